"""The run loop shared by every trainer (domain adaptation, latent mappers).

A trainer implements one optimiser step (``train_step``), a preview and how to write its weights;
``Trainer`` supplies the rest: progress events, cancel, preview and snapshot cadence, exact resume
(weights + optimiser + sampler state), the non-finite-loss guard, and saving that never loses a trained
model (a failed snapshot is a warning; a failed final save keeps the model in memory and ``save_final()``
retries). Stopping saves a resumable state at the step where the run stopped, so Continue loses nothing.
The run's files are named and handled by ``store.runs.RunFolder``; ``training.run.Run`` drives a trainer
for the CLI, the app and batch jobs alike.

Observers (``trainer.add_observer(obs)``, e.g. ``diagnostics.Diagnostics``) watch the run from outside
the step: on every event that carries a preview the loop calls ``obs.observe(event)`` and merges the
dicts they return into ``event.diagnostics``; an observer that raises becomes a warning event and the
run goes on. The figures of every measured step are kept in the run's diagnostics file (see
``read_diagnostics``), and every snapshot step is previewed, hence measured.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Protocol

import torch

from ..store.bounded_json import load_file
from ..store.checkpoints import atomic_write
from ..store.runs import ADAPTATION, DIAGNOSTICS, RunBusy, RunFolder, RunKind

MAX_DIAGNOSTICS_BYTES = 64 << 20   # ~120 bytes a measured step: 100,000 steps measured at every one fit


@dataclass
class Event:
    """One report from a trainer. ``kind``: step | done | cancelled | error | warning."""

    kind: str
    step: int
    total: int
    loss: float | None = None
    losses: dict = field(default_factory=dict)
    slots: list[int] = field(default_factory=list)
    sec_per_step: float | None = None
    eta: float | None = None
    timings: dict = field(default_factory=dict)
    preview: tuple[torch.Tensor, torch.Tensor] | None = None   # (before row, after row) in [-1, 1]
    checkpoint: str | None = None
    message: str = ""
    save_error: str | None = None   # on a final event: why the final weights could not be written
    diagnostics: dict = field(default_factory=dict)   # observers' figures for this preview (clip_score, ...)

    @property
    def final(self) -> bool:
        return self.kind in ("done", "cancelled", "error")

    def to_dict(self) -> dict:
        """Plain JSON-ready data (no tensors; non-finite numbers become None): kind, step, total, and what
        the event carries: loss, losses, slots, sec_per_step, eta, timings, the diagnostics' figures at top
        level, message, and on a final event checkpoint and save_error."""
        d: dict = {"kind": self.kind, "step": self.step, "total": self.total}
        if self.kind == "step":
            d.update(loss=self.loss, losses=dict(self.losses), slots=list(self.slots), sec_per_step=self.sec_per_step,
                     eta=self.eta, timings=dict(self.timings))
        d.update({k: v for k, v in self.diagnostics.items() if k != "step"})
        if self.message:
            d["message"] = self.message
        if self.final:
            d.update(loss=self.loss, checkpoint=self.checkpoint, save_error=self.save_error)
        return _plain(d)


class Observer(Protocol):
    """Anything with ``observe(event) -> dict | None``; called on every event that carries a preview."""

    def observe(self, event: Event) -> dict | None: ...


def _plain(x):
    """JSON-safe copy: NaN and infinities become None, tuples lists, tensors numbers."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def read_diagnostics(run_dir: str | Path) -> dict[int, dict]:
    """The figures measured during a run, ``{step: {"clip_score", "diversity", "identity", "collapse"}}`` in
    step order (every snapshot step has one when an observer was attached); {} when the run has none or
    the file cannot be read."""
    path = Path(run_dir) / DIAGNOSTICS
    try:
        raw = load_file(path, expect=dict, max_bytes=MAX_DIAGNOSTICS_BYTES, max_depth=4)
        return {int(k): dict(v) for k, v in sorted(raw.items(), key=lambda kv: int(kv[0])) if isinstance(v, dict)}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


class StepResult(NamedTuple):
    """What one optimiser step reports: losses (with 'total'), the W+ slots trained, seconds per phase."""

    losses: dict
    slots: list[int]
    timings: dict


