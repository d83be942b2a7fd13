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
import json
import os
import re
from pathlib import Path

import torch

from ..guidance.text_limits import text_problem
from ..models.fingerprint import fingerprint
from ..models.stylegan2 import Generator
from . import bounded_json
from .bounded_json import JSONRefused
from .checkpoints import (
    atomic_write,
    check_config,
    first_non_finite,
    read_safetensors_header,
    safetensors_metadata,
)

FORMAT_NAME = "nada-studio-delta"
FORMAT_VERSION = 1
SUFFIX = ".nada.safetensors"


class DeltaError(ValueError):
    """A delta that cannot be written or applied, with the reason."""


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}   # what a difference of weights can be stored as
SNIFF_BYTES = 64 << 10                          # our writer puts the metadata first in the header


def _not_delta(name: str, why: str) -> DeltaError:
    return DeltaError(f"{name}: not a NADA delta: {why}")


def is_delta(path: str | os.PathLike, display_name: str | None = None) -> bool:
    """Whether a file claims to be a style delta: named ``*.nada.safetensors``, or a safetensors file whose header
    mentions our delta metadata in its first 64 KiB (read as bytes, not parsed), so that a damaged delta is told
    apart from a generator file and described as a delta."""
    if (display_name or Path(path).name).endswith(SUFFIX):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(8 + SNIFF_BYTES)
    except OSError:
        return False
    return head[8:9] == b"{" and b'"nada-delta"' in head


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
    ``meta`` (recipe, source model name, ...) and the base's fingerprint, as one safetensors file. Refuses a
    model or base with non-finite values, and metadata that reading the delta would refuse."""
    from safetensors.torch import save_file

    for what, G in (("the model", G_adapted), ("the base", G_base)):
        bad = first_non_finite(G.state_dict())
        if bad is not None:
            raise DeltaError(f"{what}'s tensor {bad!r} holds NaN or infinite values; no delta was written")
    diffs = {k: _storage(v).contiguous() for k, v in changed_tensors(G_adapted, G_base).items()}
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": G_base.config,
              "base_fingerprint": fingerprint(G_base), "meta": meta or {}, "tensors": len(diffs),
              "of_tensors": len(G_base.state_dict())}
    try:
        _checked_header(header)
        text = json.dumps(header)
        bounded_json.loads(text, "its metadata")
    except ValueError as e:
        raise DeltaError(f"the delta's metadata could not be read back ({e}); no delta was written") from None
    return atomic_write(path, lambda tmp: save_file(diffs, tmp, metadata={"nada-delta": text}))


def _checked_header(header: dict) -> dict:
    """Our delta metadata with every field of the type it must have (ValueError naming the first that is not)."""
    if header.get("format") != FORMAT_NAME:
        raise ValueError(f"its metadata names the format {str(header.get('format'))[:40]!r}")
    if type(header.get("version")) is not int or not 1 <= header["version"] <= FORMAT_VERSION:
        raise ValueError(f"format version {str(header.get('version'))[:20]} is not one this program reads")
    try:
        config = check_config(header.get("config"))
    except ValueError as e:
        raise ValueError(str(e)) from None
    fp = header.get("base_fingerprint")
    if not isinstance(fp, str) or not re.fullmatch(r"[0-9a-f]{64}", fp):
        raise ValueError("its base fingerprint is not a sha256 hex digest")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"its meta is {_kind(meta)}, not a JSON object")
    recipe = meta.get("recipe", {})
    if not isinstance(recipe, dict):
        raise ValueError(f"its recipe is {_kind(recipe)}, not a JSON object")
    for key in ("source", "target"):
        problem = text_problem(recipe.get(key), f"its recipe's {key} text")
        if problem:
            raise ValueError(problem)
    for key in ("source_model", "name"):
        if key in meta and (not isinstance(meta[key], str) or len(meta[key]) > 200):
            raise ValueError(f"its meta's {key} is not a name")
    return {**header, "config": config, "meta": meta}


def _kind(value) -> str:
    return {list: "a JSON array", str: "a JSON text", bool: "a JSON boolean", type(None): "JSON null"}.get(
        type(value), "a JSON number")


def _read_header(path: Path, name: str) -> tuple[dict, dict]:
    """(the checked delta metadata, the safetensors tensor entries), read and checked before any tensor is."""
    if not path.is_file():
        raise DeltaError(f"{name}: no such file")
    try:
        raw, data_bytes = read_safetensors_header(path)
        header = safetensors_metadata(raw, "nada-delta", "its metadata")
    except JSONRefused as e:
        raise _not_delta(name, str(e)) from None
    except OSError as e:
        raise DeltaError(f"{name}: could not read it ({e.strerror or e})") from None
    if header is None:
        if isinstance(raw.get("__metadata__"), dict) and "nada" in raw["__metadata__"]:
            raise DeltaError(f"{name}: not a NADA Studio style delta (a full model? import or load it as a model)")
        raise _not_delta(name, "a safetensors file without delta metadata")
    try:
        header = _checked_header(header)
    except ValueError as e:
        raise _not_delta(name, str(e)) from None
    entries = {k: v for k, v in raw.items() if k != "__metadata__"}
    for key, entry in entries.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in FLOAT_DTYPES:
            raise _not_delta(name, f"tensor {key[:60]!r} is {str(dtype)[:10]}; a delta holds floating-point "
                                   "differences only")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or len(shape) > 8 or any(type(d) is not int or d < 0 for d in shape) \
                or not isinstance(offsets, list) or len(offsets) != 2 or any(type(o) is not int for o in offsets) \
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes:
            raise _not_delta(name, f"the entry of tensor {key[:60]!r} is damaged")
    return header, entries


def read_delta(path: str | os.PathLike, display_name: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(differences, header) of a delta file; header holds config, base_fingerprint and meta (a JSON object, its
    recipe one too). DeltaError (``<name>: not a NADA delta: ...``) for anything else, named as ``display_name``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    name = display_name or str(path)
    header, _ = _read_header(path, name)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _not_delta(name, f"its tensors are damaged ({str(e)[:120]})") from None
    bad = first_non_finite(tensors)
    if bad is not None:
        raise _not_delta(name, f"tensor {bad!r} holds NaN or infinite values")
    return tensors, header


def delta_info(path: str | os.PathLike, display_name: str | None = None) -> dict:
    """The delta's checked header (config, base_fingerprint, meta), read without its tensors."""
    path = Path(path)
    return _read_header(path, display_name or str(path))[0]


