"""Batch adaptation: ``python -m nada_core batch JOBS.toml`` trains a list of recipes, one after another on
this machine, or spread over a Ray cluster with ``--ray auto|local|ADDRESS``.

The file holds optional ``[defaults]`` and one ``[[job]]`` table per model::

    [defaults]
    base = "ffhq"
    clip = ["ViT-B-32", "ViT-B-16"]
    iterations = 300

    [[job]]
    name = "sketch"
    target = "pencil sketch"

    [[job]]
    name = "starry"
    style_images = ["styles/starry-night.jpg"]     # paths relative to this file

A job's keys are ``name``, ``base``, ``clip`` and any field of :class:`nada_core.training.adapt.Recipe` (``source``,
``target``, ``style_images``, ``source_images``, ``iterations``, ``batch``, ``lr``, ``preset``, ``k``, ``mixing``,
``clip_weights``, ``seed``, ...) except ``snapshot_every``: batch runs keep no snapshots. The whole file is
checked before anything runs; every problem is reported with its job and field.

Every job trains in a temporary folder of the machine that runs it; the driver (this process) writes the
finished run folder -- ``recipe.json``, ``final.safetensors``, ``thumb.png`` -- into the library, so the
app lists it, and a cluster needs no shared disk for the results. A failed job is tried once more, then
reported; the exit code is 1 if any job failed.

On a cluster each job takes one GPU (when the cluster has GPUs) or ``--cpus-per-job`` CPUs. The code and the
weights manifest travel with the jobs (Ray's ``working_dir``); the weights are read on each node from the
driver's weights folder path (``NADA_WEIGHTS_DIR``, a path every node must see), or with ``--ship-weights``
sent through Ray's object store (the base generator as our safetensors, the CLIP files as they are).
Ray is imported only here, only when asked for (``pip install -r requirements-cluster.txt``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

if TYPE_CHECKING:  # importing this module stays light (no torch): Ray's progress actor lives here
    from .adapt import Recipe
    from .loop import Event

__all__ = ["BatchError", "Job", "JobFailed", "JobResult", "attempt", "batch_command", "follow_run", "install_run",
           "job_keys", "load_jobs", "run_batch", "run_job", "summary_table"]

CLUSTER_HINT = "pip install -r requirements-cluster.txt"
MAX_TRIES = 2                      # a failed job is retried once
RUN_FILES = ("final.safetensors", "thumb.png", "recipe.json")   # recipe last: the app lists a folder from then on


class BatchError(ValueError):
    """A jobs file or batch option that cannot run; the message names the job and field."""


class JobFailed(RuntimeError):
    """A job's training ended without a finished model (non-finite loss, out of memory, save failure...)."""


# ---------------------------------------------------------------------------- the jobs file
# Recipe field types (annotations are strings under ``from __future__ import annotations``) -> checks
_KINDS = {"str": "a text in quotes", "int": "a whole number", "int | None": "a whole number", "float": "a number",
          "list[str]": "a list of texts", "list[int]": "a list of whole numbers", "list[float]": "a list of numbers"}


def job_keys() -> dict[str, str]:
    """The keys a [[job]] may have -> their kind: name, base, clip and the Recipe's fields but two."""
    from .adapt import Recipe

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
    base: str                     # 'tiny', a manifest name (resolved: 'ffhq' -> ffhq-256/1024) or an absolute path
    recipe: Recipe
    n_latent: int | None = None   # W+ slots of the base when known before loading it

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
    from ..store.images import open_image

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


