"""StyleGAN2 generator in plain PyTorch (no compiled ops): runs on CUDA, MPS and CPU.

Parameter and buffer names and shapes follow the widely used rosinality layout, so the
``g_ema`` state dict of ``stylegan2-ffhq-config-f.pt`` and of every StyleGAN-NADA output
loads with ``strict=True``. The arithmetic is the reference arithmetic, rearranged for speed:

* Modulated convolution builds one weight per sample (grouped conv, as the reference) and folds
  the activation gain and bias into it, so a layer touches its large output only twice. For CPU
  inference a shared kernel in channels-last memory is faster still; CPU training picks per layer
  (see ``Formulation``, chosen with the ``formulation(...)`` context manager).
* The stride-2 transposed convolution runs as four dense per-phase convolutions (same FLOPs,
  several times faster than NCHW conv_transpose2d) written into the blur's padded buffer; the CPU
  paths, in channels-last memory, use oneDNN's transposed convolution, faster still there.
* Blur/upsampling (upfirdn2d) is a zero-insertion, a pad and a depthwise convolution.

W+ slot use (GUIDE.md section 2), with ``L = n_latent``::

    slot 0                -> conv1
    slot 1                -> to_rgb1, convs[0]
    slot i (odd, i >= 3)  -> convs[i-1], to_rgbs[(i-3)//2]
    slot i (even, i >= 2) -> convs[i-1]
    slot L-1              -> to_rgbs[-1] only
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BLUR_KERNEL = (1, 3, 3, 1)
NOISE_MODES = ("const", "random", "none")
@dataclasses.dataclass(frozen=True)
class Formulation:
    """How the modulated convolutions are computed: every choice is exact (tests compare each with the reference
    math, gradients included); they differ in speed by device (bench/generator.py --compare times them).

    cpu_channels_last: CPU inference shares one kernel across the batch in channels-last memory, which oneDNN
        runs much faster (under autograd its broadcasting multiplies made forward+backward slower).
    cpu_training_layout: CPU training (autograd, or inference with ``grouped``) picks per layer whichever of two
        formulations moves less data: one shared kernel with the style scaling the activations where the
        per-sample kernels outweigh the feature maps (by ``scale_ratio``), else per-sample kernels as one grouped
        convolution in channels-last memory. False: the grouped NCHW formulation of the other devices.
    device: CUDA's choice: "scaled" (one kernel, the style scales the activations) or "grouped" (per-sample
        kernels as one grouped convolution, the reference code's). MPS runs "grouped".
    """

    cpu_channels_last: bool = True
    cpu_training_layout: bool = True
    scale_ratio: float = 1.0
    device: str = "scaled"


BLOCK_DIAG_MAX_BATCH = 4   # ToRGB as one matrix product with block-diagonal kernels up to this batch, else bmm
# the formulation in force: changed only by ``formulation(...)`` (benchmarks and tests compare them). A plain
# value that torch.compile guards on; the per-thread ``grouped_kernels`` choice lives apart, in ``_path``.
_current = [Formulation()]
_path = threading.local()


def current_formulation() -> Formulation:
    return _current[0]


@contextlib.contextmanager
def formulation(**changes):
    """Compute with a changed formulation inside the block (``with formulation(device="grouped"): ...``)."""
    previous = _current[0]
    _current[0] = dataclasses.replace(previous, **changes)
    try:
        yield _current[0]
    finally:
        _current[0] = previous


def _cpu_training_layout(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the CPU training formulation: float32 and bfloat16 (oneDNN's types) on CPU. Other
    types keep the grouped NCHW one: PyTorch's float64 CPU convolution computed wrong weight gradients for the
    (1, B*C, H, W) channels-last views this formulation hands on (torch 2.14)."""
    return current_formulation().cpu_training_layout and x.device.type == "cpu" and \
        x.dtype in (torch.float32, torch.bfloat16)


@contextlib.contextmanager
def grouped_kernels():
    """Make no-grad forwards in this thread use the training formulation (on CPU the training layout, elsewhere
    the grouped per-sample kernels) instead of the CPU inference one, e.g. so that a frozen generator's no-grad
    forward rounds exactly like the trained generator's forward it is compared with."""
    previous = getattr(_path, "grouped", False)
    _path.grouped = True
    try:
        yield
    finally:
        _path.grouped = previous


