"""Load any generator file users have, save our own.

Recognised by content, not by extension:

* our format: safetensors tensors + JSON metadata (generator config, source model, recipe);
* rosinality / StyleGAN-NADA ``.pt``: a torch zip or a pre-1.6 torch file holding ``{"g_ema": state_dict, ...}``;
* NVIDIA stylegan2-ada-pytorch ``.pkl``: the ``G_ema`` tensors, mapped onto our layout.

Every file is untrusted (users upload them), so before anything is built:

* all pickles, torch files included, go through one restricted unpickler of ours instead of ``torch.load``:
  it resolves only tensor-rebuild helpers and plain containers, refuses standard-library and torch callables,
  and turns every other class a file names into an inert placeholder, so nothing in a file ever runs;
* a storage is allocated only after its declared size is checked against the bytes that hold it, all storages
  together may not exceed the file's size, and a tensor must lie inside its storage;
* a generator config is checked against sane bounds, and the bytes its tensors need against the file's size,
  before ``Generator(...)`` allocates anything; safetensors headers are checked before any tensor is read.
"""
from __future__ import annotations

import collections
import io
import json
import math
import mmap
import os
import pickle
import re
import struct
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..models.stylegan2 import Generator, channel_table
from . import bounded_json
from .bounded_json import JSONRefused

FORMAT_NAME = "nada-studio-generator"
FORMAT_VERSION = 1
W_AVG_KEY = "_nada.w_avg"  # our safetensors: the stored truncation centre, beside the state dict
MAX_PICKLE_OPS = 1_000_000  # real generator pickles need ~1e5; an op makes at most a ~64-byte object (sets count 4)
MAX_FOREIGN_CLASSES = 1000  # distinct class names a file may use (each becomes a placeholder class, ~1 kB)


class CheckpointError(ValueError):
    """A generator file that cannot be used, named as the user knows it, with what was expected.
    ``path`` is that shown name (the display name when one was given, never a server path then)."""

    def __init__(self, name: str | os.PathLike, problem: str):
        super().__init__(f"{name}: {problem}. Expected a StyleGAN2 generator: our .safetensors, a rosinality/"
                         "StyleGAN-NADA .pt with 'g_ema', or an NVIDIA stylegan2-ada-pytorch .pkl.")
        self.path = str(name)


class _Refused(ValueError):
    """Raised where a file breaks a rule; ``load_generator`` turns it into a CheckpointError naming the file."""


def _damaged(what: str) -> _Refused:
    return _Refused(f"file is damaged or truncated ({what})")


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


# --------------------------------------------------------------------------- finite values
def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or an infinity (None when every one is finite): a
    diverged or damaged model renders black or noise, and every mix or delta made from it inherits that."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


# --------------------------------------------------------------------------- saving
def save_generator(G: Generator, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``G`` as safetensors with the config and ``meta`` (source, recipe, ...) as JSON; a stored
    truncation centre travels as the extra tensor ``W_AVG_KEY``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in G.state_dict().items()}
    if G.stored_w_avg is not None:
        tensors[W_AVG_KEY] = G.stored_w_avg.detach().to("cpu", torch.float32).reshape(1, G.style_dim).contiguous()
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": G.config, "meta": meta or {}}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"nada": json.dumps(header)}))


def export_rosinality(G: Generator, path: str | os.PathLike) -> Path:
    """``{"g_ema": state_dict}``: what StyleGAN-NADA and other rosinality-based tools read (plus the
    ``latent_avg`` that pSp/e4e-style checkpoints carry, when ``G`` has a stored centre)."""
    ckpt: dict[str, Any] = {"g_ema": {k: v.detach().to("cpu").clone() for k, v in G.state_dict().items()}}
    if G.stored_w_avg is not None:
        ckpt["latent_avg"] = G.stored_w_avg.detach().to("cpu", torch.float32).reshape(G.style_dim).clone()
    return atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


# --------------------------------------------------------------------------- configs: bounds and size
CONFIG_BOUNDS = {"size": (8, 1024), "style_dim": (1, 1024), "n_mlp": (1, 16), "channel_multiplier": (1, 4),
                 "channel_max": (1, 1024)}


