"""Where generators come from: base models (manifest assets, files, or the tiny test model) and the
library of adapted models (one folder per run: final weights, recipe, thumbnail, snapshots)."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.stylegan2 import Generator
from ..models.tiny import TINY_NAME, is_tiny, tiny_generator
from . import weights
from .checkpoints import first_non_finite, load_generator, save_generator
from .delta import apply_delta, delta_info, is_delta
from .runs import ACTIVE, ADAPTATION, SNAPSHOTS, THUMB, TRASH, RunFolder, is_reserved


def library_dir() -> Path:
    return Path(os.environ.get("NADA_LIBRARY_DIR", weights.REPO_ROOT / "library"))


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_base_name(name: str, device: str = "cpu") -> str:
    """'ffhq' means the 256 px model on CPU (1024 px training takes hours there), config-f on GPU."""
    if name == "ffhq":
        return "ffhq-1024" if str(device).startswith("cuda") else "ffhq-256"
    return name


def load_base(name_or_path: str, device: str = "cpu") -> tuple[Generator, str]:
    """(generator, canonical name) for 'tiny', a manifest generator name, or a file path."""
    if is_tiny(name_or_path):
        return tiny_generator().to(device), TINY_NAME
    if Path(name_or_path).is_file():
        return load_generator(name_or_path, device)[0], str(name_or_path)
    if Path(name_or_path).is_dir() and RunFolder(name_or_path).weights() is not None:   # a run folder
        return load_generator(RunFolder(name_or_path).weights(), device)[0], Path(name_or_path).name
    name = resolve_base_name(name_or_path, device)
    manifest = weights.load_manifest()
    if name not in manifest or manifest[name].kind not in ("generator", "style"):
        known = [n for n, a in manifest.items() if a.kind == "generator"]
        raise weights.WeightsError(f"unknown base model {name_or_path!r}: use a file path, '{TINY_NAME}', or one of {', '.join(known)}")
    return load_generator(weights.require(name, manifest), device)[0], name


def model_file(name_or_path: str, root: Path | None = None) -> Path | None:
    """The weights file of a model as a command names it: the file itself, a run folder (its final weights, else
    its newest snapshot) or a library model's id; None when it is none of these."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        return RunFolder(path).weights()
    if MODEL_ID.fullmatch(name_or_path):
        return next((e.path for e in list_library(root) if e.id == name_or_path), None)
    return None


def load_model(name_or_path: str, device: str = "cpu", root: Path | None = None) -> tuple[Generator, str]:
    """(generator, canonical name) for any model a command may name: a model file, a run folder, a library model's id (its
    final weights, else its newest snapshot), or a base (see :func:`load_base`)."""
    found = model_file(name_or_path, root)
    if found is not None:
        name = str(name_or_path) if Path(name_or_path).is_file() else Path(name_or_path).name
        return load_generator(found, device, display_name=name)[0], name
    try:
        return load_base(name_or_path, device)
    except weights.WeightsError as e:
        if not str(e).startswith("unknown base model"):
            raise                                   # a known base that is not downloaded: say how to get it
        raise weights.WeightsError(str(e).replace("unknown base model", "unknown model", 1)
                                   .replace("use a file path,", "use a file path, a library model's id,", 1)) from None


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "model"


def new_run_dir(source: str, target: str, root: Path | None = None) -> Path:
    """Create and return a fresh, empty folder for a run: never an earlier model's. The folder is
    created exclusively (mkdir fails if it exists), so two runs started at once never share one."""
    return new_model_dir(f"{source}-to-{target}", root)


def new_model_dir(name: str, root: Path | None = None) -> Path:
    """A fresh folder named after ``name`` (slugified; '-2', '-3' ... when taken), created exclusively."""
    root = Path(root or library_dir())
    root.mkdir(parents=True, exist_ok=True)
    stem = slugify(name)
    for i in range(1, 10_000):
        p = root / (stem if i == 1 else f"{stem}-{i}")
        if is_reserved(p.name):   # e.g. a mix or an import called 'mappers' becomes 'mappers-2'
            continue
        try:
            p.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return p
    raise RuntimeError("too many runs with the same name")


