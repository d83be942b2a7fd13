"""LPIPS perceptual distance (Zhang et al. 2018) on VGG16, for the inversion projector.

VGG16's ImageNet weights come from torchvision's URL (weights manifest 'vgg16'); LPIPS's trained
per-channel weights ship inside the ``lpips`` pip package (read by path, the package is not imported).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..store import weights

SHIFT = (-0.030, -0.088, -0.188)   # LPIPS input scaling, for images in [-1, 1]
SCALE = (0.458, 0.448, 0.450)
CUTS = (4, 9, 16, 23, 30)          # vgg16.features ends of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw( sum_c w_lc (f̂_l(x) - f̂_l(y))^2 ), f̂ unit-normalised over channels."""

    def __init__(self):
        super().__init__()
        import torchvision

        self.features = torchvision.models.vgg16(weights=None).features[:CUTS[-1]]
        for i, c in enumerate(CHANNELS):
            self.register_buffer(f"lin{i}", torch.ones(1, c, 1, 1))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        x = (x - self.shift) / self.scale
        for end in CUTS:
            x = self.features[start:end](x)
            out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            start = end
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distances (B,), for images in [-1, 1]."""
        total = 0.0
        for i, (a, b) in enumerate(zip(self._layers(x), self._layers(y))):
            total = total + ((a - b).pow(2) * getattr(self, f"lin{i}")).sum(1).mean((1, 2))
        return total

    def load_weights(self, vgg_state: dict, lin_state: dict) -> "LPIPS":
        feats = {k[len("features."):]: v for k, v in vgg_state.items() if k.startswith("features.")}
        self.features.load_state_dict({k: v for k, v in feats.items() if int(k.split(".")[0]) < CUTS[-1]}, strict=True)
        for i in range(len(CHANNELS)):
            getattr(self, f"lin{i}").copy_(lin_state[f"lin{i}.model.1.weight"])
        return self


def load_lpips(device="cpu") -> LPIPS | None:
    """LPIPS with its real weights, or None when either file is missing (callers fall back)."""
    vgg, lin = weights.get_asset("vgg16"), weights.get_asset("lpips-vgg-lin")
    if not (vgg.present and lin.present):
        return None
    model = LPIPS().load_weights(torch.load(vgg.path, map_location="cpu", weights_only=True),
                                 torch.load(lin.path, map_location="cpu", weights_only=True))
    return model.to(device)


def lpips_loss(model: LPIPS, img: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS at 256 px (as the StyleGAN2 projector does for larger images)."""
    if img.shape[-1] > 256:
        img, target = F.interpolate(img, size=256, mode="area"), F.interpolate(target, size=256, mode="area")
    return model(img, target).mean()
