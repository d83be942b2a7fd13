"""Selfie pipeline: photo -> aligned face -> W+ -> the same face through every chosen generator ->
pasted back into the photo. Each stage is its own function so a UI can show progress between them.
Group photos: every face (largest first) is aligned, inverted and stylised on its own, then all are
pasted back into one photo.

Stylised faces are rendered from the inverted W+ with each model's own stored noise (as StyleGAN-NADA
renders its inversions); optimised noise maps, when asked for, only serve the reconstruction view."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..models.stylegan2 import Generator
from ..store import weights
from ..store.checkpoints import load_generator
from ..store.images import from_pil, to_pil
from ..store.library import default_device, load_base
from . import colour
from .align import CropAdjust, FaceError, align_face, aligned_points, detect, draw_landmarks, load_photo, paste_back
from .invert import invert_with_noise, load_e4e
from .perceptual import load_lpips


@dataclass
class AlignedFace:
    photo: Image.Image
    aligned: Image.Image
    quad: np.ndarray
    landmarks: np.ndarray          # in the aligned image's pixels
    faces_found: int
    box: tuple[int, int, int, int] | None = None   # the detector's box in the photo (left, top, right, bottom)

    def overlay(self) -> Image.Image:
        return draw_landmarks(self.aligned, self.landmarks)


@dataclass
class Inversion:
    w_plus: torch.Tensor
    noises: list[torch.Tensor] | None   # optimised noise maps (only with optimize_noise); reconstruction only
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


NO_FACE = "no face found; try a frontal, well-lit photo with the face at least 80 px wide"


def _aligned(img: Image.Image, lm: np.ndarray, box, count: int, output_size: int,
             adjust: CropAdjust | None = None) -> AlignedFace:
    aligned, quad = align_face(img, output_size=output_size, transform_size=max(output_size, 1024), lm=lm,
                               adjust=adjust)
    return AlignedFace(img, aligned, quad, aligned_points(lm, quad, output_size), count, tuple(box))


def prepare_face(photo, output_size: int = 1024, adjust: CropAdjust | None = None) -> AlignedFace:
    """Detect, align (FFHQ recipe, nudged by ``adjust``) and report how many faces were found (the largest is used)."""
    img = load_photo(photo)
    faces = detect(img)
    if not faces.count:
        raise FaceError(NO_FACE)
    return _aligned(img, faces.landmarks[0], faces.boxes[0], faces.count, output_size, adjust)


def prepare_faces(photo, output_size: int = 1024, max_faces: int = 8,
                  adjust: CropAdjust | None = None) -> list[AlignedFace]:
    """Every detected face (up to ``max_faces``, largest first), each aligned on its own (every crop nudged
    by ``adjust``); each AlignedFace shares the photo and reports the total count in ``faces_found``."""
    if max_faces < 1:
        raise ValueError("max_faces must be at least 1")
    img = load_photo(photo)
    faces = detect(img)
    if not faces.count:
        raise FaceError(NO_FACE)
    return [_aligned(img, lm, box, faces.count, output_size, adjust)
            for lm, box in list(zip(faces.landmarks, faces.boxes))[:max_faces]]


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
    lp = load_lpips(device)
    if lp is not None:
        return {"lpips": lp}, "LPIPS (VGG16)"
    # lazy: clip_guide imports all of open_clip (seconds), which invert and video need only without LPIPS
    from ..guidance.clip_guide import ClipLoadError, load_clip

    try:
        return {"clip": load_clip("ViT-B-32", device)}, "multi-scale pixels + CLIP (LPIPS/VGG16 weights not downloaded)"
    except ClipLoadError:
        return {}, "multi-scale pixels only (neither LPIPS/VGG16 nor CLIP weights are downloaded)"


def invert_face(face: AlignedFace, G: Generator, encoder=None, steps: int = 200,
                progress: Callable[[int, int, float], None] | None = None, perceptual: dict | None = None,
                optimize_noise: bool = False) -> Inversion:
    """W+ of the aligned face. ``optimize_noise`` also fits the noise maps: a closer reconstruction
    (shown as ``reconstruction``), never used for stylised renders."""
    target = from_pil(face.aligned, G.size).to(G.device)
    w, img, noises, method = invert_with_noise(target, G, encoder, steps, progress, optimize_noise=optimize_noise,
                                               **(perceptual or {}))
    return Inversion(w, noises, to_pil(img)[0], method)


def invert_faces(faces: list[AlignedFace], G: Generator, encoder=None, steps: int = 200,
                 progress: Callable[[int, int, float], None] | None = None, perceptual: dict | None = None,
                 optimize_noise: bool = False) -> list[Inversion]:
    """:func:`invert_face` for each face; ``progress(step, total, loss)`` counts over all faces."""
    out = []
    for i, face in enumerate(faces):
        report = None
        if progress:
            def report(s, n, loss, i=i):
                progress(i * n + s, len(faces) * n, loss)
        out.append(invert_face(face, G, encoder, steps, report, perceptual, optimize_noise))
    return out


def pixel_error(aligned: Image.Image, reconstruction: Image.Image) -> float:
    """How far the reconstruction is from the aligned photo: the mean absolute per-pixel difference, 0 (the
    same) to 1 (black against white), at the reconstruction's size. A crop the generator can reproduce scores
    lower, so it tells the user whether a nudged crop helped."""
    target = np.asarray(aligned.convert("RGB").resize(reconstruction.size, Image.LANCZOS), dtype=np.float64)
    return float(np.abs(target - np.asarray(reconstruction.convert("RGB"), dtype=np.float64)).mean() / 255.0)


@torch.no_grad()
def render(G: Generator, inv: Inversion) -> Image.Image:
    """The inverted face through another generator of the same latent space, with that generator's
    own stored noise: the inversion's optimised noise maps (if any) carry the photo's fine detail
    and would leak it into the style, so they are never used here."""
    w = inv.w_plus.to(G.device)
    return to_pil(G.synthesis(w, noise_mode="const"))[0]


def paste_faces(photo, faces: list[AlignedFace], stylised: list[Image.Image], feather: float = 0.06) -> Image.Image:
    """Paste every stylised face back into the photo with feathered blending (``align.paste_back`` per
    face, smallest first so a larger face stays on top where masks overlap)."""
    if len(faces) != len(stylised):
        raise ValueError(f"{len(faces)} faces but {len(stylised)} stylised images")
    out = load_photo(photo)
    for face, img in sorted(zip(faces, stylised), key=lambda fs: _quad_area(fs[0].quad)):
        out = paste_back(out, img, face.quad, feather)
    return out


def _quad_area(quad: np.ndarray) -> float:
    return float(np.hypot(*(quad[3] - quad[0])) * np.hypot(*(quad[1] - quad[0])))


def _inverter(G: Generator, base_name: str, steps: int, device, encoder: str, notes: list[str]):
    """(encoder or None, perceptual losses) for the CLI pipelines, with notes on what was chosen."""
    enc = None
    if encoder != "none":
        enc, why = encoder_for(base_name, G, device)
        if why:
            notes.append(why)
    perceptual, how = perceptual_for(device) if steps > 0 else ({}, "")
    if how:
        notes.append(f"reconstruction loss: {how}")
    return enc, perceptual


def _styles(models: list, G: Generator, device, notes: list[str]):
    """(name, generator) for each model path that fits the base's architecture."""
    for path in models:
        Gm, _ = load_generator(path, device)
        if Gm.config != G.config:
            notes.append(f"{path}: different architecture from the base; skipped")
            continue
        yield (str(path).replace("\\", "/").split("/")[-2] if "/" in str(path) else str(path)), Gm


