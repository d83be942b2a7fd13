"""A generator as a standalone ONNX (or TorchScript) file, to run a style without this project.

The exported graph is a frozen snapshot of the generator: equalised-learning-rate scales are folded into
the weights and the stored noise maps are baked in as constants (``noise_mode="const"``), so the same W+
gives the same image as ``G.synthesis(ws)``. Every convolution keeps one static kernel shared by the
batch -- the style scales the activations and the demodulation the outputs
(``conv(x * s, w) * d == conv(x, w * s * d)``) -- so the batch size is a free dimension of the file
instead of being folded into per-sample kernels.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .stylegan2 import EqualLinear, Generator, ModulatedConv2d, StyledConv, ToRGB

FORMATS = ("onnx", "torchscript")
OPSET = 18


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy: the export never moves or changes the caller's generator."""
    return t.detach().to("cpu", torch.float32).clone()


def _linear(layer: EqualLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) with the equalised-lr factors applied."""
    return _copy(layer.weight) * layer.scale, _copy(layer.bias) * layer.lr_mul


class _Conv(nn.Module):
    """One modulated convolution (optionally with noise, bias and activation, as ``StyledConv``) in the
    shared-kernel form, with its parameters copied as buffers."""

    def __init__(self, conv: ModulatedConv2d, noise: torch.Tensor | None, noise_weight: torch.Tensor | None,
                 bias: torch.Tensor | None, activate: bool):
        super().__init__()
        w = _copy(conv.weight[0]) * conv.scale                            # (out, in, k, k)
        mod_w, mod_b = _linear(conv.modulation)
        self.register_buffer("mod_w", mod_w)
        self.register_buffer("mod_b", mod_b)
        self.upsample, self.demodulate, self.padding, self.activate = conv.upsample, conv.demodulate, conv.padding, activate
        self.register_buffer("weight", w.transpose(0, 1).contiguous() if conv.upsample else w)
        self.register_buffer("w2", w.pow(2).sum((2, 3)))                      # demodulation from s alone
        if conv.upsample:
            c, k = w.shape[0], conv.blur.kernel.shape[0]
            self.register_buffer("blur", torch.flip(_copy(conv.blur.kernel), (0, 1))[None, None].expand(c, 1, k, k).clone())
            self.blur_pad = conv.blur.pad
        self.register_buffer("noise", None if noise is None else _copy(noise) * _copy(noise_weight))
        self.register_buffer("bias", None if bias is None else _copy(bias).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        s = F.linear(style, self.mod_w, self.mod_b)
        x = x * s[:, :, None, None]
        if self.upsample:
            out = F.conv_transpose2d(x, self.weight, stride=2)
            p0, p1 = self.blur_pad
            out = F.conv2d(F.pad(out, (p0, p1, p0, p1)), self.blur, groups=out.shape[1])
        else:
            out = F.conv2d(x, self.weight, padding=self.padding)
        if self.demodulate:
            out = out * torch.rsqrt(F.linear(s * s, self.w2) + 1e-8)[:, :, None, None]
        if self.noise is not None:
            out = out + self.noise
        if self.bias is not None:
            out = out + self.bias
        return F.leaky_relu(out, 0.2) * math.sqrt(2) if self.activate else out


def _styled(layer: StyledConv, noise: torch.Tensor) -> _Conv:
    return _Conv(layer.conv, noise, layer.noise.weight, layer.activate.bias, activate=True)


def _to_rgb(layer: ToRGB) -> _Conv:
    return _Conv(layer.conv, None, None, layer.bias, activate=False)


class Synthesis(nn.Module):
    """W+ (B, n_latent, style_dim) -> image (B, 3, size, size) in about [-1, 1], with the generator's stored
    noise. With ``mapping``: z (B, style_dim) and a truncation psi (1,) -> image, truncating towards
    ``G.w_avg()`` as ``G(z, psi)`` does."""

    def __init__(self, G: Generator, mapping: bool = False):
        super().__init__()
        noises = G.noise_buffers()
        self.register_buffer("const", _copy(G.input.input))
        self.conv1 = _styled(G.conv1, noises[0])
        self.to_rgb1 = _to_rgb(G.to_rgb1)
        self.convs = nn.ModuleList(_styled(c, noises[i + 1]) for i, c in enumerate(G.convs))
        self.to_rgbs = nn.ModuleList(_to_rgb(t) for t in G.to_rgbs)
        up = G.to_rgbs[0].upsample
        k = up.kernel.shape[0]
        if up.pad[0] - up.pad[1] != up.factor - 1:
            raise ValueError("this blur kernel's upsampling is not a transposed convolution")
        # the skip path's 2x FIR upsampling as one depthwise transposed convolution (3 RGB channels)
        self.register_buffer("up_kernel", _copy(up.kernel)[None, None].expand(3, 1, k, k).clone())
        self.up_padding = k - 1 - up.pad[0]
        self.n_latent, self.mapping = G.n_latent, mapping
        if mapping:
            self.n_mlp = len(G.style) - 1      # after the PixelNorm
            for i, layer in enumerate(G.style[1:]):
                w, b = _linear(layer)
                self.register_buffer(f"map_w{i}", w)
                self.register_buffer(f"map_b{i}", b)
            self.register_buffer("w_avg", _copy(G.w_avg()).view(1, -1))

    def _map(self, z: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        x = z * torch.rsqrt(torch.mean(z * z, dim=1, keepdim=True) + 1e-8)
        for i in range(self.n_mlp):
            x = F.leaky_relu(F.linear(x, getattr(self, f"map_w{i}"), getattr(self, f"map_b{i}")), 0.2) * math.sqrt(2)
        w = self.w_avg + psi * (x - self.w_avg)
        return w[:, None, :].expand(-1, self.n_latent, -1)

    def forward(self, ws: torch.Tensor, psi: torch.Tensor | None = None) -> torch.Tensor:
        if self.mapping:
            ws = self._map(ws, psi)
        x = self.const.expand(ws.shape[0], -1, -1, -1)
        x = self.conv1(x, ws[:, 0])
        skip = self.to_rgb1(x, ws[:, 1])
        for j, to_rgb in enumerate(self.to_rgbs):
            x = self.convs[2 * j](x, ws[:, 2 * j + 1])
            x = self.convs[2 * j + 1](x, ws[:, 2 * j + 2])
            up = F.conv_transpose2d(skip, self.up_kernel, stride=2, padding=self.up_padding, groups=3)
            skip = to_rgb(x, ws[:, 2 * j + 3]) + up
        return skip


def example_inputs(G: Generator, mapping: bool = False, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of the exported graph: (ws,) or, with ``mapping``, (z, psi) (psi = 0.7)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, G.style_dim, generator=gen)
    if mapping:
        return z, torch.tensor([0.7])
    with torch.no_grad():
        return (G.to_w_plus(G.mapping(z.to(G.input.input))).float().cpu(),)   # G's device and dtype


def input_names(mapping: bool) -> list[str]:
    return ["z", "truncation"] if mapping else ["ws"]


def export_onnx(G: Generator, path: str | Path, *, mapping: bool = False) -> Path:
    """Write ``G`` as ONNX (one self-contained file, float32): input ``ws`` (B, n_latent, style_dim) or, with
    ``mapping``, ``z`` (B, style_dim) and ``truncation`` (1,); output ``image`` (B, 3, size, size) in about
    [-1, 1]; B is free. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = Synthesis(G, mapping).eval()
    args = example_inputs(G, mapping)
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = {"ws": {0: batch}, "psi": None} if mapping else {"ws": {0: batch}}
    with torch.no_grad():
        program = torch.onnx.export(model, args, dynamo=True, input_names=input_names(mapping),
                                    output_names=["image"], dynamic_shapes=dynamic, opset_version=OPSET,
                                    optimize=True, verbose=False)
    program.save(str(path), external_data=False)
    return path


