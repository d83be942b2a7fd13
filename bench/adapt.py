"""Seconds per adaptation iteration, split into G_frozen forward / G_train forward+backward / CLIP /
layer selection, with the real architectures (random weights: speed does not depend on them).

Goals (issue 3, issue 11): on CPU one iteration at 256 px (batch 2, ViT-B/32 + ViT-B/16) within 2x one
generator forward+backward at 256 px; on one H100, 300 iterations at 1024 px within 60 s.

--compile on|off|auto runs the trainer with that Recipe.compile; --compile both times an uncompiled and a
compiled trainer in the same run, alternating their iterations after each one's first step, and reports the
compile time (first compiled step minus a compiled step's median) and 300 iterations of each, extrapolated
as first step + 299 medians (the ratio "auto" compiles for is >= 1.3x).
Usage: python bench/adapt.py [--size 256] [--device cpu] [--iters 5] [--k 18] [--clip ViT-B-32,ViT-B-16]
                             [--compile off|on|auto|both]
"""
import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nada_core.adapt import Adapter, Recipe, compile_enabled  # noqa: E402
from nada_core.clip_guide import ClipMember  # noqa: E402
from nada_core.stylegan2 import Generator  # noqa: E402
from nada_core.training import reused_memory  # noqa: E402


def random_clip(name, device):
    import open_clip

    if name == "tiny":  # a smoke test of this script
        from nada_core.tiny import tiny_clip

        model, tok = tiny_clip()
        return ClipMember("tiny", model.to(device), tok)
    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True, device=device,
                                   precision="bf16" if device.type == "cuda" else "fp32")
    return ClipMember(name, model.eval().requires_grad_(False), open_clip.get_tokenizer(name))


def timed_step(ad, device):
    t = time.perf_counter()
    _, _, timings = ad.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    timings["total"] = time.perf_counter() - t
    return timings


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--k", type=int, default=None, help="slots per step; below n_latent runs adaptive selection")
    ap.add_argument("--clip", default="ViT-B-32,ViT-B-16")
    ap.add_argument("--compile", default="off", choices=["off", "on", "auto", "both"],
                    help="Recipe.compile of the timed trainer; 'both' compares off and on in one run")
    args = ap.parse_args()
    device = torch.device(args.device)
    with reused_memory() if device.type == "cpu" else contextlib.nullcontext():  # as Trainer.run trains
        run(args, device)


def run(args, device):
    cm = 1 if args.size <= 256 else 2
    G = Generator(args.size, channel_multiplier=cm).to(device)
    names = args.clip.split(",")
    clip = [random_clip(n, device) for n in names]
    settings = ["off", "on"] if args.compile == "both" else [args.compile]
    trainers, first = {}, {}
    for s in settings:
        recipe = Recipe(iterations=args.iters + 1, clip_models=names, clip_weights=[1.0] * len(names), k=args.k,
                        preview_every=10 ** 6, compile=s)
        trainers[s] = Adapter(G, recipe, clip, device)
        first[s] = timed_step(trainers[s], device)["total"]  # warm-up; with compile on, the compilation
    rows = {s: [] for s in settings}
    for _ in range(args.iters):
        for s in settings:
            rows[s].append(timed_step(trainers[s], device))
    med = {s: {k: statistics.median(r[k] for r in rows[s]) for k in rows[s][0]} for s in settings}

    ws = torch.randn(2, G.n_latent, 512, device=device)
    G.requires_grad_(True)

    def fwd_bwd():
        G.zero_grad(set_to_none=True)
        G.synthesis(ws).square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    fwd_bwd()
    fb = statistics.median((lambda t: (fwd_bwd(), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(args.iters))
    print(f"device {device}, {args.size} px (channel multiplier {cm}), batch 2, CLIP {args.clip}, k={args.k or G.n_latent}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for s in settings:
        ad = trainers[s]
        label = f"compile={s}" + (f" ({'compiled: ' + ', '.join(ad.compiled) if ad.compiled else 'nothing compiled'})")
        if ad.compile_error:
            label += f", compile failed: {ad.compile_error}"
        print(label)
        for k, v in med[s].items():
            print(f"  {k:24} {v:8.3f} s")
        print(f"  first step               {first[s]:8.3f} s" + (f"   (compile time ~{first[s] - med[s]['total']:.0f} s)"
                                                                   if ad.compiled else ""))
        print(f"  iteration / generator fwd+bwd = {med[s]['total'] / fb:.2f}x (goal <= 2x)")
        print(f"  300 iterations: {(first[s] + 299 * med[s]['total']) / 60:.1f} min (first step + 299 medians)")
    print(f"generator fwd+bwd (ref)    {fb:8.3f} s   (median of {args.iters}, as the iteration figures)")
    if args.compile == "both":
        t_off, t_on = (first[s] + 299 * med[s]["total"] for s in ("off", "on"))
        print(f"300 iterations, uncompiled / compiled = {t_off / t_on:.2f}x (auto compiles where this is >= 1.3x; "
              f"auto here: {'on' if compile_enabled('auto', device) else 'off'})")


if __name__ == "__main__":
    main()
