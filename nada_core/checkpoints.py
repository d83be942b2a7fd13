"""Load any generator file users have, save our own.

Recognised by content, not by extension:

* our format: safetensors tensors + JSON metadata (generator config, source model, recipe);
* rosinality / StyleGAN-NADA ``.pt`` (a torch zip holding ``{"g_ema": state_dict, ...}``),
  read with ``torch.load(weights_only=True)``;
* NVIDIA stylegan2-ada-pytorch ``.pkl``: read by a restricted unpickler that never imports or
  executes anything named in the file (the embedded class sources are ignored) and maps the
  ``G_ema`` tensors onto our layout.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from safetensors import SafetensorError

from .stylegan2 import Generator, channel_table

FORMAT_NAME = "nada-studio-generator"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A generator file that cannot be used, with the file named and what was expected."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}. Expected a StyleGAN2 generator: our .safetensors, a rosinality/"
                         "StyleGAN-NADA .pt with 'g_ema', or an NVIDIA stylegan2-ada-pytorch .pkl.")
        self.path = str(path)


# --------------------------------------------------------------------------- atomic writes
def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- our format
def save_generator(G: Generator, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``G`` as safetensors with the config and ``meta`` (source, recipe, ...) as JSON."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in G.state_dict().items()}
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": G.config, "meta": meta or {}}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"nada": json.dumps(header)}))


def export_rosinality(G: Generator, path: str | os.PathLike) -> Path:
    """``{"g_ema": state_dict}``: what StyleGAN-NADA and other rosinality-based tools read."""
    sd = {k: v.detach().to("cpu").clone() for k, v in G.state_dict().items()}
    return atomic_write(path, lambda tmp: torch.save({"g_ema": sd}, tmp))


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get("nada", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if header.get("format") != FORMAT_NAME:
        raise CheckpointError(path, "safetensors file without NADA Studio generator metadata")
    return tensors, header


# --------------------------------------------------------------------------- rosinality layout
def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """Rebuild the constructor arguments of a rosinality-layout state dict from its shapes."""
    n_mlp = sum(1 for k in sd if re.fullmatch(r"style\.\d+\.weight", k))
    n_rgbs = sum(1 for k in sd if re.fullmatch(r"to_rgbs\.\d+\.bias", k))
    if n_mlp == 0 or "input.input" not in sd:
        raise KeyError("no mapping network ('style.N.weight') or constant input ('input.input')")
    size, style_dim, channel_max = 2 ** (n_rgbs + 2), sd["style.1.weight"].shape[0], sd["input.input"].shape[1]
    actual = {2 ** (j + 3): sd[f"convs.{2 * j}.conv.weight"].shape[1] for j in range(n_rgbs)}
    for cm in (2, 1, 4, 8):
        table = channel_table(cm, channel_max)
        if all(table[r] == c for r, c in actual.items()):
            return {"size": size, "style_dim": style_dim, "n_mlp": n_mlp, "channel_multiplier": cm, "channel_max": channel_max}
    raise KeyError(f"channel counts {actual} fit no channel multiplier")


def generator_from_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike = "<state dict>") -> Generator:
    try:
        G = Generator(**infer_config(sd))
        G.load_state_dict(sd, strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(path, f"state dict does not fit the StyleGAN2 layout ({str(e).splitlines()[0][:300]})") from None
    return G.eval()


# --------------------------------------------------------------------------- NVIDIA pickles
class _Inert(dict):
    """Stands in for every class a pickle names: it stores what it is given and runs nothing."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __reduce__(self):  # never re-pickled
        raise TypeError("inert placeholder")


_SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "dict": dict, "list": list, "tuple": tuple, "int": int,
                  "float": float, "bool": bool, "str": str, "bytes": bytes, "bytearray": bytearray,
                  "slice": slice, "complex": complex}


def _storage_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


class _Persistent:
    """An NVIDIA ``persistent_class`` object: its class name and saved ``__dict__``; its source is ignored."""

    def __init__(self, meta: dict):
        self.class_name = meta.get("class_name", "?")
        self.state = meta.get("state") or {}


