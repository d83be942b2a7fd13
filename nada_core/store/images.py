"""Conversions between generator tensors ([-1, 1], NCHW) and PIL images, and image grids."""
from __future__ import annotations

import os
import threading

import numpy as np
import torch
import torch.nn.functional as F
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


def resize_and_crop(x: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), differentiably: the short side resized to ``size`` (bicubic), then the
    centre cropped, as CLIP's preprocessing does. ``antialias`` for photos shrunk a lot (style images)."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size]


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


MAX_IMAGE_BYTES = 25 * 2 ** 20     # photos and style images
MAX_MEGAPIXELS = 50


class ImageInputError(ValueError):
    """An image a user gave that cannot be used, named by the user's own file name."""


def open_image(path, display_name: str | None = None, max_bytes: int = MAX_IMAGE_BYTES,
               max_megapixels: float = MAX_MEGAPIXELS) -> Image.Image:
    """Read an uploaded image safely: size and pixel count checked before decoding, EXIF orientation
    applied, transparency flattened on white, and 16/32-bit or float images scaled (not clipped) to 8 bits."""
    from PIL import ImageOps, UnidentifiedImageError

    name = display_name or str(path).replace("\\", "/").rsplit("/", 1)[-1]
    try:
        n_bytes = os.path.getsize(path)
    except OSError:
        raise ImageInputError(f"{name}: the file could not be read") from None
    if n_bytes > max_bytes:
        raise ImageInputError(f"{name}: file too large ({n_bytes / 2 ** 20:.0f} MB); the limit is {max_bytes >> 20} MB")
    try:
        img = Image.open(path)
        w, h = img.size
        if w * h > max_megapixels * 1e6:
            raise ImageInputError(f"{name}: image too large ({w} x {h}); the limit is {max_megapixels:g} megapixels")
        img.load()
    except Image.DecompressionBombError:
        w, h = _declared_size(path)
        raise ImageInputError(f"{name}: image too large ({w} x {h}); the limit is {max_megapixels:g} megapixels") from None
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as e:
        if isinstance(e, ImageInputError):
            raise
        raise ImageInputError(f"{name}: could not read the image ({type(e).__name__}); upload a JPEG or PNG") from None
    return to_rgb8(ImageOps.exif_transpose(img))


_BOMB_LOCK = threading.Lock()


def _declared_size(path) -> tuple[int, int]:
    """Width and height from the header of an image PIL refused as a decompression bomb (nothing is decoded)."""
    with _BOMB_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path) as im:
                return im.size
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. High bit depths are rescaled to their range instead of clipped at 255
    (a 16-bit greyscale photo would otherwise turn almost white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            top = 65535.0
        elif img.mode == "F" and a.size and np.nanmax(a) <= 1.0:
            top = 1.0
        else:
            peak = float(np.nanmax(a)) if a.size else 0.0
            top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        a = np.clip(np.nan_to_num(a) * (255.0 / top), 0, 255).round().astype(np.uint8)
        img = Image.fromarray(a, "L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")
