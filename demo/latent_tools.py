"""Latent tools shared by the tabs: a trained latent mapper applied with a strength (StyleGAN-NADA's
'focus the domain', StyleCLIP's edit mappers), text edits by optimising one latent, and the streaming
of a long job (a mapper's training, an optimisation) into a tab's progress line and preview."""
from __future__ import annotations

import time
from typing import Iterator

import gradio as gr
import torch

from nada_core.store.images import grid, to_pil

from .state import Studio
from .ui import Cancelled, Slider, fmt_seconds, number, progress_html, run_with_progress  # noqa: F401 (re-exported)

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
    """Run a trainer in the training slot, yielding (status html, preview grid or gr.update(), final event or None).
    Previews follow the wall clock; the slot is freed however the run ends."""
    run_id = studio.start_training(trainer, session)
    t_preview, last = 0.0, None
    try:
        for ev in trainer.run():
            if ev.kind == "warning":
                gr.Warning(ev.message)
                continue
            if ev.kind == "step":
                now = time.perf_counter()
                if ev.preview is None and now - t_preview >= every:
                    ev.preview = trainer.preview()
                img = gr.update()
                if ev.preview is not None:
                    img, t_preview = grid([to_pil(ev.preview[0]), to_pil(ev.preview[1])], tile=128), now
                text = (f"{what}: step {ev.step}/{ev.total} · loss {ev.loss:.4f} · {ev.sec_per_step:.2f} s/step · "
                        f"about {fmt_seconds(ev.eta)} left")
                yield progress_html(ev.step / ev.total, text), img, None
                continue
            last = ev
            img = grid([to_pil(ev.preview[0]), to_pil(ev.preview[1])], tile=128) if ev.preview is not None else gr.update()
            verdict = {"done": "Finished", "cancelled": "Stopped", "error": "Stopped by an error"}[ev.kind]
            text = f"{what}: {verdict.lower()} after {ev.step}/{ev.total} steps." + (
                f" {ev.message[0].upper()}{ev.message[1:]}." if ev.kind != "done" else "")
            yield progress_html(ev.step / max(1, ev.total), text, "done" if ev.kind == "done" else "warn"), img, ev
    finally:
        if last is None and trainer.step > 0:
            trainer.save_final()
        studio.finish_training(run_id)
