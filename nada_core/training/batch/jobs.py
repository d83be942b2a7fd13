"""The jobs file: ``[defaults]`` and ``[[job]]`` tables checked up front, every problem with its job and field."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...models.tiny import TINY_NAME, is_tiny, tiny_n_latent
from ...store import weights
from ...store.images import open_image
from ...store.library import MODEL_ID, library_dir, list_library, resolve_base_name, slugify
from ...store.runs import RunFolder, is_reserved

# training.adapt (Recipe) stays lazy: it loads clip_guide, which imports all of open_clip (seconds), and Ray's
# progress actor imports this package without needing any of it
if TYPE_CHECKING:
    from ..adapt import Recipe

MAX_TRIES = 2                      # a failed job is retried once


class BatchError(ValueError):
    """A jobs file or batch option that cannot run; the message names the job and field."""


# ---------------------------------------------------------------------------- the jobs file
# Recipe field types (annotations are strings under ``from __future__ import annotations``) -> checks
_KINDS = {"str": "a text in quotes", "int": "a whole number", "int | None": "a whole number", "float": "a number",
          "list[str]": "a list of texts", "list[int]": "a list of whole numbers", "list[float]": "a list of numbers"}


def job_keys() -> dict[str, str]:
    """The keys a [[job]] may have -> their kind: name, base, clip and the Recipe's fields but two."""
    from ..adapt import Recipe  # lazy: see the imports above

    recipe = {f.name: f.type for f in dataclasses.fields(Recipe) if f.name not in ("clip_models", "snapshot_every")}
    unknown = {k: t for k, t in recipe.items() if t not in _KINDS}
    if unknown:
        raise TypeError(f"batch.py does not know how to check Recipe fields {unknown}")
    return {"name": "str", "base": "str", "clip": "clip", **recipe}