def check_config(cfg: Any) -> dict:
    """A config read from a file, checked against what a StyleGAN2 generator can sanely be: a file can ask
    for anything, and ``Generator(**cfg)`` would allocate it. Raises ValueError."""
    if not isinstance(cfg, dict) or "size" not in cfg or not set(cfg) <= set(CONFIG_BOUNDS):
        raise _Refused(f"generator config must be a JSON object with 'size' and keys from {sorted(CONFIG_BOUNDS)}, "
                       f"got {str(cfg)[:120]}")
    for key, value in cfg.items():
        lo, hi = CONFIG_BOUNDS[key]
        if type(value) is not int or not lo <= value <= hi:
            raise _Refused(f"generator config {key}={str(value)[:40]} is outside {lo}..{hi}")
    if cfg["size"] & (cfg["size"] - 1):
        raise _Refused(f"generator config size={cfg['size']} is not a power of two")
    return dict(cfg)


def expected_layout(cfg: dict) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of a (checked) config, from the channel table: nothing is allocated
    (building a Generator on the meta device would do, but pulls in ~150 MB of torch's Python meta kernels).
    Kept equal to ``Generator(**cfg).state_dict()`` by a test."""
    size, D = cfg["size"], cfg.get("style_dim", 512)
    ch = channel_table(cfg.get("channel_multiplier", 2), cfg.get("channel_max", 512))
    out: dict[str, tuple[int, ...]] = {}
    for i in range(1, cfg.get("n_mlp", 8) + 1):
        out[f"style.{i}.weight"], out[f"style.{i}.bias"] = (D, D), (D,)

    def modulated(name: str, cin: int, cout: int, k: int) -> None:
        out.update({f"{name}.weight": (1, cout, cin, k, k), f"{name}.modulation.weight": (cin, D),
                    f"{name}.modulation.bias": (cin,)})

    def styled(name: str, cin: int, cout: int, up: bool) -> None:
        modulated(f"{name}.conv", cin, cout, 3)
        out.update({f"{name}.noise.weight": (1,), f"{name}.activate.bias": (cout,)})
        if up:
            out[f"{name}.conv.blur.kernel"] = (4, 4)

    def to_rgb(name: str, cin: int, up: bool) -> None:
        modulated(f"{name}.conv", cin, 3, 1)
        out[f"{name}.bias"] = (1, 3, 1, 1)
        if up:
            out[f"{name}.upsample.kernel"] = (4, 4)

    out["input.input"] = (1, ch[4], 4, 4)
    styled("conv1", ch[4], ch[4], False)
    to_rgb("to_rgb1", ch[4], False)
    n_res = int(math.log2(size)) - 2
    for j in range(n_res):
        cin, cout = ch[2 ** (j + 2)], ch[2 ** (j + 3)]
        styled(f"convs.{2 * j}", cin, cout, True)
        styled(f"convs.{2 * j + 1}", cout, cout, False)
        to_rgb(f"to_rgbs.{j}", cout, True)
    for i in range(2 * n_res + 1):
        res = 2 ** ((i + 5) // 2)
        out[f"noises.noise_{i}"] = (1, 1, res, res)
    return out


def _check_fits(cfg: Any, file_bytes: int | None) -> dict:
    """Bounds, then size: a file far smaller than the tensors its config needs (at 2 bytes per value,
    allowing half precision) is refused before the generator is built."""
    cfg = check_config(cfg)
    need = 2 * sum(math.prod(s) for s in expected_layout(cfg).values())
    if file_bytes is not None and file_bytes < need:
        raise _Refused(f"the file holds {file_bytes} bytes, too few for the generator it describes ({cfg}: at least "
                       f"{need} bytes of weights)")
    return cfg


# --------------------------------------------------------------------------- bounded, restricted unpickling
class _Budget:
    """What one file may still make us allocate: storage bytes up to the file's size (a pickle can reference
    one blob many times, so checking each storage alone would not bound the total), a number of pickle
    operations (one byte can make a 64-byte object) and of placeholder classes."""

    def __init__(self, nbytes: int):
        self.bytes, self.ops, self.classes = nbytes, MAX_PICKLE_OPS, {}

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.bytes:
            raise _Refused(f"{what} declares {nbytes} bytes, more than the file holds")
        self.bytes -= nbytes


_STORAGE_DTYPES = {f"{n}Storage": d for n, d in [
    ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool), ("Untyped", torch.uint8)]}


class _StorageType:
    """What a ``torch.FloatStorage``-like name resolves to: its dtype, nothing callable."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    """A flat tensor we allocated after its size passed the budget; rebuilt tensors are views of it."""

    def __init__(self, stype: Any, numel: Any, budget: _Budget, available: int):
        if not isinstance(stype, _StorageType) or type(numel) is not int or numel < 0:
            raise _damaged("malformed storage record")
        self.nbytes = numel * stype.dtype.itemsize
        if self.nbytes > available:
            raise _Refused(f"a storage declares {self.nbytes} bytes but only {available} hold it")
        budget.take(self.nbytes, "a storage")
        self.flat = torch.empty(numel, dtype=stype.dtype)

    def fill(self, stream) -> None:
        data = stream.read(self.nbytes)
        if len(data) != self.nbytes:
            raise _damaged("storage data ends early")
        memoryview(self.flat.view(torch.uint8).numpy())[:] = data


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """``torch._utils._rebuild_tensor_v2``, refusing a tensor that reaches outside its storage or has more
    elements than it (torch would grow the storage to fit, or alias one value into a huge tensor)."""
    if not isinstance(storage, _Storage):
        raise _damaged("tensor without a storage")
    dims = [offset, *size, *stride] if isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) else None
    if dims is None or len(size) != len(stride) or len(size) > 8 or any(type(d) is not int or d < 0 for d in dims):
        raise _damaged("malformed tensor record")
    numel, available = math.prod(size), storage.flat.numel()
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if numel and (numel > available or last >= available):
        raise _Refused(f"a tensor of shape {list(size)} reaches outside its storage of {available} values")
    return storage.flat.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data, *_ignored):
    if not isinstance(data, torch.Tensor):
        raise _damaged("parameter without a tensor")
    return data


def _rebuild_from_type(func, _new_type, args, _state=None):
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(args, tuple):
        raise _damaged("malformed tensor record")
    return func(*args)


def _containers_only(cls):
    """``set``/``OrderedDict``/``torch.Size`` as called by pickles: from a list or tuple already in the file,
    never from a tensor or string whose iteration would make many objects out of few bytes."""
    def build(*args):
        if any(not isinstance(a, (list, tuple)) for a in args) or len(args) > 1:
            raise _damaged(f"{cls.__name__} built from something other than a list")
        return cls(*args)
    return build


def _latin1(text, encoding="latin1"):
    """``_codecs.encode``: how protocol-2 pickles store bytes; output as long as its input."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _damaged("unexpected encode call")
    return text.encode("latin1")


