"""The page: a compact header, the get-started panel when weights are missing, four tabs over one
shared Studio state, and the model library under them. Layout lives here; handlers live in each tab."""
from __future__ import annotations

import gradio as gr

from nada_core.store import weights

from . import adapt_tab, agent_api, edit_tab, library_panel, sample_tab, selfie_tab, video_tab
from .latent_tools import mapper_choices
from .sample_tab import model_choices
from .state import Studio
from .ui import banner, get_started

CSS = """
.tiny-banner {background: #fff3cd; border: 1px solid #e0b100; border-radius: 6px; padding: 2px 10px; font-size: 0.9em;}
.nada-header h1 {margin: 0 0 2px 0; font-size: 1.5em;}
.nada-header p {margin: 0; font-size: 0.92em; color: var(--body-text-color-subdued);}
.nada-small, .nada-small p {font-size: 0.88em; color: var(--body-text-color-subdued);}
.nada-status {padding: 6px 10px; border-radius: 6px; background: var(--block-background-fill);
              border: 1px solid var(--border-color-primary); min-height: 2.2em; font-size: 0.95em;}
.nada-status.nada-done {border-color: #3a9d5d;}
.nada-status.nada-warn {border-color: #d08a00;}
.nada-bar {height: 6px; background: var(--border-color-primary); border-radius: 3px; margin-bottom: 4px; overflow: hidden;}
.nada-bar > div {height: 100%; background: var(--color-accent); transition: width 0.3s;}
.nada-optional {align-items: center;}
/* narrow dropdowns: the text stops (with an ellipsis) before the arrow instead of running under it */
.secondary-wrap > input[role=combobox] {padding-right: 26px !important; text-overflow: ellipsis;}
/* uploads: the drop area starts below its floating label, so the upload icon is not hidden behind it */
label[data-testid="block-label"].float ~ .upload-container {padding-top: 26px;}
@media (max-width: 480px) { .tab-wrapper > .tab-container > button {padding: 0 12px !important;} }  /* 5 tabs fit a phone */
/* result galleries keep their column count even with one image (a lone tile would fill the width and be cropped) */
#edit-result .grid-container, #selfie-result .grid-container {--grid-cols: 3 !important;}
/* captioned galleries: each picture whole with its whole name under it (not a cropped label over it) */
.nada-captioned .thumbnail-item {aspect-ratio: auto !important; height: auto !important; flex-direction: column;}
.nada-captioned .thumbnail-item img {height: auto !important; width: 100%;}
.nada-captioned .caption-label {position: static !important; max-width: 100%; transform: none !important;
                                white-space: normal !important; text-align: center; font-size: 0.8em;}
.nada-captioned .grid-wrap {max-height: 380px; overflow-y: auto;}
#library-thumbs .thumbnail-item img {aspect-ratio: 2 / 1;}   /* sources over adapted */
#selfie-result .thumbnail-item img {aspect-ratio: 1 / 1;}
@media (max-width: 899px) { #library-thumbs .grid-container {--grid-cols: 2 !important;}
                            #selfie-result, #selfie-result .grid-wrap {height: auto !important;} }  /* two rows, then it scrolls */
@media (max-width: 899px) { #edit-result .grid-container, #selfie-result .grid-container {--grid-cols: 2 !important;} }
/* 'clip' (not 'hidden') keeps the page from scrolling sideways without becoming a scroll container,
   so the Edit tab's result can stay in view (sticky) while the sliders scroll */
.gradio-container {overflow: clip !important;}
@media (min-width: 900px) { .nada-sticky {position: sticky; top: 8px; align-self: flex-start;} }
/* phones: the Edit result comes first and stays at the top while the sliders scroll under it */
@media (max-width: 899px) {
  .nada-result-first {flex-direction: column-reverse !important;}
  .nada-result-first > .nada-sticky {position: sticky; top: 0; z-index: 50; isolation: isolate;
                                     background: var(--body-background-fill); padding-bottom: 6px;}
  .nada-result-first #edit-result {height: 42vh !important; background: var(--body-background-fill);}
}
"""


def build_demo(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="NADA Studio") as demo:
        gr.Markdown("# NADA Studio\nText-driven domain adaptation of StyleGAN2 (StyleGAN-NADA): one latent code, "
                    "the same face in every domain.", elem_classes=["nada-header"])
        banner(studio)
        get_started(studio)
        with gr.Tab("Adapt") as t1:
            adapt_base, focus_model, resume_run, adapt_changes = adapt_tab.build(studio)
        with gr.Tab("Sample") as t2:
            sample_models, sample_mapper, sample_changes = sample_tab.build(studio)
        with gr.Tab("Edit") as t3:
            edit_base, edit_models, edit_controls, edit_mapper = edit_tab.build(studio)
        with gr.Tab("Selfie") as t4:
            selfie_base, selfie_models, selfie_controls, selfie_mapper = selfie_tab.build(studio)
        with gr.Tab("Video"):
            video_tab.build(studio)
        listing, thumbs, pick, usage, library_changed = library_panel.build(studio)

        def on_load(edit_base_name, selfie_base_name):
            """Fresh library lists and slider labels for every visitor (models trained since start-up)."""
            all_models = model_choices(studio)
            updates = [gr.update(choices=all_models)] * len(sample_models)
            updates.append(gr.update(choices=model_choices(studio, edit_base_name)))
            updates.append(gr.update(choices=model_choices(studio, selfie_base_name)))
            for controls, base_name in ((edit_controls, edit_base_name), (selfie_controls, selfie_base_name)):
                updates += _configure(studio, controls, base_name)
            updates += [library_panel.table(studio), library_panel.thumbnails(studio),
                        gr.update(choices=[e.id for e in studio.library()]), library_panel.usage_text(studio),
                        gr.update(choices=[(e.label, e.id) for e in studio.library() if e.kind == "run"]),
                        gr.update(choices=adapt_tab.resumable(studio))]
            updates += [gr.update(choices=mapper_choices(studio, g)) for g in (None, edit_base_name, selfie_base_name)]
            return updates

        outputs = [*sample_models, edit_models, selfie_models]
        for controls in (edit_controls, selfie_controls):
            outputs += controls.configured()
        outputs += [listing, thumbs, pick, usage, focus_model, resume_run]
        outputs += [sample_mapper.choice, edit_mapper.choice, selfie_mapper.choice]
        demo.load(on_load, [edit_base, selfie_base], outputs, api_visibility="private", show_progress="hidden")
        for tab in (t1, t2, t3, t4):  # models trained meanwhile show up when a tab is opened
            tab.select(on_load, [edit_base, selfie_base], outputs, api_visibility="private", show_progress="hidden")
        for change in (*adapt_changes, *sample_changes):  # and every list right after a change
            change.then(on_load, [edit_base, selfie_base], outputs, api_visibility="private", show_progress="hidden")
        library_changed.change(on_load, [edit_base, selfie_base], outputs, api_visibility="private", show_progress="hidden")
        selfie_base.change(lambda b: _configure(studio, selfie_controls, b), selfie_base,
                           selfie_controls.configured(), api_visibility="private", show_progress="hidden")
        agent_api.build(studio)                 # the four tools for agents (MCP with --mcp) ...
    agent_api.keep_only_the_tools(demo)         # ... and the only MCP tools
    return demo


def _configure(studio: Studio, controls, base_name):
    try:
        return controls.configure(studio, base_name)
    except weights.WeightsError:  # base not downloaded yet: the get-started panel says so
        n = len(controls.sliders)
        return [gr.update()] * n + [gr.update(visible=False)] * n + [gr.update(choices=[], value=None)]
