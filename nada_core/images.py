"""Conversions between generator tensors ([-1, 1], NCHW) and PIL images, and image grids."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> list of RGB PIL images."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]


def from_pil(img: Image.Image, size: int | None = None) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized (Lanczos) to ``size`` when given."""
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
    a = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return (a / 127.5 - 1).unsqueeze(0)


def grid(rows: list[list[Image.Image]], pad: int = 4, tile: int | None = None) -> Image.Image:
    """Rows of images -> one image; all tiles resized to ``tile`` (default: first image's width)."""
    tile = tile or rows[0][0].width
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (cols * tile + (cols - 1) * pad, len(rows) * tile + (len(rows) - 1) * pad), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            out.paste(im.resize((tile, tile), Image.LANCZOS) if im.size != (tile, tile) else im,
                      (j * (tile + pad), i * (tile + pad)))
    return out