def _check_base(base: str, folder: Path, device_kind: str, need_files: bool) -> tuple[str, int | None]:
    """(the base as jobs record it, its W+ slot count when known) or ValueError."""
    from ..store import weights
    from ..store.library import resolve_base_name

    if base == "tiny":
        from ..models.tiny import TINY_GENERATOR

        return "tiny", 2 * int(math.log2(TINY_GENERATOR["size"])) - 2
    for candidate in (_resolve_path(base, folder), Path(base).expanduser()):
        if candidate.is_file():
            return str(candidate.resolve()), None
    name = resolve_base_name(base, device_kind)
    manifest = weights.load_manifest()
    asset = manifest.get(name)
    if asset is None or asset.kind not in ("generator", "style"):   # as load_base: a ready style can be a base
        known = ", ".join(n for n, a in manifest.items() if a.kind == "generator")
        raise ValueError(f"base {base!r} is neither a file nor a known base model: use a file path, 'tiny', "
                         f"'ffhq' or one of {known}")
    if need_files and not asset.present:
        raise ValueError(f"base {name}: not downloaded ({asset.how_to_get()})")
    parent = manifest.get(asset.extra.get("base", ""))
    res = asset.extra.get("resolution") or (parent.extra.get("resolution") if parent else None)
    return name, (2 * int(math.log2(res)) - 2) if res else None


def _check_clip(names: list[str], need_files: bool) -> None:
    from ..store import weights
    real = [n for n in names if n != "tiny"]
    if not real:
        return
    import open_clip

    manifest = weights.load_manifest()
    for n in real:
        asset = manifest.get(f"clip-{n}")
        if n not in open_clip.list_models() or asset is None:
            known = ", ".join(a.extra.get("open_clip", k) for k, a in manifest.items() if a.kind == "clip")
            raise ValueError(f"unknown CLIP model {n!r}: use {known} or 'tiny'")
        if need_files and not asset.present:
            raise ValueError(f"CLIP {n}: not downloaded ({asset.how_to_get()})")


def load_jobs(path: str | os.PathLike, device_kind: str = "cpu", need_files: bool = True,
              library: Path | None = None, skip_existing: bool = False) -> tuple[list[Job], list[str]]:
    """Read and check a jobs file. Returns (jobs, warnings); raises BatchError listing every problem.

    ``device_kind`` ('cpu' or 'cuda') resolves ``base = "ffhq"`` as training would; ``need_files``: the weights
    must be present here (sequential runs, --ship-weights). Names already in ``library`` are refused unless
    ``skip_existing`` (then jobs whose model is finished there are dropped, with a warning)."""
    from ..store.library import MODEL_ID, slugify
    from .adapt import Recipe

    keys = job_keys()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise BatchError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BatchError(f"{path}: not valid TOML ({e})") from None
    folder = path.resolve().parent
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
    for i, table in enumerate(tables, 1):
        where = f"job {i}" + (f" ({table['name']!r})" if isinstance(table.get("name"), str) else "")
        before = len(problems)
        spec = {**defaults, **_check_keys(table, where, problems, keys)}
        if len(problems) > before:
            continue
        if spec.get("source_images") and not spec.get("style_images"):
            problems.append(f"{where}: source_images only make sense together with style_images")
        style = _check_images(spec.pop("style_images", []), "style_images", where, folder, problems)
        source_imgs = _check_images(spec.pop("source_images", []), "source_images", where, folder, problems)
        if not spec.get("target", "").strip() and not style:
            if len(problems) == before:
                problems.append(f"{where}: give a target text (target = \"...\") or style_images")
            continue
        if len(problems) > before:
            continue
        clip = spec.pop("clip", ["ViT-B-32", "ViT-B-16"])
        spec.setdefault("clip_weights", [1.0] * len(clip))
        base_text = spec.pop("base", "ffhq")
        name = slugify(spec.pop("name", None) or f"{spec.get('source', 'photo')}-to-"
                       f"{spec.get('target') or Path(style[0]).stem}")
        recipe = Recipe(**spec, clip_models=clip, style_images=style, source_images=source_imgs, snapshot_every=0)
        try:
            _check_clip(clip, need_files)
            base, n_latent = _check_base(base_text, folder, device_kind, need_files)
            for w in recipe.validate(n_latent or 18):   # 18: the most W+ slots (1024 px); rechecked on the node
                warnings.append(f"{where}: {w}")
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if not MODEL_ID.fullmatch(name):
            problems.append(f"{where}: name {name!r} cannot be a model name (letters, digits and '-')")
            continue
        if name in names:
            problems.append(f"{where}: the name {name!r} is taken by job {names[name]}; give each job its own name")
            continue
        names[name] = i
        jobs.append(Job(i, name, base, recipe, n_latent))
    if library is not None:
        kept = []
        for job in jobs:
            folder_ = Path(library) / job.name
            done = (folder_ / "recipe.json").is_file() and (folder_ / "final.safetensors").is_file()
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