@dataclass
class LibraryEntry:
    """One model a client may choose, by ``id`` only: a run folder's name, or a ready style's manifest name."""

    name: str
    path: Path            # final weights (or the latest snapshot of an unfinished run); never shown to clients
    base: str
    recipe: dict
    thumbnail: Path | None
    finished: bool
    kind: str = "run"     # run | style (a ready manifest style)
    created: float = 0.0  # seconds since the epoch
    size_bytes: int = 0
    continuable: bool = False   # a run with a resumable state (stopped, crashed after a snapshot, or finished)
    training: bool = False      # a process is training it now

    @property
    def id(self) -> str:
        return self.name

    @property
    def folder(self) -> RunFolder | None:
        """The run's folder (None for a ready style)."""
        return RunFolder(self.path.parent.parent if self.path.parent.name == SNAPSHOTS else self.path.parent) \
            if self.kind == "run" else None

    @property
    def label(self) -> str:
        r = self.recipe
        target = r.get("target") or "image style"
        state = " [training]" if self.training else "" if self.finished else " [unfinished: continue it]"
        return f"{self.name}  ({r.get('source', '?')} -> {target}, {self.base})" + state


class UnknownModel(ValueError):
    """A model id that is not in the library. The message is the same whether or not a file of that
    name exists anywhere, so clients cannot probe the server's disk."""

    def __init__(self, model_id: object):
        if model_id is None or model_id == "" or model_id == []:   # nothing chosen yet: say that, not "unknown"
            super().__init__("choose a model from the library list first")
            return
        shown = f" {model_id!r}" if isinstance(model_id, str) and MODEL_ID.fullmatch(model_id) else ""
        super().__init__(f"unknown model{shown}: choose one from the library list")


MODEL_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,79}")
MAX_NAME_CHARS = 80   # what a user may type as a model's name (its folder name is at most 60 characters)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_library(root: Path | None = None) -> list[LibraryEntry]:
    """Every run folder with usable weights, newest first (folders starting with '.' or '_' are not runs).
    A run without final weights (stopped before saving, or crashed) is listed with its newest snapshot."""
    root = root or library_dir()
    entries = []
    for d in sorted(root.glob(f"*/{ADAPTATION.recipe}"), key=lambda p: p.stat().st_mtime, reverse=True):
        run = RunFolder(d.parent)
        if not MODEL_ID.fullmatch(run.name) or is_reserved(run.name):
            continue
        path = run.weights()
        if path is None:
            continue
        try:
            saved = run.read_record()
        except ValueError:
            continue
        recipe = saved.get("recipe", {})
        entries.append(LibraryEntry(run.name, path, str(saved.get("base", "?")), recipe if isinstance(recipe, dict) else {},
                                    run.thumb_path if run.thumb_path.is_file() else None, run.finished, "run",
                                    d.stat().st_mtime, _folder_bytes(run.path), run.continuable, run.is_active()))
    return entries


def remove_abandoned(root: Path) -> list[str]:
    """Delete run folders that hold a recipe and nothing trained (a process killed before its first snapshot),
    unless a process is training there now. Returns their names."""
    gone = []
    for d in root.glob(f"*/{ADAPTATION.recipe}") if root.is_dir() else []:
        run = RunFolder(d.parent)
        if MODEL_ID.fullmatch(run.name) and not is_reserved(run.name) and run.weights() is None and not run.state_path.exists() \
                and not run.is_active():
            shutil.rmtree(run.path, ignore_errors=True)
            gone.append(run.name)
    return gone


def find_model(model_id: object, entries: list[LibraryEntry]) -> LibraryEntry:
    """The entry a client named; anything else (paths, unknown names, non-strings) is UnknownModel."""
    if isinstance(model_id, str):
        for e in entries:
            if e.id == model_id:
                return e
    raise UnknownModel(model_id)


