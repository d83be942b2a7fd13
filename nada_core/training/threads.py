"""How many CPU threads a training process computes with (entered through training.process, as training.memory)."""
from __future__ import annotations

import contextlib
import threading

import torch

_lock = threading.Lock()
_users = 0
_before = 0


@contextlib.contextmanager
def one_thread():
    """Compute on one CPU thread inside the block (process-wide, reference-counted; the count before comes back).

    For the tiny models: their layers are too small to share between threads, and once a second Python thread
    computes (a run in its own thread, a page being served), libgomp stops spinning its idle workers because it
    manages more threads than there are cores, so that every small parallel op waits for a worker to wake up:
    two threads then took twice as long per step as one (bench/results/cpu-2026-12-07/threads.log). Real models'
    ops are long enough that a wake-up does not show; they keep PyTorch's thread count."""
    global _users, _before
    with _lock:
        if _users == 0:
            _before = torch.get_num_threads()
            torch.set_num_threads(1)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                torch.set_num_threads(_before)


def for_models(device, tiny: bool) -> contextlib.AbstractContextManager:
    """``one_thread()`` for tiny models on the CPU, nothing otherwise."""
    return one_thread() if tiny and torch.device(device).type == "cpu" else contextlib.nullcontext()
