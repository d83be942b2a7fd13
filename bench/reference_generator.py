"""The reference StyleGAN2 synthesis as the widely used rosinality code computes it with its pure-PyTorch ops
(no compiled CUDA extensions): per-sample kernels as a grouped convolution, upsampling as a grouped
stride-2 transposed convolution followed by a blur, and upfirdn2d's native fallback (zero insertion by
padding a reshaped view, then a depthwise convolution per channel).

It runs on a ``nada_core.models.stylegan2.Generator``'s own parameters (same names), so both formulations are
timed on the same weights, gradients included. Written for the benchmarks; tests use the float64
transcription in tests/reference_stylegan2.py.
"""
import math

import torch
import torch.nn.functional as F


def upfirdn2d_native(x, kernel, up=1, pad=(0, 0)):
    """Zero-insert by ``up``, pad by ``pad`` on both axes, convolve every channel with ``kernel``."""
    b, c, h, w = x.shape
    out = x.reshape(b * c, h, 1, w, 1)
    if up > 1:
        out = F.pad(out, (0, up - 1, 0, 0, 0, up - 1))
    out = out.reshape(b * c, 1, h * up, w * up)
    out = F.pad(out, (pad[0], pad[1], pad[0], pad[1]))
    kh, kw = kernel.shape
    out = F.conv2d(out, torch.flip(kernel, (0, 1)).view(1, 1, kh, kw).to(out.dtype))
    return out.view(b, c, out.shape[2], out.shape[3])


def blur_kernel(device, up_gain=1.0):
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device)
    k = k[None, :] * k[:, None]
    return k / k.sum() * up_gain


def equal_linear(p, prefix, x, lr_mul=1.0):
    w, b = p[prefix + ".weight"], p[prefix + ".bias"]
    return F.linear(x, w * (lr_mul / math.sqrt(w.shape[1])), b * lr_mul)


def modulated_conv(p, prefix, x, style, demodulate=True, upsample=False):
    weight = p[prefix + ".weight"]                                   # (1, out, in, k, k)
    _, out_c, in_c, k, _ = weight.shape
    b, _, h, w_ = x.shape
    s = equal_linear(p, prefix + ".modulation", style).view(b, 1, in_c, 1, 1)
    wgt = weight / math.sqrt(in_c * k * k) * s
    if demodulate:
        wgt = wgt * torch.rsqrt(wgt.pow(2).sum([2, 3, 4]) + 1e-8).view(b, out_c, 1, 1, 1)
    x = x.reshape(1, b * in_c, h, w_)
    if upsample:
        wgt = wgt.transpose(1, 2).reshape(b * in_c, out_c, k, k)
        y = F.conv_transpose2d(x, wgt.to(x.dtype), stride=2, groups=b)
        y = y.view(b, out_c, y.shape[2], y.shape[3])
        return upfirdn2d_native(y, blur_kernel(x.device, 4.0), pad=(1, 1))
    y = F.conv2d(x, wgt.reshape(b * out_c, in_c, k, k).to(x.dtype), padding=k // 2, groups=b)
    return y.view(b, out_c, h, w_)


def fused_leaky_relu(x, bias):
    return F.leaky_relu(x + bias.view(1, -1, 1, 1).to(x.dtype), 0.2) * math.sqrt(2)


def styled_conv(p, prefix, x, style, noise, upsample=False):
    y = modulated_conv(p, prefix + ".conv", x, style, upsample=upsample)
    y = y + p[prefix + ".noise.weight"] * noise
    return fused_leaky_relu(y, p[prefix + ".activate.bias"])


def to_rgb(p, prefix, x, style, skip):
    y = modulated_conv(p, prefix + ".conv", x, style, demodulate=False) + p[prefix + ".bias"].to(x.dtype)
    if skip is not None:
        y = y + upfirdn2d_native(skip, blur_kernel(x.device, 4.0), up=2, pad=(2, 1))
    return y


def reference_synthesis(G, ws, noises=None):
    """Image from W+ codes (B, n_latent, 512) through G's parameters; ``noises`` default to G's buffers."""
    p = dict(G.named_parameters()) | dict(G.named_buffers())
    noises = noises if noises is not None else G.noise_buffers()
    n_rgbs = len({k.split(".")[1] for k in p if k.startswith("to_rgbs.")})
    x = p["input.input"].repeat(ws.shape[0], 1, 1, 1)
    x = styled_conv(p, "conv1", x, ws[:, 0], noises[0])
    skip = to_rgb(p, "to_rgb1", x, ws[:, 1], None)
    i = 1
    for j in range(n_rgbs):
        x = styled_conv(p, f"convs.{2 * j}", x, ws[:, i], noises[i], upsample=True)
        x = styled_conv(p, f"convs.{2 * j + 1}", x, ws[:, i + 1], noises[i + 1])
        skip = to_rgb(p, f"to_rgbs.{j}", x, ws[:, i + 2], skip)
        i += 2
    return skip
