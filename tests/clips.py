"""Small clips built from a real photo (scikit-image's astronaut), for the video tests and bench/video.py:
the photo's face moving and growing across the frame, optionally framed by shots with no face, optionally
with a sound track."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

FACE_CENTRE = (220.0, 121.0)   # the dlib box's centre in the 512 px photo


def moving_face(n: int = 12, size: int = 128, start=(250.0, 140.0), end=(205.0, 125.0),
                window=(300.0, 230.0)) -> list[np.ndarray]:
    """``n`` frames of ``size`` px: a square window of the photo whose centre slides from ``start`` to ``end``
    and whose side shrinks from ``window[0]`` to ``window[1]`` photo pixels, so the face drifts and grows
    (sub-pixel motion, bicubic)."""
    photo = Image.fromarray(data.astronaut())
    frames = []
    for i in range(n):
        t = i / max(1, n - 1)
        cx, cy = (1 - t) * np.asarray(start) + t * np.asarray(end)
        half = ((1 - t) * window[0] + t * window[1]) / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        frames.append(np.asarray(photo.transform((size, size), Image.EXTENT, box, Image.BICUBIC)))
    return frames


def no_face(size: int = 128) -> np.ndarray:
    """A shot of the same photo without a face (the lower left: the suit's sleeve and the flag)."""
    photo = Image.fromarray(data.astronaut())
    return np.asarray(photo.crop((0, 312, 200, 512)).resize((size, size), Image.BICUBIC))


def write_clip(frames: list[np.ndarray], path, fps: int = 12, audio: bool = False, audio_codec: str = "aac",
               container: str | None = None) -> Path:
    """Frames as H.264 at ``fps``; with ``audio``, a 440 Hz tone as long as the clip (``audio_codec`` aac or
    pcm_s16le, the latter in a .mov since MP4 cannot hold it)."""
    import av

    path = Path(path)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format=container) as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        a = None
        if audio:
            a = c.add_stream(audio_codec, rate=16000)
            a.layout = "mono"
        for f in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        if a is not None:
            n = int(16000 * len(frames) / fps)
            tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)
            fmt = "fltp" if audio_codec == "aac" else "s16"
            samples = tone.astype(np.float32)[None] if fmt == "fltp" else (tone * 32767).astype(np.int16)[None]
            frame = av.AudioFrame.from_ndarray(samples, format=fmt, layout="mono")
            frame.sample_rate, frame.pts = 16000, 0
            for p in a.encode(frame):
                c.mux(p)
            for p in a.encode(None):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
    return path


def patched_frame_count(path, frames: int) -> bytes:
    """The MP4 with its stts table claiming ``frames`` frames (the first entry's sample count)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"stts")
    data[at + 12:at + 16] = struct.pack(">I", frames)
    return bytes(data)


def face_chroma_gap(source: list[np.ndarray], shown: list[np.ndarray]) -> float:
    """Mean chroma (YCbCr's Cb, Cr) difference from ``source`` inside the detected face of each frame that has
    one: how far a stylised clip's faces are from the clip's own colours."""
    from nada_core.faces.align import detect

    gaps = []
    for src, out in zip(source, shown):
        found = detect(Image.fromarray(src)).boxes
        if found:
            left, top, right, bottom = found[0]
            box = (slice(top + 4, bottom - 4), slice(left + 4, right - 4))
            a, b = (np.asarray(Image.fromarray(np.ascontiguousarray(f[box])).convert("YCbCr"), dtype=float)[..., 1:]
                    for f in (src, out))
            gaps.append(np.abs(a - b).mean())
    assert gaps, "no face in any frame"
    return float(np.mean(gaps))
