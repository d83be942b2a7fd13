"""Progress in the terminal: one line per job, redrawn in place on a terminal, and the summary table."""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..timefmt import fmt_seconds
from .jobs import MAX_TRIES, Job


@dataclass
class JobResult:
    job: Job
    state: str = "queued"        # queued | running | done | failed | stopped (kept, resumable)
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
                text += f" {r.sec_per_step:.2f}s/it ETA {fmt_seconds(r.eta, clock=True)}"
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
        rows.append((str(r.job.index), r.job.name, r.state, str(r.tries), fmt_seconds(r.seconds, clock=True),
                     str(r.folder) if r.folder else r.error))
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in rows)


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
