"""One job on this machine (a temporary run folder, its files returned as bytes), installing a finished run into
the library, and the sequential driver that runs every job here, one after another."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from ...models.tiny import is_tiny
from ...store.checkpoints import atomic_write, load_generator
from ...store.images import from_pil, open_image
from ...store.library import load_named_base
from ...store.runs import ADAPTATION, THUMB
from ..loop import Event, describe_error
from ..process import training_process
from ..run import Run
from ..timefmt import fmt_seconds
from .jobs import MAX_TRIES, Job
from .progress import JobResult, ProgressView, _apply_event

CLUSTER_HINT = "pip install -r requirements-cluster.txt"
RUN_FILES = (ADAPTATION.final, THUMB, ADAPTATION.recipe)   # what a finished job's folder holds (recipe last)


class JobFailed(RuntimeError):
    """A job's training ended without a finished model (non-finite loss, out of memory, save failure...)."""


class JobStopped(Exception):
    """A job stopped on request (``Run.stop``): ``files`` hold its run folder with the resumable state, if it
    trained a step, so that the library keeps it and ``adapt --resume`` continues it."""

    def __init__(self, message: str, files: dict[str, bytes]):
        super().__init__(message)
        self.files = files


class Stop:
    """A batch's stop request (the first Ctrl-C): the job training now stops after its step through ``Run.stop``,
    which saves its weights and resumable state, and no further job starts."""

    def __init__(self):
        self.requested = False
        self._run = None
        self._lock = threading.Lock()

    def attach(self, run) -> None:
        """The ``training.run.Run`` of the job starting now (stopped at once if a stop came first)."""
        with self._lock:
            self._run = run
            if self.requested:
                run.stop()

    def stop(self) -> None:
        with self._lock:
            self.requested = True
            if self._run is not None:
                self._run.stop()


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
            threads: int | None = None, on_run: Callable | None = None) -> dict[str, bytes]:
    """Train ``job`` on this machine in a temporary folder, through ``training.run.Run`` with the CPU memory setting
    of ``training.process.training_process`` (the lifecycle of the CLI's ``adapt``), and return its run folder's files as
    bytes ({path inside the folder: bytes}). ``shipped``: what the driver sent instead of reading files here:
    ``{"base": safetensors bytes or None, "clip": {file under weights/: bytes}, "images": {path: bytes}}``;
    ``on_run(run)`` is called before training (``Stop.attach``). Raises JobFailed when training ends without a
    model, JobStopped when the run was stopped."""
    # lazy, as Recipe in jobs.py: clip_guide imports all of open_clip (seconds), which Ray's progress actor does not need
    from ...guidance.clip_guide import load_ensemble
    from ..adapt import Adapter

    if threads:
        torch.set_num_threads(threads)
    report = report or (lambda d: None)
    r = job.recipe
    with tempfile.TemporaryDirectory(prefix="nada-batch-") as tmp:
        tmp = Path(tmp)
        if shipped and shipped.get("base") is not None:
            (tmp / "base.safetensors").write_bytes(shipped["base"])
            G, _ = load_generator(tmp / "base.safetensors", device)
        elif job.base_file:   # a library model, read where the driver checked it
            G, _ = load_generator(job.base_file, device)
        else:
            G, _ = load_named_base(job.base, device)
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
        run = Run(Adapter(G, r, clip, device, out, job.base, style_images=style, source_images=source))
        if on_run is not None:
            on_run(run)
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

        with training_process(device, tiny=is_tiny(job.base)):
            last = run.run_here(on_event)   # also writes thumb.png
        finished = last is not None and not last.save_error and run.folder.finished
        if last is not None and last.kind == "cancelled":
            raise JobStopped(last.message, _folder_files(out) if finished else {})
        if last is None or last.kind != "done" or not finished:
            raise JobFailed(last.message if last is not None else "training produced no events")
        return _folder_files(out)


