"""Generator forward+backward on the CPU in the main thread and in a second thread, with PyTorch's thread count
and with one thread: the evidence behind training.threads (tiny models train on one thread).

    python bench/threads.py [--sizes tiny 256] [--reps 200 4]

A second thread that computes makes libgomp manage more threads than there are cores; it then stops spinning
its idle workers, and every parallel op waits for a wake-up. Small ops (the tiny models) pay it in full."""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nada_core.models.stylegan2 import Generator  # noqa: E402
from nada_core.models.tiny import tiny_generator  # noqa: E402
from nada_core.training.memory import reused_memory  # noqa: E402


def per_step(G, ws, reps: int) -> float:
    G.zero_grad(set_to_none=True)
    G.synthesis(ws).square().mean().backward()   # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        G.zero_grad(set_to_none=True)
        G.synthesis(ws).square().mean().backward()
    return (time.perf_counter() - t) / reps


def in_thread(fn) -> float:
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "256"])
    p.add_argument("--reps", nargs="+", type=int, default=[200, 4])
    args = p.parse_args()
    default = torch.get_num_threads()
    print(f"torch {torch.__version__}, {default} threads by default")
    with reused_memory():
        for size, reps in zip(args.sizes, args.reps):
            G = tiny_generator() if size == "tiny" else Generator(int(size), channel_multiplier=1)
            ws = torch.randn(2, G.n_latent, G.style_dim)
            for threads in (default, 1):
                torch.set_num_threads(threads)
                main_s = per_step(G, ws, reps)
                other_s = in_thread(lambda: per_step(G, ws, reps))
                print(f"{size:>5} px, {threads} thread(s): main thread {main_s * 1000:8.1f} ms, "
                      f"second thread {other_s * 1000:8.1f} ms  ({other_s / main_s:.2f}x)", flush=True)
            torch.set_num_threads(default)


if __name__ == "__main__":
    main()
