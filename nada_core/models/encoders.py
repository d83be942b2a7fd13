"""Image networks onto W+ and the IR-SE backbone they share with ArcFace.

One IR-SE network (Deng et al.'s "improved residual" units with squeeze-excitation) serves three files:
ArcFace's identity net (``model_ir_se50.pth``), e4e (``e4e_ffhq_encode.pt``) and pSp (``psp_celebs_*.pt``).
Each keeps the official parameter names (``input_layer``, ``body.N``, and e4e/pSp's ``styles.K``,
``latlayer1``/``latlayer2``) on the network itself, so official state dicts load with ``strict=True``.

* :class:`IRSE`: input layer + the bottleneck units of ``stages`` (IR-SE-50 by default).
* :class:`FeaturePyramid`: IR-SE + e4e/pSp's pyramid: the last stage (16 px at a 256 px input), and
  two merged levels (32 and 64 px) from the 2nd and 3rd stages.
* :class:`E4EEncoder` (one base code plus per-slot offsets), :class:`GradualStyleEncoder` (pSp: each slot
  on its own) and :class:`PSPEncoder` (pSp's encoder half with its ``latent_avg``).

Slots 0-2 read the coarse level, 3-6 the middle one and 7+ the fine one (e4e's and pSp's split).
Smaller ``stages`` and ``style_dim`` give the tiny untrained stand-ins of ``models.tiny``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .stylegan2 import EqualLinear

IR_SE_50 = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))   # (in channels, depth, units) per stage
INPUT_SIZE = 256                 # e4e and pSp read 256x256 inputs
COARSE_END, MIDDLE_END = 3, 7    # e4e/pSp: slots below 3 read the 16 px level, below 7 the 32 px, the rest 64 px


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BottleneckIRSE(nn.Module):
    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth), SEModule(depth, 16))

    def forward(self, x):
        return self.shortcut_layer(x) + self.res_layer(x)


def ir_se_units(stages=IR_SE_50) -> list[BottleneckIRSE]:
    """The units of each stage: the first halves the resolution, the others keep it."""
    units = []
    for in_c, depth, n in stages:
        units.append(BottleneckIRSE(in_c, depth, 2))
        units += [BottleneckIRSE(depth, depth, 1) for _ in range(n - 1)]
    return units


def upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The feature-pyramid merge of e4e's and pSp's encoders: bilinear (align_corners) up to y's size, plus y."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


def pyramid_level(slot: int) -> int:
    """0 (coarse), 1 (middle) or 2 (fine): which pyramid level a W+ slot reads."""
    return 0 if slot < COARSE_END else 1 if slot < MIDDLE_END else 2


class GradualStyleBlock(nn.Module):
    """Strided convs down to 1x1, then an equalised linear layer: one W offset."""

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        for _ in range(int(math.log2(spatial)) - 1):
            layers += [nn.Conv2d(out_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_c, out_c)
        self.out_c = out_c

    def forward(self, x):
        return self.linear(self.convs(x).view(-1, self.out_c))


class IRSE(nn.Module):
    """IR-SE trunk: ``input_layer`` (3x3 conv, BN, PReLU) then ``body`` (the units of ``stages``)."""

    def __init__(self, input_nc: int = 3, stages=IR_SE_50):
        super().__init__()
        width = stages[0][0]
        self.input_layer = nn.Sequential(nn.Conv2d(input_nc, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                         nn.PReLU(width))
        self.body = nn.Sequential(*ir_se_units(stages))
        self.stage_ends = [sum(n for _, _, n in stages[:k + 1]) - 1 for k in range(len(stages))]

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each stage's last unit."""
        x, out = self.input_layer(x), []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self.stage_ends:
                out.append(x)
        return out


