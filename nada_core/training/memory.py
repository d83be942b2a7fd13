"""The CPU memory setting for training processes (entered by the entry points, not by the run loop)."""
from __future__ import annotations

import contextlib
import ctypes
import threading

import torch

# glibc's mallopt parameters and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_memory_lock = threading.Lock()
_memory_users = 0


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, Windows, musl)
        return None


@contextlib.contextmanager
def reused_memory():
    """glibc serves large blocks from its heap and keeps freed ones for reuse, instead of mapping fresh pages for
    every tensor above 32 MB and returning them on free: on CPU the page faults on fresh pages cost more than the
    arithmetic of the high-resolution layers (bench/generator.py --compare; figures in bench/results/). On exit
    the defaults come back and the freed memory goes back to the system (``malloc_trim``). Process-wide and
    reference-counted, so it belongs to entry points (the CLI's training commands, a CPU app, a batch job), never
    to a library call; does nothing where the C library is not glibc."""
    global _memory_users
    libc = _glibc()
    if libc is None:
        yield
        return
    with _memory_lock:
        if _memory_users == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)
        _memory_users += 1
    try:
        yield
    finally:
        with _memory_lock:
            _memory_users -= 1
            if _memory_users == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)


def for_device(device) -> contextlib.AbstractContextManager:
    """``reused_memory()`` for CPU training, nothing elsewhere (GPU memory has its own caching allocator)."""
    return reused_memory() if torch.device(device).type == "cpu" else contextlib.nullcontext()
