"""The run loop shared by every trainer (domain adaptation, latent mappers).

A trainer implements one optimiser step (``train_step``), a preview and how to write its weights;
``Trainer`` supplies the rest: progress events with ETA, cancel, preview and snapshot cadence, exact
resume (weights + optimiser + sampler state), the non-finite-loss guard, and saving that never loses
a trained model (a failed snapshot is a warning; a failed final save keeps the model in memory and
``save_final()`` retries).

Run folder::

    <recipe_file>              what the run is (written when the folder is opened)
    snapshots/step_NNNNN.*     weights every ``snapshot_every`` steps
    state.pt                   optimiser, sampler and history of the newest snapshot (for resume)
    <final_name>               the weights of the last finished step
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from .checkpoints import atomic_write


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


def remove_stale_parts(folder: Path) -> list[Path]:
    """Delete half-written temporary files (``.<name>.*.part``, see ``atomic_write``) left by a process
    killed while saving, in a run folder and its snapshots folder."""
    removed = []
    for d in (folder, folder / "snapshots"):
        if d.is_dir():
            for p in d.glob(".*.part"):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


class Trainer:
    """Base class: subclasses set ``recipe`` (with ``iterations``, ``preview_every``, ``snapshot_every``),
    ``opt``, ``rng``, ``device`` and ``out_dir``, call ``_open_run_dir`` and implement ``train_step``,
    ``preview``, ``save`` and ``_load_weights``."""

    recipe_file = "recipe.json"
    final_name = "final.safetensors"
    snapshot_suffix = ".safetensors"
    what = "model"          # used in messages: "the model is only in memory"

    step: int
    history: list[float]
    out_dir: Path | None
    warnings: list[str]
    save_error: str | None

    def _init_state(self, out_dir) -> None:
        self.out_dir = Path(out_dir) if out_dir else None
        self.step, self.history, self.warnings = 0, [], getattr(self, "warnings", [])
        self.save_error = None
        self._cancel = False

    def _open_run_dir(self, record: dict, resuming: bool = False) -> None:
        """Create the run folder (or reopen it to resume), remove stale ``.part`` files, write the recipe.
        A folder already holding another run is refused: a new run never overwrites a model."""
        if not self.out_dir:
            return
        recipe_path = self.out_dir / self.recipe_file
        if not resuming and recipe_path.exists():
            raise ValueError(f"{self.out_dir} already holds a run; resume it or choose a new folder")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(self.out_dir)
        if not resuming:
            atomic_write(recipe_path, lambda t: Path(t).write_text(json.dumps(record, indent=2)))

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
        """Stop before the next step; the weights of the last finished step are saved and kept."""
        self._cancel = True

    # ------------------------------------------------------------ the loop
    def run(self) -> Iterator[Event]:
        """Train, yielding a 'step' event per iteration (and 'warning' events) and one final 'done',
        'cancelled' or 'error' event. Every ending saves the weights of the last finished step when the
        run has an output folder; if that fails the model stays in memory (``save_final()`` retries)."""
        r = self.recipe
        total = r.iterations
        for w in self.warnings:
            yield Event("warning", self.step, total, message=w)
        sec = None
        while self.step < total:
            if self._cancel:
                yield self._finish("cancelled", f"stopped after {self.step} of {total} steps" if self.step else
                                   "stopped before the first step")
                return
            t0 = time.perf_counter()
            try:
                result = self.train_step()
            except NonFiniteLoss as e:
                advice = "Try a lower learning rate, smaller loss weights or different prompts"
                kept = (f"training stopped and the last good weights (step {self.step}) were kept" if self.step
                        else "training stopped at the first step")
                yield self._finish("error", f"{e}; {kept}. {advice}")
                return
            except (RuntimeError, MemoryError) as e:  # e.g. out of memory: keep what was learned so far
                kept = f"the weights of step {self.step} were kept" if self.step else "nothing had been trained yet"
                yield self._finish("error", f"training failed at step {self.step + 1} ({describe_error(e)}); {kept}")
                return
            losses, slots, timings = result
            self.step += 1
            dt = time.perf_counter() - t0
            sec = dt if sec is None else 0.8 * sec + 0.2 * dt
            self.history.append(losses["total"])
            ev = Event("step", self.step, total, loss=losses["total"], losses=losses, slots=list(slots),
                       sec_per_step=sec, eta=sec * (total - self.step), timings=timings)
            if self.step == 1 or self.step % max(1, r.preview_every) == 0 or self.step == total:
                try:
                    ev.preview = self.preview()
                except (RuntimeError, MemoryError) as e:
                    yield Event("warning", self.step, total, message=f"could not render the preview ({describe_error(e)})")
            if self.out_dir and r.snapshot_every and self.step % r.snapshot_every == 0:
                try:
                    ev.checkpoint = str(self.save_snapshot())
                except Exception as e:  # noqa: BLE001 - any failure to write (disk full, quota, ...) must not end the run
                    yield Event("warning", self.step, total,
                                message=f"could not save snapshot ({describe_error(e)}); training goes on")
            yield ev
        yield self._finish("done", f"finished {total} steps")

    def _finish(self, kind: str, message: str) -> Event:
        total = self.recipe.iterations
        try:
            preview = self.preview()
        except (RuntimeError, MemoryError):
            preview = None
        if self.step == 0:  # the starting weights under a new name would pass for a trained model
            self.save_error = None
            return Event(kind, 0, total, preview=preview, message=message + "; nothing was trained, so nothing was saved")
        path = self.save_final()
        if path is None and self.save_error:
            message += (f"; but saving failed ({self.save_error}), the {self.what} is only in memory: "
                        "free disk space and save again")
        return Event(kind, self.step, total, loss=self.history[-1] if self.history else None,
                     checkpoint=str(path) if path else None, preview=preview, message=message,
                     save_error=self.save_error)

    # ------------------------------------------------------------ saving and resuming
    def save_final(self, path: str | Path | None = None) -> Path | None:
        """Write the weights of the last finished step (default ``<run folder>/<final_name>``); call it again
        to retry after a failure. Returns the path, or None when nothing was written: no output folder,
        nothing trained yet, or the write failed, in which case ``save_error`` says why (else it is None)."""
        self.save_error = None
        if path is None:
            if not self.out_dir:
                return None
            path = self.out_dir / self.final_name
        if self.step == 0:
            return None
        try:
            return self.save(path)
        except Exception as e:  # noqa: BLE001 - torch.save, safetensors and the file system raise many types
            self.save_error = describe_error(e)
            return None

    def save_snapshot(self) -> Path:
        """Weights at this step plus the optimiser and sampler state, so a run can resume exactly."""
        path = self.save(self.out_dir / "snapshots" / f"step_{self.step:05d}{self.snapshot_suffix}")
        state = {"step": self.step, "optimizer": self.opt.state_dict(), "rng": self.rng.get_state(),
                 "history": list(self.history), "snapshot": path.name, "extra": self._extra_state()}
        atomic_write(self.out_dir / "state.pt", lambda t: torch.save(state, t))
        return path

    def snapshots(self) -> list[Path]:
        return sorted((self.out_dir / "snapshots").glob(f"step_*{self.snapshot_suffix}")) if self.out_dir else []

    def _restore(self) -> None:
        """Continue from the newest snapshot: same weights, optimiser moments, sampler state and history."""
        state_path = self.out_dir / "state.pt"
        if not state_path.is_file():
            raise ValueError(f"{self.out_dir} has no snapshot to resume from (state.pt is missing)")
        state = torch.load(state_path, weights_only=True)
        self._load_weights(self.out_dir / "snapshots" / state["snapshot"])
        self.opt.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self._load_extra_state(state.get("extra") or {})