@dataclass
class Job:
    """One validated ``[[job]]``: everything a machine needs to train it (paths are absolute)."""

    index: int                    # 1-based position in the file
    name: str                     # the library folder it becomes
    base: str                     # 'tiny', a manifest name (resolved: 'ffhq' -> ffhq-256/1024) or a library model
    recipe: Recipe
    n_latent: int | None = None   # W+ slots of the base when known before loading it
    base_file: str | None = None  # a library model base: its weights on the driver (always shipped to Ray nodes)

    @property
    def label(self) -> str:
        return f"job {self.index} ({self.name!r})"

    @property
    def what(self) -> str:
        r = self.recipe
        to = f"'{r.target}'" if not r.style_images else f"{len(r.style_images)} style image(s)"
        return f"'{r.source}' -> {to}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_problem(value, kind: str) -> str | None:
    """None when ``value`` fits the Recipe annotation ``kind``, else what it must be."""
    if kind.startswith("list["):
        if not isinstance(value, list):
            return f"must be {_KINDS[kind]}, e.g. [{'1.0' if 'float' in kind else '1' if 'int' in kind else chr(34) * 2}]"
        inner = kind[5:-1]
        bad = [v for v in value if _type_problem(v, inner)]
        return f"must be {_KINDS[kind]} (got {bad[0]!r} in it)" if bad else None
    if kind in ("int", "int | None"):
        ok = _is_int(value)
    elif kind == "float":
        if (_is_int(value) or isinstance(value, float)) and not math.isfinite(value):
            return "must be a finite number"
        ok = _is_int(value) or isinstance(value, float)
    else:
        ok = isinstance(value, str)
    return None if ok else f"must be {_KINDS[kind]}"


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_keys(table: dict, where: str, problems: list[str], allowed: dict) -> dict:
    """The table's known, well-typed entries; problems appended for the others."""
    good = {}
    for key, value in table.items():
        if key not in allowed:
            problems.append(f"{where}: unknown key '{key}'{_did_you_mean(key, allowed)}")
            continue
        kind = allowed[key]
        if kind == "clip":
            names = [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else value
            if not isinstance(names, list) or not names or not all(isinstance(c, str) and c for c in names):
                problems.append(f"{where}: clip must name one or more CLIP models, e.g. [\"ViT-B-32\", \"ViT-B-16\"] "
                                f"or \"tiny\" (got {value!r})")
                continue
            value = names
        else:
            problem = _type_problem(value, kind)
            if problem:
                problems.append(f"{where}: {key} {problem} (got {value!r})")
                continue
        good[key] = value
    return good


def _resolve_path(text: str, folder: Path) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else (folder / p)


def _check_images(paths: list[str], key: str, where: str, folder: Path, problems: list[str]) -> list[str]:
    out = []
    for text in paths:
        p = _resolve_path(text, folder).resolve()
        if not p.is_file():
            problems.append(f"{where}: {key}: {text}: no such file (looked for {p})")
            continue
        try:
            open_image(p, display_name=text)
        except ValueError as e:
            problems.append(f"{where}: {key}: {e}")
            continue
        out.append(str(p))
    return out


def _check_base(base: str, device_kind: str, need_files: bool, library: Path) -> tuple[str, int | None, str | None]:
    """(the base as jobs record it, its W+ slot count when known, a library model's weights file) or ValueError.
    Bases are chosen by name only ('tiny', a weights manifest name, a library model), never by a path: a jobs file
    must not make the batch read any file it names."""
    if is_tiny(base):
        return TINY_NAME, tiny_n_latent(), None
    name = resolve_base_name(base, device_kind)
    manifest = weights.load_manifest()
    asset = manifest.get(name)
    if asset is not None and asset.kind in ("generator", "style"):   # as load_base: a ready style can be a base
        if need_files and not asset.present:
            raise ValueError(f"base {name}: not downloaded ({asset.how_to_get()})")
        parent = manifest.get(asset.extra.get("base", ""))
        res = asset.extra.get("resolution") or (parent.extra.get("resolution") if parent else None)
        return name, (2 * int(math.log2(res)) - 2) if res else None, None
    entry = next((e for e in list_library(library) if e.kind == "run" and e.id == base), None)
    if entry is not None:
        config = entry.folder.read_record().get("config")
        size = config.get("size") if isinstance(config, dict) else None
        n_latent = 2 * int(math.log2(size)) - 2 if isinstance(size, int) and size >= 4 else None
        return entry.id, n_latent, str(entry.path)
    known = ", ".join(n for n, a in manifest.items() if a.kind == "generator")
    shown = repr(base) if len(base) <= 80 else repr(base[:80] + "...")
    raise ValueError(f"base {shown} is not '{TINY_NAME}', a weights manifest name ('ffhq', {known}) or a model of the "
                     f"library {library} (bases are chosen by name, never as a file path: import a file into the "
                     "library first)")


def _check_clip(names: list[str], need_files: bool) -> None:
    real = [n for n in names if not is_tiny(n)]
    if not real:
        return
    import open_clip

    manifest = weights.load_manifest()
    for n in real:
        asset = manifest.get(f"clip-{n}")
        if n not in open_clip.list_models() or asset is None:
            known = ", ".join(a.extra.get("open_clip", k) for k, a in manifest.items() if a.kind == "clip")
            raise ValueError(f"unknown CLIP model {n!r}: use {known} or '{TINY_NAME}'")
        if need_files and not asset.present:
            raise ValueError(f"CLIP {n}: not downloaded ({asset.how_to_get()})")


def load_jobs(path: str | os.PathLike, device_kind: str = "cpu", need_files: bool = True,
              library: Path | None = None, skip_existing: bool = False) -> tuple[list[Job], list[str]]:
    """Read and check a jobs file. Returns (jobs, warnings); raises BatchError listing every problem.

    ``device_kind`` ('cpu' or 'cuda') resolves ``base = "ffhq"`` as training would; ``need_files``: the weights
    must be present here (sequential runs, --ship-weights). Names already in ``library`` are refused unless
    ``skip_existing`` (then jobs whose model is finished there are dropped, with a warning)."""
    from ..adapt import Recipe  # lazy: see the imports above

    keys = job_keys()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise BatchError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BatchError(f"{path}: not valid TOML ({e})") from None
    folder = path.resolve().parent
    library_root = Path(library) if library is not None else library_dir()
    problems: list[str] = []
    warnings: list[str] = []
    for key in data:
        if key not in ("defaults", "job"):
            problems.append(f"{path.name}: unknown top-level key '{key}'{_did_you_mean(key, ['defaults', 'job'])}; "
                            "use [defaults] and [[job]] tables")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        problems.append(f"{path.name}: 'defaults' must be a table: [defaults]")
        defaults = {}
    if "name" in defaults:
        problems.append("[defaults]: 'name' belongs in each [[job]] (every model needs its own)")
    defaults = _check_keys({k: v for k, v in defaults.items() if k != "name"}, "[defaults]", problems, keys)
    tables = data.get("job", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.append(f"{path.name}: jobs are [[job]] tables (double brackets)")
        tables = []
    if not tables and not problems:
        problems.append(f"{path.name}: no jobs: add one [[job]] table per model")

    jobs, names = [], {}
    for i, table in enumerate(tables, 1):   # every problem of every job is reported, not just the first
        where = f"job {i}" + (f" ({table['name']!r})" if isinstance(table.get("name"), str) else "")
        before = len(problems)
        own = _check_keys(table, where, problems, keys)
        bad_keys = set(table) - set(own)
        spec = {**defaults, **own}
        if spec.get("source_images") and not spec.get("style_images"):
            problems.append(f"{where}: source_images only make sense together with style_images")
        style_given = bool(spec.get("style_images")) or "style_images" in bad_keys
        style = _check_images(spec.pop("style_images", []), "style_images", where, folder, problems)
        source_imgs = _check_images(spec.pop("source_images", []), "source_images", where, folder, problems)
        has_target = bool(spec.get("target", "").strip())
        if not has_target and not style_given and "target" not in bad_keys:
            problems.append(f"{where}: give a target text (target = \"...\") or style_images")
        clip = spec.pop("clip", ["ViT-B-32", "ViT-B-16"])
        spec.setdefault("clip_weights", [1.0] * len(clip))
        base_text = spec.pop("base", "ffhq")
        name = slugify(spec.pop("name", None) or f"{spec.get('source', 'photo')}-to-"
                       f"{spec.get('target') or (Path(style[0]).stem if style else 'style')}")
        try:
            _check_clip(clip, need_files)
        except ValueError as e:
            problems.append(f"{where}: {e}")
        base, n_latent, base_file = base_text, None, None
        try:
            base, n_latent, base_file = _check_base(base_text, device_kind, need_files, library_root)
        except ValueError as e:
            problems.append(f"{where}: {e}")
        recipe = Recipe(**spec, clip_models=clip, style_images=style, source_images=source_imgs, snapshot_every=0)
        # 18: the most W+ slots (1024 px), when the base's are not known here; rechecked on the node
        problems += [f"{where}: {p}" for p in recipe.problems(n_latent or 18, prompts=has_target or bool(style))]
        if not MODEL_ID.fullmatch(name) or is_reserved(name):
            problems.append(f"{where}: name {name!r} cannot be a model name (letters, digits and '-', and not one "
                            "of the library's own folders)")
        elif name in names:
            problems.append(f"{where}: the name {name!r} is taken by job {names[name]}; give each job its own name")
        else:
            names[name] = i
        if len(problems) == before:
            warnings += [f"{where}: {w}" for w in recipe.validate(n_latent or 18)]
            jobs.append(Job(i, name, base, recipe, n_latent, base_file))
    if library is not None:
        kept = []
        for job in jobs:
            folder_ = Path(library) / job.name
            done = RunFolder(folder_).finished and RunFolder(folder_).recipe_path.is_file()
            if not folder_.exists():
                kept.append(job)
            elif skip_existing and done:
                warnings.append(f"{job.label}: skipped, the library already has this model ({folder_})")
            else:
                problems.append(f"{job.label}: the library already has a folder {folder_}; choose another name"
                                + (" (or --skip-existing to skip finished models)" if done else ""))
        jobs = kept
    if problems:
        raise BatchError(f"{path} has {len(problems)} problem{'s' * (len(problems) > 1)}; nothing was run:\n  "
                         + "\n  ".join(problems))
    return jobs, warnings