# ---------------------------------------------------------------------------- one job, on any machine
def follow_run(trainer, out_dir: Path | None, on_event: Callable[[Event], None] | None = None) -> Event | None:
    """Run ``trainer`` to its end, passing each event to ``on_event``; write ``thumb.png`` (source row above
    adapted row) into ``out_dir`` from the final preview. Returns the last event (None if none came)."""
    from ..store.images import grid, to_pil

    last = None
    for ev in trainer.run():
        if on_event is not None:
            on_event(ev)
        last = ev
    if out_dir is not None and last is not None and last.preview is not None:
        src, adapted = last.preview
        grid([to_pil(src), to_pil(adapted)]).save(Path(out_dir) / "thumb.png")
    return last


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_job(job: Job, device: str, report: Callable[[dict], None] | None = None, shipped: dict | None = None,
            threads: int | None = None) -> dict[str, bytes]:
    """Train ``job`` on this machine in a temporary folder and return its run folder's files as bytes
    (``RUN_FILES``). ``shipped``: what the driver sent instead of reading files here: ``{"base": safetensors bytes
    or None, "clip": {file under weights/: bytes}, "images": {path: bytes}}``. Raises JobFailed when training
    ends without a model."""
    import torch

    from ..guidance.clip_guide import load_ensemble
    from ..store.images import from_pil, open_image
    from ..store.library import load_base
    from .adapt import Adapter

    if threads:
        torch.set_num_threads(threads)
    report = report or (lambda d: None)
    r = job.recipe
    with tempfile.TemporaryDirectory(prefix="nada-batch-") as tmp:
        tmp = Path(tmp)
        base = job.base
        if shipped and shipped.get("base") is not None:
            base = str(tmp / "base.safetensors")
            Path(base).write_bytes(shipped["base"])
        G, _ = load_base(base, device)
        weights_env = contextlib.nullcontext()
        if shipped and shipped.get("clip"):
            for rel, blob in shipped["clip"].items():
                (tmp / "weights" / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / "weights" / rel).write_bytes(blob)
            weights_env = _env("NADA_WEIGHTS_DIR", str(tmp / "weights"))
        with weights_env:
            clip = load_ensemble(r.clip_models, r.clip_weights, device)
        sent = (shipped or {}).get("images") or {}

        def image(i: int, path: str):
            if path in sent:   # read on the driver: this node may not see its disk
                local = tmp / f"image-{i}{Path(path).suffix}"
                local.write_bytes(sent[path])
                return from_pil(open_image(local, display_name=Path(path).name))
            return from_pil(open_image(path))

        style = [image(i, p) for i, p in enumerate(r.style_images)] or None
        source = [image(-1 - i, p) for i, p in enumerate(r.source_images)] or None
        out = tmp / job.name
        ad = Adapter(G, r, clip, device, out, job.base, style_images=style, source_images=source)
        clock = {"t": 0.0}

        def on_event(ev: Event) -> None:
            if ev.kind == "warning":
                report({"kind": "warning", "message": ev.message})
            elif ev.kind == "step":
                now = time.monotonic()   # at most one report a second (a cluster's driver polls)
                if ev.step in (1, ev.total) or now - clock["t"] >= 1.0:
                    clock["t"] = now
                    report({"kind": "step", "step": ev.step, "total": ev.total, "loss": ev.loss,
                            "sec_per_step": ev.sec_per_step, "eta": ev.eta})

        last = follow_run(ad, out, on_event)
        if last is None or last.kind != "done" or last.save_error or not (out / "final.safetensors").is_file():
            raise JobFailed(last.message if last is not None else "training produced no events")
        return {f: (out / f).read_bytes() for f in RUN_FILES if (out / f).is_file()}


