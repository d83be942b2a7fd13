"""Where generators come from: base models (manifest assets, files, or the tiny test model) and the
library of adapted models (one folder per run: final weights, recipe, thumbnail, snapshots)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import weights
from .checkpoints import load_generator
from .stylegan2 import Generator

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
    if name_or_path == "tiny":
        from .tiny import tiny_generator

        return tiny_generator().to(device), "tiny"
    if Path(name_or_path).is_file():
        return load_generator(name_or_path, device)[0], str(name_or_path)
    name = resolve_base_name(name_or_path, device)
    manifest = weights.load_manifest()
    if name not in manifest or manifest[name].kind not in ("generator", "style"):
        known = [n for n, a in manifest.items() if a.kind == "generator"]
        raise weights.WeightsError(f"unknown base model {name_or_path!r}: use a file path, 'tiny', or one of {', '.join(known)}")
    return load_generator(weights.require(name, manifest), device)[0], name


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "model"


def new_run_dir(source: str, target: str, root: Path | None = None) -> Path:
    """Create and return a fresh, empty folder for a run: never an earlier model's. The folder is
    created exclusively (mkdir fails if it exists), so two runs started at once never share one."""
    root = Path(root or library_dir())
    root.mkdir(parents=True, exist_ok=True)
    stem = slugify(f"{source}-to-{target}")
    for i in range(1, 10_000):
        p = root / (stem if i == 1 else f"{stem}-{i}")
        try:
            p.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return p
    raise RuntimeError("too many runs with the same name")


@dataclass
class LibraryEntry:
    name: str
    path: Path            # final weights (or the latest snapshot of an unfinished run)
    base: str
    recipe: dict
    thumbnail: Path | None
    finished: bool

    @property
    def label(self) -> str:
        r = self.recipe
        target = r.get("target") or "image style"
        return f"{self.name}  ({r.get('source', '?')} -> {target}, {self.base})" + ("" if self.finished else " [unfinished]")


def list_library(root: Path | None = None) -> list[LibraryEntry]:
    """Every run folder with usable weights, newest first."""
    root = root or library_dir()
    entries = []
    for d in sorted(root.glob("*/recipe.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        run = d.parent
        final = run / "final.safetensors"
        snaps = sorted((run / "snapshots").glob("step_*.safetensors"))
        path = final if final.is_file() else (snaps[-1] if snaps else None)
        if path is None:
            continue
        try:
            saved = json.loads(d.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        thumb = run / "thumb.png"
        entries.append(LibraryEntry(run.name, path, saved.get("base", "?"), saved.get("recipe", {}),
                                    thumb if thumb.is_file() else None, final.is_file()))
    return entries