class NonFiniteLoss(RuntimeError):
    pass


class Phases:
    """Seconds per named phase of one step: ``with phases("clip"): ...``; a name used twice adds up.
    On CUDA a phase ends with a synchronisation, so it measures the GPU's work, not the launches."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def describe_error(e: BaseException, limit: int = 200) -> str:
    """'TypeName: first line of the message' (short enough for a status line)."""
    text = str(e).splitlines()[0][:limit] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Trainer:
    """Base class: a subclass calls ``super().__init__`` with its recipe (``iterations``, ``preview_every``,
    ``snapshot_every``), sets ``opt`` and ``rng``, calls ``_open_folder`` once its weights exist, and implements
    ``train_step``, ``preview``, ``save`` and ``_load_weights``."""

    run_kind: RunKind = ADAPTATION
    what = "model"          # used in messages: "the model is only in memory"

    def __init__(self, recipe, device: str | torch.device = "cpu", out_dir: str | Path | None = None,
                 observers=(), warnings=()):
        self.recipe = recipe
        self.device = torch.device(device)
        self.folder: RunFolder | None = RunFolder(out_dir, self.run_kind) if out_dir else None
        self.step, self.history = 0, []
        self.warnings: list[str] = list(warnings)
        self.save_error: str | None = None
        self.observers: list[Observer] = list(observers or [])
        self.measured: dict[int, dict] = {}   # step -> observers' figures (what the diagnostics file holds)
        self.step_warnings: list[str] = []    # what a step has to report (train_step appends; run yields them)
        self._cancel = False
        self._last_preview: tuple[int, tuple, dict] | None = None   # (step, preview, diagnostics)
        self._observer_failures: set[tuple[int, str]] = set()

    @property
    def out_dir(self) -> Path | None:
        return self.folder.path if self.folder else None

    def add_observer(self, observer: Observer) -> Observer:
        """Have ``observer.observe(event)`` called on every event with a preview (once per observer)."""
        if all(observer is not o for o in self.observers):
            self.observers.append(observer)
        return observer

    def continue_for(self, more: int) -> None:
        """Train ``more`` steps beyond the current one; the folder's recipe says so, so every entry point that
        continues the run later (the CLI's ``--resume`` too) aims at the same total."""
        if not 1 <= int(more) <= 100_000:
            raise ValueError("more iterations must be between 1 and 100000")
        self.recipe.iterations = self.step + int(more)
        if self.folder:
            record = self.folder.read_record()
            record["recipe"] = {**record.get("recipe", {}), "iterations": self.recipe.iterations}
            self.folder.write_record(record)

    def _open_folder(self, record: dict, resuming: bool = False) -> None:
        """Start the run's folder (refused when it already holds a run) or reopen it to continue."""
        if self.folder:
            self.folder.reopen() if resuming else self.folder.create(record)

    # ------------------------------------------------------------ to implement
    def train_step(self) -> StepResult:
        raise NotImplementedError

    def preview(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write the trained weights (with ``meta()``) to ``path``, atomically."""
        raise NotImplementedError

    def _load_weights(self, path: Path) -> None:
        """Load weights written by ``save`` (used by resume)."""
        raise NotImplementedError

    def _extra_state(self) -> dict:
        """More sampler state for exact resume (beyond ``rng``)."""
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def meta(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "step": self.step, "loss": self.history[-1] if self.history else None}

    # ------------------------------------------------------------ guards
    def _check_loss(self, total: torch.Tensor) -> None:
        if not torch.isfinite(total):
            raise NonFiniteLoss(f"the loss became {float(total.detach())} at step {self.step + 1}")

    def _check_gradients(self) -> None:
        grads = [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        if not all(torch.isfinite(g).all() for g in grads):
            raise NonFiniteLoss(f"gradients became non-finite at step {self.step + 1}")

    def cancel(self) -> None:
        """Stop before the next step; the weights and the resumable state of the last finished step are saved."""
        self._cancel = True

    @property
    def cancelled(self) -> bool:
        return self._cancel

    # ------------------------------------------------------------ observers
    def _observe(self, ev: Event) -> list[Event]:
        """Let every observer measure ``ev`` (which has a preview); their answers go into
        ``ev.diagnostics``. Returns warning events for observers that failed (each distinct failure once)."""
        warnings = []
        for i, obs in enumerate(self.observers):
            try:
                answer = obs.observe(ev)
            except Exception as e:  # noqa: BLE001 - a measurement must never end a run
                text = describe_error(e)
                if (i, text) not in self._observer_failures:
                    self._observer_failures.add((i, text))
                    warnings.append(Event("warning", ev.step, ev.total,
                                          message=f"{type(obs).__name__} could not measure step {ev.step} ({text}); "
                                                  "training goes on"))
                continue
            if answer:
                ev.diagnostics.update({k: v for k, v in answer.items() if k != "step"})
        return warnings

    def attach_preview(self, ev: Event) -> Iterator[Event]:
        """Render ``ev.preview`` (or reuse the one of this very step) and measure it; yields warnings."""
        if self._last_preview is not None and self._last_preview[0] == self.step:
            ev.preview, ev.diagnostics = self._last_preview[1], dict(self._last_preview[2])
            return
        try:
            ev.preview = self.preview()
        except (RuntimeError, MemoryError) as e:
            yield Event("warning", self.step, ev.total, message=f"could not render the preview ({describe_error(e)})")
            return
        if self.observers:
            yield from self._observe(ev)
        self._last_preview = (self.step, ev.preview, dict(ev.diagnostics))
        if ev.diagnostics and self.step > 0:
            self.measured[self.step] = _plain(dict(ev.diagnostics))
            if self.out_dir:
                try:
                    self._write_diagnostics()
                except Exception as e:  # noqa: BLE001 - like a snapshot: a failed write must not end the run
                    yield Event("warning", self.step, ev.total,
                                message=f"could not save the diagnostics ({describe_error(e)}); training goes on")

    def _write_diagnostics(self) -> None:
        text = json.dumps({str(s): v for s, v in sorted(self.measured.items())}, indent=1)
        atomic_write(self.folder.diagnostics_path, lambda t: Path(t).write_text(text))

    # ------------------------------------------------------------ the loop
    def run(self) -> Iterator[Event]:
        """Train, yielding a 'step' event per iteration (and 'warning' events) and one final 'done',
        'cancelled' or 'error' event. Every ending saves the weights of the last finished step when the
        run has a folder (a stop also its resumable state); if that fails the model stays in memory
        (``save_final()`` retries). Events with a preview (the first step, every ``preview_every`` steps, every
        snapshot step, the last step and the final event) carry the observers' figures in ``diagnostics``.
        The folder is locked while the loop runs, so the library never renames or deletes a training run."""
        try:
            with self.folder.active() if self.folder else contextlib.nullcontext():
                yield from self._run()
        except RunBusy:
            yield Event("error", self.step, self.recipe.iterations,
                        message=f"{self.folder.name} is already training in another process; nothing was changed")

    def _run(self) -> Iterator[Event]:
        r = self.recipe
        total = r.iterations
        for w in self.warnings:
            yield Event("warning", self.step, total, message=w)
        sec = None
        while self.step < total:
            if self._cancel:
                yield from self._finish("cancelled", f"stopped after {self.step} of {total} steps" if self.step else
                                        "stopped before the first step")
                return
            t0 = time.perf_counter()
            try:
                result = self.train_step()
            except NonFiniteLoss as e:
                advice = "Try a lower learning rate, smaller loss weights or different prompts"
                kept = (f"training stopped and the last good weights (step {self.step}) were kept" if self.step
                        else "training stopped at the first step")
                yield from self._finish("error", f"{e}; {kept}. {advice}")
                return
            except (RuntimeError, MemoryError) as e:  # e.g. out of memory: keep what was learned so far
                kept = f"the weights of step {self.step} were kept" if self.step else "nothing had been trained yet"
                yield from self._finish("error", f"training failed at step {self.step + 1} ({describe_error(e)}); {kept}")
                return
            while self.step_warnings:
                yield Event("warning", self.step, total, message=self.step_warnings.pop(0))
            losses, slots, timings = result
            self.step += 1
            dt = time.perf_counter() - t0
            sec = dt if sec is None else 0.8 * sec + 0.2 * dt
            self.history.append(losses["total"])
            ev = Event("step", self.step, total, loss=losses["total"], losses=losses, slots=list(slots),
                       sec_per_step=sec, eta=sec * (total - self.step), timings=timings)
            snapshot = bool(self.out_dir and r.snapshot_every and self.step % r.snapshot_every == 0)
            if self.step == 1 or self.step % max(1, r.preview_every) == 0 or self.step == total or snapshot:
                yield from self.attach_preview(ev)
            if snapshot:
                try:
                    ev.checkpoint = str(self.save_snapshot())
                except Exception as e:  # noqa: BLE001 - any failure to write (disk full, quota, ...) must not end the run
                    yield Event("warning", self.step, total,
                                message=f"could not save snapshot ({describe_error(e)}); training goes on")
            yield ev
        yield from self._finish("done", f"finished {total} steps")

    def _finish(self, kind: str, message: str) -> Iterator[Event]:
        """The final event (after any warnings of its preview's measurement), with the weights saved."""
        total = self.recipe.iterations
        ev = Event(kind, self.step, total)
        for w in self.attach_preview(ev):
            if not w.message.startswith("could not render the preview"):  # a final preview is optional
                yield w
        if self.step == 0:  # the starting weights under a new name would pass for a trained model
            self.save_error = None
            ev.message = message + "; nothing was trained, so nothing was saved"
            yield ev
            return
        if kind == "cancelled" and self.folder and self._snapshot_step() != self.step:
            try:  # Continue resumes from exactly here
                ev.checkpoint = str(self.save_snapshot())
            except Exception as e:  # noqa: BLE001 - the final save below still keeps the weights
                yield Event("warning", self.step, total, message=f"could not save the state to continue from "
                                                                 f"({describe_error(e)}); the weights are saved")
        path = self.save_final()
        if path is None and self.save_error:
            message += (f"; but saving failed ({self.save_error}), the {self.what} is only in memory: "
                        "free disk space and save again")
        ev.loss = self.history[-1] if self.history else None
        ev.checkpoint, ev.message, ev.save_error = str(path) if path else None, message, self.save_error
        yield ev

    # ------------------------------------------------------------ saving and resuming
    def save_final(self, path: str | Path | None = None) -> Path | None:
        """Write the weights of the last finished step (default ``<run folder>/<final_name>``); call it again
        to retry after a failure. Returns the path, or None when nothing was written: no output folder,
        nothing trained yet, or the write failed, in which case ``save_error`` says why (else it is None)."""
        self.save_error = None
        if path is None:
            if not self.folder:
                return None
            path = self.folder.final_path
        if self.step == 0:
            return None
        try:
            return self.save(path)
        except Exception as e:  # noqa: BLE001 - torch.save, safetensors and the file system raise many types
            self.save_error = describe_error(e)
            return None

    def save_snapshot(self) -> Path:
        """Weights at this step plus the optimiser and sampler state, so a run can resume exactly."""
        path = self.save(self.folder.snapshot_path(self.step))
        state = {"step": self.step, "optimizer": self.opt.state_dict(), "rng": self.rng.get_state(),
                 "history": list(self.history), "snapshot": path.name, "extra": self._extra_state()}
        atomic_write(self.folder.state_path, lambda t: torch.save(state, t))
        return path

    def _snapshot_step(self) -> int | None:
        """The step the folder's resumable state is at (None when it has none)."""
        try:
            return int(torch.load(self.folder.state_path, weights_only=True)["step"])
        except (OSError, RuntimeError, KeyError, ValueError, TypeError):
            return None

    def snapshots(self) -> list[Path]:
        return self.folder.snapshots() if self.folder else []

    def _restore(self) -> None:
        """Continue from the resumable state: same weights, optimiser moments, sampler state and history."""
        if not self.folder.state_path.is_file():
            raise ValueError(f"{self.folder.path} has no state to continue from ({self.folder.state_path.name} is missing)")
        state = torch.load(self.folder.state_path, weights_only=True)
        self._load_weights(self.folder.snapshots_dir / state["snapshot"])
        self.opt.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self._load_extra_state(state.get("extra") or {})
        # figures measured after the snapshot describe weights the resumed run no longer has
        self.measured = {s: v for s, v in read_diagnostics(self.folder.path).items() if s <= self.step}
