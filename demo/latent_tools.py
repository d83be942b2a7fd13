"""Latent tools shared by the tabs: a trained latent mapper applied with a strength (StyleGAN-NADA's
'focus the domain', StyleCLIP's edit mappers), text edits by optimising one latent, and the streaming
of a long job (a mapper's training, an optimisation) into a tab's progress line and preview."""
from __future__ import annotations

from typing import Iterator

import gradio as gr
import torch

from nada_core.latent.sampling import comparison
from nada_core.store.images import to_pil
from nada_core.training.run import Run

from .run_stream import status_text, watch
from .state import Studio
from .ui import Cancelled, Slider, fmt_seconds, image_file, number, progress_html, run_with_progress  # noqa: F401 (re-exported)

PREVIEW_SECONDS = 2.0


class MapperPicker:
    """A dropdown of the trained mappers that fit a model, and a strength slider
    (w_hat = w + a * 0.1 * mapper(w))."""

    def __init__(self, studio: Studio, generator: str | None, label: str = "Latent mapper (optional)"):
        with gr.Row():
            self.choice = gr.Dropdown(mapper_choices(studio, generator), value=None, label=label, scale=3,
                                      min_width=160, allow_custom_value=True)  # ids, checked on the server
            self.strength = Slider(0, 2, value=1.0, step=0.05, label="Mapper strength", scale=2, min_width=140)

    @property
    def inputs(self):
        return [self.choice, self.strength]

    @staticmethod
    def apply(studio: Studio, w_plus: torch.Tensor, mapper_id, strength, n_latent: int) -> torch.Tensor:
        if not mapper_id:
            return w_plus
        a = number(strength, "Mapper strength", 0, 2, integer=False)
        mapper = studio.mapper(mapper_id, n_latent)
        with torch.no_grad():
            return mapper.edit(w_plus.to(next(mapper.parameters()).device), a).to(w_plus.device)


def mapper_choices(studio: Studio, generator: str | None = None):
    return [(f"{m['text']}  (trained on {m['generator']})", m["id"]) for m in studio.mappers(generator)]


def stream_trainer(studio: Studio, trainer, session: str, what: str, every: float = PREVIEW_SECONDS) -> Iterator[tuple]:
    """Run a trainer (a mapper's) in the training slot as the Adapt tab runs its own (``run_stream.watch``),
    yielding (status html, preview grid or gr.update(), final event or None)."""
    run = Run(trainer, preview_seconds=every)
    shown = -1
    for view in watch(studio, run, session):
        img = gr.update()
        if view.preview is not None and view.preview_step != shown:
            shown = view.preview_step
            img = image_file(comparison([to_pil(view.preview[0]), to_pil(view.preview[1])], largest=128), name="before_after", live=True)
        if not view.ended:
            yield progress_html(view.step / max(1, view.total), status_text(what, view),
                                "warn" if view.state == "stopping" else "run"), img, None
            continue
        ev = view.final
        verdict = {"done": "Finished", "cancelled": "Stopped", "error": "Stopped by an error"}[ev.kind]
        text = f"{what}: {verdict.lower()} after {ev.step}/{ev.total} steps." + (
            f" {ev.message[0].upper()}{ev.message[1:]}." if ev.kind != "done" else "")
        yield progress_html(ev.step / max(1, ev.total), text, "done" if ev.kind == "done" else "warn"), img, ev