def _inert_class(module: str, name: str) -> type:
    return type(name, (_Inert,), {"qualname": f"{module}.{name}"})


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuild helpers and plain containers; everything else becomes inert."""

    def find_class(self, module: str, name: str):
        if module == "torch_utils.persistence" and name == "_reconstruct_persistent_obj":
            return _Persistent
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter",
                                                 "_rebuild_parameter_with_state"):
            return getattr(torch._utils, name)
        if module == "torch.storage" and name == "_load_from_bytes":
            return _storage_from_bytes
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module == "collections" and name == "OrderedDict":
            import collections
            return collections.OrderedDict
        if module == "builtins" and name in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[name]
        if module == "copyreg" and name == "_reconstructor":
            return lambda cls, base, state: cls() if isinstance(cls, type) and issubclass(cls, _Inert) else None
        return _inert_class(module, name)


def _module_state(obj: Any) -> dict:
    if isinstance(obj, _Persistent):
        return obj.state
    return getattr(obj, "__dict__", {}).get("_state") or {}


def _flatten_module(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    state, out = _module_state(obj), {}
    for group in ("_parameters", "_buffers"):
        for k, v in (state.get(group) or {}).items():
            if isinstance(v, torch.Tensor):
                out[prefix + k] = v.detach()
    for k, child in (state.get("_modules") or {}).items():
        out.update(_flatten_module(child, f"{prefix}{k}."))
    return out


def ada_to_rosinality(ada: dict[str, torch.Tensor], G: Generator) -> dict[str, torch.Tensor]:
    """Rename/reshape stylegan2-ada-pytorch ``G_ema`` tensors into our layout (no flips needed: both
    layouts store the up-sampling kernels flipped relative to TF). Blur kernels come from ``G``."""
    sd = dict(G.state_dict())
    for i in range(G.n_mlp):
        sd[f"style.{i + 1}.weight"], sd[f"style.{i + 1}.bias"] = ada[f"mapping.fc{i}.weight"], ada[f"mapping.fc{i}.bias"]
    sd["input.input"] = ada["synthesis.b4.const"].unsqueeze(0)

    def layer(src: str, dst: str, noise_index: int) -> None:
        sd[f"{dst}.conv.weight"] = ada[f"{src}.weight"].unsqueeze(0)
        sd[f"{dst}.conv.modulation.weight"] = ada[f"{src}.affine.weight"]
        sd[f"{dst}.conv.modulation.bias"] = ada[f"{src}.affine.bias"]
        sd[f"{dst}.noise.weight"] = ada[f"{src}.noise_strength"].reshape(1)
        sd[f"{dst}.activate.bias"] = ada[f"{src}.bias"]
        const = ada[f"{src}.noise_const"]
        sd[f"noises.noise_{noise_index}"] = const.reshape(1, 1, *const.shape[-2:])

    def torgb(src: str, dst: str) -> None:
        sd[f"{dst}.conv.weight"] = ada[f"{src}.weight"].unsqueeze(0)
        sd[f"{dst}.conv.modulation.weight"] = ada[f"{src}.affine.weight"]
        sd[f"{dst}.conv.modulation.bias"] = ada[f"{src}.affine.bias"]
        sd[f"{dst}.bias"] = ada[f"{src}.bias"].view(1, 3, 1, 1)

    layer("synthesis.b4.conv1", "conv1", 0)
    torgb("synthesis.b4.torgb", "to_rgb1")
    for j in range(len(G.to_rgbs)):
        res = 2 ** (j + 3)
        layer(f"synthesis.b{res}.conv0", f"convs.{2 * j}", 2 * j + 1)
        layer(f"synthesis.b{res}.conv1", f"convs.{2 * j + 1}", 2 * j + 2)
        torgb(f"synthesis.b{res}.torgb", f"to_rgbs.{j}")
    return sd


def _load_nvidia_pickle(path: Path) -> tuple[Generator, dict]:
    with open(path, "rb") as f:
        data = RestrictedUnpickler(f).load()
    g_ema = data.get("G_ema") if isinstance(data, dict) else None
    if g_ema is None:
        raise CheckpointError(path, "pickle has no 'G_ema' entry")
    ada = _flatten_module(g_ema)
    try:
        n_mlp = sum(1 for k in ada if re.fullmatch(r"mapping\.fc\d+\.weight", k))
        top = max(int(m.group(1)) for k in ada if (m := re.fullmatch(r"synthesis\.b(\d+)\.torgb\.weight", k)))
        guess = {"style.1.weight": ada["mapping.fc0.weight"], "input.input": ada["synthesis.b4.const"][None]}
        guess.update({f"style.{i + 1}.weight": ada[f"mapping.fc{i}.weight"] for i in range(n_mlp)})
        for j in range(top.bit_length() - 3):  # resolutions 8 .. top
            guess[f"to_rgbs.{j}.bias"] = ada[f"synthesis.b{2 ** (j + 3)}.torgb.bias"]
            guess[f"convs.{2 * j}.conv.weight"] = ada[f"synthesis.b{2 ** (j + 3)}.conv0.weight"][None]
        G = Generator(**infer_config(guess))
        G.load_state_dict(ada_to_rosinality(ada, G), strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(path, f"G_ema does not have the stylegan2-ada-pytorch layout ({e!s:.300})") from None
    return G.eval(), {"format": "nvidia-ada-pkl", "config": G.config}


# --------------------------------------------------------------------------- entry points
def sniff(path: str | os.PathLike) -> str:
    """'safetensors', 'torch-zip', 'pickle' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head.startswith(b"\x80"):
        return "pickle"
    return "unknown"


_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def _is_legacy_torch_file(path: Path) -> bool:
    """Pre-1.6 ``torch.save`` files begin with torch's magic number pickled on its own. Compared as
    bytes: unpickling anything from an untrusted file to find out would already run its code."""
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_TORCH_MAGIC)) == _LEGACY_TORCH_MAGIC


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Generator, dict]:
    """Load a generator from any supported file. Returns ``(G in eval mode, info)``; ``info`` holds
    ``format``, ``config`` and, for our files, the ``meta`` (source model, recipe) they were saved with."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    kind = sniff(path)
    try:
        if kind == "safetensors":
            tensors, header = _read_safetensors(path)
            G = Generator(**header["config"])
            G.load_state_dict(tensors, strict=True)
            G, info = G.eval(), {"format": "nada-safetensors", "config": header["config"], "meta": header.get("meta", {})}
        elif kind == "torch-zip" or (kind == "pickle" and _is_legacy_torch_file(path)):
            # rosinality training checkpoints carry their argparse.Namespace: allow that one harmless class
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            sd = ckpt.get("g_ema", ckpt) if isinstance(ckpt, dict) else None
            if not isinstance(sd, dict):
                raise CheckpointError(path, "torch file without a 'g_ema' state dict")
            G = generator_from_state_dict(sd, path)
            info = {"format": "rosinality-pt", "config": G.config}
        elif kind == "pickle":
            G, info = _load_nvidia_pickle(path)
        else:
            raise CheckpointError(path, "unrecognised file type (first bytes match no known format)")
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError, KeyError,
            SafetensorError) as e:
        raise CheckpointError(path, f"file is damaged or truncated ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return G.to(device), info