def check_name_text(name: object) -> str:
    """A model name as a client sent it: a text of 1 to ``MAX_NAME_CHARS`` characters (ValueError otherwise)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("give the model a name")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"a model name is at most {MAX_NAME_CHARS} characters (got {len(name)})")
    return name


def check_new_name(name: str, root: Path, reserved=()) -> str:
    """A user-chosen model name as a safe folder name, refused when taken."""
    slug = slugify(check_name_text(name))
    if is_reserved(slug):
        raise ValueError(f"{slug!r} is the name of one of the library's own folders; choose another name")
    if slug in reserved or (root / slug).exists():
        raise ValueError(f"a model named {slug!r} already exists; choose another name")
    return slug


def rename_model(root: Path, model_id: str, new_name: str, reserved=()) -> str:
    """Rename a run folder (atomic on one filesystem); returns the new id. Refused while the run trains."""
    entry = find_model(model_id, list_library(root))
    slug = check_new_name(new_name, root, reserved)
    with RunFolder(root / entry.id).idle("rename"):
        os.rename(root / entry.id, root / slug)
    (root / slug / ACTIVE).unlink(missing_ok=True)   # the moment's lock file moved with the folder
    return slug


def delete_model(root: Path, model_id: str) -> None:
    """Delete a run folder; refused while the run trains."""
    entry = find_model(model_id, list_library(root))
    with RunFolder(root / entry.id).idle("delete"):
        shutil.rmtree(root / entry.id)


def restore(root: Path, name: str) -> Path:
    """Bring a set-aside run back into the library (under a fresh name if its old one is taken)."""
    src = root / TRASH / name
    if not MODEL_ID.fullmatch(name) or not src.is_dir():
        raise UnknownModel(name)
    dest = root / name
    i = 2
    while dest.exists() or is_reserved(dest.name):
        dest, i = root / f"{name}-{i}", i + 1
    os.rename(src, dest)
    return dest


def empty_trash(root: Path) -> None:
    shutil.rmtree(root / TRASH, ignore_errors=True)


def remove_stale_parts(root: Path, depth: int = 2) -> int:
    """Delete half-written files and folders (``*.part``) that a killed process left in the library (run
    folders, and the folders holding runs, such as the mappers'); runs training now, in any process, are left
    alone."""
    n = 0
    for item in sorted(root.iterdir()) if root.is_dir() else []:
        if item.name.endswith(".part"):
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
            n += 1
        elif item.is_dir() and not RunFolder(item).is_active():
            n += len(RunFolder(item).remove_stale_parts())
            if depth > 1 and not (item / ADAPTATION.recipe).exists():
                n += remove_stale_parts(item, depth - 1)
    return n


def disk_use(root: Path) -> int:
    return _folder_bytes(root) if root.is_dir() else 0


def base_like(base: Generator, G: Generator) -> Generator:
    """``G``'s weights in a generator built like ``base`` (same config), so the library can pair them."""
    out = copy.deepcopy(base).cpu()
    out.load_state_dict({k: v.cpu() for k, v in G.state_dict().items()}, strict=True)
    if getattr(G, "stored_w_avg", None) is not None:
        out.stored_w_avg = G.stored_w_avg.detach().cpu().clone()
    return out


def import_model(root: Path, upload: Path, display_name: str, base_name: str, base: Generator,
                 max_bytes: int = 2 << 30, thumbnail=None) -> Path:
    """Make a user's generator file a library model: read it with the safe loaders (never as a path a
    client chose for rendering), check it fits the chosen base, and copy it in as our safetensors."""
    _check_upload_size(upload, display_name, max_bytes)
    G, info = load_generator(upload, "cpu", display_name=display_name)
    shapes = lambda g: {k: tuple(v.shape) for k, v in g.state_dict().items()}  # noqa: E731
    if shapes(G) != shapes(base):  # configs may differ in name only (e.g. any channel multiplier at 32 channels)
        raise ValueError(f"{display_name} is a {G.config['size']} px generator with a different architecture from the "
                         f"base {base_name!r} ({base.config['size']} px); choose the base it was adapted from")
    stem = Path(display_name).stem[:MAX_NAME_CHARS]
    recipe = {"source": base_name, "target": stem, "imported_from": display_name, "format": info.get("format")}
    return add_model(root, stem, base_like(base, G), base_name, recipe, thumbnail)


def import_delta(root: Path, upload: Path, display_name: str, base_name: str, base: Generator,
                 max_bytes: int = 2 << 30, thumbnail=None) -> Path:
    """Make a style delta a library model: its differences applied to ``base`` (which must be the base it was made
    from), with the recipe it carries. Refusals say ``<name>: not a NADA delta: ...``."""
    _check_upload_size(upload, display_name, max_bytes)
    info = delta_info(upload, display_name)   # checked: meta and its recipe are JSON objects
    G = apply_delta(upload, base, display_name)
    recipe = {**info["meta"].get("recipe", {}), "imported_from": display_name}
    stem = display_name.split(".")[0][:MAX_NAME_CHARS] or "style"
    return add_model(root, stem, G, base_name, recipe, thumbnail)


def import_file(root: Path, upload: Path, display_name: str, base_name: str, base: Generator,
                max_bytes: int = 2 << 30, thumbnail=None) -> Path:
    """``import_delta`` for a file that claims to be a style delta (damaged ones too), else ``import_model``."""
    how = import_delta if is_delta(upload, display_name) else import_model
    return how(root, upload, display_name, base_name, base, max_bytes, thumbnail)


def _check_upload_size(upload: Path, display_name: str, max_bytes: int) -> None:
    if upload.stat().st_size > max_bytes:
        raise ValueError(f"{display_name}: file too large ({upload.stat().st_size >> 20} MiB); the limit is {max_bytes >> 20} MiB")


def add_model(root: Path, name: str, G: Generator, base_name: str, recipe: dict, thumbnail=None) -> Path:
    """Write a generator into the library as a model folder (final weights, recipe, and ``thumbnail(G)``'s image when
    given) under a fresh name. Every file is written into a temporary folder first, renamed onto the fresh one at the
    end: a full disk (or any failure) leaves no model folder, empty or half written. Non-finite weights are refused."""
    check_name_text(name)
    bad = first_non_finite(G.state_dict())
    if bad is not None:
        raise ValueError(f"{name}: tensor {bad!r} holds NaN or infinite values; nothing was saved")
    folder = new_model_dir(name, root)
    tmp = folder.parent / f".{folder.name}.part"   # removed by remove_stale_parts if this process dies meanwhile
    try:
        tmp.mkdir()
        save_generator(G, tmp / ADAPTATION.final, {"source_model": base_name, "recipe": recipe, "step": None})
        if thumbnail is not None:
            thumbnail(G).save(tmp / THUMB, format="PNG")
        (tmp / ADAPTATION.recipe).write_text(json.dumps({"base": base_name, "config": G.config, "recipe": recipe},
                                                        indent=2))
        os.replace(tmp, folder)   # onto the empty folder reserved above
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def load_named_base(name: object, device: str = "cpu", root: Path | None = None) -> tuple[Generator, str]:
    """(generator, name) for a base chosen by name only: 'tiny', a weights-manifest generator or style ('ffhq'
    resolved), or a library model's id. Never a path: a name written inside a file (a delta's ``source_model``)
    cannot make us open another file."""
    if is_tiny(name):
        return load_base(TINY_NAME, device)
    if isinstance(name, str):
        resolved = resolve_base_name(name, device)
        manifest = weights.load_manifest()
        if resolved in manifest and manifest[resolved].kind in ("generator", "style"):
            return load_generator(weights.require(resolved, manifest), device)[0], resolved
        for entry in list_library(root):
            if entry.id == name:
                return load_generator(entry.path, device)[0], name
    shown = f" {name!r}" if isinstance(name, str) and MODEL_ID.fullmatch(name) else ""
    raise ValueError(f"the base{shown} is not '{TINY_NAME}', a weights manifest name or a library model")