def stylize_photo(photo, models: list, base: str = "ffhq", steps: int = 200, device: str | None = None,
                  encoder: str = "auto", progress=None, optimize_noise: bool = False,
                  keep_colours: float = 0.0, crop: CropAdjust | None = None) -> SelfieResult:
    """The whole pipeline for the CLI: ``models`` are paths of adapted generators. ``keep_colours`` in [0, 1]
    gives the stylised faces the photo's chroma by that strength (``colour.keep_colours``); ``crop`` nudges
    the alignment. The notes say the reconstruction's pixel error."""
    device = device or default_device()
    G, base_name = load_base(base, device)
    notes = []
    face = prepare_face(photo, output_size=max(256, min(G.size, 1024)), adjust=crop)
    if face.faces_found > 1:
        notes.append(f"{face.faces_found} faces found; used the largest")
    enc, perceptual = _inverter(G, base_name, steps, device, encoder, notes)
    inv = invert_face(face, G, enc, steps, progress, perceptual, optimize_noise)
    notes.append(f"reconstruction error: {pixel_error(face.aligned, inv.reconstruction):.2%} mean per-pixel difference")
    result = SelfieResult(face, inv, notes=notes)
    for name, Gm in _styles(models, G, device, notes):
        result.stylised[name] = colour.keep_colours(render(Gm, inv), face.aligned, keep_colours)
        result.pasted[name] = paste_back(face.photo, result.stylised[name], face.quad)
    return result


