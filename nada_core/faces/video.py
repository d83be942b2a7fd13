"""Stylised video: each frame through the selfie pipeline (``faces.selfie``), kept steady over time.
Faces are tracked (``faces.tracking``: detection every few frames, smoothed landmarks); each face's W+
comes from the e4e encoder where the base has one, else from a few optimisation steps started at the
previous frame's code; the codes are smoothed exponentially, then go through every chosen style and back
into the frame with selfie's feathered paste. Frames without a face pass through as they are.
``VideoStyliser`` is the per-frame pipeline (the webcam uses it alone); ``stylize_clip`` runs it over a
file with progress, a stop that keeps the frames done, and the clip's sound copied."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..models.stylegan2 import Generator
from ..store.checkpoints import load_generator
from ..store.clips import ClipInfo, ClipLimits, ClipWriter, read_frames
from ..store.images import from_pil, to_pil
from ..store.library import find_model, list_library, load_base, slugify
from .align import align_face, aligned_points
from .colour import keep_colours
from .invert import encoder_input, project, refine
from .selfie import AlignedFace, paste_faces
from .tracking import FaceTracker

STEPS = 5           # optimisation steps per frame, started at the previous frame's code
FIRST_STEPS = 50    # for a face seen for the first time (the projector, from the mean latent)
CODE_ALPHA = 0.5    # weight of the new frame's code in the running average (1: no smoothing)


@dataclass
class FrameOutput:
    """One frame through every style: ``frames[name]`` is the input array itself where no face was found;
    ``aligned`` are the faces' crops and ``stylised[name]`` their renders (before pasting)."""

    frames: dict[str, np.ndarray]
    faces: int
    aligned: list[Image.Image] = field(default_factory=list)
    stylised: dict[str, list[Image.Image]] = field(default_factory=dict)


class VideoStyliser:
    """frame (H, W, 3 uint8) -> that frame through each of ``styles`` (generators of ``G``'s latent space).
    State carries over between calls: the tracks, and each face's last and smoothed codes."""

    def __init__(self, G: Generator, styles: dict[str, Generator], encoder=None, steps: int = STEPS,
                 first_steps: int = FIRST_STEPS, perceptual: dict | None = None, fps: float = 25.0,
                 detect_every: int = 5, max_faces: int = 4, code_alpha: float = CODE_ALPHA, feather: float = 0.06,
                 smooth_landmarks: bool = True, keep_colours: float = 0.0):
        if not styles:
            raise ValueError("choose at least one style")
        for name, Gm in styles.items():
            if Gm.config != G.config:
                raise ValueError(f"{name}: a different architecture from the base; it cannot render its faces")
        if encoder is None and (steps < 1 or first_steps < 1):
            raise ValueError("choose at least one optimisation step: no encoder fits this generator")
        if not 0 <= keep_colours <= 1:
            raise ValueError(f"keep colours must be between 0 and 1, got {keep_colours}")
        if not 0 < code_alpha <= 1:
            raise ValueError("code_alpha must lie in (0, 1]")
        self.G, self.styles, self.encoder = G, dict(styles), encoder
        self.steps, self.first_steps, self.perceptual = steps, first_steps, dict(perceptual or {})
        self.code_alpha, self.feather = code_alpha, feather
        self.keep_colours = keep_colours   # the photo's chroma by this strength (faces.colour); may change live
        self.tracker = FaceTracker(fps, detect_every, max_faces, smooth=smooth_landmarks)
        self.crop = 256 if encoder is not None else min(G.size, 256)
        self.device = G.device
        self._last: dict[int, torch.Tensor] = {}     # each track's code as inverted
        self._smoothed: dict[int, torch.Tensor] = {}

    @property
    def method(self) -> str:
        return "e4e" if self.encoder is not None else f"optimisation ({self.steps} steps a frame from the last code)"

    def __call__(self, frame: np.ndarray, t: float | None = None) -> FrameOutput:
        tracked = self.tracker.update(frame, t)
        live = {f.id for f in tracked}
        for store in (self._last, self._smoothed):
            for k in [k for k in store if k not in live]:
                del store[k]
        if not tracked:
            return FrameOutput({name: frame for name in self.styles}, 0)
        photo = Image.fromarray(frame)
        faces, codes = [], []
        for f in tracked:
            aligned, quad = align_face(photo, output_size=self.crop, transform_size=min(1024, 2 * self.crop),
                                       lm=f.landmarks)
            faces.append(AlignedFace(photo, aligned, quad, aligned_points(f.landmarks, quad, self.crop), len(tracked)))
            codes.append(self._code(f.id, from_pil(aligned).to(self.device)))
        w = torch.cat(codes)
        out, renders = {}, {}
        with torch.no_grad():
            for name, Gm in self.styles.items():
                renders[name] = to_pil(Gm.synthesis(w, noise_mode="const"))
                if self.keep_colours:
                    renders[name] = [keep_colours(img, face.aligned, self.keep_colours)
                                     for img, face in zip(renders[name], faces)]
                out[name] = np.asarray(paste_faces(photo, faces, renders[name], self.feather))
        return FrameOutput(out, len(tracked), [f.aligned for f in faces], renders)

    def _code(self, track: int, target: torch.Tensor) -> torch.Tensor:
        """This face's smoothed W+: the encoder's answer, or optimisation from its code in the previous frame."""
        if self.encoder is not None:
            with torch.no_grad():
                w = self.encoder(encoder_input(target.to(next(self.encoder.parameters()).device))).to(self.device)
        elif track in self._last:
            w = refine(self.G, target, self._last[track], self.steps, **self.perceptual)
        else:
            w = project(self.G, target, steps=self.first_steps, **self.perceptual)[0]
        self._last[track] = w
        prev = self._smoothed.get(track)
        self._smoothed[track] = w if prev is None else prev + self.code_alpha * (w - prev)
        return self._smoothed[track]


