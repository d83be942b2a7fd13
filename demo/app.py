"""The page: four tabs over one shared Studio state. Layout lives here; handlers live in each tab."""
from __future__ import annotations

import gradio as gr

from nada_core import weights

from . import adapt_tab, edit_tab, sample_tab, selfie_tab
from .sample_tab import model_choices
from .state import Studio

CSS = ".tiny-banner {background: #fff3cd; border: 1px solid #e0b100; border-radius: 6px; padding: 4px 12px;}"


def build_demo(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="NADA Studio") as demo:
        gr.Markdown("# NADA Studio\nText-driven domain adaptation of StyleGAN2 (StyleGAN-NADA). One latent code, "
                    "the same face in every domain.")
        with gr.Tab("Adapt") as t1:
            library = adapt_tab.build(studio)
        with gr.Tab("Sample") as t2:
            sample_models = sample_tab.build(studio)
        with gr.Tab("Edit") as t3:
            edit_base, edit_models, edit_controls = edit_tab.build(studio)
        with gr.Tab("Selfie") as t4:
            selfie_base, selfie_models, selfie_controls = selfie_tab.build(studio)

        def on_load(edit_base_name, selfie_base_name):
            """Fresh library lists and slider labels for every visitor (models trained since start-up)."""
            all_models = model_choices(studio)
            updates = [adapt_tab.library_items(studio)] + [gr.update(choices=all_models)] * len(sample_models)
            updates.append(gr.update(choices=model_choices(studio, edit_base_name)))
            updates.append(gr.update(choices=model_choices(studio, selfie_base_name)))
            for controls, base_name in ((edit_controls, edit_base_name), (selfie_controls, selfie_base_name)):
                updates += _configure(studio, controls, base_name)
            return updates

        outputs = [library, *sample_models, edit_models, selfie_models]
        for controls in (edit_controls, selfie_controls):
            outputs += controls.configured()
        demo.load(on_load, [edit_base, selfie_base], outputs, api_visibility="private")
        for tab in (t1, t2, t3, t4):  # models trained meanwhile show up when a tab is opened
            tab.select(on_load, [edit_base, selfie_base], outputs, api_visibility="private", show_progress="hidden")
        selfie_base.change(lambda b: _configure(studio, selfie_controls, b), selfie_base,
                           selfie_controls.configured(), api_visibility="private")
    return demo


def _configure(studio: Studio, controls, base_name):
    try:
        return controls.configure(studio, base_name)
    except weights.WeightsError:  # base not downloaded yet: the missing-weights panel says so
        n = len(controls.sliders)
        return [gr.update()] * n + [gr.update(visible=False)] * n + [gr.update(choices=[], value=None)]
