"""Style deltas: an adapted generator stored as its difference from the base it was trained from.

StyleGAN-NADA trains some synthesis layers and leaves the mapping network, the ToRGB layers and
the buffers as they were, so a style needs only the tensors that changed. A delta file is one
safetensors file holding, for each tensor that differs, ``adapted - base`` in float16 (float32 where
a difference does not fit float16), plus JSON metadata: the generator config, the recipe / meta, and
the base's fingerprint (sha256 over its state-dict tensors in a fixed order). Applying a delta to a
different base is refused, since the difference only means something on top of the same weights.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch

from ..models.stylegan2 import Generator
from .checkpoints import atomic_write

FORMAT_NAME = "nada-studio-delta"
FORMAT_VERSION = 1
SUFFIX = ".nada.safetensors"


class DeltaError(ValueError):
    """A delta that cannot be written or applied, with the reason."""


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


def changed_tensors(G_adapted: Generator, G_base: Generator) -> dict[str, torch.Tensor]:
    """``adapted - base`` (float32, CPU) for every state-dict entry whose values differ."""
    if G_adapted.config != G_base.config:
        raise DeltaError(f"the model and the base have different architectures ({G_adapted.config} vs {G_base.config})")
    base = G_base.state_dict()
    out = {}
    for name, t in G_adapted.state_dict().items():
        a, b = t.detach().to("cpu"), base[name].detach().to("cpu")
        if not torch.equal(a, b):
            out[name] = a.float() - b.float()
    return out


def _storage(diff: torch.Tensor) -> torch.Tensor:
    half = diff.half()
    return half if torch.isfinite(half).all() or not torch.isfinite(diff).all() else diff


def export_delta(G_adapted: Generator, G_base: Generator, meta: dict | None, path: str | os.PathLike) -> Path:
    """Write the tensors of ``G_adapted`` that differ from ``G_base`` as float16 differences, with
    ``meta`` (recipe, source model name, ...) and the base's fingerprint, as one safetensors file."""
    from safetensors.torch import save_file

    diffs = {k: _storage(v).contiguous() for k, v in changed_tensors(G_adapted, G_base).items()}
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": G_base.config,
              "base_fingerprint": fingerprint(G_base), "meta": meta or {}, "tensors": len(diffs),
              "of_tensors": len(G_base.state_dict())}
    return atomic_write(path, lambda tmp: save_file(diffs, tmp, metadata={"nada-delta": json.dumps(header)}))


def read_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(differences, header) of a delta file; header holds config, base_fingerprint and meta."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DeltaError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("nada-delta", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise DeltaError(f"{path}: not a readable style delta ({e})") from None
    if header.get("format") != FORMAT_NAME:
        raise DeltaError(f"{path}: not a NADA Studio style delta (a full model? load it directly instead)")
    return tensors, header


def delta_info(path: str | os.PathLike) -> dict:
    """The delta's header without its tensors' values being used: config, base_fingerprint, meta."""
    return read_delta(path)[1]


@torch.no_grad()
def apply_delta(path: str | os.PathLike, G_base: Generator) -> Generator:
    """Rebuild the adapted generator: a copy of ``G_base`` plus the stored differences. Refuses a
    base whose architecture or fingerprint differs from the one the delta was made from."""
    diffs, header = read_delta(path)
    if header.get("config") != G_base.config:
        raise DeltaError(f"{path}: made for a {header.get('config')} generator, the given base is {G_base.config}")
    got, want = fingerprint(G_base), header.get("base_fingerprint")
    if got != want:
        source = (header.get("meta") or {}).get("source_model") or "another base"
        raise DeltaError(f"{path}: this style was trained from {source} (fingerprint {str(want)[:12]}...), "
                         f"but the given base has fingerprint {got[:12]}...; load the same base model it was made from")
    G = copy.deepcopy(G_base)
    state = G.state_dict()
    unknown = sorted(set(diffs) - set(state))
    if unknown:
        raise DeltaError(f"{path}: tensors {unknown[:3]} do not exist in the base")
    wrong = [k for k, d in diffs.items() if tuple(d.shape) != tuple(state[k].shape)]
    if wrong:
        raise DeltaError(f"{path}: tensors {wrong[:3]} have other shapes than the base's")
    for name, d in diffs.items():
        t = state[name]
        t.copy_((t.float() + d.to(t.device).float()).to(t.dtype))
    return G.eval()
