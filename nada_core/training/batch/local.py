"""One job on this machine (a temporary run folder, its files returned as bytes), installing a finished run into
the library, and the sequential driver that runs every job here, one after another."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .jobs import MAX_TRIES, Job
from .progress import JobResult, ProgressView, _apply_event, _fmt_time

if TYPE_CHECKING:
    from ..loop import Event

CLUSTER_HINT = "pip install -r requirements-cluster.txt"
RUN_FILES = ("final.safetensors", "thumb.png", "recipe.json")   # recipe last: the app lists a folder from then on


class JobFailed(RuntimeError):
    """A job's training ended without a finished model (non-finite loss, out of memory, save failure...)."""


def follow_run(trainer, out_dir: Path | None, on_event: Callable[[Event], None] | None = None) -> Event | None:
    """Run ``trainer`` to its end, passing each event to ``on_event``; write ``thumb.png`` (source row above
    adapted row) into ``out_dir`` from the final preview. Returns the last event (None if none came)."""
    from ...store.images import grid, to_pil

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

    from ...guidance.clip_guide import load_ensemble
    from ...store.images import from_pil, open_image
    from ...store.library import load_base
    from ..adapt import Adapter

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
    from ...store.checkpoints import atomic_write

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


def _failure_text(e: BaseException) -> str:
    from ..loop import describe_error

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
    from ..loop import describe_error

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