def install_run(library: Path, name: str, files: dict[str, bytes]) -> Path:
    """Write a finished run into the library as ``<library>/<name>`` (``name-2``... if that appeared meanwhile);
    the weights and thumbnail first and recipe.json last, each atomically, so the app never lists half a run."""
    from ..store.checkpoints import atomic_write

    library = Path(library)
    library.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        folder = library / (name if i == 1 else f"{name}-{i}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        break
    else:
        raise OSError(f"no free folder name for {name} in {library}")
    try:
        for f in RUN_FILES:
            if f in files:
                atomic_write(folder / f, lambda t, blob=files[f]: Path(t).write_bytes(blob))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


# ---------------------------------------------------------------------------- progress in the terminal
def _fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass
class JobResult:
    job: Job
    state: str = "queued"        # queued | running | done | failed
    tries: int = 0
    step: int = 0
    loss: float | None = None
    sec_per_step: float | None = None
    eta: float | None = None
    where: str = ""
    started: float | None = None
    seconds: float = 0.0
    folder: Path | None = None
    error: str = ""
    errors: list[str] = field(default_factory=list)   # one per failed try


class ProgressView:
    """One line per job. On a terminal the block of lines is redrawn in place (notes such as warnings and
    retries are printed above it); elsewhere (logs, CI) notes are printed as they come and the running
    jobs' lines every ``every`` seconds."""

    def __init__(self, results: list[JobResult], stream: TextIO | None = None, every: float = 10.0):
        self.results, self.stream, self.every = results, stream or sys.stderr, every
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty() and os.environ.get("TERM") != "dumb"
        self._drawn = 0
        self._block: list[str] = []
        self._last = 0.0
        self._width = max([len(r.job.name) for r in results] + [4])

    def line(self, r: JobResult) -> str:
        total = r.job.recipe.iterations
        n = int(20 * r.step / total) if total else 0
        text = f"{r.job.index:>3} {r.job.name:<{self._width}} {r.state:<8} [{'#' * n}{'.' * (20 - n)}] {r.step}/{total}"
        if r.state == "running" and r.loss is not None:
            text += f" loss {r.loss:.4f}"
            if r.sec_per_step:
                text += f" {r.sec_per_step:.2f}s/it ETA {_fmt_time(r.eta)}"
        if r.where and r.state == "running":
            text += f"  on {r.where}"
        if r.tries > 1 and r.state in ("running", "queued"):
            text += f"  (try {r.tries} of {MAX_TRIES})"
        return text

    def _erase(self) -> None:
        if self.tty and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def note(self, text: str) -> None:
        self._erase()
        print(text, file=self.stream, flush=True)
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            size = shutil.get_terminal_size()   # the block must fit the screen, or redraws drift
            shown = self.results
            if len(shown) > size.lines - 3:        # many jobs: the running ones and a count of the rest
                shown = [r for r in self.results if r.state == "running"][:max(1, size.lines - 4)]
            block = [self.line(r)[:max(20, size.columns - 1)] for r in shown]
            if len(shown) < len(self.results):
                states = [r.state for r in self.results]
                block.append("    " + ", ".join(f"{states.count(k)} {k}" for k in ("queued", "running", "done", "failed")))
            if not force and (now - self._last < 0.2 or block == self._block):
                return
            self._erase()
            self.stream.write("".join(line + "\n" for line in block))
            self._drawn, self._block = len(block), block
        elif now - self._last >= self.every:
            for r in self.results:
                if r.state == "running":
                    self.stream.write(self.line(r) + "\n")
        else:
            return
        self._last = now
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.refresh(force=True)
        self._drawn = 0


def summary_table(results: list[JobResult]) -> str:
    rows = [("job", "name", "status", "tries", "time", "model / error")]
    for r in results:
        rows.append((str(r.job.index), r.job.name, r.state, str(r.tries), _fmt_time(r.seconds),
                     str(r.folder) if r.folder else r.error))
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in rows)


