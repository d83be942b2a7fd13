"""A training run as one object: drives a trainer (here, or in a thread of its own), keeps the latest state a
page or terminal shows, stops on request, and finishes the run folder the same way for the CLI, the app and
batch jobs (thumbnail, pruned snapshots, short runs set aside, exports).

The training thread never waits for its readers: ``view()`` returns a copy of the latest state whenever a
reader asks, at the reader's own pace. Previews beyond the trainer's own cadence are rendered on the wall
clock, at most a bounded share of the run's time, and their cost is counted in the step rate, so the ETA is
the time the run will really take.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..latent.sampling import comparison
from ..store.checkpoints import export_rosinality
from ..store.images import to_pil
from .loop import Event, Trainer, describe_error

MAX_CURVE_POINTS = 4000     # loss values kept for a curve (older ones thinned out)
RATE_WINDOW_S = 20.0        # the step rate (hence the ETA) is measured over this much recent wall time


def preview_grid(preview):
    """Source row above adapted row; tiles between 128 and 256 px so tiny and 1024 px models both read well."""
    src, adapted = preview
    return comparison([to_pil(src), to_pil(adapted)])


@dataclass
class RunView:
    """What a reader sees of a run at one moment (a copy: safe to keep and read from any thread)."""

    state: str                       # starting | running | stopping | done | cancelled | error
    step: int
    total: int
    loss: float | None = None
    sec_per_step: float | None = None   # wall clock per step, previews and snapshots included
    eta: float | None = None
    elapsed: float = 0.0
    preview: tuple | None = None        # (source row, adapted row) tensors of the newest preview
    preview_step: int = 0
    losses: list[dict] = field(default_factory=list)        # {"step", "loss", "model"} per CLIP model and step
    diagnostics: list[tuple[int, dict]] = field(default_factory=list)
    slots: list[list[int]] = field(default_factory=list)    # W+ slots trained, the newest steps last
    warnings: list[str] = field(default_factory=list)       # every warning so far, oldest first
    final: Event | None = None
    set_aside: bool = False
    version: int = 0

    @property
    def ended(self) -> bool:
        return self.final is not None


class Run:
    """``Run(trainer, ...)``; then ``run_here(on_event)`` (CLI, batch) or ``start()`` + ``view()`` (the app).

    preview_seconds: extra previews on the wall clock (None: only the trainer's own cadence);
    preview_share: the most of the run's time those previews may take;
    set_aside_below: a stopped run shorter than this share of its steps leaves the library listing;
    keep_snapshots: snapshots kept of a finished run; export_pt: also write the rosinality ``.pt`` on finish.
    """

    def __init__(self, trainer: Trainer, *, preview_seconds: float | None = None, preview_share: float = 0.1,
                 set_aside_below: float | None = None, keep_snapshots: int | None = 5, export_pt: bool = False,
                 owner: str = ""):
        self.trainer, self.owner = trainer, owner
        self.preview_seconds, self.preview_share = preview_seconds, preview_share
        self.set_aside_below, self.keep_snapshots, self.export_pt = set_aside_below, keep_snapshots, export_pt
        self.folder = trainer.folder
        self.exports: list = []
        self.stop_requested_at: float | None = None
        self._lock = threading.Lock()
        self._view = RunView("starting", trainer.step, trainer.recipe.iterations)
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self._marks: deque[tuple[float, int]] = deque()   # (time, step) of recent steps, for the rate

    # ------------------------------------------------------------ driving
    def run_here(self, on_event: Callable[[Event], None] | None = None) -> Event | None:
        """Train in this thread to the end; every event goes to ``on_event``. Returns the final event."""
        self._t0 = time.monotonic()
        self._marks.clear()
        self._marks.append((self._t0, self.trainer.step))
        self._update(state="running")
        final = None
        try:
            for ev in self.trainer.run():
                if ev.final:   # finished while the trainer still holds the folder's lock: no rename splits it
                    final = ev
                    self._finish(final)
                    continue
                self._record(ev)
                if on_event is not None:
                    on_event(ev)
        except BaseException as e:   # a crash outside the trainer's guards still ends the view
            final = Event("error", self.trainer.step, self.trainer.recipe.iterations, message=describe_error(e))
            self._update(final=final, state="error")
            raise
        if final is not None and on_event is not None:
            on_event(final)
        return final

    def start(self) -> "Run":
        """Train in a thread of its own; read it with ``view()``, end it with ``stop()``."""
        def target():
            try:
                self.run_here()
            except BaseException:  # noqa: BLE001 - recorded in the view as an error ending
                pass

        self._thread = threading.Thread(target=target, name=f"run-{self.folder.name if self.folder else 'memory'}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> bool:
        """Ask the run to stop after its current step (weights and resumable state are saved). False if ended."""
        with self._lock:
            if self._view.final is not None:
                return False
            self.stop_requested_at = time.monotonic()
            self._view.state = "stopping"
            self._view.version += 1
        self.trainer.cancel()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the run has ended (waiting up to ``timeout`` seconds for a started run)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._view.final is not None

    def view(self) -> RunView:
        with self._lock:
            v = self._view
            return RunView(v.state, v.step, v.total, v.loss, v.sec_per_step, v.eta, time.monotonic() - self._t0,
                           v.preview, v.preview_step, list(v.losses), list(v.diagnostics), list(v.slots),
                           list(v.warnings), v.final, v.set_aside, v.version)

    @property
    def ended(self) -> bool:
        return self._view.final is not None

    # ------------------------------------------------------------ recording
    def _update(self, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self._view, k, v)
            self._view.version += 1

    def _record(self, ev: Event) -> None:
        if ev.kind == "warning":
            with self._lock:
                self._view.warnings.append(ev.message)
                self._view.version += 1
            return
        now = time.monotonic()
        self._maybe_preview(ev, now)
        self._marks.append((time.monotonic(), ev.step))
        while len(self._marks) > 2 and self._marks[-1][0] - self._marks[0][0] > RATE_WINDOW_S:
            self._marks.popleft()
        (t_a, s_a), (t_b, s_b) = self._marks[0], self._marks[-1]
        if s_b > s_a:   # what the run really takes per step, previews and snapshots included
            ev.sec_per_step = (t_b - t_a) / (s_b - s_a)
            ev.eta = ev.sec_per_step * (ev.total - ev.step)
        with self._lock:
            v = self._view
            v.step, v.total, v.loss, v.sec_per_step, v.eta = ev.step, ev.total, ev.loss, ev.sec_per_step, ev.eta
            v.losses.extend({"step": ev.step, "loss": value, "model": name} for name, value in ev.losses.items())
            if len(v.losses) > MAX_CURVE_POINTS:
                v.losses = v.losses[::2]
            v.slots.append(list(ev.slots))
            del v.slots[:-200]
            if ev.preview is not None:
                v.preview, v.preview_step = ev.preview, ev.step
            if ev.diagnostics:
                v.diagnostics.append((ev.step, dict(ev.diagnostics)))
            if v.state == "starting":
                v.state = "running"
            v.version += 1

    def _maybe_preview(self, ev: Event, now: float) -> None:
        """A wall-clock preview (measured by the trainer's observers) when one is due and affordable."""
        if self.preview_seconds is None or ev.preview is not None or self.trainer.cancelled:
            return
        cost = getattr(self, "_preview_cost", 0.0)
        last = getattr(self, "_preview_at", float("-inf"))
        if now - last < max(self.preview_seconds, cost / max(self.preview_share, 1e-3)):
            return
        t0 = time.monotonic()
        for w in self.trainer.attach_preview(ev):
            self._record(w)
        self._preview_cost, self._preview_at = time.monotonic() - t0, time.monotonic()

    # ------------------------------------------------------------ the ending
    def _finish(self, ev: Event) -> None:
        """What a finished run's folder gets, the same for every entry point; then the view shows the end."""
        folder, trainer, aside = self.folder, self.trainer, False
        if folder is not None and ev.checkpoint and not trainer.save_error:
            try:
                if ev.preview is not None:
                    folder.write_thumb(preview_grid(ev.preview))
                if self.export_pt and hasattr(trainer, "G_train"):
                    self.exports.append(export_rosinality(trainer.G_train, folder.export_path(".pt")))
            except Exception as e:  # noqa: BLE001 - the model itself is saved; say what is missing
                self._record(Event("warning", ev.step, ev.total,
                                   message=f"the thumbnail or .pt export could not be written ({describe_error(e)})"))
            if ev.kind == "done" and self.keep_snapshots:
                folder.prune(self.keep_snapshots)
            short = self.set_aside_below is not None and ev.kind != "done" and ev.step < self.set_aside_below * ev.total
            if short:
                try:
                    self.folder, aside = folder.set_aside(), True
                    self.exports = []
                except OSError as e:
                    self._record(Event("warning", ev.step, ev.total, message="the short run could not be set "
                                       f"aside ({describe_error(e)}); it stays in the library"))
        if ev.preview is not None:
            self._update(preview=ev.preview, preview_step=ev.step)
        if ev.diagnostics:
            with self._lock:
                self._view.diagnostics.append((ev.step, dict(ev.diagnostics)))
        self._update(final=ev, state=ev.kind, step=ev.step, set_aside=aside)


@contextlib.contextmanager
def stop_on_ctrl_c(run, message: str = "stopping after this step and saving"):
    """While a terminal command trains: the first Ctrl-C calls ``run.stop()`` (a ``Run`` ends after its current step
    with its weights and resumable state saved, as the app's Stop; a batch also starts no further job); a second
    Ctrl-C quits at once, unsaved. Does nothing outside the main thread (signals are delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\n{message}; Ctrl-C again quits without saving", file=sys.stderr, flush=True)
        run.stop()

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
