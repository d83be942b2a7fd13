"""Generator speed: forward and forward+backward at 256 and 1024 px, batch 2, against this machine's
float32 matmul throughput. Prints efficiency = achieved GFLOP/s / matmul GFLOP/s, with the FLOPs of
one forward counted by torch.utils.flop_counter.FlopCounterMode. Random weights: speed does not
depend on their values.  Usage: python bench/generator.py [--device cuda] [--sizes 256 1024] [--reps 3]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nada_core.stylegan2 import Generator  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(device, n=2048, reps=5):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / timed(lambda: a @ b, device, reps) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    peak = matmul_gflops(device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"float32 matmul 2048x2048: {peak:.1f} GFLOP/s")
    print(f"{'size':>5} {'cm':>3} {'GFLOP fwd':>10} {'fwd s':>8} {'fwd eff':>8} {'fwd+bwd s':>10} {'f+b eff':>8}")
    for size in args.sizes:
        cm = 1 if size <= 256 else 2  # the CPU-friendly FFHQ-256 base vs config-f
        G = Generator(size, channel_multiplier=cm).to(device)
        ws = torch.randn(args.batch, G.n_latent, 512, device=device)
        with FlopCounterMode(display=False) as fc:
            G.synthesis(ws)
        flops = fc.get_total_flops()
        with torch.no_grad():
            t_fwd = timed(lambda: G.synthesis(ws), device, args.reps)

        def fwd_bwd():
            G.zero_grad(set_to_none=True)
            G.synthesis(ws).square().mean().backward()

        t_fb = timed(fwd_bwd, device, max(1, args.reps - 1))
        eff_f = flops / t_fwd / 1e9 / peak
        eff_fb = 3 * flops / t_fb / 1e9 / peak  # backward ~ 2x forward FLOPs
        print(f"{size:>5} {cm:>3} {flops / 1e9:>10.1f} {t_fwd:>8.3f} {eff_f:>7.0%} {t_fb:>10.3f} {eff_fb:>7.0%}")


if __name__ == "__main__":
    main()
