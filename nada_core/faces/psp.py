"""pSp conditional synthesis (pixel2style2pixel, Richardson et al. 2021): a drawn sketch or a face
segmentation map -> W+ of the FFHQ 1024 generator. StyleGAN-NADA's image-to-image section feeds these
codes to an adapted generator, so one drawing becomes a face in every domain.

The encoder is pSp's ``GradualStyleEncoder`` (``models.encoders``): the IR-SE-50 backbone shared with e4e, a
feature pyramid (``latlayer1``/``latlayer2``), and one map-to-style block per W+ slot reading the coarse
(16 px, slots 0-2), middle (32 px, slots 3-6) or fine (64 px, slots 7+) features. Unlike e4e, every slot is
predicted on its own (no shared base code). Official checkpoints (``psp_celebs_sketch_to_face.pt``,
``psp_celebs_seg_to_face.pt``) are ``{"state_dict": {"encoder.*", "decoder.*"}, "latent_avg", "opts"}``;
``opts`` is the training ``argparse`` namespace saved as a dict. Their inputs (pSp's
``SketchToImageTransforms`` / ``SegToImageTransforms`` and its datasets' ``convert('L')``):

* sketch (``label_nc`` 1, ``input_nc`` 1): greyscale, resized to 256x256 (PIL bilinear), scaled to [0, 1],
  *not* normalised; dark lines on a white background, as pSp's training sketches;
* segmentation (``label_nc`` = ``input_nc`` = 19): a CelebAMask-HQ label map (0 background .. 18 cloth),
  resized to 256x256 as an 8-bit image (PIL bilinear, as pSp does: boundaries get in-between labels, as in
  its training data), then one-hot over 19 channels.

W+ = encoder(x) + latent_avg when the checkpoint's opts say ``start_from_latent_avg`` (pSp's README trains
both tasks with that flag; its trainer stores ``latent_avg`` only then), else encoder(x).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..models.encoders import INPUT_SIZE, GradualStyleEncoder, PSPEncoder, latent_avg_slots

__all__ = ["SEG_CLASSES", "SEG_COLORS", "GradualStyleEncoder", "PSPEncoder", "encoder_from_checkpoint", "load_psp",
           "labels_from_colors", "segmentation_input", "segmentation_to_w", "sketch_input", "sketch_to_w"]

# CelebAMask-HQ labels in the order of its g_mask.py (index = label value), with pSp's display colours
# (utils/common.py get_colors).
SEG_CLASSES = ("background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
               "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
SEG_COLORS = ((0, 0, 0), (204, 0, 0), (76, 153, 0), (204, 204, 0), (51, 51, 255), (204, 0, 204), (0, 255, 255),
              (255, 204, 204), (102, 51, 0), (255, 0, 0), (102, 204, 0), (255, 255, 0), (0, 0, 153), (0, 0, 204),
              (255, 51, 153), (0, 204, 204), (0, 51, 0), (255, 153, 51), (0, 204, 0))


def _read(path: str | Path) -> dict:
    """torch.load with weights_only (nothing in the file runs); an argparse Namespace (opts of some pSp-style
    files) is allowed as a plain attribute bag."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a pSp checkpoint (a dict with state_dict, latent_avg, opts expected)")
    return ckpt


def load_psp(path: str | Path, device: str | torch.device = "cpu") -> PSPEncoder:
    """The encoder of a pSp checkpoint file (the official layout, or a bare state dict with ``encoder.*``
    keys), read with ``torch.load(weights_only=True)``; see ``encoder_from_checkpoint``."""
    return encoder_from_checkpoint(_read(path), device, name=str(path))


def encoder_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu", name: str = "checkpoint") -> PSPEncoder:
    """Build the encoder from a loaded pSp checkpoint dict. ``input_nc`` and the number of W+ slots come from
    the weights; ``label_nc``, ``encoder_type`` and ``start_from_latent_avg`` from ``opts`` (a dict, or an
    argparse Namespace). Without that opt, ``latent_avg`` is added when the file has one: pSp's trainer
    saves it only for models trained with ``start_from_latent_avg``."""
    sd = ckpt.get("state_dict", ckpt)
    enc_sd = {k[len("encoder."):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith("encoder.")}
    avg = ckpt.get("latent_avg")
    avg = avg if isinstance(avg, torch.Tensor) else None
    opts = ckpt.get("opts")
    opts = vars(opts) if isinstance(opts, argparse.Namespace) else opts if isinstance(opts, dict) else {}
    if not enc_sd or not all(isinstance(v, torch.Tensor) for v in enc_sd.values()):
        raise ValueError(f"{name}: no encoder.* weights; not a pSp checkpoint")
    kind = opts.get("encoder_type", "GradualStyleEncoder")
    if kind != "GradualStyleEncoder":
        raise ValueError(f"{name}: encoder_type {kind!r} is not supported (only pSp's GradualStyleEncoder)")
    styles = {int(k.split(".")[1]) for k in enc_sd if k.startswith("styles.") and k.split(".")[1].isdigit()}
    if "input_layer.0.weight" not in enc_sd or not styles:
        raise ValueError(f"{name}: encoder.input_layer / encoder.styles weights missing; not a GradualStyleEncoder")
    input_nc = int(enc_sd["input_layer.0.weight"].shape[1])
    start = opts.get("start_from_latent_avg")
    if start and avg is None:
        raise ValueError(f"{name}: opts say start_from_latent_avg but the file has no latent_avg")
    if start is not None and not start:
        avg = None  # trained without it: pSp adds nothing
    n_styles = 1 + max(styles)
    with torch.device("meta"):  # no random init and no second copy: the file's tensors become the weights
        enc = PSPEncoder(n_styles, input_nc, opts.get("label_nc"), None, opts)
    enc.encoder.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in enc_sd.items()},
                                strict=True, assign=True)
    if avg is not None:
        enc.latent_avg = latent_avg_slots(avg, n_styles)
    return enc.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------ inputs