@dataclass
class ClipProgress:
    done: int
    total: int
    frames_per_second: float
    faces: int                      # in the frame just done
    preview: np.ndarray | None      # that frame through the first style


@dataclass
class ClipResult:
    outputs: dict[str, Path]
    done: int
    total: int
    cancelled: bool
    seconds: float
    with_faces: int                 # frames in which at least one face was stylised
    notes: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        rate = f"{self.done / self.seconds:.2f} frames/s" if self.seconds > 0 else ""
        if self.cancelled and not self.done:
            return "cancelled before the first frame; nothing was written"
        if self.cancelled:
            return (f"cancelled at frame {self.done} of {self.total}; the {self.done} frames done are saved "
                    f"({self.with_faces} with a face, {rate})")
        return f"{self.done} frames, {self.with_faces} with a face stylised ({rate})"


def output_paths(out, names: list[str]) -> dict[str, Path]:
    """One style: ``out`` itself; several: OUT-<style>.mp4 beside it."""
    out = Path(out)
    if len(names) == 1:
        return {names[0]: out}
    return {n: out.with_name(f"{out.stem}-{slugify(n)}{out.suffix or '.mp4'}") for n in names}


def stylize_clip(path, info: ClipInfo, styliser: VideoStyliser, outputs: dict[str, Path],
                 progress: Callable[[ClipProgress], None] | None = None, stop: threading.Event | None = None,
                 limits: ClipLimits = ClipLimits(), display_name: str | None = None) -> ClipResult:
    """Every frame of the clip at ``path`` (already checked by ``store.clips.probe``, which gave ``info``)
    through ``styliser``, one MP4 per style at ``outputs[name]`` with the source's frame rate, timestamps and
    sound. ``stop`` set: the frames done so far are finished into playable files and the result says so."""
    missing = set(styliser.styles) - set(outputs)
    if missing:
        raise ValueError(f"no output path for {', '.join(sorted(missing))}")
    styliser.tracker.fps = float(info.fps)
    writers = {name: ClipWriter(outputs[name], info) for name in styliser.styles}
    first = next(iter(styliser.styles))
    done = with_faces = 0
    cancelled = False
    start = time.perf_counter()
    try:
        for rgb, pts in read_frames(path, info, limits, display_name):
            if stop is not None and stop.is_set():
                cancelled = True
                break
            result = styliser(rgb, float(pts * info.time_base))
            for name, writer in writers.items():
                writer.write(result.frames[name], pts)
            done += 1
            with_faces += result.faces > 0
            if progress:
                elapsed = time.perf_counter() - start
                progress(ClipProgress(done, info.frames, done / elapsed if elapsed > 0 else 0.0, result.faces,
                                      result.frames[first]))
        seconds = time.perf_counter() - start
        if not done:
            for writer in writers.values():
                writer.abort()
            return ClipResult({}, 0, info.frames, cancelled, seconds, 0)
        paths = {name: writer.finish(path) for name, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    notes = [] if info.audio else ["the clip has no sound"]
    return ClipResult(paths, done, info.frames, cancelled, seconds, with_faces, notes)


def load_styles(names: list[str], base: str | None = None, device: str = "cpu"):
    """(base generator, base name, {style name: generator}) for library ids or weight files; every style must
    be an adaptation of one base (their latent space), which is taken from them unless ``base`` is given."""
    chosen, bases = {}, set()
    for name in names:
        if Path(name).is_file():
            G, info = load_generator(name, device)
            label = Path(name).parent.name if Path(name).stem in ("final", "model") else Path(name).stem
            bases.add((info.get("meta") or {}).get("source_model"))
        else:
            entry = find_model(name, list_library())
            G, _ = load_generator(entry.path, device, display_name=name)
            label = entry.name
            bases.add(entry.base)
        chosen[label] = G.requires_grad_(False)
    known = {b for b in bases if b}
    if base is None:
        if len(known) != 1:
            raise ValueError("the styles do not say one common base model; pass --base" if not known else
                             f"the styles were adapted from different bases ({', '.join(sorted(known))}); "
                             "choose styles of one base")
        base = known.pop()
    G, base_name = load_base(base, device)
    return G.requires_grad_(False), base_name, chosen
