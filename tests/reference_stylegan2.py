"""An independent, deliberately naive transcription of the reference StyleGAN2 synthesis math.

It reads a rosinality-layout state dict and computes the image the way the reference code does
it (one modulated, demodulated weight per sample, grouped convolution, upfirdn2d by explicit tap
sums). ``nada_core.models.stylegan2`` rearranges the same math for speed; tests compare the two.
"""
import math

import torch
import torch.nn.functional as F


def kernel2d(k=(1, 3, 3, 1)):
    k = torch.tensor(k, dtype=torch.float64)
    k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn_taps(x, k, up=1, pad=(0, 0)):
    """Zero-insert, pad, then sum shifted copies weighted by the flipped kernel (true convolution)."""
    b, c, h, w = x.shape
    if up > 1:
        u = x.new_zeros(b, c, h * up, w * up)
        u[:, :, ::up, ::up] = x
        x = u
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    kf = torch.flip(k, (0, 1)).to(x.dtype)
    kh, kw = k.shape
    oh, ow = x.shape[2] - kh + 1, x.shape[3] - kw + 1
    out = x.new_zeros(b, c, oh, ow)
    for i in range(kh):
        for j in range(kw):
            out += kf[i, j] * x[:, :, i:i + oh, j:j + ow]
    return out


def lrelu(x, bias):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), 0.2) * math.sqrt(2)


def equal_linear(sd, prefix, x, lr_mul=1.0, act=False):
    w, b = sd[prefix + ".weight"], sd[prefix + ".bias"]
    y = x @ (w * lr_mul / math.sqrt(w.shape[1])).t()
    return lrelu(y, b * lr_mul) if act else y + b * lr_mul


def modconv(sd, prefix, x, style, demod=True, up=False):
    weight = sd[prefix + ".weight"]                      # (1, out, in, k, k)
    _, out_c, in_c, k, _ = weight.shape
    b = x.shape[0]
    s = equal_linear(sd, prefix + ".modulation", style).view(b, 1, in_c, 1, 1)
    wgt = weight / math.sqrt(in_c * k * k) * s           # (B, out, in, k, k)
    if demod:
        wgt = wgt * torch.rsqrt(wgt.pow(2).sum([2, 3, 4]) + 1e-8).view(b, out_c, 1, 1, 1)
    if up:
        wgt = wgt.transpose(1, 2).reshape(b * in_c, out_c, k, k)
        y = F.conv_transpose2d(x.reshape(1, b * in_c, *x.shape[2:]), wgt, stride=2, groups=b)
        y = y.view(b, out_c, *y.shape[2:])
        return upfirdn_taps(y, kernel2d() * 4, pad=(1, 1))
    y = F.conv2d(x.reshape(1, b * in_c, *x.shape[2:]), wgt.reshape(b * out_c, in_c, k, k), padding=k // 2, groups=b)
    return y.view(b, out_c, *y.shape[2:])


def styled_conv(sd, prefix, x, style, noise, up=False):
    y = modconv(sd, prefix + ".conv", x, style, up=up)
    y = y + sd[prefix + ".noise.weight"] * noise
    return lrelu(y, sd[prefix + ".activate.bias"])


def to_rgb(sd, prefix, x, style, skip):
    y = modconv(sd, prefix + ".conv", x, style, demod=False) + sd[prefix + ".bias"]
    if skip is not None:
        y = y + upfirdn_taps(skip, kernel2d() * 4, up=2, pad=(2, 1))
    return y


def reference_synthesis(sd, ws):
    """Image from W+ with the stored (const) noise buffers, in float64 for a clean reference."""
    sd = {k: v.double() for k, v in sd.items()}
    ws = ws.double()
    n_rgbs = len({k.split(".")[1] for k in sd if k.startswith("to_rgbs.")})
    noise = lambda i: sd[f"noises.noise_{i}"]
    x = sd["input.input"].repeat(ws.shape[0], 1, 1, 1)
    x = styled_conv(sd, "conv1", x, ws[:, 0], noise(0))
    skip = to_rgb(sd, "to_rgb1", x, ws[:, 1], None)
    i = 1
    for j in range(n_rgbs):
        x = styled_conv(sd, f"convs.{2 * j}", x, ws[:, i], noise(i), up=True)
        x = styled_conv(sd, f"convs.{2 * j + 1}", x, ws[:, i + 1], noise(i + 1))
        skip = to_rgb(sd, f"to_rgbs.{j}", x, ws[:, i + 2], skip)
        i += 2
    return skip


def reference_mapping(sd, z, n_mlp, lr_mul=0.01):
    z = z.double()
    x = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)
    sd = {k: v.double() for k, v in sd.items()}
    for i in range(1, n_mlp + 1):
        x = equal_linear(sd, f"style.{i}", x, lr_mul=lr_mul, act=True)
    return x