class _Inert(dict):
    """Stands in for every foreign class a pickle names: it stores what it is given and runs nothing."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __reduce__(self):  # never re-pickled
        raise TypeError("inert placeholder")


def _inert_class(module: str, name: str) -> type:
    return type(name, (_Inert,), {"qualname": f"{module}.{name}"})


class _Persistent:
    """An NVIDIA ``persistent_class`` object: its class name and saved ``__dict__``; its source is ignored."""

    def __init__(self, meta: Any):
        meta = meta if isinstance(meta, dict) else {}
        self.class_name = meta.get("class_name", "?")
        self.state = meta.get("state") or {}


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): _containers_only(torch.Size),
    ("collections", "OrderedDict"): _containers_only(collections.OrderedDict),
    ("builtins", "set"): _containers_only(set),
    ("builtins", "frozenset"): _containers_only(frozenset),
    ("builtins", "object"): object,  # protocol 0/1 objects: copyreg._reconstructor(cls, object, None)
    ("copyreg", "_reconstructor"): lambda cls, base, state: cls() if isinstance(cls, type) and issubclass(cls, _Inert) else None,
    ("_codecs", "encode"): _latin1,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent,
}
_PY2_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_INERT_STDLIB = {("argparse", "Namespace")}  # rosinality training checkpoints carry their arguments


def _counted(op, cost: int = 1):
    def run(self):
        self.budget.ops -= cost
        if self.budget.ops < 0:
            raise _Refused(f"the pickle is made of more than {MAX_PICKLE_OPS} objects, far more than a generator has")
        op(self)
    return run


class RestrictedUnpickler(pickle._Unpickler):
    """Python's own unpickler (the pure-Python one, so that single opcodes can be overridden) with:

    * ``find_class``: tensor-rebuild helpers with bounds checks, plain containers, storage types and
      dtypes; any other standard-library or torch name (``os.system``, ``eval``, ``bytearray``, ...) is
      refused; classes of other packages (dnnlib, numpy, training code) become inert placeholders;
    * BUILD only on placeholders and ordered dicts (``Tensor.__setstate__`` would resize a storage),
      SETITEM(S) only on dicts;
    * BYTEARRAY8 no longer than the stream, and a budget of storage bytes and operations shared by
      every pickle of one file.
    """

    dispatch = {key: _counted(op, 4 if key in (pickle.EMPTY_SET[0], pickle.FROZENSET[0]) else 1)
                for key, op in pickle._Unpickler.dispatch.items()}

    def __init__(self, stream, budget: _Budget, persistent=None, size: int | None = None):
        super().__init__(stream, encoding="utf-8")
        self.budget, self._persistent = budget, persistent
        self._size = size if size is not None else budget.bytes

    def persistent_load(self, pid):
        if self._persistent is None:
            raise _damaged("unexpected persistent reference")
        return self._persistent(pid)

    def find_class(self, module: str, name: str):
        key = (_PY2_NAMES.get(module, module), name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if key == ("torch.storage", "_load_from_bytes"):
            return self._load_from_bytes
        if key[0] in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if key[0] == "torch" and isinstance(torch.__dict__.get(name), torch.dtype):  # (no lazy submodule imports)
            return torch.__dict__[name]
        top = key[0].split(".")[0]
        if top in sys.stdlib_module_names or top == "torch":
            if key not in _INERT_STDLIB:
                raise _Refused(f"the file calls {module[:60]}.{name[:60]}; a generator file needs only tensors and containers")
        if key not in self.budget.classes:
            if len(self.budget.classes) >= MAX_FOREIGN_CLASSES:
                raise _Refused(f"the file names more than {MAX_FOREIGN_CLASSES} classes, far more than a generator has")
            self.budget.classes[key] = _inert_class(module, name)
        return self.budget.classes[key]

    def _load_from_bytes(self, blob):
        """``torch.storage._load_from_bytes``: how plain pickles hold tensor data, as a nested legacy torch file."""
        if not isinstance(blob, bytes):
            raise _damaged("storage blob is not bytes")
        return _read_legacy_torch(io.BytesIO(blob), len(blob), self.budget)

    @_counted
    def load_build(self):
        state, inst = self.stack.pop(), self.stack[-1]
        if isinstance(inst, _Inert):
            inst.__dict__["_state"] = state
        elif not isinstance(inst, collections.OrderedDict):  # (state dicts' ``_metadata`` is dropped)
            raise _Refused(f"the file sets the state of a {type(inst).__name__}, which a generator file never does")

    @_counted
    def load_setitem(self):
        self._dict_target(self.stack[-3])
        pickle._Unpickler.load_setitem(self)

    @_counted
    def load_setitems(self):
        self._dict_target(self.metastack[-1][-1])
        pickle._Unpickler.load_setitems(self)

    @staticmethod
    def _dict_target(obj):
        if not isinstance(obj, dict):  # (never ``tensor[key] = value``)
            raise _damaged(f"items set on a {type(obj).__name__}")

    @_counted
    def load_bytearray8(self):
        n, = struct.unpack("<Q", self.read(8))
        if n > self._size:
            raise _damaged(f"a byte array of {n} bytes in a {self._size}-byte file")
        self.append(bytearray(self.read(n)))

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def restricted_loads(data: bytes, name: str = "<pickle>") -> Any:
    """Unpickle ``data`` under the rules above (no persistent references); a refusal is a CheckpointError."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), _Budget(len(data))).load()
    except _Refused as e:
        raise CheckpointError(name, str(e)) from None


