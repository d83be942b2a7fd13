"""Video stylisation: frames per second and flicker, on a clip built from a real photo (scikit-image's
astronaut, moved and scaled over 48 frames) with the tiny generators (untrained: the faces they paint are
noise-like, so the figures measure the pipeline's steadiness and speed, not a style's look).

Flicker is the mean absolute frame-to-frame change (0-255 levels, RGB) inside the face's detector box, of the
output divided by the input's own (the face moves, so the input changes too); the goal is at most 1.5x.
The untrained faces are smooth, so they change less than the textured photo in that box; the crop columns
take the motion out: the mean frame-to-frame change of the input's aligned crop (what landmark jitter shows
up in) and of the stylised face rendered from it (landmark and code jitter together).
Rows: the defaults (smoothed landmarks, smoothed codes), and with both smoothings off.
Usage: python bench/video.py [--frames 48] [--size 256] [--steps 5] [--device cpu]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nada_core.faces.align import detect  # noqa: E402
from nada_core.faces.video import VideoStyliser, stylize_clip  # noqa: E402
from nada_core.models.tiny import tiny_generator  # noqa: E402
from nada_core.store.clips import probe, read_frames  # noqa: E402
from tests.clips import moving_face, write_clip  # noqa: E402


def flicker(frames: list[np.ndarray], boxes: list[tuple]) -> float:
    """Mean |frame t - frame t-1| over the pixels of frame t's face box, averaged over the frames."""
    changes = []
    for t in range(1, len(frames)):
        left, top, right, bottom = (max(0, int(v)) for v in boxes[t])
        a = frames[t][top:bottom, left:right].astype(np.float64)
        b = frames[t - 1][top:bottom, left:right].astype(np.float64)
        changes.append(np.abs(a - b).mean())
    return float(np.mean(changes))


def change(frames: list[np.ndarray]) -> float:
    """Mean |frame t - frame t-1| over whole frames (here: aligned crops at the generator's size)."""
    return float(np.mean([np.abs(frames[t].astype(np.float64) - frames[t - 1]).mean() for t in range(1, len(frames))]))


def decoded(path) -> list[np.ndarray]:
    info = probe(path)
    return [rgb for rgb, _ in read_frames(path, info)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--detect-every", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = Path(tempfile.mkdtemp(prefix="nada_bench_video_"))
    src = write_clip(moving_face(args.frames, args.size), folder / "in.mp4", fps=24, audio=True)
    info = probe(src)
    inputs = decoded(src)
    boxes = [detect(Image.fromarray(f)).boxes[0] for f in inputs]
    base_flicker = flicker(inputs, boxes)
    G = tiny_generator().to(args.device)
    style = tiny_generator(seed=4).to(args.device)
    print(f"clip: {args.frames} frames, {args.size} px, 24 fps, the astronaut moved and scaled; tiny UNTRAINED models "
          f"(32 px, random weights), device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"input flicker in the face box: {base_flicker:.2f} levels per frame")
    print(f"{'setting':40} {'frames/s':>9} {'s/frame':>8} {'box flicker':>12} {'ratio':>6} "
          f"{'crop change in':>15} {'out':>6}")
    for label, kw in [("defaults (smoothed landmarks and codes)", {}),
                      ("no smoothing", dict(smooth_landmarks=False, code_alpha=1.0))]:
        styliser = VideoStyliser(G, {"style": style}, steps=args.steps, detect_every=args.detect_every, **kw)
        t = time.perf_counter()
        result = stylize_clip(src, info, styliser, {"style": folder / f"out-{len(label)}.mp4"})
        seconds = time.perf_counter() - t
        out = decoded(result.outputs["style"])
        assert len(out) == len(inputs) and result.with_faces == len(inputs), result.message
        f = flicker(out, boxes)
        again = VideoStyliser(G, {"style": style}, steps=args.steps, detect_every=args.detect_every, **kw)
        crops = [again(frame) for frame in inputs]
        crop_in = change([np.asarray(c.aligned[0]) for c in crops])
        crop_out = change([np.asarray(c.stylised["style"][0]) for c in crops])
        print(f"{label:40} {result.done / seconds:9.2f} {seconds / result.done:8.3f} {f:12.2f} {f / base_flicker:5.2f}x "
              f"{crop_in:15.2f} {crop_out:6.2f}   ({styliser.tracker.detections} detections)")


if __name__ == "__main__":
    main()
