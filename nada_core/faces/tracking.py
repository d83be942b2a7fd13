"""Faces followed through a clip. The detector (dlib's HOG, tens of milliseconds a frame) runs every few
frames, and at once when the tracked region changes abruptly (a cut, the face leaving); in between, the
shape predictor (about a millisecond) finds the landmarks in the box carried over from the last frame.
The landmarks go through a 1-euro filter (Casiez et al., CHI 2012): strong smoothing while the face holds
still, where detector jitter would make the aligned crop shake, and little lag while it moves."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .align import detect, landmarks_in_box


class OneEuro:
    """The 1-euro filter on an array: an exponential smoother whose cut-off frequency (Hz) rises with the
    signal's speed, ``min_cutoff + beta * speed``; speed is measured in units of ``scale`` per second (the
    face's size, so one setting suits small and large faces)."""

    def __init__(self, min_cutoff: float = 1.0, beta: float = 1.0, d_cutoff: float = 1.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.value: np.ndarray | None = None
        self._speed: np.ndarray | None = None

    @staticmethod
    def _alpha(cutoff: float, dt: float) -> float:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, dt: float, scale: float = 1.0) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.value is None:
            self.value, self._speed = x.copy(), np.zeros_like(x)
            return self.value.copy()
        a_d = self._alpha(self.d_cutoff, dt)
        self._speed = self._speed + a_d * ((x - self.value) / dt - self._speed)
        speed = float(np.abs(self._speed).mean()) / max(scale, 1e-6)
        a = self._alpha(self.min_cutoff + self.beta * speed, dt)
        self.value = self.value + a * (x - self.value)
        return self.value.copy()


@dataclass(frozen=True)
class TrackedFace:
    """A face in one frame: ``id`` stays the same while it is in view; ``landmarks`` (smoothed) build the
    crop; ``raw`` are this frame's measurement."""

    id: int
    landmarks: np.ndarray
    raw: np.ndarray


@dataclass
class Track:
    """The tracker's own record of one face; ``box`` is where the predictor looks in the next frame."""

    id: int
    landmarks: np.ndarray
    raw: np.ndarray
    box: tuple[float, float, float, float]
    frames: int = 1
    _filter: OneEuro | None = field(default=None, repr=False)
    _offset: np.ndarray | None = field(default=None, repr=False)   # detector box relative to the landmarks' extent
    _thumb: np.ndarray | None = field(default=None, repr=False)    # the box's look at the last detection


def _extent(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = lm.min(0), lm.max(0)
    return (lo + hi) / 2, np.maximum(hi - lo, 1.0)


def _face_scale(lm: np.ndarray) -> float:
    return float(np.hypot(*(lm[42:48].mean(0) - lm[36:42].mean(0)))) or 1.0


def _thumb(frame: np.ndarray, box) -> np.ndarray | None:
    """The box's region as a 16 x 16 grey thumbnail (None when it lies outside the frame)."""
    h, w = frame.shape[:2]
    left, top = max(int(box[0]), 0), max(int(box[1]), 0)
    right, bottom = min(int(math.ceil(box[2])), w), min(int(math.ceil(box[3])), h)
    if right - left < 4 or bottom - top < 4:
        return None
    crop = Image.fromarray(frame[top:bottom, left:right]).convert("L").resize((16, 16), Image.BILINEAR)
    return np.asarray(crop, dtype=np.float32)


class FaceTracker:
    """``update(frame)`` -> the faces in it (largest first at each detection, at most ``max_faces``), each with
    a stable id while it stays in view. ``smooth=False`` gives the raw measurements (for comparison)."""

    def __init__(self, fps: float = 25.0, detect_every: int = 5, max_faces: int = 4, smooth: bool = True,
                 min_cutoff: float = 1.0, beta: float = 1.0, cut_threshold: float = 30.0):
        if detect_every < 1 or max_faces < 1:
            raise ValueError("detect_every and max_faces must be at least 1")
        self.fps, self.detect_every, self.max_faces, self.smooth = float(fps), detect_every, max_faces, smooth
        self.min_cutoff, self.beta, self.cut_threshold = min_cutoff, beta, cut_threshold
        self.tracks: list[Track] = []
        self.frame_index, self.detections, self._next_id, self._last_t = 0, 0, 0, None

    def update(self, frame: np.ndarray, t: float | None = None) -> list[TrackedFace]:
        """Track the faces into ``frame`` (H, W, 3 uint8); ``t`` in seconds (None: one frame at ``fps``)."""
        dt = 1.0 / self.fps
        if t is not None and self._last_t is not None and t > self._last_t:
            dt = t - self._last_t
        self._last_t = t
        due = self.frame_index % self.detect_every == 0 or not self.tracks
        self.frame_index += 1
        if not due:
            measured = [(tr, landmarks_in_box(frame, tr.box)) for tr in self.tracks]
            if all(self._same_place(frame, tr, lm) for tr, lm in measured):
                for tr, lm in measured:
                    self._follow(tr, lm, dt)
                return self._faces()
        self._detect(frame, dt)
        return self._faces()

    def _faces(self) -> list[TrackedFace]:
        return [TrackedFace(tr.id, tr.landmarks, tr.raw) for tr in self.tracks]

    def _same_place(self, frame: np.ndarray, track: Track, lm: np.ndarray) -> bool:
        """Whether the tracked region still looks as it did at the last detection (no cut, the face still there)."""
        now = _thumb(frame, self._box(track, lm))
        return now is not None and track._thumb is not None and \
            float(np.abs(now - track._thumb).mean()) <= self.cut_threshold

    def _detect(self, frame: np.ndarray, dt: float) -> None:
        self.detections += 1
        faces = detect(Image.fromarray(frame))
        kept, free = [], list(self.tracks)
        for box, lm in list(zip(faces.boxes, faces.landmarks))[:self.max_faces]:
            centre, size = _extent(lm)
            match = min(free, key=lambda tr: np.hypot(*(_extent(tr.raw)[0] - centre)), default=None)
            if match is not None and np.hypot(*(_extent(match.raw)[0] - centre)) < 0.5 * size.max():
                free.remove(match)
                track = match
                self._follow(track, lm, dt)
            else:
                track = Track(self._next_id, lm.copy(), lm.copy(), tuple(map(float, box)),
                              _filter=OneEuro(self.min_cutoff, self.beta))
                track._filter(lm, dt, _face_scale(lm))
                self._next_id += 1
            track._offset = (np.asarray(box, dtype=np.float64).reshape(2, 2) - centre) / size
            track.box = self._box(track, lm)
            track._thumb = _thumb(frame, track.box)
            kept.append(track)
        self.tracks = kept

    def _box(self, track: Track, lm: np.ndarray) -> tuple[float, float, float, float]:
        """The detector-like box around ``lm``: the offset measured at the last detection, so the predictor
        sees the face framed the way it was trained on."""
        centre, size = _extent(lm)
        corners = centre + track._offset * size
        return tuple(float(v) for v in corners.reshape(-1))

    def _follow(self, track: Track, lm: np.ndarray, dt: float) -> None:
        track.raw = lm.copy()
        track.landmarks = track._filter(lm, dt, _face_scale(lm)) if self.smooth else lm.copy()
        track.box = self._box(track, lm)
        track.frames += 1