def _folder_files(folder: Path) -> dict[str, bytes]:
    """Every file a run wrote into ``folder`` ({path relative to it: bytes}), the lock file aside."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def install_run(library: Path, name: str, files: dict[str, bytes]) -> Path:
    """Write a run into the library as ``<library>/<name>`` (``name-2``... if that appeared meanwhile): every file
    but recipe.json first and recipe.json last, each atomically, so the app never lists half a run."""
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
    order = sorted(files, key=lambda f: f == ADAPTATION.recipe)   # the recipe last: the listing's sign
    try:
        for f in order:
            target = folder / f
            if folder.resolve() not in target.resolve().parents:
                raise OSError(f"{f}: not a file of a run folder")
            atomic_write(target, lambda t, blob=files[f]: Path(t).write_bytes(blob))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _failure_text(e: BaseException) -> str:
    if isinstance(e, JobFailed):
        return str(e)
    text = describe_error(e, limit=400)
    if "No module named" in text:
        text += " (every node needs the project's packages: " + CLUSTER_HINT + ")"
    return text


def attempt(job: Job, device: str, report: Callable[[dict], None] | None = None, shipped: dict | None = None,
            threads: int | None = None, on_run: Callable | None = None) -> dict:
    """One try of ``job`` here: ``{"files": ...}``, ``{"stopped": text, "files": ...}`` or ``{"error": text}``, with
    ``seconds`` it took. Any failure of the job is an answer, not an exception (KeyboardInterrupt excepted)."""
    t0 = time.monotonic()
    try:
        out = {"files": run_job(job, device, report, shipped, threads, on_run)}
    except JobStopped as e:
        out = {"stopped": str(e), "files": e.files}
    except Exception as e:  # noqa: BLE001 - one job's failure, whatever it is, must not stop the batch
        out = {"error": _failure_text(e)}
    out["seconds"] = time.monotonic() - t0
    return out


def _finish_try(r: JobResult, view: ProgressView, library: Path, outcome: dict) -> bool:
    """Record one try's outcome (see ``attempt``); True when the job should be tried again."""
    if "seconds" in outcome:
        r.seconds += outcome["seconds"]
    elif r.started is not None:
        r.seconds += time.monotonic() - r.started
    r.started = None
    error = outcome.get("error")
    if error is None:
        stopped = outcome.get("stopped")
        try:
            r.folder = install_run(library, r.job.name, outcome["files"]) if outcome["files"] else None
        except OSError as e:
            error = f"could not write the model into the library ({describe_error(e)})"
        else:
            if stopped is None:
                r.state, r.error = "done", ""
                view.note(f"{r.job.label}: done in {fmt_seconds(r.seconds, clock=True)} -> {r.folder}")
            else:
                r.state = "stopped"
                r.error = stopped + (f"; `python -m nada_core adapt --resume {r.folder}` continues it" if r.folder
                                     else "")
                view.note(f"{r.job.label}: {r.error}")
            return False
    r.errors.append(error)
    if r.tries < MAX_TRIES:
        r.state, r.step, r.loss, r.sec_per_step, r.eta, r.where = "queued", 0, None, None, None, ""
        view.note(f"{r.job.label}: try {r.tries} failed: {error}; trying once more")
        return True
    r.state, r.error = "failed", error
    view.note(f"{r.job.label}: failed after {r.tries} tries: {error}")
    return False


def _run_here(results: list[JobResult], view: ProgressView, library: Path, device: str,
              stop: Stop | None = None) -> None:
    """Every job here, one after another; after ``stop`` (the job training then stops and is kept) none starts."""
    where = f"{socket.gethostname()} ({device})"
    stop = stop or Stop()
    for r in results:
        while not stop.requested:
            r.tries += 1
            _apply_event(r, {"kind": "start", "where": where}, view)
            view.refresh(force=True)

            def report(d: dict, r=r) -> None:
                _apply_event(r, d, view)
                view.refresh()

            if not _finish_try(r, view, library, attempt(r.job, device, report, on_run=stop.attach)):
                break