def export_torchscript(G: Generator, path: str | Path, *, mapping: bool = False) -> Path:
    """The same graph as :func:`export_onnx`, traced to TorchScript (``torch.jit.load(path)(ws)``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = Synthesis(G, mapping).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch 2.14 marks torch.jit as deprecated; it still works
        traced = torch.jit.trace(model, example_inputs(G, mapping))
    traced.save(str(path))
    return path


def export(G: Generator, path: str | Path, fmt: str = "onnx", *, mapping: bool = False) -> Path:
    """:func:`export_onnx` or :func:`export_torchscript` by name (``FORMATS``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return (export_onnx if fmt == "onnx" else export_torchscript)(G, path, mapping=mapping)


def onnx_difference(G: Generator, path: str | Path, *, mapping: bool = False, batch: int = 2, seed: int = 0) -> float:
    """Max |ONNX Runtime - PyTorch| over one batch of the file at ``path`` (needs ``onnxruntime``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    args = example_inputs(G, mapping, batch, seed)
    out = session.run(None, {name: a.numpy() for name, a in zip(input_names(mapping), args)})[0]
    with torch.no_grad():
        x = args[0].to(G.input.input)
        ref = G(x, float(args[1])) if mapping else G.synthesis(x)
    return float((torch.from_numpy(out) - ref.float().cpu()).abs().max())