def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            im.load()
            return im.copy()
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    if isinstance(image, Image.Image):
        return image
    raise TypeError(f"expected a PIL image, a numpy array or a path, got {type(image).__name__}")


def sketch_input(image: Any) -> torch.Tensor:
    """A sketch (PIL image, uint8 array, or path; dark lines on white) -> (1, 1, 256, 256) in [0, 1], as
    pSp's sketch transform: greyscale, PIL bilinear resize to 256, ToTensor, no normalisation. Transparent
    pixels (a drawing canvas) count as white paper. A tensor (H, W), (1, H, W) or (B, 1, H, W) already in
    [0, 1] is only resized."""
    if isinstance(image, torch.Tensor):
        x = image.float().reshape(-1, 1, *image.shape[-2:])
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x.clamp(0, 1)
    img = _as_pil(image)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        paper = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, img)
    img = img.convert("L")
    if img.size != (INPUT_SIZE, INPUT_SIZE):
        img = img.resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]


def labels_from_colors(image: Any) -> np.ndarray:
    """An RGB picture painted with pSp's CelebAMask-HQ colours (``SEG_COLORS``) -> (H, W) labels, each pixel
    taking the nearest colour's class."""
    rgb = np.asarray(_as_pil(image).convert("RGB"), dtype=np.int32)
    best = np.full(rgb.shape[:2], np.iinfo(np.int32).max, dtype=np.int32)
    labels = np.zeros(rgb.shape[:2], dtype=np.uint8)
    for i, color in enumerate(SEG_COLORS):
        dist = ((rgb - np.asarray(color, dtype=np.int32)) ** 2).sum(-1)
        closer = dist < best
        best[closer], labels[closer] = dist[closer], i
    return labels


def _label_array(label_map: Any) -> np.ndarray:
    if isinstance(label_map, torch.Tensor):
        label_map = label_map.detach().cpu().numpy()
    if isinstance(label_map, np.ndarray):
        arr = np.squeeze(label_map)
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            if arr.dtype != np.uint8 or not (arr[..., 0] == arr[..., 1]).all() or not (arr[..., 1] == arr[..., 2]).all():
                return labels_from_colors(arr[..., :3].astype(np.uint8))
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise ValueError(f"a label map is (H, W); got shape {tuple(np.shape(label_map))}")
        if not np.issubdtype(arr.dtype, np.integer):
            if not np.all(arr == np.round(arr)):
                raise ValueError("a label map holds whole class numbers")
        return arr.astype(np.int64)
    img = _as_pil(label_map)
    if img.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
        return np.asarray(img).astype(np.int64)  # P: the palette indices are the labels
    rgb = np.asarray(img.convert("RGB"))
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0].astype(np.int64)  # a label map saved as grey RGB
    return labels_from_colors(rgb)


def segmentation_input(label_map: Any, n_classes: int = 19, resample: str = "bilinear") -> torch.Tensor:
    """A label map -> one-hot (1, n_classes, 256, 256) float, as pSp's segmentation transform: the labels,
    as an 8-bit image, are resized to 256 with PIL ``resample`` ("bilinear" is pSp's and its training data's;
    "nearest" keeps only labels that were drawn), then one-hot encoded.

    Accepted: an (H, W) integer array or tensor, a greyscale / palette ("P": indices are labels) image or
    path, or an RGB picture in pSp's colours (``SEG_COLORS``, mapped by nearest colour)."""
    if resample not in ("bilinear", "nearest"):
        raise ValueError(f"resample is 'bilinear' (pSp's) or 'nearest', not {resample!r}")
    labels = _label_array(label_map)
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1} (CelebAMask-HQ classes); found "
                         f"{int(labels.min())}..{int(labels.max())}")
    if labels.shape != (INPUT_SIZE, INPUT_SIZE):
        mode = Image.BILINEAR if resample == "bilinear" else Image.NEAREST
        labels = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((INPUT_SIZE, INPUT_SIZE), mode),
                            dtype=np.int64)
    one_hot = torch.from_numpy(labels)[None] == torch.arange(n_classes)[:, None, None]
    return one_hot.float()[None]


# ------------------------------------------------------------------ W+
def _device_of(encoder: nn.Module) -> torch.device:
    return next(encoder.parameters()).device


def sketch_to_w(image: Any, encoder: PSPEncoder) -> torch.Tensor:
    """A sketch -> W+ (1, n_styles, 512) with a sketch pSp model (``load_psp`` of psp_celebs_sketch_to_face)."""
    if encoder.input_nc != 1:
        raise ValueError(f"this pSp model takes {encoder.input_nc} input channels; a sketch model takes 1")
    with torch.no_grad():
        return encoder(sketch_input(image).to(_device_of(encoder)))


def segmentation_to_w(label_map: Any, encoder: PSPEncoder, resample: str = "bilinear") -> torch.Tensor:
    """A CelebAMask-HQ label map -> W+ (1, n_styles, 512) with a segmentation pSp model (psp_celebs_seg_to_face)."""
    if encoder.input_nc < 2:
        raise ValueError(f"this pSp model takes {encoder.input_nc} input channel(s); a segmentation model takes "
                         "one per class")
    with torch.no_grad():
        return encoder(segmentation_input(label_map, encoder.input_nc, resample).to(_device_of(encoder)))
