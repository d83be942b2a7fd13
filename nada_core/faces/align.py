"""Face detection, 68 landmarks (dlib) and FFHQ alignment, plus pasting a stylised face back.

Alignment follows the recipe NVIDIA used to build FFHQ (and e4e / StyleGAN-NADA use for inversion):
an oriented square from the eyes and mouth, shrink, crop, reflect-pad with blur, then a QUAD
transform. The quad is returned in the coordinates of the input photo so the result can be
warped back into it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from ..store import weights
from ..store.images import ImageInputError, open_image, to_rgb8

DETECT_MAX_SIDE = 1280      # larger photos are downscaled for detection only
MIN_FACE_PX = 40
MIN_SCORE = 0.25            # weaker detections are ignored when a confident one exists


class FaceError(ValueError):
    """No usable face; the message tells the user what to try."""


@dataclass
class Faces:
    landmarks: list[np.ndarray]     # one (68, 2) float array per face, largest first
    boxes: list[tuple[int, int, int, int]]

    @property
    def count(self) -> int:
        return len(self.landmarks)


@lru_cache(maxsize=1)
def _models():
    import dlib

    path = weights.require("dlib-landmarks")
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path))


def load_photo(photo, display_name: str | None = None) -> Image.Image:
    """Any upload (path, PIL, numpy) -> RGB PIL with EXIF orientation applied; RGBA, greyscale and
    16-bit photos are converted (see images.open_image for the size limits)."""
    if isinstance(photo, np.ndarray):
        if photo.dtype != np.uint8:
            peak = float(photo.max()) if photo.size else 0.0
            photo = np.clip(photo * (255.0 / (peak if peak > 255 else 255.0)), 0, 255).astype(np.uint8)
        return to_rgb8(Image.fromarray(photo))
    if isinstance(photo, Image.Image):
        return to_rgb8(ImageOps.exif_transpose(photo))
    try:
        return open_image(photo, display_name)
    except ImageInputError as e:
        raise FaceError(str(e)) from None


def detect(img: Image.Image) -> Faces:
    """All faces with 68 landmarks each, largest first. Detection runs on a downscaled copy of huge
    photos (and an upsampled pyramid level for small ones); landmarks on the full-resolution photo."""
    detector, _ = _models()
    arr = np.asarray(img)
    scale = min(1.0, DETECT_MAX_SIDE / max(img.size))
    small = np.asarray(img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)) if scale < 1 else arr
    upsample = 1 if max(small.shape[:2]) <= 1024 else 0
    rects, scores, _ = detector.run(small, upsample, 0.0)
    found = [(r, s) for r, s in zip(rects, scores)]
    if any(s >= MIN_SCORE for _, s in found):
        found = [(r, s) for r, s in found if s >= MIN_SCORE]
    boxes = [tuple(int(round(v / scale)) for v in (r.left(), r.top(), r.right(), r.bottom())) for r, _ in found]
    boxes.sort(key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
    return Faces([landmarks_in_box(arr, b) for b in boxes], boxes)


def landmarks_in_box(arr: np.ndarray, box) -> np.ndarray:
    """(68, 2) landmarks the shape predictor finds in ``box`` (left, top, right, bottom) of an RGB array: a
    millisecond, against tens for the detector, so video tracks faces with it between detections."""
    import dlib

    _, predictor = _models()
    shape = predictor(arr, dlib.rectangle(*(int(round(v)) for v in box)))
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def landmarks(img, all_faces: bool = False):
    """(68, 2) landmarks of the largest face, or a list for every face with ``all_faces``."""
    faces = detect(load_photo(img))
    if not faces.count:
        raise FaceError(f"no face found; try a frontal, well-lit photo with the face at least {MIN_FACE_PX * 2} px wide")
    return faces.landmarks if all_faces else faces.landmarks[0]


@dataclass(frozen=True)
class CropAdjust:
    """A nudge of the FFHQ crop square, for faces the recipe frames badly (a tilted head, a wide chin):
    ``scale`` multiplies the side about the square's centre, ``shift_x`` / ``shift_y`` move it along its own
    axes (right / down in the aligned image) by fractions of the side, ``rotate`` turns it by degrees
    (clockwise on the photo as seen). The default is no nudge: exactly the FFHQ crop."""

    scale: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    rotate: float = 0.0

    # bounds, so that an adjustment from a client still frames the face it was detected for
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "scale": (0.6, 1.6), "shift_x": (-0.3, 0.3), "shift_y": (-0.3, 0.3), "rotate": (-45.0, 45.0)}
    LABELS: ClassVar[dict[str, str]] = {"scale": "crop scale", "shift_x": "crop shift x", "shift_y": "crop shift y",
                                        "rotate": "crop rotation (degrees)"}

    def __post_init__(self):
        for name, (lo, hi) in self.RANGES.items():
            value = getattr(self, name)
            try:
                x = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{self.LABELS[name]} must be a number between {lo:g} and {hi:g}") from None
            if not math.isfinite(x) or not lo <= x <= hi:
                raise ValueError(f"{self.LABELS[name]} must be between {lo:g} and {hi:g} (got {str(value)[:30]})")
            object.__setattr__(self, name, x)

    @property
    def is_default(self) -> bool:
        return (self.scale, self.shift_x, self.shift_y, self.rotate) == (1.0, 0.0, 0.0, 0.0)

    def apply(self, quad: np.ndarray) -> np.ndarray:
        """``quad`` (4, 2) scaled, shifted and turned about its centre; the default returns it untouched."""
        if self.is_default:
            return quad
        centre = quad.mean(0)
        side = np.hypot(*(quad[3] - quad[0]))
        ux, uy = (quad[3] - quad[0]) / side, (quad[1] - quad[0]) / side
        moved = centre + (self.shift_x * ux + self.shift_y * uy) * side
        a = math.radians(self.rotate)
        turn = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])  # y points down: clockwise as seen
        return moved + ((quad - centre) * self.scale) @ turn.T

    @classmethod
    def parse_shift(cls, text: str) -> tuple[float, float]:
        """'DX,DY' (fractions of the crop's side) as the CLI's --crop-shift gives it."""
        parts = str(text).split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            return float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"crop shift must be DX,DY, two numbers such as 0.02,-0.03 (got {str(text)[:30]})") from None


def ffhq_quad(lm: np.ndarray, adjust: CropAdjust | None = None) -> np.ndarray:
    """The oriented crop square (4, 2) of the FFHQ recipe: upper-left, lower-left, lower-right, upper-right;
    nudged by ``adjust`` when one is given."""
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg, eye_to_eye = (eye_left + eye_right) / 2, eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad if adjust is None else adjust.apply(quad)


def align_face(img, output_size: int = 1024, transform_size: int = 4096, lm: np.ndarray | None = None,
               enable_padding: bool = True, adjust: CropAdjust | None = None) -> tuple[Image.Image, np.ndarray]:
    """FFHQ-aligned square crop of the largest face (its square nudged by ``adjust``), and its quad in the
    input photo's coordinates."""
    img = load_photo(img)
    lm = landmarks(img) if lm is None else lm
    quad = ffhq_quad(lm, adjust)
    original_quad = quad.copy()
    qsize = np.hypot(*(quad[3] - quad[0]))

    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        img = img.resize((int(np.rint(img.width / shrink)), int(np.rint(img.height / shrink))), Image.LANCZOS)
        quad, qsize = quad / shrink, qsize / shrink

    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())),
            int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max())))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0), min(crop[2] + border, img.width), min(crop[3] + border, img.height))
    if crop[2] - crop[0] < img.width or crop[3] - crop[1] < img.height:
        img = img.crop(crop)
        quad = quad - crop[0:2]

    pad = (int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())),
           int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max())))
    pad = (max(-pad[0] + border, 0), max(-pad[1] + border, 0), max(pad[2] - img.width + border, 0), max(pad[3] - img.height + border, 0))
    if enable_padding and max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        a = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = a.shape
        yy, xx, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(1.0 - np.minimum(np.float32(xx) / pad[0], np.float32(w - 1 - xx) / pad[2]),
                          1.0 - np.minimum(np.float32(yy) / pad[1], np.float32(h - 1 - yy) / pad[3]))
        blurred = np.float32(Image.fromarray(np.uint8(np.clip(np.rint(a), 0, 255))).filter(ImageFilter.GaussianBlur(float(qsize * 0.02))))
        a += (blurred - a) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        a += (np.median(a, axis=(0, 1)) - a) * np.clip(mask, 0.0, 1.0)
        img = Image.fromarray(np.uint8(np.clip(np.rint(a), 0, 255)), "RGB")
        quad = quad + pad[:2]

    img = img.transform((transform_size, transform_size), Image.QUAD, (quad + 0.5).flatten(), Image.BILINEAR)
    if output_size < transform_size:
        img = img.resize((output_size, output_size), Image.LANCZOS)
    return img, original_quad


