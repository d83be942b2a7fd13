"""Generator speed: forward and forward+backward at 256 and 1024 px, batch 2, against this machine's
float32 matmul throughput. Prints efficiency = achieved GFLOP/s / matmul GFLOP/s, with the FLOPs of
one forward counted by torch.utils.flop_counter.FlopCounterMode (forward+backward counted as 3x).
Random weights: speed does not depend on their values. Times are medians of --reps runs after a warm-up;
the matmul reference is measured before and after the generator runs and the higher figure is used.
The generator runs as training runs it: inside ``training.reused_memory()`` (on CPU).

--compare also times, in the same run and alternating with the default so that all share the machine's load,
"plain-malloc" (the default formulation without ``reused_memory``) and "grouped-nchw" (the formulation CPU
training used before, ``stylegan2.CPU_TRAINING_LAYOUT = False``, without ``reused_memory``).

Usage: python bench/generator.py [--device cuda] [--sizes 256 1024] [--reps 3] [--compare]
"""
import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nada_core import stylegan2  # noqa: E402
from nada_core.stylegan2 import Generator  # noqa: E402
from nada_core.training import reused_memory  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def once(fn, device):
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def matmul_gflops(device, n=2048, reps=5):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    once(lambda: a @ b, device)
    return 2 * n ** 3 / statistics.median(once(lambda: a @ b, device) for _ in range(reps)) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compare", action="store_true",
                    help="also time the default without reused_memory and the grouped NCHW formulation, interleaved")
    args = ap.parse_args()
    device = torch.device(args.device)
    peak_before = matmul_gflops(device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    reuse = device.type == "cpu"
    variants = [("default", True, reuse)] + ([("plain-malloc", True, False), ("grouped-nchw", False, False)]
                                            if args.compare else [])
    rows = []
    for size in args.sizes:
        cm = 1 if size <= 256 else 2  # the CPU-friendly FFHQ-256 base vs config-f
        G = Generator(size, channel_multiplier=cm).to(device)
        ws = torch.randn(args.batch, G.n_latent, 512, device=device)
        with FlopCounterMode(display=False) as fc:
            G.synthesis(ws)
        flops = fc.get_total_flops()

        def fwd():
            with torch.no_grad():
                G.synthesis(ws)

        def fwd_bwd():
            G.zero_grad(set_to_none=True)
            G.synthesis(ws).square().mean().backward()

        times = {(name, kind): [] for name, *_ in variants for kind in ("fwd", "fb")}
        for rep in range(args.reps + 1):  # the first round warms up
            for name, layout, reused in variants:
                stylegan2.CPU_TRAINING_LAYOUT = layout
                with reused_memory() if reused else contextlib.nullcontext():
                    if reused and rep:
                        fwd_bwd()  # fills the heap, as the steps before it do in a training run
                    t_f, t_fb = once(fwd, device), once(fwd_bwd, device)
                if rep:
                    times[name, "fwd"].append(t_f)
                    times[name, "fb"].append(t_fb)
        stylegan2.CPU_TRAINING_LAYOUT = True
        for name, *_ in variants:
            rows.append((size, cm, name, flops, statistics.median(times[name, "fwd"]), statistics.median(times[name, "fb"])))
        del G
    peak = max(peak_before, matmul_gflops(device))
    print(f"float32 matmul 2048x2048: {peak_before:.1f} GFLOP/s before, {peak:.1f} used (the higher of before/after)")
    print(f"{'size':>5} {'cm':>3} {'formulation':>13} {'GFLOP fwd':>10} {'fwd s':>8} {'fwd eff':>8} {'fwd+bwd s':>10} "
          f"{'f+b eff':>8}")
    for size, cm, name, flops, t_fwd, t_fb in rows:
        eff_f = flops / t_fwd / 1e9 / peak
        eff_fb = 3 * flops / t_fb / 1e9 / peak  # backward ~ 2x forward FLOPs
        print(f"{size:>5} {cm:>3} {name:>13} {flops / 1e9:>10.1f} {t_fwd:>8.3f} {eff_f:>7.0%} {t_fb:>10.3f} {eff_fb:>7.0%}")


if __name__ == "__main__":
    main()