# ---------------------------------------------------------------------------- running a batch
def _apply_event(r: JobResult, d: dict, view: ProgressView) -> None:
    kind = d.get("kind")
    if kind == "warning":
        view.note(f"{r.job.label}: warning: {d['message']}")
    elif kind == "start":
        r.state, r.where = "running", d.get("where", "")
        r.started = r.started or time.monotonic()
    elif kind == "step":
        r.state = "running"
        r.step, r.loss, r.sec_per_step, r.eta = d["step"], d["loss"], d["sec_per_step"], d["eta"]


def _failure_text(e: BaseException) -> str:
    from .loop import describe_error

    if isinstance(e, JobFailed):
        return str(e)
    text = describe_error(e, limit=400)
    if "No module named" in text:
        text += " (every node needs the project's packages: " + CLUSTER_HINT + ")"
    return text


def attempt(job: Job, device: str, report: Callable[[dict], None] | None = None, shipped: dict | None = None,
            threads: int | None = None) -> dict:
    """One try of ``job`` here: ``{"files": ...}`` or ``{"error": text}``, with ``seconds`` it took. Any failure
    of the job is an answer, not an exception (KeyboardInterrupt excepted)."""
    t0 = time.monotonic()
    try:
        out = {"files": run_job(job, device, report, shipped, threads)}
    except Exception as e:  # noqa: BLE001 - one job's failure, whatever it is, must not stop the batch
        out = {"error": _failure_text(e)}
    out["seconds"] = time.monotonic() - t0
    return out


def _finish_try(r: JobResult, view: ProgressView, library: Path, outcome: dict) -> bool:
    """Record one try's outcome (see ``attempt``); True when the job should be tried again."""
    from .loop import describe_error

    if "seconds" in outcome:
        r.seconds += outcome["seconds"]
    elif r.started is not None:
        r.seconds += time.monotonic() - r.started
    r.started = None
    error = outcome.get("error")
    if error is None:
        try:
            r.folder = install_run(library, r.job.name, outcome["files"])
        except OSError as e:
            error = f"could not write the model into the library ({describe_error(e)})"
        else:
            r.state, r.error = "done", ""
            view.note(f"{r.job.label}: done in {_fmt_time(r.seconds)} -> {r.folder}")
            return False
    r.errors.append(error)
    if r.tries < MAX_TRIES:
        r.state, r.step, r.loss, r.sec_per_step, r.eta, r.where = "queued", 0, None, None, None, ""
        view.note(f"{r.job.label}: try {r.tries} failed: {error}; trying once more")
        return True
    r.state, r.error = "failed", error
    view.note(f"{r.job.label}: failed after {r.tries} tries: {error}")
    return False


def _run_here(results: list[JobResult], view: ProgressView, library: Path, device: str) -> None:
    where = f"{socket.gethostname()} ({device})"
    for r in results:
        while True:
            r.tries += 1
            _apply_event(r, {"kind": "start", "where": where}, view)
            view.refresh(force=True)

            def report(d: dict, r=r) -> None:
                _apply_event(r, d, view)
                view.refresh()

            if not _finish_try(r, view, library, attempt(r.job, device, report)):
                break


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BatchError(f"--ray needs Ray, which is not installed: {CLUSTER_HINT}") from None
    return ray


