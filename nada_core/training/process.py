"""The CPU settings a training process enters around its runs, in one place for every entry point (app.py, the
CLI's training commands, a batch job, the tests' app): memory reuse (training.memory) and, for the tiny models,
one thread (training.threads)."""
from __future__ import annotations

import contextlib

from .memory import for_device
from .threads import for_models


@contextlib.contextmanager
def training_process(device, tiny: bool = False):
    """Process-wide and reference-counted, as both settings are; nothing changes on a GPU."""
    with for_device(device), for_models(device, tiny):
        yield
