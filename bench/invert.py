"""Selfie pipeline speed: alignment (dlib detection + landmarks + FFHQ warp), e4e encoder forward
(random weights, real architecture), and seconds per projector step at 256 and 1024 px.
Usage: python bench/invert.py [--device cuda] [--steps 5]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nada_core.faces.align import align_face, detect  # noqa: E402
from nada_core.faces.invert import E4EEncoder, project  # noqa: E402
from nada_core.models.stylegan2 import Generator  # noqa: E402


def clock(fn, device):
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    photo = Image.fromarray(data.astronaut())
    detect(photo)  # load the dlib models once
    faces, t_detect = clock(lambda: detect(photo), device)
    _, t_align = clock(lambda: align_face(photo, 1024, 4096, lm=faces.landmarks[0]), device)
    print(f"device {device}")
    print(f"  detection + 68 landmarks (512x512 photo) {t_detect:7.3f} s")
    print(f"  FFHQ alignment to 1024 px               {t_align:7.3f} s")
    enc = E4EEncoder().to(device).eval()
    x = torch.randn(1, 3, 256, 256, device=device)
    with torch.no_grad():
        enc(x)
        _, t_enc = clock(lambda: enc(x), device)
    print(f"  e4e encoder forward (1 face)            {t_enc:7.3f} s")
    for size, cm in [(256, 1), (1024, 2)]:
        G = Generator(size, channel_multiplier=cm).to(device)
        target = torch.rand(1, 3, size, size, device=device) * 2 - 1
        project(G, target, steps=1)
        _, t = clock(lambda: project(G, target, steps=args.steps), device)
        print(f"  projector step at {size:4d} px               {t / args.steps:7.3f} s")


if __name__ == "__main__":
    main()
