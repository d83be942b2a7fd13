"""Seconds per adaptation iteration, split into G_frozen forward / G_train forward+backward / CLIP /
layer selection, with the real architectures (random weights: speed does not depend on them).

Goals (issue 3, issue 11): on CPU one iteration at 256 px (batch 2, ViT-B/32 + ViT-B/16) within 2x one
generator forward+backward at 256 px; on one H100, 300 iterations at 1024 px within 60 s.

--compile, --amp and --formulation each take one value or a comma-separated list ("both" = "off,on" for
--compile); every combination gets its own trainer, and after each one's first step their iterations alternate,
so that all share the machine's state (a GPU this small a batch keeps busy only as fast as the CPU launches its
work, which varies between processes). --amp sets Recipe.amp (off or bf16 autocast),
--formulation sets stylegan2.formulation(device=...) (CUDA). Reported per combination: phase medians, the first
step (with compile on: compile time = first step minus a compiled step's median), 300 iterations extrapolated
as first step + 299 medians, and the measured time of all its steps; on CUDA the peak memory over the timed
steps (everything allocated, all trainers'; time one combination alone for its own peak).
Usage: python bench/adapt.py [--size 256] [--device cpu] [--iters 5] [--k 18] [--clip ViT-B-32,ViT-B-16]
                             [--compile off|on|auto|both|LIST] [--amp auto|bf16|off|LIST] [--formulation grouped|scaled|LIST]
"""
import argparse
import contextlib
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nada_core.guidance.clip_guide import ClipMember  # noqa: E402
from nada_core.models import stylegan2  # noqa: E402
from nada_core.models.stylegan2 import Generator  # noqa: E402
from nada_core.training.adapt import AMP_SETTINGS, COMPILE_SETTINGS, Adapter, Recipe, compile_enabled  # noqa: E402
from nada_core.training.memory import reused_memory  # noqa: E402


def random_clip(name, device):
    import open_clip

    if name == "tiny":  # a smoke test of this script
        from nada_core.models.tiny import tiny_clip

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
    ap.add_argument("--compile", default="off", help="Recipe.compile: off, on, auto, or a list ('both' = off,on)")
    ap.add_argument("--amp", default="off", help="Recipe.amp: off, bf16, or a list")
    ap.add_argument("--formulation", default=stylegan2.current_formulation().device,
                    help="stylegan2.Formulation.device on CUDA: grouped, scaled, or a list")
    args = ap.parse_args()
    device = torch.device(args.device)
    with reused_memory() if device.type == "cpu" else contextlib.nullcontext():  # as the CLI trains
        run(args, device)


def choices(value, allowed, flag):
    values = ["off", "on"] if value == "both" else value.split(",")
    for v in values:
        if v not in allowed:
            raise SystemExit(f"{flag}: {v!r} is not one of {', '.join(allowed)}")
    return values


def run(args, device):
    cm = 1 if args.size <= 256 else 2
    G = Generator(args.size, channel_multiplier=cm).to(device)
    names = args.clip.split(",")
    clip = [random_clip(n, device) for n in names]
    settings = list(itertools.product(choices(args.compile, COMPILE_SETTINGS, "--compile"),
                                      choices(args.amp, AMP_SETTINGS, "--amp"),
                                      choices(args.formulation, ("grouped", "scaled"), "--formulation")))
    trainers, first = {}, {}
    for s in settings:
        compile_, amp, formulation = s
        recipe = Recipe(iterations=args.iters + 1, clip_models=names, clip_weights=[1.0] * len(names), k=args.k,
                        preview_every=10 ** 6, compile=compile_, amp=amp)
        trainers[s] = Adapter(G, recipe, clip, device)
        with stylegan2.formulation(device=formulation):
            first[s] = timed_step(trainers[s], device)["total"]  # warm-up; with compile on, the compilation
    rows = {s: [] for s in settings}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.iters):
        for s in settings:
            with stylegan2.formulation(device=s[2]):
                rows[s].append(timed_step(trainers[s], device))
    peak_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
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
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, {args.size} px "
          f"(channel multiplier {cm}), batch 2, CLIP {args.clip}, k={args.k or G.n_latent}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    if peak_mem is not None:
        print(f"peak GPU memory over the timed steps: {peak_mem:.2f} GiB" + (" (all trainers together)" if len(settings) > 1 else ""))
    for s in settings:
        ad = trainers[s]
        label = f"compile={s[0]} amp={s[1]}" + (f" formulation={s[2]}" if cuda else "")
        label += f" ({'compiled: ' + ', '.join(ad.compiled) if ad.compiled else 'nothing compiled'})"
        if ad.compile_error:
            label += f", compile failed: {ad.compile_error}"
        print(label)
        for k, v in med[s].items():
            print(f"  {k:24} {v:8.3f} s")
        print(f"  first step               {first[s]:8.3f} s" + (f"   (compile time ~{first[s] - med[s]['total']:.0f} s)"
                                                                   if ad.compiled else ""))
        print(f"  iteration / generator fwd+bwd = {med[s]['total'] / fb:.2f}x (goal <= 2x)")
        print(f"  300 iterations: {(first[s] + 299 * med[s]['total']) / 60:.2f} min (first step + 299 medians); "
              f"measured: {args.iters + 1} steps in {first[s] + sum(r['total'] for r in rows[s]):.1f} s")
    if len(settings) > 1:
        best = min(settings, key=lambda s: first[s] + 299 * med[s]["total"])
        print(f"fastest over 300 iterations: compile={best[0]} amp={best[1]} formulation={best[2]}")
    print(f"generator fwd+bwd (ref)    {fb:8.3f} s   (median of {args.iters}, formulation {settings[0][2]}, float32)")
    by_compile = {s[0]: s for s in settings}
    if set(by_compile) == {"off", "on"} and len(settings) == 2:
        t_off, t_on = (first[by_compile[c]] + 299 * med[by_compile[c]]["total"] for c in ("off", "on"))
        print(f"300 iterations, uncompiled / compiled = {t_off / t_on:.2f}x (auto compiles where this is >= 1.3x; "
              f"auto here: {'on' if compile_enabled('auto', device) else 'off'})")


if __name__ == "__main__":
    main()
