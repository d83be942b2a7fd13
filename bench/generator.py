"""Generator speed: forward and forward+backward at 256 and 1024 px, batch 2, against this machine's
float32 matmul throughput. Prints efficiency = achieved GFLOP/s / matmul GFLOP/s, with the FLOPs of
one forward counted by torch.utils.flop_counter.FlopCounterMode (forward+backward counted as 3x).
Random weights: speed does not depend on their values. Times are medians of --reps runs after a warm-up;
the matmul reference is measured before and after the generator runs and the higher figure is used.
The generator runs as training runs it: inside ``training.memory.reused_memory()`` (on CPU).

--compare also times, in the same run and alternating with the default so that all share the machine's load:
on CPU "plain-malloc" (the default formulation without ``reused_memory``) and "grouped-nchw" (the formulation
CPU training used before, ``stylegan2.formulation(cpu_training_layout=False)``, without ``reused_memory``); on CUDA the
formulation ``stylegan2.Formulation.device`` does not name ("grouped" or "scaled"). --reference adds the
rosinality formulation with its pure-PyTorch ops (bench/reference_generator.py) on the same weights.
--amp bf16|both times under bfloat16 autocast (``--amp bf16`` training). On CUDA the peak memory of each
forward+backward is reported (weights and gradients included).

Usage: python bench/generator.py [--device cuda] [--sizes 256 1024] [--reps 3] [--compare] [--reference]
                                 [--amp off|bf16|both]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_generator import reference_synthesis  # noqa: E402

from nada_core.models import stylegan2  # noqa: E402
from nada_core.models.stylegan2 import Generator  # noqa: E402
from nada_core.training.memory import reused_memory  # noqa: E402


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


def formulation(cpu_layout=True, device_formulation="grouped"):
    return stylegan2.formulation(cpu_training_layout=cpu_layout, device=device_formulation)


def variants(args, device):
    """(name, synthesis function, context factory, reuse memory) per formulation timed."""
    cpu = device.type == "cpu"
    ours = lambda G, ws: G.synthesis(ws)  # noqa: E731
    default = stylegan2.current_formulation().device
    rows = [("default", ours, lambda: formulation(device_formulation=default), cpu)]
    if args.compare and cpu:
        rows += [("plain-malloc", ours, formulation, False),
                 ("grouped-nchw", ours, lambda: formulation(cpu_layout=False), False)]
    elif args.compare:  # the other CUDA formulation
        other = "grouped" if default == "scaled" else "scaled"
        rows += [(other, ours, lambda: formulation(device_formulation=other), False)]
    if args.reference:
        rows += [("reference", reference_synthesis, contextlib.nullcontext, False)]
    amps = {"off": [False], "bf16": [True], "both": [False, True]}[args.amp]
    return [(name + ("+bf16" if amp else ""), fn, ctx, reuse, amp) for amp in amps for name, fn, ctx, reuse in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compare", action="store_true",
                    help="also time the other formulations of this device, interleaved with the default")
    ap.add_argument("--reference", action="store_true", help="also time the rosinality formulation (pure PyTorch)")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "both"], help="bfloat16 autocast")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    peak_before = matmul_gflops(device)
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    rows = []
    timed = variants(args, device)
    for size in args.sizes:
        cm = 1 if size <= 256 else 2  # the CPU-friendly FFHQ-256 base vs config-f
        G = Generator(size, channel_multiplier=cm).to(device)
        ws = torch.randn(args.batch, G.n_latent, 512, device=device)
        with FlopCounterMode(display=False) as fc:
            G.synthesis(ws)
        flops = fc.get_total_flops()
        times = {(name, kind): [] for name, *_ in timed for kind in ("fwd", "fb")}
        peak_mem = {}
        for rep in range(args.reps + 1):  # the first round warms up
            for name, fn, ctx, reused, amp in timed:
                autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

                def fwd(fn=fn, G=G):
                    with torch.no_grad():
                        fn(G, ws)

                def fwd_bwd(fn=fn, G=G):
                    G.zero_grad(set_to_none=True)
                    fn(G, ws).float().square().mean().backward()

                with reused_memory() if reused else contextlib.nullcontext(), ctx(), autocast:
                    if reused and rep:
                        fwd_bwd()  # fills the heap, as the steps before it do in a training run
                    t_f = once(fwd, device)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    t_fb = once(fwd_bwd, device)
                    if cuda:
                        peak_mem[name] = max(peak_mem.get(name, 0), torch.cuda.max_memory_allocated(device))
                if rep:
                    times[name, "fwd"].append(t_f)
                    times[name, "fb"].append(t_fb)
        G.zero_grad(set_to_none=True)
        for name, *_ in timed:
            rows.append((size, cm, name, flops, statistics.median(times[name, "fwd"]),
                         statistics.median(times[name, "fb"]), peak_mem.get(name)))
        del G  # free the model before the next size
    peak = max(peak_before, matmul_gflops(device))
    print(f"float32 matmul 2048x2048: {peak_before:.1f} GFLOP/s before, {peak:.1f} used (the higher of before/after)")
    print(f"{'size':>5} {'cm':>3} {'formulation':>17} {'GFLOP fwd':>10} {'fwd s':>8} {'fwd eff':>8} {'fwd+bwd s':>10} "
          f"{'f+b eff':>8}" + (f" {'f+b peak GiB':>13}" if cuda else ""))
    for size, cm, name, flops, t_fwd, t_fb, mem in rows:
        eff_f = flops / t_fwd / 1e9 / peak
        eff_fb = 3 * flops / t_fb / 1e9 / peak  # backward ~ 2x forward FLOPs
        print(f"{size:>5} {cm:>3} {name:>17} {flops / 1e9:>10.1f} {t_fwd:>8.4f} {eff_f:>7.0%} {t_fb:>10.4f} {eff_fb:>7.0%}"
              + (f" {mem / 2 ** 30:>13.2f}" if mem is not None else ""))


if __name__ == "__main__":
    main()
