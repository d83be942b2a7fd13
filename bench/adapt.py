"""Seconds per adaptation iteration, split into G_frozen forward / G_train forward+backward / CLIP /
layer selection, with the real architectures (random weights: speed does not depend on them).

Goals (issue 3): on CPU one iteration at 256 px (batch 2, ViT-B/32 + ViT-B/16) within 3x one
generator forward+backward at 256 px; on one H100, 300 iterations at 1024 px within 60 s.
Usage: python bench/adapt.py [--size 256] [--device cpu] [--iters 5] [--k 18] [--clip ViT-B-32,ViT-B-16]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nada_core.adapt import Adapter, Recipe  # noqa: E402
from nada_core.clip_guide import ClipMember  # noqa: E402
from nada_core.stylegan2 import Generator  # noqa: E402


def random_clip(name, device):
    import open_clip

    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True, device=device,
                                   precision="bf16" if device.type == "cuda" else "fp32")
    return ClipMember(name, model.eval().requires_grad_(False), open_clip.get_tokenizer(name))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--k", type=int, default=None, help="slots per step; below n_latent runs adaptive selection")
    ap.add_argument("--clip", default="ViT-B-32,ViT-B-16")
    args = ap.parse_args()
    device = torch.device(args.device)
    cm = 1 if args.size <= 256 else 2
    G = Generator(args.size, channel_multiplier=cm).to(device)
    names = args.clip.split(",")
    clip = [random_clip(n, device) for n in names]
    recipe = Recipe(iterations=args.iters + 1, clip_models=names, clip_weights=[1.0] * len(names), k=args.k,
                    preview_every=10 ** 6)
    ad = Adapter(G, recipe, clip, device)
    ad.train_step()  # warm-up
    rows = []
    for _ in range(args.iters):
        t = time.perf_counter()
        _, _, timings = ad.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings["total"] = time.perf_counter() - t
        rows.append(timings)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}

    ws = torch.randn(2, G.n_latent, 512, device=device)
    G.requires_grad_(True)

    def fwd_bwd():
        G.zero_grad(set_to_none=True)
        G.synthesis(ws).square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    fwd_bwd()
    fb = statistics.median((lambda t: (fwd_bwd(), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(args.iters))
    print(f"device {device}, {args.size} px (channel multiplier {cm}), batch 2, CLIP {args.clip}, k={args.k or G.n_latent}")
    for k, v in med.items():
        print(f"  {k:24} {v:8.3f} s")
    print(f"  generator fwd+bwd (ref)  {fb:8.3f} s   (median of {args.iters}, as the iteration figures)")
    print(f"iteration / generator fwd+bwd = {med['total'] / fb:.2f}x (goal <= 3x)")
    print(f"300 iterations: {300 * med['total'] / 60:.1f} min")


if __name__ == "__main__":
    main()