class FeaturePyramid(IRSE):
    """IR-SE + e4e/pSp's pyramid; ``levels(x)`` = [c3 (last stage), p2 = c3 up + latlayer1(c2),
    p1 = p2 up + latlayer2(c1)] at 16, 32 and 64 px for a 256 px input."""

    def __init__(self, input_nc: int = 3, stages=IR_SE_50):
        super().__init__(input_nc, stages)
        top = stages[-1][1]
        self.latlayer1 = nn.Conv2d(stages[2][1], top, 1)
        self.latlayer2 = nn.Conv2d(stages[1][1], top, 1)

    def style_blocks(self, n_styles: int, style_dim: int) -> nn.ModuleList:
        top = self.latlayer1.out_channels
        return nn.ModuleList(GradualStyleBlock(top, style_dim, (INPUT_SIZE // 16) << pyramid_level(i))
                             for i in range(n_styles))

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        _, c1, c2, c3 = self.stage_outputs(x)
        p2 = upsample_add(c3, self.latlayer1(c2))
        return [c3, p2, upsample_add(p2, self.latlayer2(c1))]


class E4EEncoder(FeaturePyramid):
    """Image (B, 3, 256, 256) in [-1, 1] -> W+ (B, n_styles, style_dim) = latent_avg + the code of slot 0
    + each later slot's offset (e4e's single base code)."""

    def __init__(self, n_styles: int = 18, style_dim: int = 512, stages=IR_SE_50):
        super().__init__(3, stages)
        self.styles = self.style_blocks(n_styles, style_dim)
        self.n_styles = n_styles
        self.register_buffer("latent_avg", torch.zeros(n_styles, style_dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.levels(x)
        w = self.styles[0](levels[0]).unsqueeze(1).repeat(1, self.n_styles, 1)
        for i in range(1, self.n_styles):
            w[:, i] = w[:, i] + self.styles[i](levels[pyramid_level(i)])
        return w + self.latent_avg.to(w)


class GradualStyleEncoder(FeaturePyramid):
    """pSp's encoder: image (B, input_nc, 256, 256) -> codes (B, n_styles, style_dim), without latent_avg."""

    def __init__(self, n_styles: int = 18, input_nc: int = 3, style_dim: int = 512, stages=IR_SE_50):
        super().__init__(input_nc, stages)
        self.styles = self.style_blocks(n_styles, style_dim)
        self.n_styles, self.input_nc = n_styles, input_nc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.levels(x)
        return torch.stack([style(levels[pyramid_level(i)]) for i, style in enumerate(self.styles)], dim=1)


def latent_avg_slots(avg: torch.Tensor, n_styles: int) -> torch.Tensor:
    """pSp's latent_avg as (n_styles, D): stored either per slot or as one w (repeated, as pSp does)."""
    avg = avg.detach().float().reshape(-1, avg.shape[-1])
    if avg.shape[0] == 1:
        return avg.expand(n_styles, -1).clone()
    if avg.shape[0] != n_styles:
        raise ValueError(f"latent_avg has {avg.shape[0]} slots, the encoder predicts {n_styles}")
    return avg.clone()


class PSPEncoder(nn.Module):
    """A pSp model's encoder half: input -> W+ (B, n_styles, style_dim), ``latent_avg`` added when the model
    was trained with ``start_from_latent_avg``. ``task`` is "sketch", "segmentation" or "image" (from
    ``label_nc``: 1, >1, 0); ``opts`` are the checkpoint's training options."""

    def __init__(self, n_styles: int = 18, input_nc: int = 3, label_nc: int | None = None,
                 latent_avg: torch.Tensor | None = None, opts: dict | None = None, style_dim: int = 512,
                 stages=IR_SE_50):
        super().__init__()
        self.encoder = GradualStyleEncoder(n_styles, input_nc, style_dim, stages)
        self.label_nc = (0 if input_nc == 3 else input_nc) if label_nc is None else int(label_nc)
        self.task = "image" if self.label_nc == 0 else "sketch" if self.label_nc == 1 else "segmentation"
        self.opts = dict(opts or {})
        self.register_buffer("latent_avg", None if latent_avg is None else
                             latent_avg_slots(latent_avg, n_styles), persistent=False)

    @property
    def n_styles(self) -> int:
        return self.encoder.n_styles

    @property
    def input_nc(self) -> int:
        return self.encoder.input_nc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.encoder(x)
        return codes if self.latent_avg is None else codes + self.latent_avg.to(codes)
