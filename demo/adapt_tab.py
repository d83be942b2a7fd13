"""Adapt tab: controls on the left, the live run on the right (one progress line, previews on a wall
clock, loss curve, layer heat map); afterwards the snapshot scrubber, downloads and Retry."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image, ImageDraw

from nada_core.guidance.clip_guide import ClipLoadError
from nada_core.guidance.gallery import GALLERY
from nada_core.guidance.gallery import get as gallery_prompt
from nada_core.latent.sampling import thumbnail
from nada_core.store import weights
from nada_core.store.checkpoints import load_generator
from nada_core.store.images import from_pil, open_image
from nada_core.store.library import new_model_dir, new_run_dir, restore
from nada_core.store.runs import RunFolder
from nada_core.training.adapt import AMP_SETTINGS, COMPILE_SETTINGS, Adapter, Recipe
from nada_core.training.diagnostics import best_snapshot_of_run
from nada_core.training.freezing import STARTER_PRESETS, starter_settings
from nada_core.training.loop import read_diagnostics
from nada_core.training.mapper import MapperRecipe, MapperTrainer
from nada_core.training.official import PARITIES
from nada_core.training.run import Run, preview_grid

from .latent_tools import stream_trainer
from .run_stream import status_text, watch
from .state import Studio
from .ui import (
    Slider,
    bind,
    choice,
    fmt_seconds,
    friendly,
    image_file,
    named_copy,
    number,
    progress_html,
    reveal,
    scrub,
    status_on_error,
)

PREVIEW_LABEL = "Source (top) and adapted (bottom), same latents"
PREVIEW_SECONDS = 2.0        # default wall-clock cadence of the live preview
N_TRAIN_OUTPUTS = 19         # status, preview, loss, diagnostics, heat map, files, snapshot, advice, snapshot
                             # preview, run folder, result box, Stop, Retry, Keep, estimate, the runs to continue,
                             # and the form's source, target and iterations (a continued run shows its own)
SHORT_RUN = 0.10             # runs stopped before this share of their steps are set aside unless kept
KEEP_SNAPSHOTS = 5           # snapshots kept of a finished run (plus any saved as models)
MAX_STYLE_IMAGES = 16
CURVE_POINTS = 150           # points per plotted curve (the browser redraws them every few seconds)
PICTURES_SECONDS = 2.0       # the curves and heat map are sent this often at most (a new preview goes at once)


HEATMAP_ROWS = 24   # the recent steps the heat map shows


def heatmap(slot_history: list[list[int]], n_latent: int, rows: int = HEATMAP_ROWS,
            untrained: tuple[int, ...] = ()) -> Image.Image:
    """Rows: recent steps (newest at the bottom); columns: W+ slots, coarse to fine; lit = trained.
    Labelled with slot numbers and the resolution each slot's convolution works at; slots that no
    trainable layer reads (the last one feeds only a ToRGB) are hatched."""
    recent = slot_history[-rows:] or [[]]
    cell_w, cell_h, top, left = 28, 5, 44, 4
    w, h = max(left + n_latent * cell_w, 250), top + len(recent) * cell_h + 30
    img = Image.new("RGB", (w, h), (250, 250, 250))
    d = ImageDraw.Draw(img)
    for s in range(n_latent):
        x = left + s * cell_w
        res = "rgb" if s in untrained else 4 if s == 0 else 2 ** (3 + (s - 1) // 2)
        d.text((x + 4, 16), str(s), fill=(40, 40, 40))
        d.text((x + 2, 28), str(res), fill=(110, 110, 110))
        for i, slots in enumerate(recent):
            y = top + i * cell_h
            lit = s in slots
            d.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=(230, 150, 60) if lit else (60, 60, 80))
        if s in untrained:
            for y in range(top, top + len(recent) * cell_h, 6):
                d.line([x, y, x + cell_w - 2, y + 5], fill=(170, 170, 170))
    d.text((left, 2), "Layers trained per step (W+ slots)", fill=(30, 30, 30))
    d.text((left, h - 27), "columns: slot / resolution (px)", fill=(90, 90, 90))
    d.text((left, h - 14), "orange: trained; hatched: ToRGB only", fill=(90, 90, 90))
    return img


def build(studio: Studio):
    base_default = studio.default_base()
    n_latent = studio.n_latent(base_default)
    style = starter_settings("Style", n_latent)

    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            base = gr.Dropdown([(studio.base_label(n), n) for n in studio.base_names()], value=base_default,
                               label="Base model", elem_id="adapt-base", allow_custom_value=True)  # names are checked on the server
            preset = gr.Radio(["Style", "Shape", "Custom"], value="Style", label="Preset", elem_id="adapt-preset")
            preset_info = gr.Markdown(_preset_text("Style", style, set()), elem_classes=["nada-small"])
            with gr.Row():
                source = gr.Textbox("Photo", label="Source (what it makes now)", max_lines=1, max_length=300, min_width=120)
                target = gr.Textbox("Sketch", label="Target (the new domain)", max_lines=1, max_length=300, min_width=120)
            with gr.Row(elem_classes=["nada-optional"]):
                prompt_check = gr.Markdown(elem_classes=["nada-small"], elem_id="adapt-prompt-check")
                suggested = gr.Button("Use the suggestion", size="sm", visible=False, scale=0, min_width=160,
                                      elem_id="adapt-use-suggestion")
            suggestion = gr.State(None)
            iterations = gr.Number(style["iterations"], label="Iterations", step=1,
                                   elem_id="adapt-iterations")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="adapt-start", min_width=100)
                stop = gr.Button("Stop", variant="stop", elem_id="adapt-stop", interactive=False, min_width=100)
            estimate = gr.Markdown(_estimate_text(studio, base_default, 2, studio.clip_names(), False, style["iterations"]),
                                   elem_classes=["nada-small"], elem_id="adapt-estimate")
            measure = gr.Button("Measure one step", size="sm")
            with gr.Accordion("Style gallery", open=False, elem_id="adapt-gallery"):
                with gr.Row():
                    pick = gr.Dropdown([(f"{g.name}: {g.source} -> {g.target}" + ("" if g.base == "ffhq" else f" ({g.base})"),
                                         g.name) for g in GALLERY], value=None, label="Known-good prompts from the paper",
                                       scale=3, min_width=180, elem_id="adapt-gallery-pick")
                    use = gr.Button("Use", scale=1, min_width=70, elem_id="adapt-gallery-use")
                gallery_note = gr.Markdown("", elem_classes=["nada-small"])
            with gr.Accordion("Continue a run", open=False):
                resume_run = gr.Dropdown(resumable(studio), value=None, label="Run (its recipe, snapshot and optimiser)",
                                         allow_custom_value=True)  # ids, checked on the server
                with gr.Row():
                    more = gr.Number(100, label="More iterations", step=1, min_width=100)
                    resume_go = gr.Button("Continue", min_width=100)
            with gr.Accordion("Style images (image-guided target instead of text)", open=False):
                style_files = gr.File(label="Style images", file_count="multiple", file_types=["image"])
                source_files = gr.File(label="Source images (optional; default: samples of the base)",
                                       file_count="multiple", file_types=["image"])
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    batch = Slider(1, 8, value=2, step=1, label="Batch")
                    lr = gr.Number(0.002, label="Learning rate (Adam, x4/5 as in the paper)")
                with gr.Row():
                    k = Slider(0, n_latent, value=style["k"], step=1, label="W+ slots trained per step (0 = all)")
                    mixing = Slider(0, 1, value=style["mixing"], step=0.05, label="Style-mixing probability")
                with gr.Row():
                    layer_iters = Slider(0, 5, value=1, step=1, label="Layer-selection iterations")
                    seed = gr.Number(0, label="Seed", step=1)
                with gr.Row():
                    clip_models = gr.CheckboxGroup(studio.clip_names(), value=studio.clip_names(), label="CLIP models")
                    w1 = gr.Number(1.0, label=f"weight {studio.clip_names()[0]}")
                    w2 = gr.Number(1.0, label=f"weight {studio.clip_names()[-1]}", visible=len(studio.clip_names()) > 1)
                preview_seconds = Slider(0.5, 30, value=PREVIEW_SECONDS, step=0.5, label="Preview every N seconds")
                with gr.Row():
                    precision = gr.Radio([("float32", "off"), ("bfloat16 autocast", "bf16")], value="off",
                                         label="Precision", elem_id="adapt-precision",
                                         info="bfloat16 saves GPU memory; float32 is as fast or faster")
                    compile_choice = gr.Radio([("off", "off"), ("on", "on")], value="off",
                                              label="torch.compile", elem_id="adapt-compile",
                                              info="minutes of compiling before the first step, faster steps on CUDA "
                                                   "after it: for runs of thousands of steps")
                parity = gr.Radio([("ours", "ours"), ("as the official code", "official")], value="ours",
                                  label="Trained layers", elem_id="adapt-parity",
                                  info="'as the official code' trains what rinongal/StyleGAN-nada trains (to_rgb1, the "
                                       "constant input, its slot map), to reproduce its runs; README: Exactness")
            with gr.Accordion("Focus the domain (latent mapper)", open=False, elem_id="adapt-focus"):
                gr.Markdown("For large shape changes (dog -> cat) the adapted model also makes in-between images. A "
                            "latent mapper trained on it with the target text moves every latent into the target "
                            "region (with the embedding-norm loss against artefacts). Use it in Sample, Edit and Selfie.",
                            elem_classes=["nada-small"])
                focus_model = gr.Dropdown([(e.label, e.id) for e in studio.library() if e.kind == "run"], value=None,
                                          label="Adapted model", allow_custom_value=True)  # ids, checked on the server
                with gr.Row():
                    focus_text = gr.Textbox("", label="Text (default: the model's target)", max_lines=1, max_length=300,
                                            min_width=140)
                    focus_steps = gr.Number(500, label="Steps", step=1, min_width=90)
                focus_go = gr.Button("Focus the domain", elem_id="adapt-focus-go")
        with gr.Column(scale=3, min_width=300):
            status = gr.HTML(progress_html(None, "Ready.", "idle"), elem_id="adapt-status")
            preview = gr.Image(format="png", label=PREVIEW_LABEL, type="pil",
                               elem_id="adapt-preview", interactive=False, height=300, show_label=True)
            with gr.Row(equal_height=False):
                with gr.Tabs(elem_classes=["nada-plots"]):
                    with gr.Tab("Loss"):
                        loss_plot = gr.LinePlot(x="step", y="loss", color="model", label="Loss", height=250,
                                                elem_id="adapt-loss", min_width=200, show_label=False)
                    with gr.Tab("Diagnostics"):
                        diag_plot = gr.LinePlot(x="step", y="value", color="measure",
                                                label="Direction score, diversity, "
                                                "identity distance", height=250, elem_id="adapt-diagnostics",
                                                min_width=200, show_label=False)
                heat = gr.Image(format="png", label="Layers trained (W+ slots)", type="pil", interactive=False,
                                height=250, elem_id="adapt-heatmap", min_width=200, show_label=False)
            with gr.Row():
                retry = gr.Button("Retry saving", visible=False, variant="primary")
                keep_run = gr.Button("Keep this short run in the library", visible=False)
            with gr.Accordion("Result: downloads and snapshots", open=False) as result_box:
                files = gr.File(label="Download (our .safetensors and rosinality .pt)", file_count="multiple",
                                interactive=False)
                snapshot = Slider(0, 1, value=0, step=1, label="Snapshot at iteration", interactive=False)
                advice = gr.Markdown("", elem_classes=["nada-small"], elem_id="adapt-best")
                snapshot_preview = gr.Image(format="png", label="Snapshot preview", type="pil", interactive=False)
                keep = gr.Button("Save this snapshot as a new library model")
    run_dir = gr.State("")
    touched = gr.State([])

    preset.input(bind(studio, apply_preset), [preset, base, touched], [k, mixing, iterations, preset_info], api_visibility="private",
                 show_progress="hidden")
    for comp, field in ((k, "k"), (mixing, "mixing"), (iterations, "iterations")):
        comp.input(touch(studio, field), [touched, preset, base], [touched, preset_info], api_visibility="private",
                   show_progress="hidden")

    base.change(bind(studio, on_base), [base, preset, k], k, api_visibility="private", show_progress="hidden")

    # ------------------------------------------------------------------ prompt checker, gallery, resume

    # ------------------------------------------------------------------ snapshots

    est_inputs = [base, batch, clip_models, iterations, k, layer_iters]
    measure.click(bind(studio, measure_step), [base, batch, clip_models, w1, w2, iterations, k, layer_iters], estimate,
                  api_name="measure", concurrency_limit=1, concurrency_id="device", show_progress_on=[estimate])
    for comp in est_inputs:
        comp.change(bind(studio, refresh_estimate), est_inputs, estimate, api_visibility="private", show_progress="hidden")
    train_outputs = [status, preview, loss_plot, diag_plot, heat, files, snapshot, advice, snapshot_preview, run_dir,
                     result_box, stop, retry, keep_run, estimate, resume_run, source, target, iterations]
    trained = start.click(bind(studio, before_start), None, status, api_visibility="private", show_progress="hidden").success(
        bind(studio, train), [base, preset, source, target, style_files, source_files, iterations, batch, lr, k, layer_iters, mixing,
                clip_models, w1, w2, seed, preview_seconds, precision, compile_choice, parity], train_outputs,
        api_name="train", concurrency_limit=1, concurrency_id="device", show_progress="minimal",
        show_progress_on=[status], scroll_to_output=True)
    stop.click(bind(studio, stop_training), None, status, api_name="stop", show_progress="hidden")
    for go in (start, resume_go, focus_go):   # the run's status and preview, wherever the button sits
        reveal(go.click, "adapt-status")
    # on page load and whenever the wording, the CLIP models or the style images change (the last edit wins)
    gr.on(None, bind(studio, check), [source, target, clip_models, style_files], [prompt_check, suggested, suggestion],
          api_visibility="private", trigger_mode="always_last", show_progress="hidden", concurrency_id="prompt",
          concurrency_limit=1)
    suggested.click(use_suggestion, suggestion, [source, target], api_visibility="private", show_progress="hidden")
    use.click(friendly(bind(studio, use_gallery)), [pick, base], [base, preset, source, target, iterations, k, mixing, w1, w2, touched,
                                                    preset_info, gallery_note], api_name="gallery", show_progress="hidden")
    resumed = resume_go.click(bind(studio, before_start), None, status, api_visibility="private", show_progress="hidden").success(
        bind(studio, resume), [resume_run, more, preview_seconds], train_outputs, api_name="resume", concurrency_limit=1,
        concurrency_id="device", show_progress="minimal", show_progress_on=[status], scroll_to_output=True)
    focused = focus_go.click(bind(studio, before_start), None, status, api_visibility="private", show_progress="hidden").success(
        bind(studio, focus), [focus_model, focus_text, focus_steps, clip_models, w1, w2], [status, preview, stop], api_name="focus",
        concurrency_limit=1, concurrency_id="device", show_progress="minimal", show_progress_on=[status],
        scroll_to_output=True)
    retry.click(bind(studio, retry_saving), run_dir, [status, retry], api_visibility="private", show_progress="hidden")
    kept_run = keep_run.click(bind(studio, keep_short_run), run_dir, [status, keep_run], api_visibility="private", show_progress="hidden")
    snapshot.release(bind(studio, show_snapshot), [snapshot, run_dir], [snapshot_preview, advice], api_name="snapshot",
                     show_progress_on=[snapshot_preview])
    kept_snapshot = keep.click(bind(studio, keep_snapshot), [snapshot, run_dir], status, api_name="keep_snapshot", show_progress="hidden")
    return base, focus_model, resume_run, [trained, resumed, focused, kept_run, kept_snapshot]


def check(studio: Studio, src, tgt, models, style_paths):
    """As the user types: how strong and consistent the text direction is per CLIP model, a verdict in
    plain words, and a measured better wording when there is one, with a button that fills it in.
    Returns (text, the button, the suggested (source, target) or None)."""
    hidden = gr.update(visible=False)
    if style_paths or not (src or "").strip() or not (tgt or "").strip():
        return "", hidden, None
    names = tuple(m for m in (models or []) if m in studio.clip_names())
    try:
        report = studio.prompt_report(src.strip(), tgt.strip(), names)
    except (ClipLoadError, weights.WeightsError):
        return "", hidden, None   # CLIP is not downloaded yet: the get-started panel says so
    except Exception as e:  # noqa: BLE001 - identical prompts and the like: say it quietly here
        return f"Prompt check: {scrub(str(e))[:200]}", hidden, None
    figures = "; ".join(f"{m.model}: strength {m.strength:.2f}, consistency {m.consistency:.2f}" for m in report.members)
    text = f"Prompt check: {'; '.join(report.verdicts)}. ({figures})"
    if not report.suggestion:
        return text, hidden, None
    s = report.suggestion
    text += f" Try **{s.source} -> {s.target}** (measured stronger)."
    return text, gr.update(value=f"Use {s.source} -> {s.target}", visible=True), (s.source, s.target)


def use_suggestion(pair):
    """The suggested wording into the form (the check then runs again on it)."""
    if not pair:
        return gr.update(), gr.update()
    return pair[0], pair[1]


def apply_preset(studio: Studio, name, base_name, touched_fields):
    if name not in STARTER_PRESETS:
        return gr.update(), gr.update(), gr.update(), _preset_text(name, None, set(touched_fields))
    p = starter_settings(name, studio.n_latent(base_name))
    keep = set(touched_fields)
    return (gr.update() if "k" in keep else gr.update(value=p["k"]),
            gr.update() if "mixing" in keep else gr.update(value=p["mixing"]),
            gr.update() if "iterations" in keep else gr.update(value=p["iterations"]),
            _preset_text(name, p, keep))


def touch(studio: Studio, field):
    """A value the user typed: presets chosen later leave it alone, and the preset line says so."""
    def handler(fields, name, base_name):
        fields = sorted(set(fields) | {field})
        p = starter_settings(name, studio.n_latent(base_name)) if name in STARTER_PRESETS else None
        return fields, _preset_text(name, p, set(fields))
    return handler


def on_base(studio: Studio, base_name, preset_name, k_value):
    L = studio.n_latent(base_name)
    value = starter_settings(preset_name, L)["k"] if preset_name in STARTER_PRESETS else min(int(k_value or 0), L)
    return gr.update(maximum=L, value=value)


@friendly
def before_start(studio: Studio, request: gr.Request):
    """Answers at once, outside the device queue: a second Start of the same visitor is refused,
    another visitor is told their run waits for the one in progress."""
    running = studio.training_status()
    if running and studio.is_training(_session(request)):
        raise gr.Error(f"Already training ({running}). Press Stop to end this run first.")
    if running:
        return progress_html(None, f"Waiting: another run is training ({running}); yours starts when it ends.", "wait")
    return progress_html(0, "Starting: loading the models...", "run")


@status_on_error(0, N_TRAIN_OUTPUTS)
@friendly
def train(studio: Studio, base_name, preset_name, src, tgt, style_paths, source_paths, iters, bsz, lr_value, k_value, sel_iters, mix,
          models, weight1, weight2, seed_value, every_s, precision_value="off", compile_value="off",
          parity_value="ours", request: gr.Request = None):
    session = _session(request)
    if studio.is_training(session):
        raise gr.Error(f"Already training ({studio.training_status()}).")
    G = studio.base(base_name)
    names, model_weights = _clip_choice(studio, models, weight1, weight2)
    n_iters = number(iters, "Iterations", 1, 100_000)
    k_slots = number(k_value, "W+ slots trained per step", 0, G.n_latent) or None
    if len(style_paths or []) > MAX_STYLE_IMAGES or len(source_paths or []) > MAX_STYLE_IMAGES:
        raise gr.Error(f"at most {MAX_STYLE_IMAGES} style images and {MAX_STYLE_IMAGES} source images")
    style_images = [from_pil(open_image(p, _display(p)), G.size) for p in (style_paths or [])]
    source_images = [from_pil(open_image(p, _display(p)), G.size) for p in (source_paths or [])] if style_images else []
    recipe = Recipe(source=(src or "").strip(), target=(tgt or "").strip(), iterations=n_iters,
                    batch=number(bsz, "Batch", 1, 8), lr=number(lr_value, "Learning rate", 1e-6, 1, integer=False),
                    k=k_slots, auto_layer_iters=number(sel_iters, "Layer-selection iterations", 0, 5),
                    clip_models=names, clip_weights=model_weights,
                    mixing=number(mix, "Style-mixing probability", 0, 1, integer=False),
                    seed=number(seed_value or 0, "Seed", 0, 2 ** 32 - 1), preview_every=n_iters,
                    snapshot_every=max(1, n_iters // 10), style_images=[_display(p) for p in style_paths or []],
                    source_images=[_display(p) for p in source_paths or []] if style_images else [],
                    amp=choice(precision_value, "Precision", AMP_SETTINGS, "off"),
                    compile=choice(compile_value, "torch.compile", COMPILE_SETTINGS, "off"),
                    parity=choice(parity_value, "Trained layers", PARITIES, "ours"))
    every = number(every_s, "Preview every N seconds", 0.5, 30, integer=False)
    recipe.validate(G.n_latent)
    clip = studio.clip(names, model_weights)
    out = new_run_dir(recipe.source or "style", recipe.target or _images_name(recipe.style_images), studio.library_root)
    adapter = Adapter(G, recipe, clip, studio.device, out, base_name, style_images=style_images or None,
                      source_images=source_images or None)
    if adapter.compiled:
        gr.Info("torch.compile: the first step compiles the models, which takes minutes; the steps after it run faster.")
    yield from follow(studio, adapter, G, base_name, every, session, gr.update(), gr.update(), gr.update())


def follow(studio: Studio, adapter, G, base_name, every, session, *form):
    """Show a run (new or continued) as it is: it trains in its own thread and the page reads its latest
    state; previews on the wall clock (measured by the diagnostics observer), curves, heat map, then the
    ending. ``form``: updates of the source, target and iterations fields (a continued run shows its own)."""
    recipe = adapter.recipe
    selection = bool(recipe.k and recipe.k < G.n_latent and recipe.auto_layer_iters)
    key = _estimate_key(base_name, recipe.batch, recipe.clip_models, selection)
    adapter.add_observer(adapter.diagnostics_observer(identity="auto"))
    run = Run(adapter, preview_seconds=every, set_aside_below=SHORT_RUN, keep_snapshots=KEEP_SNAPSHOTS,
              export_pt=True, owner=session)
    untrained = tuple(s for s in range(G.n_latent) if s >= len(G.convs) + 1)
    keep_hidden, same = gr.update(visible=False), gr.update()
    shown_preview, heavy_at, warned, shown_slots = -1, 0.0, False, None
    fields = form   # sent with the first update and the last
    for view in watch(studio, run, session):
        if view.ended:
            yield (*_ending(studio, view, run, G, untrained, key, session), *fields)
            return
        if view.sec_per_step:
            studio.seconds_per_step[key] = view.sec_per_step
        collapse = next((f for _, f in reversed(view.diagnostics) if f.get("collapse")), None)
        if collapse and not warned:
            warned = True
            gr.Warning(f"Diversity fell to {collapse['diversity']:.0%} of the source's: the model may be "
                       "collapsing. The snapshots keep earlier iterations.")
        # the images and curves are sent when a preview is new, and every 2 s at most otherwise
        heavy = view.preview_step != shown_preview or time.monotonic() - heavy_at >= PICTURES_SECONDS
        pictures = (same,) * 4
        if heavy:
            heavy_at = time.monotonic()
            preview_update = same
            if view.preview is not None and view.preview_step != shown_preview:
                shown_preview = view.preview_step
                preview_update = gr.update(value=image_file(preview_grid(view.preview), live=True), label=PREVIEW_LABEL)
            recent = [tuple(s) for s in view.slots[-HEATMAP_ROWS:]]
            heat_update = same   # redrawn only when its rows changed (never, when every layer trains)
            if recent != shown_slots:
                shown_slots = recent
                heat_update = image_file(heatmap(view.slots, G.n_latent, untrained=untrained), live=True)
            pictures = (preview_update, _loss_frame(view.losses), _diag_frame(view.diagnostics), heat_update)
        state = "warn" if view.state == "stopping" else "run"
        yield (progress_html(view.step / max(1, view.total), status_text("Training", view), state), *pictures,
               same, same, same, same, str(run.folder.path), same, gr.update(interactive=view.state != "stopping"),
               keep_hidden, keep_hidden, same, same, *form)
        form = (same,) * len(form)


def _ending(studio: Studio, view, run, G, untrained, key, session):
    """The last update of a run: its verdict, where it went, snapshots, and what the user can do next."""
    ev, adapter, folder = view.final, run.trainer, run.folder
    studio.seconds_per_step[key] = view.sec_per_step or studio.seconds_per_step.get(key, 0.0)
    grid_img = image_file(preview_grid(view.preview)) if view.preview is not None else None
    downloads = [named_copy(ev.checkpoint, f"{folder.name}.safetensors"), *(named_copy(p, p.name) for p in run.exports)] \
        if ev.checkpoint and not view.set_aside else []
    verdict = {"done": "Finished", "cancelled": "Stopped", "error": "Stopped by an error"}[ev.kind]
    text = f"{verdict}: {ev.step}/{ev.total} steps in {fmt_seconds(view.elapsed)}."
    if ev.kind == "error":
        text += f" {ev.message}."
        gr.Warning(ev.message)
    if adapter.save_error:
        studio.keep_unsaved(session, adapter)
        text += f" Saving failed ({adapter.save_error}); the model is kept in memory: free disk space, then Retry."
    elif view.set_aside:
        text += " It was a short run, so it is not in the library unless you keep it."
    elif ev.checkpoint:
        text += f" Saved as **{folder.name}**."
        if ev.kind == "cancelled":
            text += " *Continue a run* goes on from this very step."
    elif ev.step == 0:
        text += " Nothing was trained, so nothing was saved."
    snaps = [] if view.set_aside else folder.snapshot_steps()
    snap_update = (gr.update(minimum=snaps[0], maximum=snaps[-1], step=_snap_step(snaps), value=snaps[-1], interactive=True)
                   if len(snaps) > 1 else gr.update(value=snaps[0] if snaps else 0, interactive=False))
    snap_img = _render_snapshot(studio, folder.path, snaps[-1]) if snaps else None
    state = "done" if ev.kind == "done" and not adapter.save_error else "warn"
    return (progress_html(1.0 if ev.kind == "done" else ev.step / max(1, ev.total), text, state), grid_img,
            _loss_frame(view.losses), _diag_frame(view.diagnostics),
            image_file(heatmap(view.slots, G.n_latent, untrained=untrained)) if view.slots else None, downloads,
            snap_update, _advice_text(folder.path) if snaps else "", snap_img, str(folder.path),
            gr.update(open=bool(ev.checkpoint) and not view.set_aside),
            gr.update(interactive=False), gr.update(visible=bool(adapter.save_error)),
            gr.update(visible=view.set_aside and not adapter.save_error), _estimate_text(
                studio, key[0], key[1], list(key[2]), key[3], ev.total), gr.update(choices=resumable(studio)))


@friendly
def retry_saving(studio: Studio, folder, request: gr.Request):
    adapter = studio.take_unsaved(_session(request))
    if adapter is None:
        return progress_html(None, "Nothing is waiting to be saved.", "idle"), gr.update(visible=False)
    path = adapter.save_final()
    if path is None:
        raise gr.Error(f"saving failed again ({adapter.save_error}); the model is still kept in memory")
    studio.unsaved.pop(_session(request), None)
    return progress_html(1.0, f"Saved as **{Path(path).parent.name}**.", "done"), gr.update(visible=False)


@friendly
def keep_short_run(studio: Studio, folder):
    if not folder:
        raise gr.Error("there is no stopped run to keep")
    dest = restore(studio.library_root, Path(folder).name)
    return progress_html(1.0, f"Kept as **{dest.name}**.", "done"), gr.update(visible=False)


@friendly
def stop_training(studio: Studio, request: gr.Request):
    if studio.cancel_training(_session(request)):
        return progress_html(None, "Stopping after the current step...", "warn")
    return gr.update()


def use_gallery(studio: Studio, name, base_name):
    g = gallery_prompt(name) if name else None
    if g is None:
        raise gr.Error("choose a prompt from the gallery")
    bases = studio.base_names()
    chosen = studio.default_base() if g.base == "ffhq" else g.base if g.base in bases else base_name
    fields = g.recipe_fields(studio.n_latent(chosen))
    note = g.note + (" " if g.note else "")
    if g.base not in ("ffhq", *bases):
        note += f"Needs the base '{g.base}', which this server does not offer."
    elif g.ready_model:
        note += f"A ready model of this style exists: '{g.ready_model}' (Sample tab, once downloaded)."
    w = dict(zip(g.clip_models, g.clip_weights))
    names = studio.clip_names()
    return (chosen, g.preset, g.source, g.target, g.iterations,
            fields["k"] or 0, fields["mixing"], w.get(names[0], 1.0), w.get(names[-1], 1.0), [],
            _preset_text(g.preset, starter_settings(g.preset, studio.n_latent(chosen)), set()), note)


@status_on_error(0, N_TRAIN_OUTPUTS)
@friendly
def resume(studio: Studio, run_id, extra, every_s, request: gr.Request):
    """Continue a run from its resumable state (weights, optimiser, sampler at the step where it stopped,
    or its newest snapshot after a crash) for ``extra`` more iterations; the form shows the run's recipe."""
    session = _session(request)
    if studio.is_training(session):
        raise gr.Error(f"Already training ({studio.training_status()}).")
    entry = studio.entry(run_id)
    if entry.kind != "run" or not entry.continuable:
        raise gr.Error(f"{entry.name} has no saved training state to continue from")
    if entry.training:
        raise gr.Error(f"{entry.name} is training right now; wait for it to end")
    recipe, base_name = Adapter.saved_recipe(entry.folder.path)
    if recipe.style_images:
        raise gr.Error("image-guided runs continue from the command line (adapt --resume with --style-images)")
    G = studio.base(base_name)
    names = [m for m in recipe.clip_models if m in studio.clip_names()]
    if names != list(recipe.clip_models):
        raise gr.Error(f"this run used CLIP {', '.join(recipe.clip_models)}, which this server does not offer")
    more_steps = number(extra, "More iterations", 1, 100_000)
    every = number(every_s, "Preview every N seconds", 0.5, 30, integer=False)
    adapter = Adapter.resume(entry.folder.path, G, studio.clip(names, list(recipe.clip_weights)), studio.device)
    adapter.continue_for(more_steps)
    gr.Info(f"continuing {entry.name} from iteration {adapter.step} to {adapter.recipe.iterations}")
    r = adapter.recipe
    yield from follow(studio, adapter, G, base_name, every, session, gr.update(value=r.source), gr.update(value=r.target),
                      gr.update(value=r.iterations))