@torch.no_grad()
def apply_delta(path: str | os.PathLike, G_base: Generator, display_name: str | None = None) -> Generator:
    """Rebuild the adapted generator: a copy of ``G_base`` plus the stored differences. Refuses a
    base whose architecture or fingerprint differs from the one the delta was made from."""
    name = display_name or str(path)
    diffs, header = read_delta(path, display_name)
    if header["config"] != G_base.config:
        raise DeltaError(f"{name}: made for a {header['config']} generator, the given base is {G_base.config}")
    got, want = fingerprint(G_base), header["base_fingerprint"]
    if got != want:
        source = header["meta"].get("source_model") or "another base"
        raise DeltaError(f"{name}: this style was trained from {source} (fingerprint {want[:12]}...), "
                         f"but the given base has fingerprint {got[:12]}...; load the same base model it was made from")
    G = copy.deepcopy(G_base)
    state = G.state_dict()
    unknown = sorted(set(diffs) - set(state))
    if unknown:
        raise DeltaError(f"{name}: tensors {unknown[:3]} do not exist in the base")
    wrong = [k for k, d in diffs.items() if tuple(d.shape) != tuple(state[k].shape)]
    if wrong:
        raise DeltaError(f"{name}: tensors {wrong[:3]} have other shapes than the base's")
    for key, d in diffs.items():
        t = state[key]
        t.copy_((t.float() + d.to(t.device).float()).to(t.dtype))
    bad = first_non_finite({k: state[k] for k in diffs})
    if bad is not None:
        raise DeltaError(f"{name}: on this base, tensor {bad!r} becomes non-finite")
    return G.eval()