def channel_table(channel_multiplier: int = 2, channel_max: int = 512) -> dict[int, int]:
    """Feature maps per resolution; ``channel_max`` < 512 builds the tiny test models."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier,
            128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
            512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {res: min(ch, channel_max) for res, ch in base.items()}


def make_kernel(k: Sequence[float]) -> torch.Tensor:
    """Separable FIR kernel normalised to sum 1 (outer product of a 1-D kernel)."""
    k = torch.tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad both axes by ``pad``, then convolve with ``kernel`` per channel."""
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(kernel, (0, 1)).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, groups=c)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, slope: float = 0.2, gain: float = math.sqrt(2)) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), slope) * gain


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weights stored at N(0,1)/lr_mul, scaled at run time."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class Blur(nn.Module):
    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor ** 2)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling of the RGB skip path."""

    def __init__(self, kernel: Sequence[float], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor ** 2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel.shape[0]
        if _cpu_training_layout(x) and self.pad[0] - self.pad[1] == self.factor - 1 < k:
            # the same filter as oneDNN's transposed convolution of each channel (zero insertion + convolution,
            # cropped by k - 1 - pad): faster on CPU than the depthwise convolution, backward included
            b, c, h, w = x.shape
            y = F.conv_transpose2d(x.reshape(b * c, 1, h, w), self.kernel.to(x.dtype)[None, None], stride=self.factor,
                                   padding=k - 1 - self.pad[0])
            return y.view(b, c, *y.shape[2:])
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


def _dense_channels_last(t: torch.Tensor) -> torch.Tensor:
    """A (1, C, H, W) channels-last view whose batch stride is arbitrary (as views of (B, C/B, H, W) maps get)
    restrided as a plain channels-last tensor, so that oneDNN recognises the layout instead of copying it.
    Only for use where autograd does not record (the backward of an autograd.Function)."""
    if t.ndim == 4 and t.shape[0] == 1 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        _, c, _, w = t.shape
        return t.as_strided(t.shape, (t.numel(), 1, w * c, c))
    return t


class _DepthwiseConv(torch.autograd.Function):
    """``F.conv2d(x, kernel, bias, padding, groups=channels)`` with a constant kernel, whose backward runs as
    a forward depthwise convolution with the flipped kernel (oneDNN's depthwise backward with a bias is
    far slower on CPU) and a sum for the bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
        ctx.save_for_backward(kernel)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv2d(x, kernel, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (kernel,) = ctx.saved_tensors
        grad_x = grad_bias = None
        grad = _dense_channels_last(grad)
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, kernel.flip((2, 3)), padding=kernel.shape[-1] - 1 - ctx.padding, groups=grad.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, None, grad_bias, None


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution (StyleGAN2 Fig. 2c), optionally with 2x transposed-conv upsampling.

    ``gain`` and ``bias`` let the caller fold the activation's gain and bias into the convolution
    (``conv(x, w) * g + b == conv(x, w * g) + b``), saving full-size passes over the feature maps.
    """

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)

    def sample_weights(self, style: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """One modulated (and demodulated) kernel per sample: (B, out, in, k, k)."""
        s = self.modulation(style)
        w = self.weight * (self.scale * gain) * s[:, None, :, None, None]
        if self.demodulate:
            w = w * torch.rsqrt(w.pow(2).sum((2, 3, 4), keepdim=True) / gain ** 2 + 1e-8)
        return w

    def forward(self, x: torch.Tensor, style: torch.Tensor, gain: float = 1.0,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        how = current_formulation()
        if x.device.type == "cuda" and how.device == "scaled":
            return self._forward_scaled(x, style, gain, bias)
        if x.device.type == "cpu" and how.cpu_channels_last:
            if not torch.is_grad_enabled() and not getattr(_path, "grouped", False):
                return self._forward_shared_kernel(x, style, gain, bias)
            if _cpu_training_layout(x) and (not self.upsample or self.blur.pad[0] == self.blur.pad[1]):
                if self.scales_activations(x.shape[2] * x.shape[3]):
                    return self._forward_scaled(x, style, gain, bias)
                return self._forward_per_sample_cl(x, style, gain, bias)
        b, c, h, w_ = x.shape
        w = self.sample_weights(style, gain).to(x.dtype)
        k = self.kernel_size
        x = x.reshape(1, b * c, h, w_)
        if not self.upsample:
            bb = None if bias is None else bias.to(x.dtype).repeat(b)
            out = F.conv2d(x, w.reshape(b * self.out_channel, c, k, k), bb, padding=self.padding, groups=b)
            return out.view(b, self.out_channel, h, w_)
        out = self._upsample_conv(x, w, b).view(b, self.out_channel, 2 * h, 2 * w_)
        return out if bias is None else out.add_(bias.to(x.dtype).view(1, -1, 1, 1))

    # ------------------------------------------------------------ CPU training (autograd) paths
    def scales_activations(self, pixels: int) -> bool:
        """CPU training: scale the activations (one kernel for the batch) where the per-sample kernels hold more
        numbers than the feature maps they read and write (``pixels`` per input map), else per-sample kernels."""
        k2 = self.kernel_size ** 2
        out_pixels = pixels * (4 if self.upsample else 1)
        ratio = current_formulation().scale_ratio
        return self.out_channel * self.in_channel * k2 >= ratio * (self.in_channel * pixels + self.out_channel * out_pixels)

    def _styles(self, style: torch.Tensor, gain: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, d): the modulation (B, in) and the factor per output channel (B, out) that turn the stored
        kernel into the sample's: ``w_b = weight * s_b[None, :] * d_b[:, None]``, where d holds the fan-in
        scale, the gain and the demodulation ``rsqrt(sum((scale * w * s)^2) + 1e-8)`` computed from s and the
        squared kernel's (out, in) sums (no per-sample kernel needed)."""
        s = self.modulation(style)
        if self.demodulate:
            w2 = self.weight.squeeze(0).pow(2).sum((2, 3))
            d = torch.rsqrt(F.linear(s * s, w2) * self.scale ** 2 + 1e-8) * (self.scale * gain)
        else:
            d = s.new_full((s.shape[0], self.out_channel), self.scale * gain)
        return s, d

    def _forward_scaled(self, x: torch.Tensor, style: torch.Tensor, gain: float,
                        bias: torch.Tensor | None) -> torch.Tensor:
        """One kernel shared by the batch, NCHW: ``conv(x * s, w) * d + bias``."""
        s, d = self._styles(style, gain)
        x = x * s.to(x.dtype)[:, :, None, None]
        w = self.weight.squeeze(0).to(x.dtype)
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, w.transpose(0, 1), stride=2))
        else:
            out = F.conv2d(x, w, padding=self.padding)
        d = d.to(out.dtype)[:, :, None, None]
        if bias is None:
            return out * d
        return torch.addcmul(bias.to(out.dtype).view(1, -1, 1, 1), out, d)

    def _forward_per_sample_cl(self, x: torch.Tensor, style: torch.Tensor, gain: float,
                               bias: torch.Tensor | None) -> torch.Tensor:
        """Per-sample kernels as one grouped convolution over the batch folded into the channels, in
        channels-last memory (``(1, B*C, H, W)``; the layers hand it on as a (B, C, H, W) view). The stride-2
        transposed convolution is oneDNN's, the blur a depthwise convolution carrying the bias."""
        b, c, h, w_ = x.shape
        o, k = self.out_channel, self.kernel_size
        s, d = self._styles(style, gain)
        wgt = (self.weight * (d[:, :, None] * s[:, None, :])[..., None, None]).to(x.dtype)   # (B, out, in, k, k)
        cl = torch.channels_last
        xg = x.reshape(1, b * c, h, w_).contiguous(memory_format=cl)
        bb = None if bias is None else bias.to(x.dtype).repeat(b)
        if k == 1 and not self.upsample:
            # a 1x1 convolution (ToRGB) is a matrix product over the pixels: (H*W, B*C) @ (B*C, B*O) with the
            # per-sample kernels on the diagonal blocks, in place of a grouped convolution (which converts layouts)
            x2 = xg.permute(0, 2, 3, 1).reshape(h * w_, b * c)
            if b <= BLOCK_DIAG_MAX_BATCH:
                out = F.linear(x2, torch.block_diag(*wgt.reshape(b, o, c)), bb)
                return out.view(h, w_, b, o).permute(2, 3, 0, 1)
            xb = x2.view(h * w_, b, c).transpose(0, 1)
            out = torch.bmm(xb, wgt.reshape(b, o, c).transpose(1, 2))
            if bb is not None:
                out = out + bb.view(b, 1, o)
            return out.view(b, h, w_, o).permute(0, 3, 1, 2)
        if not self.upsample:
            out = F.conv2d(xg, wgt.reshape(b * o, c, k, k).contiguous(memory_format=cl), bb, padding=self.padding, groups=b)
            return out.view(b, o, h, w_)
        y = F.conv_transpose2d(xg, wgt.transpose(1, 2).reshape(b * c, o, k, k).contiguous(memory_format=cl), stride=2,
                               groups=b)
        kernel = torch.flip(self.blur.kernel, (0, 1)).to(y.dtype)[None, None].expand(b * o, 1, *self.blur.kernel.shape)
        out = _DepthwiseConv.apply(y, kernel, bb, self.blur.pad[0])
        return out.view(b, o, 2 * h, 2 * w_)

    def _forward_shared_kernel(self, x: torch.Tensor, style: torch.Tensor, gain: float,
                               bias: torch.Tensor | None) -> torch.Tensor:
        """One kernel shared by the batch, in channels-last memory: the style scales the input channels and
        the demodulation the output channels (convolution is linear: conv(x*s, w)*d == conv(x, w*s*d))."""
        cl = torch.channels_last
        inplace = not torch.is_grad_enabled()  # (always true on the dispatch path; kept for direct callers)
        s = self.modulation(style)
        base = self.weight[0] * self.scale
        x = (x * s.to(x.dtype)[:, :, None, None]).contiguous(memory_format=cl)
        w = (base * gain).to(x.dtype)
        if self.upsample:
            out = F.conv_transpose2d(x, w.transpose(0, 1).contiguous(memory_format=cl), stride=2)
        else:
            out = F.conv2d(x, w.contiguous(memory_format=cl), padding=self.padding)
        if self.demodulate:
            d = torch.rsqrt(F.linear(s * s, base.pow(2).sum((2, 3))) + 1e-8).to(out.dtype)[:, :, None, None]
            out = out.mul_(d) if inplace else out * d
        if self.upsample:
            out = self.blur(out)
        if bias is not None:
            b = bias.to(out.dtype).view(1, -1, 1, 1)
            out = out.add_(b) if inplace else out + b
        return out

    def _upsample_conv(self, x: torch.Tensor, w: torch.Tensor, b: int) -> torch.Tensor:
        """Transposed stride-2 convolution, then blur, as four dense per-phase convolutions.

        ``out[2i+p] = sum_t x[i-t] * w[p+2t]``: each output phase (p, q) is an ordinary convolution
        with the sub-kernel ``w[p::2, q::2]`` (flipped), so the FLOPs equal the transposed conv's while
        running on the much faster dense conv2d path. The phases are written straight into the
        blur's zero-padded buffer, so no separate padding pass is needed.
        """
        _, bc, h, w_ = x.shape
        k, out_c = self.kernel_size, self.out_channel
        pad0, pad1 = self.blur.pad
        full = 2 * h + k - 2  # transposed-conv output size (2h+1 for k=3)
        n = full + pad0 + pad1
        buf = x.new_empty(1, b * out_c, n, n)  # the phases cover every inner pixel: zero the border only
        for border in (buf[..., :pad0, :], buf[..., n - pad1:, :], buf[..., :, :pad0], buf[..., :, n - pad1:]):
            border.zero_()
        for p in range(2):
            for q in range(2):
                sub = w[:, :, :, p::2, q::2].flip((3, 4))
                tp, tq = sub.shape[3], sub.shape[4]
                y = F.conv2d(x, sub.reshape(b * out_c, bc // b, tp, tq), padding=(tp - 1, tq - 1), groups=b)
                buf[:, :, pad0 + p: pad0 + p + 2 * y.shape[2]: 2, pad0 + q: pad0 + q + 2 * y.shape[3]: 2] = y
        return upfirdn2d(buf, self.blur.kernel)


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None, gain: float = 1.0) -> torch.Tensor:
        if noise is None:
            return x
        # x is a fresh convolution output: at inference add in place (allocating another full-size map costs
        # more than the add); under autograd out of place, which measured faster in the backward pass
        n = noise * (self.weight * gain)
        return x.add_(n) if not torch.is_grad_enabled() else x + n


class StyledConv(nn.Module):
    """Modulated conv + noise + bias + leaky ReLU (gain sqrt 2). The gain is folded into the weights,
    bias and noise strength (leaky ReLU is positively homogeneous), so each layer makes two passes
    over its output instead of six."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim,
                                    upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        g = math.sqrt(2)
        out = self.conv(x, style, gain=g, bias=self.activate.bias * g)
        out = self.noise(out, noise, gain=g)
        if noise is None and torch.is_grad_enabled():  # out may be a view of the convolution's output: an
            return F.leaky_relu(out, 0.2)               # in-place op on it would make autograd copy it back
        return F.leaky_relu_(out, 0.2)  # in place: autograd keeps the result it needs


class ToRGB(nn.Module):
    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True, blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style, bias=self.bias.view(3))
        if skip is None:
            return out
        # out may be a view (CPU training path): in place under autograd would make autograd copy it back
        return out.add_(self.upsample(skip)) if not torch.is_grad_enabled() else out + self.upsample(skip)


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class Generator(nn.Module):
    """Mapping network z -> w and synthesis network W+ -> image in [-1, 1]."""

    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                 channel_max: int = 512, lr_mlp: float = 0.01, blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        log_size = int(math.log2(size))
        if 2 ** log_size != size or not 8 <= size <= 1024:
            raise ValueError(f"generator size must be a power of two in 8..1024, got {size}")
        self.size, self.style_dim, self.n_mlp = size, style_dim, n_mlp
        self.channel_multiplier, self.channel_max = channel_multiplier, channel_max
        self.log_size = log_size
        self.n_latent = log_size * 2 - 2
        self.num_layers = (log_size - 2) * 2 + 1
        self.channels = channel_table(channel_multiplier, channel_max)

        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True) for _ in range(n_mlp)])
        ch = self.channels[4]
        self.input = ConstantInput(ch)
        self.conv1 = StyledConv(ch, ch, 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(ch, style_dim, upsample=False)
        self.convs, self.upsamples, self.to_rgbs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, res, res))
        in_ch = ch
        for log_res in range(3, log_size + 1):
            out_ch = self.channels[2 ** log_res]
            self.convs.append(StyledConv(in_ch, out_ch, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_ch, out_ch, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_ch, style_dim, blur_kernel=blur_kernel))
            in_ch = out_ch
        # the truncation centre a checkpoint was saved with (NVIDIA's tracked ``mapping.w_avg``, a
        # ``latent_avg``), shape (1, style_dim); None means "compute it". Non-persistent, so state dicts keep
        # the reference layout, while ``.to()`` and deepcopy carry it along with the weights.
        self.register_buffer("stored_w_avg", None, persistent=False)

    # ----------------------------------------------------------------- config
    @property
    def config(self) -> dict:
        """Constructor arguments: enough to rebuild an identical, empty generator."""
        return {"size": self.size, "style_dim": self.style_dim, "n_mlp": self.n_mlp,
                "channel_multiplier": self.channel_multiplier, "channel_max": self.channel_max}

    # ---------------------------------------------------------------- latents
    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, style_dim) -> w (B, style_dim)."""
        return self.style(z)

    @torch.no_grad()
    def mean_latent(self, n: int = 4096, seed: int = 0) -> torch.Tensor:
        """Average w of ``n`` seeded samples (the truncation centre), shape (1, style_dim)."""
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.style_dim, generator=gen).to(self.device)
        return self.mapping(z).mean(0, keepdim=True)

    @property
    def device(self) -> torch.device:
        """Where the generator's weights are (the constant input is always there)."""
        return self.input.input.device

    def w_avg(self) -> torch.Tensor:
        """The truncation centre: the one stored with the weights when there is one (what NVIDIA's tools
        truncate towards), else ``mean_latent(4096)``, computed once and reused until the mapping changes."""
        if self.stored_w_avg is not None:
            return self.stored_w_avg
        key = (self.device, tuple(p._version for p in self.style.parameters()))
        cached = self.__dict__.get("_w_avg_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.mean_latent(4096))
            self.__dict__["_w_avg_cache"] = cached
        return cached[1]

    def to_w_plus(self, w: torch.Tensor) -> torch.Tensor:
        """Broadcast w (B, D) to W+ (B, n_latent, D); W+ passes through unchanged."""
        return w if w.ndim == 3 else w.unsqueeze(1).repeat(1, self.n_latent, 1)

    def mix(self, w_a: torch.Tensor, w_b: torch.Tensor, crossover: int) -> torch.Tensor:
        """Style mixing: slots < crossover come from ``w_a``, the rest from ``w_b``."""
        a, b = self.to_w_plus(w_a), self.to_w_plus(w_b)
        keep = (torch.arange(self.n_latent, device=a.device) < crossover).view(1, -1, 1)
        return torch.where(keep, a, b)

    @staticmethod
    def truncate(w: torch.Tensor, w_avg: torch.Tensor, psi: float) -> torch.Tensor:
        return w if psi == 1.0 else w_avg + psi * (w - w_avg)

    # -------------------------------------------------------------- slot map
    def slot_consumers(self) -> dict[int, list[str]]:
        """W+ slot -> names of the modules that read it (see module docstring). The one definition of the
        slot map: layer freezing (``freezing.layers_for_slots``) and the tests derive theirs from it."""
        table: dict[int, list[str]] = {s: [] for s in range(self.n_latent)}
        table[0].append("conv1")
        table[1].append("to_rgb1")
        for i in range(len(self.convs)):
            table[i + 1].append(f"convs.{i}")
        for j in range(len(self.to_rgbs)):
            table[2 * j + 3].append(f"to_rgbs.{j}")
        return table

    # ------------------------------------------------------------- synthesis
    def _noise(self, index: int, batch: int, mode: str, like: torch.Tensor) -> torch.Tensor | None:
        if mode == "none":
            return None
        buf = getattr(self.noises, f"noise_{index}")
        if mode == "const":
            return buf.to(like.dtype)
        return torch.randn(batch, 1, *buf.shape[2:], device=like.device, dtype=like.dtype)

    def random_noises(self, batch: int, device: str | torch.device | None = None,
                      dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Fresh per-layer noise maps, drawn in the order and shapes ``noise_mode="random"`` draws them (the same
        numbers for the same RNG state); pass them as ``synthesis(noises=...)`` to keep the draws out of a
        compiled graph."""
        device = self.device if device is None else device
        return [torch.randn(batch, 1, *buf.shape[2:], device=device, dtype=dtype) for buf in self.noise_buffers()]

    def noise_buffers(self) -> list[torch.Tensor]:
        """The stored per-layer noise maps, in layer order (what noise_mode='const' uses)."""
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def synthesis(self, ws: torch.Tensor, noise_mode: str = "const", noises: list[torch.Tensor] | None = None,
                  max_resolution: int | None = None) -> torch.Tensor:
        """W+ (B, n_latent, D) or w (B, D) -> image (B, 3, size, size), roughly in [-1, 1].
        ``noises`` (one map per layer) overrides ``noise_mode``; the projector optimises them.
        ``max_resolution`` stops early and returns the RGB skip image at that size: a cheap, faithful
        low-resolution preview (the skip architecture builds the image coarse to fine)."""
        if noises is not None:
            return self._synthesis(self.to_w_plus(ws), lambda i, b, x: noises[i].to(x.dtype), max_resolution)
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        return self._synthesis(self.to_w_plus(ws), lambda i, b, x: self._noise(i, b, noise_mode, x), max_resolution)

    def _synthesis(self, ws: torch.Tensor, noise, max_resolution: int | None = None) -> torch.Tensor:
        if ws.shape[1] != self.n_latent:
            raise ValueError(f"expected {self.n_latent} W+ slots, got {ws.shape[1]}")
        b = ws.shape[0]
        x = self.input(b)
        x = self.conv1(x, ws[:, 0], noise(0, b, x))
        skip = self.to_rgb1(x, ws[:, 1])
        i = 1
        for j, to_rgb in enumerate(self.to_rgbs):
            x = self.convs[2 * j](x, ws[:, i], noise(i, b, x))
            x = self.convs[2 * j + 1](x, ws[:, i + 1], noise(i + 1, b, x))
            skip = to_rgb(x, ws[:, i + 2], skip)
            i += 2
            if max_resolution is not None and skip.shape[-1] >= max_resolution:
                break
        return skip

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, noise_mode: str = "const",
                truncation_latent: torch.Tensor | None = None) -> torch.Tensor:
        """Sample images from z (B, D): mapping, optional truncation, synthesis."""
        w = self.mapping(z)
        if truncation_psi != 1.0:
            w = self.truncate(w, truncation_latent if truncation_latent is not None else self.w_avg(), truncation_psi)
        return self.synthesis(w, noise_mode=noise_mode)


def seeds_to_z(seeds: Sequence[int], dim: int = 512, device: str | torch.device = "cpu") -> torch.Tensor:
    """One reproducible z per integer seed, independent of device and batch composition."""
    return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)
