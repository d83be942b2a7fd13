"""Selfie pipeline: photo -> aligned face -> W+ -> the same face through every chosen generator ->
pasted back into the photo. Each stage is its own function so a UI can show progress between them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import weights
from .align import align_face, aligned_points, detect, draw_landmarks, load_photo, paste_back, FaceError
from .images import from_pil, to_pil
from .invert import invert_with_noise, load_e4e
from .stylegan2 import Generator


@dataclass
class AlignedFace:
    photo: Image.Image
    aligned: Image.Image
    quad: np.ndarray
    landmarks: np.ndarray          # in the aligned image's pixels
    faces_found: int

    def overlay(self) -> Image.Image:
        return draw_landmarks(self.aligned, self.landmarks)


@dataclass
class Inversion:
    w_plus: torch.Tensor
    noises: list[torch.Tensor] | None
    reconstruction: Image.Image
    method: str


@dataclass
class SelfieResult:
    face: AlignedFace
    inversion: Inversion
    stylised: dict[str, Image.Image] = field(default_factory=dict)
    pasted: dict[str, Image.Image] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def images(self) -> dict[str, Image.Image]:
        out = {"aligned": self.face.aligned, "landmarks": self.face.overlay(), "reconstruction": self.inversion.reconstruction}
        out.update({f"stylised_{k}": v for k, v in self.stylised.items()})
        out.update({f"pasted_{k}": v for k, v in self.pasted.items()})
        return out


def prepare_face(photo, output_size: int = 1024) -> AlignedFace:
    """Detect, align (FFHQ recipe) and report how many faces were found (the largest is used)."""
    img = load_photo(photo)
    faces = detect(img)
    if not faces.count:
        raise FaceError("no face found; try a frontal, well-lit photo with the face at least 80 px wide")
    aligned, quad = align_face(img, output_size=output_size, transform_size=max(output_size, 1024), lm=faces.landmarks[0])
    return AlignedFace(img, aligned, quad, aligned_points(faces.landmarks[0], quad, output_size), faces.count)


def encoder_for(base_name: str, G: Generator, device="cpu"):
    """The e4e encoder when it fits this base (FFHQ 1024 latent space) and is downloaded, else None and why."""
    if G.n_latent != 18 or base_name not in ("ffhq-1024", "ffhq"):
        return None, "the e4e encoder only fits the FFHQ 1024 generator; using optimisation"
    asset = weights.get_asset("e4e-ffhq")
    if not asset.present:
        return None, f"e4e encoder not downloaded ({asset.how_to_get()}); using optimisation"
    return load_e4e(asset.path, device), None


def perceptual_for(device="cpu") -> tuple[dict, str]:
    """The best reconstruction loss available offline: LPIPS, else CLIP embeddings + pixels, else pixels."""
    from .clip_guide import ClipLoadError, load_clip
    from .perceptual import load_lpips

    lp = load_lpips(device)
    if lp is not None:
        return {"lpips": lp}, "LPIPS (VGG16)"
    try:
        return {"clip": load_clip("ViT-B-32", device)}, "multi-scale pixels + CLIP (LPIPS/VGG16 weights not downloaded)"
    except ClipLoadError:
        return {}, "multi-scale pixels only (neither LPIPS/VGG16 nor CLIP weights are downloaded)"


def invert_face(face: AlignedFace, G: Generator, encoder=None, steps: int = 200,
                progress: Callable[[int, int, float], None] | None = None, perceptual: dict | None = None) -> Inversion:
    target = from_pil(face.aligned, G.size).to(G.input.input.device)
    w, img, noises, method = invert_with_noise(target, G, encoder, steps, progress, **(perceptual or {}))
    return Inversion(w, noises, to_pil(img)[0], method)


@torch.no_grad()
def render(G: Generator, inv: Inversion) -> Image.Image:
    """The inverted face through another generator of the same latent space."""
    w = inv.w_plus.to(G.input.input.device)
    img = G.synthesis(w, noises=inv.noises) if inv.noises is not None else G.synthesis(w)
    return to_pil(img)[0]


def stylize_photo(photo, models: list, base: str = "ffhq", steps: int = 200, device: str | None = None,
                  encoder: str = "auto", progress=None) -> SelfieResult:
    """The whole pipeline for the CLI: ``models`` are paths of adapted generators."""
    from .checkpoints import load_generator
    from .library import default_device, load_base

    device = device or default_device()
    G, base_name = load_base(base, device)
    notes = []
    face = prepare_face(photo, output_size=max(256, min(G.size, 1024)))
    if face.faces_found > 1:
        notes.append(f"{face.faces_found} faces found; used the largest")
    enc = None
    if encoder != "none":
        enc, why = encoder_for(base_name, G, device)
        if why:
            notes.append(why)
    perceptual, how = perceptual_for(device) if steps > 0 else ({}, "")
    if how:
        notes.append(f"reconstruction loss: {how}")
    inv = invert_face(face, G, enc, steps, progress, perceptual)
    result = SelfieResult(face, inv, notes=notes)
    for path in models:
        Gm, info = load_generator(path, device)
        if Gm.config != G.config:
            notes.append(f"{path}: different architecture from the base; skipped")
            continue
        name = str(path).replace("\\", "/").split("/")[-2] if "/" in str(path) else str(path)
        result.stylised[name] = render(Gm, inv)
        result.pasted[name] = paste_back(face.photo, result.stylised[name], face.quad)
    return result