def aligned_points(points: np.ndarray, quad: np.ndarray, size: int) -> np.ndarray:
    """Map photo coordinates into the aligned image's pixel coordinates (the quad is a square, so affine)."""
    m = np.stack([quad[3] - quad[0], quad[1] - quad[0]], axis=1)   # columns: aligned x axis, y axis
    return (np.linalg.solve(m, (points - quad[0]).T).T) * size


def face_mask(size: int, feather: float = 0.06) -> Image.Image:
    """Soft elliptical mask over the face area of an FFHQ-aligned image (white = face)."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse([size * 0.14, size * 0.12, size * 0.86, size * 0.95], fill=255)
    return mask.filter(ImageFilter.GaussianBlur(size * feather))


def paste_back(original, stylised: Image.Image, quad: np.ndarray, feather: float = 0.06) -> Image.Image:
    """Warp ``stylised`` (an aligned crop) back onto ``original`` through ``quad``, blended with a
    feathered face mask; pixels outside the face region are left exactly as they were."""
    original = load_photo(original)
    s = stylised.width
    m = np.stack([quad[3] - quad[0], quad[1] - quad[0]], axis=1)
    a = np.linalg.inv(m) * s                                   # photo (x, y) -> aligned (u, v)
    off = -a @ quad[0]
    coeffs = (a[0, 0], a[0, 1], off[0], a[1, 0], a[1, 1], off[1])
    warped = stylised.convert("RGB").transform(original.size, Image.AFFINE, coeffs, Image.BICUBIC)
    mask = face_mask(s, feather).transform(original.size, Image.AFFINE, coeffs, Image.BILINEAR)
    return Image.composite(warped, original, mask)


def draw_landmarks(img: Image.Image, lm: np.ndarray, radius: float | None = None) -> Image.Image:
    out = img.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    r = radius or max(1.5, img.width / 256)
    for x, y in lm:
        d.ellipse([x - r, y - r, x + r, y + r], fill=(0, 255, 0))
    return out


def draw_faces(img: Image.Image, faces: Faces, max_side: int = 768, quads: list[np.ndarray] | None = None) -> Image.Image:
    """The photo (downscaled to ``max_side``) with each detected face's box and landmarks; the face
    that will be used (the largest) in green, others in yellow. ``quads``: each face's crop square, drawn as
    an outline with its top edge thicker, so a nudged crop is seen on the photo before anything runs."""
    scale = min(1.0, max_side / max(img.size))
    out = img.convert("RGB").resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    d = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 250))
    for i, (box, lm) in enumerate(zip(faces.boxes, faces.landmarks)):
        colour = (40, 220, 90) if i == 0 else (250, 200, 40)
        d.rectangle([v * scale for v in box], outline=colour, width=width)
        d.text((box[0] * scale + width + 2, box[1] * scale + width + 1), str(i + 1), fill=colour)
        r = max(1.0, width * 0.6)
        for x, y in lm * scale:
            d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    for i, quad in enumerate(quads or []):
        colour = (60, 140, 255) if i == 0 else (250, 200, 40)
        corners = [tuple(p) for p in quad * scale]
        d.line(corners + corners[:1], fill=colour, width=width)
        d.line([corners[0], corners[3]], fill=colour, width=width * 2)   # the top edge: shows the turn
    return out