@dataclass
class GroupResult:
    """Every face of a group photo: aligned, inverted, stylised per model, and one pasted photo per model."""

    faces: list[AlignedFace]
    inversions: list[Inversion]
    stylised: dict[str, list[Image.Image]] = field(default_factory=dict)
    pasted: dict[str, Image.Image] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def images(self) -> dict[str, Image.Image]:
        out = {}
        for i, (face, inv) in enumerate(zip(self.faces, self.inversions), 1):
            out[f"face{i}_aligned"] = face.aligned
            out[f"face{i}_reconstruction"] = inv.reconstruction
            for name, imgs in self.stylised.items():
                out[f"face{i}_stylised_{name}"] = imgs[i - 1]
        out.update({f"pasted_{k}": v for k, v in self.pasted.items()})
        return out


def stylize_faces(faces: list[AlignedFace], inversions: list[Inversion], G_style: Generator,
                  feather: float = 0.06, keep_colours: float = 0.0) -> tuple[list[Image.Image], Image.Image]:
    """Each inverted face through ``G_style`` (with its photo's colours by ``keep_colours``), and all of them
    pasted back into the photo."""
    imgs = [colour.keep_colours(render(G_style, inv), face.aligned, keep_colours)
            for face, inv in zip(faces, inversions)]
    return imgs, paste_faces(faces[0].photo, faces, imgs, feather)


def stylize_group_photo(photo, models: list, base: str = "ffhq", steps: int = 200, device: str | None = None,
                        encoder: str = "auto", progress=None, max_faces: int = 8,
                        optimize_noise: bool = False, keep_colours: float = 0.0,
                        crop: CropAdjust | None = None) -> GroupResult:
    """:func:`stylize_photo` for every face of a photo (up to ``max_faces``, largest first)."""
    device = device or default_device()
    G, base_name = load_base(base, device)
    notes = []
    faces = prepare_faces(photo, output_size=max(256, min(G.size, 1024)), max_faces=max_faces, adjust=crop)
    if faces[0].faces_found > len(faces):
        notes.append(f"{faces[0].faces_found} faces found; stylised the {len(faces)} largest")
    enc, perceptual = _inverter(G, base_name, steps, device, encoder, notes)
    result = GroupResult(faces, invert_faces(faces, G, enc, steps, progress, perceptual, optimize_noise), notes=notes)
    errors = ", ".join(f"{pixel_error(f.aligned, i.reconstruction):.2%}" for f, i in zip(faces, result.inversions))
    notes.append(f"reconstruction error per face: {errors} mean per-pixel difference")
    for name, Gm in _styles(models, G, device, notes):
        result.stylised[name], result.pasted[name] = stylize_faces(faces, result.inversions, Gm,
                                                                   keep_colours=keep_colours)
    return result
