"""One way for a tab to show a run: the run trains in its own thread (``nada_core.training.run.Run``) and
the page reads its latest state at the page's own pace, so training never waits for the browser."""
from __future__ import annotations

import time
from typing import Iterator

import gradio as gr

from nada_core.training.run import Run, RunView

from .state import Studio
from .ui import fmt_seconds

POLL_SECONDS = 0.25   # how often the page looks at the run (a look costs a copy of the view, not a step)


def watch(studio: Studio, run: Run, session: str, poll: float = POLL_SECONDS) -> Iterator[RunView]:
    """Start ``run`` in the studio's training slot and yield its view each time it changed, the ended view last.
    New warnings become toasts. If the page goes away the run goes on to its end and saves itself."""
    studio.start_training(run, session)
    run.start()
    version, warned = -1, 0
    try:
        while True:
            view = run.view()
            for message in view.warnings[warned:]:
                gr.Warning(message)
            warned = len(view.warnings)
            if view.ended:
                yield view
                return
            if view.version != version:
                version = view.version
                yield view
            time.sleep(poll)
    finally:
        studio.finish_training(run)


def status_text(what: str, view: RunView) -> str:
    """The progress line of a running run, in one place for every tab."""
    if view.state == "stopping":
        return f"Stopping after the current step... ({view.step}/{view.total} done)"
    if view.step == 0 or view.sec_per_step is None:
        return f"{what}: starting..."
    loss = f" · loss {view.loss:.4f}" if view.loss is not None else ""
    return (f"{what}: step {view.step}/{view.total}{loss} · {view.sec_per_step:.2f} s/step · "
            f"about {fmt_seconds(view.eta)} left")