@status_on_error(0, 3)
@friendly
def focus(studio: Studio, model_id, text, steps, models, weight1, weight2, request: gr.Request):
    session = _session(request)
    if studio.is_training(session):
        raise gr.Error(f"Already training ({studio.training_status()}).")
    if not model_id:
        raise gr.Error("choose the adapted model to focus (train one first)")
    entry = studio.entry(model_id)
    text = (text or "").strip() or entry.recipe.get("target") or ""
    names, model_weights = _clip_choice(studio, models, weight1, weight2)
    n = number(steps, "Steps", 1, 100_000)
    recipe = MapperRecipe(text=text, iterations=n, clip_models=names, clip_weights=model_weights, preview_every=n,
                          snapshot_every=max(1, n // 5), train_size=500 if studio.tiny else 5000,
                          test_size=100 if studio.tiny else 1000)
    recipe.validate()
    G = studio.model(model_id)
    id_fn, note = studio.identity_term(entry.base)
    out = new_model_dir(f"{model_id}-focus", studio.mapper_root)
    trainer = MapperTrainer(G, recipe, studio.clip(names, model_weights), studio.device, out, model_name=model_id,
                            id_fn=id_fn)
    if id_fn is not None:
        gr.Info(note)
    running = gr.update(interactive=True)
    for status_html, img, ev in stream_trainer(studio, trainer, session, f"Focusing {entry.name} on '{text}'"):
        if not isinstance(img, dict):   # a new picture (not a no-op update): say what it shows
            img = gr.update(value=img, label="Before (top) and after the mapper (bottom), same latents")
        if ev is None:
            yield status_html, img, running
            continue
        done = ev.checkpoint is not None
        extra = f" Saved as mapper <b>{out.name}</b>: choose it under Latent mapper in Sample, Edit or Selfie." if done else ""
        yield status_html.replace("</span>", extra + "</span>"), img, gr.update(interactive=False)


@friendly
def show_snapshot(studio: Studio, step, folder):
    if not folder or not step:
        return None, ""
    folder = Path(folder)
    text = " ".join(t for t in (_figures_text(folder, int(step)), _advice_text(folder)) if t)
    return _render_snapshot(studio, folder, int(step)), text


def _render_snapshot(studio: Studio, folder: Path, step: int) -> str | None:
    """The snapshot's preview grid as a served image file (None when that snapshot is gone)."""
    run = RunFolder(folder)
    path = run.snapshot_path(step)
    if not path.is_file():
        return None
    G, info = load_generator(path, studio.device)
    base_G = studio.base(run.read_record()["base"])
    return image_file(thumbnail(base_G, G, info["meta"]["recipe"]["preview_seeds"]))


@friendly
def keep_snapshot(studio: Studio, step, folder):
    if not folder or not step:
        raise gr.Error("train a model first, then pick a snapshot")
    run = RunFolder(folder)
    if not run.snapshot_path(int(step)).is_file():
        raise gr.Error(f"there is no snapshot at iteration {int(step)}; pick one on the slider")
    dest = run.path.with_name(f"{run.name}-step{int(step)}")
    if dest.exists():
        raise gr.Error(f"iteration {int(step)} is already saved as {dest.name}")
    kept = run.copy_snapshot_as_model(int(step), dest)
    thumb = _render_snapshot(studio, run.path, int(step))
    if thumb is not None:
        shutil.copy(thumb, kept.thumb_path)
    gr.Info(f"saved iteration {int(step)} as {dest.name}")
    return progress_html(1.0, f"Iteration {int(step)} saved as **{dest.name}**.", "done")


@friendly
def measure_step(studio: Studio, base_name, bsz, models, weight1, weight2, iters, k_value, sel_iters):
    """Time one real training step (a throwaway copy; nothing is saved), with the layer-selection
    pass when the settings use one, to predict the run's length."""
    names, model_weights = _clip_choice(studio, models, weight1, weight2)
    G = studio.base(base_name)
    k_slots = number(k_value, "W+ slots trained per step", 0, G.n_latent) or None
    recipe = Recipe(iterations=1, batch=number(bsz, "Batch", 1, 8), clip_models=names, clip_weights=model_weights,
                    k=k_slots, auto_layer_iters=number(sel_iters, "Layer-selection iterations", 0, 5))
    probe = Adapter(G, recipe, studio.clip(names, model_weights), studio.device)
    probe.train_step()  # warm-up: first calls allocate and pick kernels
    t = time.perf_counter()
    probe.train_step()
    selection = bool(k_slots and k_slots < G.n_latent and recipe.auto_layer_iters)
    studio.seconds_per_step[_estimate_key(base_name, recipe.batch, names, selection)] = time.perf_counter() - t
    return _estimate_text(studio, base_name, recipe.batch, names, selection, number(iters, "Iterations", 1, 100_000))


def refresh_estimate(studio: Studio, base_name, bsz, models, iters, k_value, sel_iters):
    try:
        L = studio.n_latent(base_name)
        selection = bool(k_value) and int(k_value) < L and bool(sel_iters)
        return _estimate_text(studio, base_name, int(bsz), list(models or []), selection, int(iters or 0))
    except (TypeError, ValueError, OverflowError):
        return gr.update()


DIAG_COLUMNS = ["step", "value", "measure"]
DIAG_NAMES = {"clip_score": "direction score", "diversity": "diversity (vs source)", "identity": "identity distance"}


def _loss_frame(losses: list[dict]) -> pd.DataFrame:
    """The loss curves: one per CLIP model, and their weighted total only when there are several (with one model
    the total is the same line, and the legend would name a curve nobody can see)."""
    models = {r["model"] for r in losses} - {"total"}
    rows = [r for r in losses if r["model"] != "total" or len(models) > 1]
    frame = _curves(rows, ["step", "loss", "model"])
    return None if frame is None else _binned(frame, "loss", "model")


def _curves(rows, columns: list[str]) -> pd.DataFrame | None:
    """Curve rows with numeric step and value columns, or None (an empty plot) while there are none: the page's
    plot keeps the scales of the first frame it draws, and an empty frame would leave it with category axes and
    no colour for any curve."""
    if not rows:
        return None
    step, value, series = columns
    return pd.DataFrame(rows, columns=columns).astype({step: "int64", value: "float64", series: "str"})


def _binned(frame: pd.DataFrame, value: str, series: str, points: int = CURVE_POINTS) -> pd.DataFrame:
    """At most ``points`` per curve, each the mean of its bin of steps: the browser redraws the plot in a time that
    grows with its rows, and a long run must not make the page fall behind the run."""
    if frame.empty or frame.groupby(series).size().max() <= points:
        return frame
    span = max(1, -(-int(frame["step"].max() + 1) // points))
    bins = frame.assign(step=(frame["step"] // span) * span + span // 2)
    return bins.groupby(["step", series], as_index=False, sort=True)[value].mean()[list(frame.columns)]


def _diag_frame(measured: list[tuple[int, dict]]) -> pd.DataFrame:
    """The diagnostics curves' rows (step, value, measure) from a run's measured previews."""
    rows = [[step, float(f[k]), name] for step, f in measured for k, name in DIAG_NAMES.items() if f.get(k) is not None]
    frame = _curves(rows, DIAG_COLUMNS)
    return None if frame is None else _binned(frame, "value", "measure")


def _advice_text(folder: Path) -> str:
    """The suggested snapshot of a run (high directional score before diversity drops), when measured."""
    advice = best_snapshot_of_run(folder)
    if advice is None:
        return ""
    return f"Suggested snapshot: iteration **{advice.step}** ({advice.reason})."


def _figures_text(folder: Path, step: int) -> str:
    f = read_diagnostics(folder).get(int(step))
    if not f:
        return ""
    parts = [f"{name} {f[k]:.3f}" for k, name in DIAG_NAMES.items() if f.get(k) is not None]
    return f"Iteration {int(step)}: " + ", ".join(parts) + (" (collapse alarm)" if f.get("collapse") else "") + "."


def resumable(studio: Studio):
    """Runs that can continue (stopped, crashed after a snapshot, or finished), not the one training now."""
    return [(e.label, e.id) for e in studio.library() if e.kind == "run" and e.continuable and not e.training]


def _preset_text(name: str, settings: dict | None, kept: set) -> str:
    if settings is None:
        return "Custom: your own settings (see Advanced)."
    slots = "every layer" if settings["k"] == 0 else f"the {settings['k']} most relevant W+ slots per step"
    text = f"{name}: trains {slots}, style mixing {settings['mixing']:g}, {settings['iterations']} iterations."
    if kept:
        names = {"k": "slot count", "mixing": "mixing", "iterations": "iterations"}
        text += f" Kept as you typed: {', '.join(names[f] for f in sorted(kept))}."
    return text


def _snap_step(steps: list[int]) -> int:
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    return min(gaps) if gaps else 1


def _clip_choice(studio: Studio, models, weight1, weight2) -> tuple[list[str], list[float]]:
    """The ticked CLIP models (only those this server offers) and their weights."""
    all_names = studio.clip_names()
    names = [m for m in (models or []) if isinstance(m, str)]
    if not names:
        raise gr.Error("choose at least one CLIP model")
    if any(n not in all_names for n in names):
        raise gr.Error(f"unknown CLIP model; choose among {', '.join(all_names)}")
    by_name = {all_names[0]: number(weight1, f"Weight of {all_names[0]}", 0, 100, integer=False),
               all_names[-1]: number(weight2, f"Weight of {all_names[-1]}", 0, 100, integer=False)}
    return names, [by_name.get(n, 1.0) for n in names]


def _session(request: gr.Request | None) -> str:
    return request.session_hash if request else ""


def _display(path) -> str:
    """How a user knows an uploaded file: its own name, never the server's temporary path."""
    return Path(str(path)).name


def _images_name(names: list[str]) -> str:
    """A run trained on style images is named after them (no inherited target text)."""
    stems = [Path(n).stem for n in names][:2]
    return "-".join(stems) + ("-etc" if len(names) > 2 else "") if stems else "images"


def _estimate_key(base_name: str, batch: int, models, selection: bool) -> tuple:
    return (base_name, int(batch), tuple(models), bool(selection))


def _estimate_text(studio: Studio, base_name: str, batch: int, models: list[str], selection: bool, iterations: int) -> str:
    sec = studio.seconds_per_step.get(_estimate_key(base_name, batch, models, selection))
    where = "GPU" if studio.device.startswith("cuda") else studio.device.upper()
    if sec is None:
        return (f"Running on **{where}**. *Measure one step* predicts the run's length "
                "(it is also measured while training).")
    what = " with layer selection" if selection else ""
    return f"On **{where}**: {sec:.2f} s/step{what} measured here, so {iterations} steps take about {fmt_seconds(sec * iterations)}."
