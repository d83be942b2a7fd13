"""Which weights a file belongs to: one fingerprint of a generator, shared by style deltas and edit mappers.

A delta applied to another base, or a mapper resumed on another generator, would silently give a wrong result;
the fingerprint names the exact weights whatever the file was called, the same on every device and layout.
"""
from __future__ import annotations

import hashlib
import re

import torch

from .stylegan2 import Generator

_LEGACY = re.compile(r"[0-9a-f]{16}")


def fingerprint(G: Generator) -> str:
    """sha256 over every state-dict tensor in sorted name order: name, dtype, shape, then the values
    as contiguous little-endian float32 (integers as int64), so device and memory layout do not matter."""
    h = hashlib.sha256()
    for name, t in sorted(G.state_dict().items()):
        t = t.detach().to("cpu")
        values = t.float().numpy().astype("<f4") if t.is_floating_point() else t.long().numpy().astype("<i8")
        h.update(name.encode())
        h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(values.tobytes())
    return h.hexdigest()


def _legacy_fingerprint(G: Generator) -> str:
    """The mappers' earlier form (16 hex digits over names and raw bytes), so their files are still recognised."""
    h = hashlib.sha256()
    for name, t in sorted(G.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_matches(saved: str, G: Generator) -> bool:
    """Whether a stored fingerprint (either form) names ``G``'s weights."""
    if not isinstance(saved, str):
        return False
    if _LEGACY.fullmatch(saved):
        return saved == _legacy_fingerprint(G)
    return saved == fingerprint(G)