_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_TORCH_MAGIC = pickle.dumps(_LEGACY_MAGIC_NUMBER, protocol=2)


def _read_legacy_torch(stream, size: int, budget: _Budget) -> Any:
    """A pre-1.6 ``torch.save`` stream: magic, version, system-info pickles, the object pickle, the list of
    storage keys, then each storage's element count and raw bytes. ``torch.load`` allocates every storage at
    its declared size before reading it; we first check that size against the bytes left in the stream."""
    def plain():
        return RestrictedUnpickler(stream, budget, size=size).load()

    if plain() != _LEGACY_MAGIC_NUMBER or plain() != 1001:
        raise _damaged("not a torch file")
    if isinstance(sys_info := plain(), dict) and sys_info.get("little_endian") is False:
        raise _Refused("big-endian torch files are not supported")
    storages: dict[Any, _Storage] = {}

    def persistent(pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise _damaged("unexpected persistent reference")
        _, stype, key, _location, numel, view = pid
        if view is not None:
            raise _Refused("storage views (files from torch < 0.4) are not supported")
        if key not in storages:
            storages[key] = _Storage(stype, numel, budget, available=size - stream.tell())
        return storages[key]

    obj = RestrictedUnpickler(stream, budget, persistent, size=size).load()
    keys = plain()
    if not isinstance(keys, list) or len(keys) != len(storages) or set(keys) != set(storages):
        raise _damaged("storage keys do not match the storages used")
    for key in keys:
        numel = int.from_bytes(stream.read(8), "little")
        if numel != storages[key].flat.numel():
            raise _damaged("storage size differs from its declaration")
        storages[key].fill(stream)
    return obj


def _read_torch_zip(path: Path, size: int, budget: _Budget) -> Any:
    """A ``torch.save`` zip: ``<name>/data.pkl`` plus one entry per storage under ``<name>/data/``. Each
    storage must declare exactly its entry's size; no entry may unpack to more than the file's size."""
    with zipfile.ZipFile(path) as zf:
        entries = {i.filename: i for i in zf.infolist()}
        pkls = [n for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1 or any(i.file_size > size for i in entries.values()):
            raise _damaged("not a torch zip: one '<name>/data.pkl' and entries no larger than the file expected")
        prefix = pkls[0][: -len("data.pkl")]
        if prefix + "byteorder" in entries and zf.read(prefix + "byteorder") != b"little":
            raise _Refused("big-endian torch files are not supported")
        storages: dict[Any, _Storage] = {}

        def persistent(pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise _damaged("unexpected persistent reference")
            _, stype, key, _location, numel = pid
            if key not in storages:
                entry = entries.get(f"{prefix}data/{key}")
                if entry is None:
                    raise _damaged(f"storage {str(key)[:20]!r} has no data")
                storage = _Storage(stype, numel, budget, available=entry.file_size)
                if storage.nbytes != entry.file_size:
                    raise _damaged("storage size differs from its data")
                with zf.open(entry) as f:
                    storage.fill(f)
                storages[key] = storage
            return storages[key]

        data = zf.read(pkls[0])
        return RestrictedUnpickler(io.BytesIO(data), budget, persistent, size=len(data)).load()


def _is_legacy_torch_file(path: Path) -> bool:
    """Pre-1.6 ``torch.save`` files begin with torch's magic number pickled on its own. Compared as
    bytes: unpickling anything from an untrusted file to find out would already run its code."""
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_TORCH_MAGIC)) == _LEGACY_TORCH_MAGIC


def load_torch_file(path: str | os.PathLike) -> Any:
    """What ``torch.load(path, weights_only=True)`` returns for a torch zip or pre-1.6 file, read under the
    rules above instead (CPU tensors; foreign classes as inert placeholders). A refused file raises
    ValueError; a damaged one whatever its parser raised (``load_generator`` turns both into CheckpointError)."""
    path = Path(path)
    size = path.stat().st_size
    if sniff(path) == "torch-zip":
        return _read_torch_zip(path, size, _Budget(size))
    if not _is_legacy_torch_file(path):
        raise _damaged("not a torch file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return _read_legacy_torch(mm, size, _Budget(size))


# --------------------------------------------------------------------------- truncation centre
def _keep_w_avg(G: Generator, w: Any) -> bool:
    """Store a file's truncation centre on ``G``: one w, or one per W+ slot (averaged; pSp/e4e repeat it)."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.ndim not in (1, 2, 3) \
            or w.shape[-1] != G.style_dim or w.numel() // G.style_dim not in (1, G.n_latent):
        return False
    w = w.detach().to(torch.float32).reshape(-1, G.style_dim).mean(0, keepdim=True)
    if not torch.isfinite(w).all():
        return False
    G.stored_w_avg = w.to(G.device)
    return True


# --------------------------------------------------------------------------- rosinality layout
def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """Rebuild the constructor arguments of a rosinality-layout state dict from its shapes."""
    n_mlp = sum(1 for k in sd if re.fullmatch(r"style\.\d+\.weight", k))
    n_rgbs = sum(1 for k in sd if re.fullmatch(r"to_rgbs\.\d+\.bias", k))
    if n_mlp == 0 or "input.input" not in sd:
        raise KeyError("no mapping network ('style.N.weight') or constant input ('input.input')")
    size, style_dim, channel_max = 2 ** (n_rgbs + 2), sd["style.1.weight"].shape[0], sd["input.input"].shape[1]
    actual = {2 ** (j + 3): sd[f"convs.{2 * j}.conv.weight"].shape[1] for j in range(n_rgbs)}
    for cm in (2, 1, 4):
        table = channel_table(cm, channel_max)
        if all(table[r] == c for r, c in actual.items()):
            return {"size": size, "style_dim": style_dim, "n_mlp": n_mlp, "channel_multiplier": cm, "channel_max": channel_max}
    raise KeyError(f"channel counts {actual} fit no channel multiplier")


_LAYOUT_ERRORS = (KeyError, IndexError, TypeError, AttributeError, RuntimeError, ValueError)


def _generator(cfg: Any, state: dict, file_bytes: int | None, what: str) -> Generator:
    """Check ``cfg`` (bounds, then size against the file) before building it, then load ``state`` strictly."""
    cfg = _check_fits(cfg, file_bytes)
    G = Generator(**cfg)
    try:
        G.load_state_dict(state, strict=True)
    except _LAYOUT_ERRORS as e:
        raise _Refused(f"{what} ({str(e).splitlines()[0][:300] if str(e) else type(e).__name__})") from None
    return G.eval()


def _state_dict_generator(sd: Any, file_bytes: int | None) -> Generator:
    what = "state dict does not fit the StyleGAN2 layout"
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise _Refused(f"{what} (not a dict of tensors)")
    try:
        cfg = infer_config(sd)
    except _LAYOUT_ERRORS as e:
        raise _Refused(f"{what} ({str(e).splitlines()[0][:300] if str(e) else type(e).__name__})") from None
    return _generator(cfg, sd, file_bytes, what)


def generator_from_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike = "<state dict>",
                              file_bytes: int | None = None) -> Generator:
    """A generator for a rosinality-layout state dict (its config inferred and checked; against
    ``file_bytes`` too when the dict came from a file of that size)."""
    try:
        return _state_dict_generator(sd, file_bytes)
    except _Refused as e:
        raise CheckpointError(path, str(e)) from None


# --------------------------------------------------------------------------- NVIDIA pickles
def _module_state(obj: Any) -> dict:
    if isinstance(obj, _Persistent):
        return obj.state if isinstance(obj.state, dict) else {}
    state = getattr(obj, "__dict__", {}).get("_state")
    return state if isinstance(state, dict) else {}


def _flatten_module(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    state, out = _module_state(obj), {}
    for group in ("_parameters", "_buffers"):
        items = state.get(group)
        for k, v in (items.items() if isinstance(items, dict) else ()):
            if isinstance(v, torch.Tensor):
                out[f"{prefix}{k}"] = v.detach()
    children = state.get("_modules")
    for k, child in (children.items() if isinstance(children, dict) else ()):
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


def _load_nvidia_pickle(path: Path, size: int) -> tuple[Generator, dict]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = RestrictedUnpickler(mm, _Budget(size), size=size).load()
    g_ema = data.get("G_ema") if isinstance(data, dict) else None
    if g_ema is None:
        raise _Refused("pickle has no 'G_ema' entry")
    ada = _flatten_module(g_ema)
    what = "G_ema does not have the stylegan2-ada-pytorch layout"
    try:
        n_mlp = sum(1 for k in ada if re.fullmatch(r"mapping\.fc\d+\.weight", k))
        top = max(int(m.group(1)) for k in ada if (m := re.fullmatch(r"synthesis\.b(\d+)\.torgb\.weight", k)))
        guess = {"style.1.weight": ada["mapping.fc0.weight"], "input.input": ada["synthesis.b4.const"][None]}
        guess.update({f"style.{i + 1}.weight": ada[f"mapping.fc{i}.weight"] for i in range(n_mlp)})
        for j in range(top.bit_length() - 3):  # resolutions 8 .. top
            guess[f"to_rgbs.{j}.bias"] = ada[f"synthesis.b{2 ** (j + 3)}.torgb.bias"]
            guess[f"convs.{2 * j}.conv.weight"] = ada[f"synthesis.b{2 ** (j + 3)}.conv0.weight"][None]
        G = Generator(**_check_fits(infer_config(guess), size))
        G.load_state_dict(ada_to_rosinality(ada, G), strict=True)
    except _Refused:
        raise
    except _LAYOUT_ERRORS as e:
        raise _Refused(f"{what} ({str(e).splitlines()[0][:300] if str(e) else type(e).__name__})") from None
    stored = _keep_w_avg(G.eval(), ada.get("mapping.w_avg"))
    return G, {"format": "nvidia-ada-pkl", "config": G.config, "w_avg": "file" if stored else "computed"}


# --------------------------------------------------------------------------- our format
_SAFETENSORS_FLOATS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
MAX_HEADER_BYTES = 4 << 20   # a 1024 px generator's safetensors header is ~50 KB


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(JSON header, bytes of tensor data after it) of a safetensors file: the header's declared length is checked
    against the file and ``MAX_HEADER_BYTES`` before it is read (the safetensors library reads up to 100 MB of it),
    then its size and depth (``bounded_json``). JSONRefused (a ValueError) for a damaged or oversized one."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < n <= size - 8:
            raise JSONRefused(f"file is damaged or truncated (its header declares {n} bytes, the whole file has {size})")
        if n > MAX_HEADER_BYTES:
            raise JSONRefused(f"its header is {n >> 20} MiB, more than the {MAX_HEADER_BYTES >> 20} MiB any model "
                              "file of ours needs")
        raw = f.read(n)
    return bounded_json.loads(raw, "its header", dict, MAX_HEADER_BYTES, max_depth=4), size - 8 - n


def safetensors_metadata(header: dict, key: str, what: str = "its metadata") -> dict | None:
    """The JSON object a safetensors header keeps under ``__metadata__[key]`` (None when there is none), bounded
    in size and depth; JSONRefused when it is not a JSON object."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or key not in meta:
        return None
    if not isinstance(meta[key], str):
        raise JSONRefused(f"{what} is not a JSON text")
    return bounded_json.loads(meta[key], what)


def _safetensors_header(path: Path, size: int) -> dict:
    """Check what a safetensors file declares before any tensor is read: a JSON header inside the file,
    our metadata with a config in bounds, and exactly that config's tensors (names, shapes, float dtypes)
    at disjoint offsets inside the file. Returns our metadata."""
    try:
        header, data_bytes = read_safetensors_header(path)
    except JSONRefused as e:
        raise _Refused(str(e)) from None
    try:
        nada = safetensors_metadata(header, "nada")
    except JSONRefused as e:
        raise _Refused(f"safetensors file without readable NADA Studio generator metadata ({e})") from None
    if not isinstance(nada, dict) or nada.get("format") != FORMAT_NAME:
        raise _Refused("safetensors file without NADA Studio generator metadata")
    cfg = check_config(nada.get("config"))
    expected = {**expected_layout(cfg), W_AVG_KEY: (1, cfg.get("style_dim", 512))}
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = expected.pop(key, None)
        if shape is None:
            raise _Refused(f"tensor {key[:60]!r} is not part of a {cfg} generator (or appears twice)")
        try:
            dtype, declared, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _damaged(f"malformed entry for tensor {key[:60]!r}") from None
        if dtype not in _SAFETENSORS_FLOATS or declared != list(shape) or any(type(d) is not int for d in declared):
            raise _Refused(f"tensor {key[:60]!r} is declared {str(dtype)[:10]} {str(declared)[:80]}, expected a float "
                           f"tensor of shape {list(shape)}")
        if type(begin) is not int or type(end) is not int or not 0 <= begin \
                or end != begin + math.prod(shape) * _SAFETENSORS_FLOATS[dtype] or end > data_bytes:
            raise _damaged(f"tensor {key[:60]!r} lies outside the file's data")
        spans.append((begin, end))
    expected.pop(W_AVG_KEY, None)  # optional
    if expected:
        raise _Refused(f"{len(expected)} tensors of the {cfg} generator are missing, e.g. {sorted(expected)[0]!r}")
    spans.sort()
    if any(b1 < e0 for (_, e0), (b1, _) in zip(spans, spans[1:])):
        raise _damaged("tensors overlap")
    return nada


def _load_safetensors(path: Path, size: int) -> tuple[Generator, dict]:
    from safetensors import safe_open

    header = _safetensors_header(path, size)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    w_avg = tensors.pop(W_AVG_KEY, None)
    G = _generator(header["config"], tensors, size, "state dict does not fit the StyleGAN2 layout")
    stored = _keep_w_avg(G, w_avg)
    meta = header.get("meta")
    return G, {"format": "nada-safetensors", "config": G.config, "meta": meta if isinstance(meta, dict) else {},
               "w_avg": "file" if stored else "computed"}


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


def _load(path: Path) -> tuple[Generator, dict]:
    size = path.stat().st_size
    kind = sniff(path)
    if kind == "safetensors":
        return _load_safetensors(path, size)
    if kind == "torch-zip" or (kind == "pickle" and _is_legacy_torch_file(path)):
        ckpt = load_torch_file(path)
        sd = ckpt.get("g_ema", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(sd, dict):
            raise _Refused("torch file without a 'g_ema' state dict")
        G = _state_dict_generator(sd, size)
        stored = "latent_avg" in ckpt and _keep_w_avg(G, ckpt["latent_avg"])
        return G, {"format": "rosinality-pt", "config": G.config, "w_avg": "file" if stored else "computed"}
    if kind == "pickle":
        return _load_nvidia_pickle(path, size)
    raise _Refused("unrecognised file type (first bytes match no known format)")


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu",
                   display_name: str | None = None) -> tuple[Generator, dict]:
    """Load a generator from any supported file. Returns ``(G in eval mode, info)``; ``info`` holds
    ``format``, ``config``, ``w_avg`` ("file" when the file's truncation centre is kept, else "computed")
    and, for our files, the ``meta`` (source model, recipe) they were saved with.

    Errors are CheckpointError naming the file as ``display_name`` when given (so that a server's paths
    never reach its users), else by its path."""
    path = Path(path)
    name = display_name or str(path)
    try:
        if not path.is_file():
            raise _Refused("no such file")
        G, info = _load(path)
        bad = first_non_finite(G.state_dict())
        if bad is not None:
            raise _Refused(f"tensor {bad!r} holds NaN or infinite values (a diverged or damaged model)")
    except _Refused as e:
        raise CheckpointError(name, str(e)) from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError, KeyError,
            IndexError, TypeError, AttributeError, struct.error, RecursionError, SafetensorError) as e:
        text = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).splitlines()
        text = (text[0][:200] if text else "").replace(str(path), name).replace(str(path.resolve()), name)
        raise CheckpointError(name, f"file is damaged or truncated ({type(e).__name__}: {text})") from None
    return G.to(device), info