def _stage_code(folder: Path) -> Path:
    """A small working_dir for Ray: this package and the weights manifest (nodes need no copy of the project)."""
    from ..store import weights
    here = Path(__file__).resolve().parents[1]  # the nada_core package
    shutil.copytree(here, folder / "nada_core", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (folder / "weights").mkdir()
    shutil.copy2(weights.MANIFEST_PATH, folder / "weights" / "manifest.json")
    return folder


class _Board:
    """A Ray actor collecting the jobs' step events; the driver drains it twice a second."""

    def __init__(self):
        self.events: list[tuple[int, int, dict]] = []

    def report(self, index: int, tries: int, event: dict) -> None:
        self.events.append((index, tries, event))

    def drain(self) -> list[tuple[int, int, dict]]:
        events, self.events = self.events, []
        return events


def _ray_job(job: Job, device: str, threads: int, board, tries: int, base_blob, clip_refs: dict,
             images: dict) -> dict:
    """The task a Ray worker runs: one try of one job (see ``attempt``)."""
    import ray

    def report(d: dict) -> None:
        try:
            board.report.remote(job.index, tries, d)
        except Exception:  # noqa: BLE001 - a lost progress actor must not fail the job
            pass

    report({"kind": "start", "where": f"{socket.gethostname()} ({device})"})
    blobs = ray.get(list(clip_refs.values())) if clip_refs else []
    shipped = {"base": base_blob, "clip": dict(zip(clip_refs, blobs)), "images": images}
    return attempt(job, device, report, shipped, threads)


def _ship(ray, jobs: list[Job]) -> tuple[dict, dict]:
    """Put each distinct base (as our safetensors, loaded here on the CPU) and CLIP file in the object store once."""
    from ..store import weights
    from ..store.checkpoints import save_generator
    from ..store.library import load_base

    bases, clips = {}, {}
    for job in jobs:
        if job.base != "tiny" and job.base not in bases:
            G, _ = load_base(job.base, "cpu")
            with tempfile.TemporaryDirectory() as tmp:
                p = save_generator(G, Path(tmp) / "base.safetensors")
                bases[job.base] = ray.put(p.read_bytes())
            del G
        for name in job.recipe.clip_models:
            if name != "tiny" and name not in clips:
                asset = weights.get_asset(f"clip-{name}")
                clips[name] = (asset.file, ray.put(asset.path.read_bytes()))
    return bases, clips


def _cluster_plan(ray, cpus_per_job: int) -> tuple[dict, str, str]:
    """(task resources, device, a line describing the plan); BatchError when no node can take a job."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    gpus = sum(n.get("GPU", 0) for n in nodes)
    fits = [n for n in nodes if n.get("CPU", 0) >= cpus_per_job and (n.get("GPU", 0) >= 1 or not gpus)]
    if not fits:
        most = max((n.get("CPU", 0) for n in nodes), default=0)
        raise BatchError(f"no node of the cluster has {cpus_per_job} CPUs{' and a GPU' if gpus else ''} for one job "
                         f"(the largest has {most:g}); lower --cpus-per-job")
    if gpus:
        return ({"num_gpus": 1, "num_cpus": cpus_per_job}, "cuda",
                f"Ray cluster: {len(nodes)} node(s), {gpus:g} GPU(s); one job per GPU")
    cpus = sum(n.get("CPU", 0) for n in nodes)
    return ({"num_cpus": cpus_per_job}, "cpu",
            f"Ray cluster: {len(nodes)} node(s), no GPU, {cpus:g} CPUs; {cpus_per_job} CPU(s) per job")


def _run_on_ray(ray, results: list[JobResult], view: ProgressView, library: Path, resources: dict, device: str,
                cpus_per_job: int, ship_weights: bool) -> None:
    from ..store import weights
    from .loop import describe_error

    jobs = [r.job for r in results]
    bases, clips = _ship(ray, jobs) if ship_weights else ({}, {})
    # style and source images are small and were checked here: they always travel with their job
    images = {j.index: {p: Path(p).read_bytes() for p in j.recipe.style_images + j.recipe.source_images} for j in jobs}
    env = {"env_vars": {"NADA_WEIGHTS_DIR": str(weights.weights_dir().resolve())}}
    board = ray.remote(num_cpus=0)(_Board).options(runtime_env=env).remote()
    task = ray.remote(_ray_job).options(max_retries=0, runtime_env=env, **resources)
    pending: dict = {}

    def submit(r: JobResult) -> None:
        r.tries += 1
        clip_refs = {clips[n][0]: clips[n][1] for n in r.job.recipe.clip_models if n in clips}
        ref = task.remote(r.job, device, cpus_per_job, board, r.tries, bases.get(r.job.base), clip_refs,
                          images[r.job.index])
        pending[ref] = r

    by_index = {r.job.index: r for r in results}
    for r in results:
        submit(r)
    drain = board.drain.remote()
    view.refresh(force=True)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            events = []
            if drain is not None and ray.wait([drain], timeout=0)[0]:   # never wait on the progress actor
                try:
                    events = ray.get(drain)
                    drain = board.drain.remote()
                except Exception as e:  # noqa: BLE001 - progress lines are a nicety: lose them, never the batch
                    view.note(f"progress reports stopped ({describe_error(e)}); the jobs go on")
                    drain = None
            for index, tries, d in events:
                r = by_index[index]
                if tries == r.tries and r.state in ("queued", "running"):
                    _apply_event(r, d, view)
            for ref in done:
                r = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - crashed workers, lost nodes, objects lost
                    outcome = {"error": _failure_text(getattr(e, "cause", None) or e)}
                if _finish_try(r, view, library, outcome):
                    submit(r)
            view.refresh()
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.kill(board)


def run_batch(jobs: list[Job], library: Path, ray_address: str | None = None, cpus_per_job: int = 1,
              ship_weights: bool = False, device: str | None = None, stream: TextIO | None = None,
              progress_every: float = 10.0, _cluster: tuple | None = None) -> list[JobResult]:
    """Run every job (here, one after another, or on Ray when ``ray_address`` is given) and install each
    finished model into ``library``. Returns one JobResult per job; failures are in them, never raised."""
    results = [JobResult(j) for j in jobs]
    view = ProgressView(results, stream, progress_every)
    if ray_address is None:
        from ..store.library import default_device

        _run_here(results, view, Path(library), device or default_device())
    else:
        ray, resources, dev, _, started = _cluster or _connect(ray_address, cpus_per_job)
        try:
            _run_on_ray(ray, results, view, Path(library), resources, dev, cpus_per_job, ship_weights)
        finally:
            if started and _cluster is None:
                ray.shutdown()
    view.close()
    return results


def _connect(address: str, cpus_per_job: int):
    """Join (or with 'local' start) a Ray cluster: (ray, task resources, device, plan line, started_here)."""
    ray = _import_ray()
    started = False
    if not ray.is_initialized():  # else the caller's Ray job already decides how workers find this code
        with tempfile.TemporaryDirectory(prefix="nada-batch-code-") as stage:  # uploaded by ray.init
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         runtime_env={"working_dir": str(_stage_code(Path(stage)))})
            except ConnectionError as e:
                raise BatchError(f"could not reach a Ray cluster at {address!r} ({e}); start one with "
                                 "`ray start --head`, or use --ray local") from None
        started = True
    resources, device, plan = _cluster_plan(ray, cpus_per_job)
    return ray, resources, device, plan, started


def batch_command(args) -> int:
    """``python -m nada_core batch``: check the file, show the plan, run, print the summary table."""
    from ..store.library import default_device, library_dir

    if args.cpus_per_job < 1:
        raise BatchError("--cpus-per-job must be 1 or more")
    if args.ship_weights and not args.ray:
        raise BatchError("--ship-weights goes with --ray (without Ray the weights are read here)")
    library = Path(args.library) if args.library else library_dir()
    cluster = None
    try:
        if args.ray:
            cluster = _connect(args.ray, args.cpus_per_job)
            device, plan = cluster[2], cluster[3]
        else:
            device = args.device or default_device()
            plan = f"one after another on this machine ({device})"
        jobs, warnings = load_jobs(args.jobs, "cuda" if str(device).startswith("cuda") else "cpu",
                                   need_files=not args.ray or args.ship_weights, library=library,
                                   skip_existing=args.skip_existing)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"{len(jobs)} job(s), {plan}; models go to {library}", file=sys.stderr)
        for j in jobs:
            print(f"  {j.index:>3} {j.name}: {j.base}, {j.what}, {j.recipe.iterations} steps, "
                  f"CLIP {'+'.join(j.recipe.clip_models)}", file=sys.stderr)
        if args.check or not jobs:
            return 0
        results = run_batch(jobs, library, args.ray, args.cpus_per_job, args.ship_weights, device, _cluster=cluster)
    finally:
        if cluster and cluster[4]:   # this command started or joined Ray: leave it
            cluster[0].shutdown()
    print(summary_table(results))
    failed = [r for r in results if r.state != "done"]
    if failed:
        print(f"{len(failed)} of {len(results)} job(s) failed", file=sys.stderr)
    return 1 if failed else 0
