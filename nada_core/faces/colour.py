"""Keep the photo's colours: a stylised face with its own light and shade but the photo's chroma.

Styles often recolour skin, hair and background (a sketch turns grey, a Pixar face orange). Working in YCbCr
(BT.601, as JPEG), the stylised image keeps its luma Y -- where the style's drawing lives -- and its chroma
(Cb, Cr) moves towards the photo's, pixel by pixel: the stylised face is rendered from the photo's inversion, so
it lies on the aligned photo. Where the photo's chroma at the stylised luma falls outside the RGB cube, the
chroma is shortened just enough to fit, so the luma is never changed by clipping.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from ..store.images import from_pil, to_pil

KR, KB = 0.299, 0.114            # BT.601 luma weights (KG = 1 - KR - KB)


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> Y in [0, 1], Cb and Cr in [-0.5, 0.5] (channel order Y, Cb, Cr)."""
    r, g, b = rgb.unbind(-3)
    y = KR * r + (1 - KR - KB) * g + KB * b
    return torch.stack([y, (b - y) / (2 * (1 - KB)), (r - y) / (2 * (1 - KR))], dim=-3)


def ycbcr_to_rgb(ycc: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_ycbcr` (no clipping)."""
    y, cb, cr = ycc.unbind(-3)
    r = y + 2 * (1 - KR) * cr
    b = y + 2 * (1 - KB) * cb
    g = (y - KR * r - KB * b) / (1 - KR - KB)
    return torch.stack([r, g, b], dim=-3)


def _fit_chroma(y: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """``rgb`` (of luma ``y``) moved towards the grey of the same luma just far enough to lie in [0, 1]: the
    largest t <= 1 with y + t * (rgb - y) inside the cube. Y is linear and Y(rgb - y) = 0, so Y stays y."""
    y = y.unsqueeze(-3)
    d = rgb - y
    inf = torch.full_like(d, float("inf"))
    up = torch.where(d > 0, (1 - y) / d.clamp(min=1e-12), inf)
    down = torch.where(d < 0, y / (-d).clamp(min=1e-12), inf)
    t = torch.minimum(up, down).amin(dim=-3, keepdim=True).clamp(0, 1)
    return (y + t * d).clamp(0, 1)   # the clamp only catches float rounding


def keep_colours_tensor(stylised: torch.Tensor, photo: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] (``photo`` (1 or B, 3, h, w), resized to the stylised size) -> the
    stylised images with their chroma blended towards the photo's by ``strength`` (0 returns them unchanged,
    1 gives the photo's chroma wherever it fits), with the luma of the images clamped to [-1, 1] as shown."""
    _check(strength)
    if strength == 0:
        return stylised.clone()
    x = (stylised.float().clamp(-1, 1) + 1) / 2
    p = (photo.float().to(x.device).clamp(-1, 1) + 1) / 2
    if p.shape[-2:] != x.shape[-2:]:
        p = F.interpolate(p, size=x.shape[-2:], mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    ycc, ycc_photo = rgb_to_ycbcr(x), rgb_to_ycbcr(p)
    chroma = torch.lerp(ycc[..., 1:, :, :], ycc_photo[..., 1:, :, :].expand_as(ycc[..., 1:, :, :]), strength)
    y = ycc[..., 0, :, :]
    rgb = _fit_chroma(y, ycbcr_to_rgb(torch.cat([y.unsqueeze(-3), chroma], dim=-3)))
    return (rgb * 2 - 1).to(stylised.dtype)


def keep_colours(stylised: Image.Image | torch.Tensor, photo: Image.Image | torch.Tensor,
                 strength: float = 1.0) -> Image.Image | torch.Tensor:
    """The stylised face (PIL image, or a [-1, 1] tensor as generators give) with the aligned photo's colours by
    ``strength`` in [0, 1]; returns the type it was given. ``photo`` is the aligned face it was inverted from
    (``AlignedFace.aligned``), any size."""
    _check(strength)
    photo = photo if isinstance(photo, torch.Tensor) else from_pil(photo)
    if isinstance(stylised, torch.Tensor):
        return keep_colours_tensor(stylised, photo, strength)
    if strength == 0:
        return stylised.copy()
    return to_pil(keep_colours_tensor(from_pil(stylised), photo, strength))[0]


def _check(strength: float) -> None:
    if not 0 <= strength <= 1:
        raise ValueError(f"colour strength must be between 0 and 1, got {strength}")
