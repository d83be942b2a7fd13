"""Edit tab: latent sliders applied at once to the source and every chosen adapted model, so the
shared latent space is visible side by side. On CPU a slider drag renders a small preview (the
generator's own coarse RGB output) and the release renders full size."""
from __future__ import annotations

import time

import gradio as gr
from PIL import Image

from nada_core.latent.sampling import edited_latent, render
from nada_core.store import weights
from nada_core.store.library import new_model_dir
from nada_core.training.mapper import MapperRecipe, MapperTrainer, optimise_edit

from .latent_tools import MapperPicker, mapper_choices, run_with_progress, stream_trainer
from .sample_tab import model_choices
from .state import Studio
from .ui import Slider, bind, friendly, image_file, number, optional_download, progress_html, reveal

N_SLOTS = 12            # slider rows; each is bound to whatever direction the base offers at that index
LAYER_RANGES = {"all layers": None, "coarse (pose, shape)": (0, 4), "middle (features)": (4, 8), "fine (colour, texture)": (8, 99)}
PREVIEW_RES = 128


class DirectionControls:
    """A column of direction sliders with a layer-range picker each, an optional Z-space attribute
    (for seeds: InterFaceGAN++ boundaries move z before mapping), and a reset button."""

    def __init__(self, z_attributes: bool = True, open: bool = True):
        self.sliders, self.ranges = [], []
        with gr.Accordion("Latent directions", open=open):
            for i in range(N_SLOTS):
                with gr.Row(visible=i < 6) as row:
                    self.sliders.append(Slider(-3, 3, value=0, step=0.1, label=f"PC{i}", scale=3, min_width=150))
                    self.ranges.append(gr.Dropdown(list(LAYER_RANGES), value="all layers", label="layers", scale=1,
                                                   min_width=110))
                self.sliders[-1].row = row
            with gr.Row(visible=z_attributes):
                self.attribute = gr.Dropdown([], value=None, scale=1,
                                             label="Attribute (InterFaceGAN++, edits z; FFHQ 1024, when downloaded)")
                self.attribute_alpha = Slider(-3, 3, value=0, step=0.1, label="Attribute strength", scale=3)
            self.reset = gr.Button("Reset sliders")

    @property
    def inputs(self):
        return [*self.sliders, *self.ranges, self.attribute, self.attribute_alpha]

    def rows(self):
        return [s.row for s in self.sliders]

    def configured(self):
        """The components :meth:`configure` updates, in order."""
        return [*self.sliders, *self.rows(), self.attribute]

    def configure(self, studio: Studio, base_name: str):
        """Updates that label the sliders with this base's directions and hide unused rows."""
        dirs = studio.directions(base_name)[:N_SLOTS]
        ups = []
        for i in range(N_SLOTS):
            if i < len(dirs):
                lo, hi = dirs[i].range
                ups.append(gr.update(label=f"{dirs[i].name} ({dirs[i].space})", minimum=lo, maximum=hi, value=0))
            else:
                ups.append(gr.update(value=0))
        rows = [gr.update(visible=i < len(dirs)) for i in range(N_SLOTS)]
        attrs = [d.name for d in studio.z_directions(base_name)]
        return ups + rows + [gr.update(choices=attrs, value=None)]

    @staticmethod
    def edits(studio: Studio, base_name: str, values):
        dirs = studio.directions(base_name)
        alphas, ranges = values[:N_SLOTS], values[N_SLOTS:2 * N_SLOTS]
        if any(r not in LAYER_RANGES for r in ranges):
            raise gr.Error(f"layers must be one of: {', '.join(LAYER_RANGES)}")
        alphas = [number(a, f"Direction {i}", -10, 10, integer=False) for i, a in enumerate(alphas)]
        out = [(d, a, LAYER_RANGES[r]) for d, a, r in zip(dirs, alphas, ranges) if a != 0]
        attribute, strength = (list(values[2 * N_SLOTS:]) + [None, 0])[:2]
        strength = number(strength or 0, "Attribute strength", -10, 10, integer=False)
        if attribute and strength != 0:
            match = [d for d in studio.z_directions(base_name) if d.name == attribute]
            if not match:
                raise gr.Error(f"attribute {attribute!r} is not available for {base_name}")
            out.append((match[0], strength, None))
        return out


def build(studio: Studio):
    optional_download(studio, ("direction",), "InterFaceGAN face directions for the FFHQ 1024 base")
    base_names = studio.base_names()
    with gr.Row(equal_height=False, elem_classes=["nada-result-first"]):
        with gr.Column(scale=2, min_width=300):
            base = gr.Dropdown([(studio.base_label(n), n) for n in base_names], value=studio.default_base(),
                               label="Base model", allow_custom_value=True)  # names are checked on the server
            models = gr.Dropdown(model_choices(studio, studio.default_base()), multiselect=True,
                                 label="Adapted models shown beside the source", elem_id="edit-models",
                                 allow_custom_value=True)  # checked on the server: ids only
            with gr.Row():
                seed = gr.Number(0, label="Seed", step=1, min_width=90)
                truncation = Slider(0, 1, value=0.7, step=0.05, label="Truncation psi", min_width=160)
            controls = DirectionControls()
            with gr.Accordion("Style mixing", open=False):
                gr.Markdown("Take the coarse layers (pose, face shape) from this seed and, from the chosen W+ slot "
                            "on, the finer layers (features, colours) from a second seed. 0 turns mixing off.",
                            elem_classes=["nada-small"])
                with gr.Row():
                    mix_seed = gr.Number(1, label="Second seed", step=1, min_width=90)
                    crossover = Slider(0, studio.n_latent(studio.default_base()), value=0, step=1,
                                          label="Second seed from W+ slot (0 = off)", min_width=160)
            mapper = MapperPicker(studio, studio.default_base())
            with gr.Accordion("Edit by text (StyleCLIP)", open=False, elem_id="edit-text"):
                gr.Markdown("Type an edit; this latent is optimised for it (CLIP loss + staying close to the start) "
                            "and the result shows through the source and every chosen model. To reuse an edit on any "
                            "latent, train it as a mapper: it then appears under Latent mapper.",
                            elem_classes=["nada-small"])
                with gr.Row():
                    edit_text = gr.Textbox("", label="Edit", placeholder="e.g. smiling, blue hair", max_lines=1,
                                           max_length=300, min_width=160)
                    edit_steps = gr.Number(60, label="Steps", step=1, min_width=80)
                with gr.Row():
                    text_go = gr.Button("Optimise this latent", min_width=120)
                    text_mapper_go = gr.Button("Train an edit mapper", min_width=120)
                    text_clear = gr.Button("Remove the text edit", size="sm", min_width=100)
                    text_stop = gr.Button("Stop training", size="sm", variant="stop", min_width=100, interactive=False)
            render_btn = gr.Button("Render", variant="primary")
        with gr.Column(scale=3, min_width=300, elem_classes=["nada-sticky"]):
            status = gr.HTML("", elem_id="edit-status")
            gallery = gr.Gallery(format="png", label="Source and adapted models, same edited latent", columns=2,
                                 height=460, elem_id="edit-result", allow_preview=False, object_fit="contain",
                                 show_label=True)

    text_delta = gr.State(None)   # W+ change found by the last text edit, added on top of the sliders

    full = friendly(lambda *a: render_edit(studio, *a))
    auto_full, quick = automatic(studio, False), automatic(studio, True)

    @friendly
    def on_base(base_name):
        return ([gr.update(choices=model_choices(studio, base_name), value=[]),
                 gr.update(maximum=studio.n_latent(base_name), value=0)] + controls.configure(studio, base_name))

    inputs = [base, models, seed, truncation, mix_seed, crossover, *mapper.inputs, text_delta, *controls.inputs]
    # one lane, in order: a slider's quick previews never land after (and over) the full render of its release
    live = dict(api_visibility="private", show_progress="hidden", concurrency_id="render", concurrency_limit=1)
    base.change(on_base, base, [models, crossover, *controls.configured()], api_visibility="private")
    base.change(lambda b: gr.update(choices=mapper_choices(studio, b), value=None), base, mapper.choice,
                api_visibility="private", show_progress="hidden")

    text_stop.click(bind(studio, stop_mapper), None, None, api_visibility="private", show_progress="hidden")
    for s in controls.sliders:
        s.change(quick, inputs, gallery, trigger_mode="always_last", **live)
        s.release(auto_full, inputs, gallery, **live)
    controls.attribute_alpha.release(auto_full, inputs, gallery, **live)
    for comp in (models, seed, truncation, mix_seed, crossover, controls.attribute, *controls.ranges, mapper.choice):
        comp.change(auto_full, inputs, gallery, trigger_mode="always_last", **live)
    mapper.strength.release(auto_full, inputs, gallery, **live)
    seed.change(lambda: None, None, text_delta, api_visibility="private", show_progress="hidden")  # edits are per latent
    base.change(lambda: None, None, text_delta, api_visibility="private", show_progress="hidden")
    text_go.click(bind(studio, text_edit), [*inputs[:9], edit_text, edit_steps, *controls.inputs], [status, gallery, text_delta],
                  api_name="text_edit", concurrency_limit=1, concurrency_id="device", show_progress="minimal",
                  show_progress_on=[status])
    text_mapper_go.click(bind(studio, train_edit_mapper), [base, edit_text, edit_steps], [status, mapper.choice, text_stop],
                         api_name="edit_mapper", concurrency_limit=1, concurrency_id="device", show_progress="minimal",
                         show_progress_on=[status])
    text_clear.click(lambda: None, None, text_delta, api_visibility="private", show_progress="hidden").then(
        auto_full, inputs, gallery, **live)
    controls.reset.click(lambda: [gr.update(value=0)] * (N_SLOTS + 1), None, [*controls.sliders, controls.attribute_alpha],
                         api_visibility="private")
    render_btn.click(full, inputs, gallery, api_name="edit", concurrency_id="render", show_progress_on=[gallery])
    reveal(render_btn.click, "edit-result")
    for go in (text_go, text_mapper_go):
        reveal(go.click, "edit-status")
    return base, models, controls, mapper


def current_latent(studio: Studio, base_name, ids, seed_value, psi, mseed, cross, mapper_id, mapper_strength, delta, values):
    """The generators to show and the latent they share: seed -> Z/W/W+ directions -> style mixing ->
    latent mapper -> text edit."""
    if not base_name:
        raise gr.Error("choose a base model")
    G = studio.base(base_name)
    ids = [i for i in (ids or [])]
    entries = [studio.entry(i) for i in ids]
    for e in entries:
        if e.base != base_name:
            raise gr.Error(f"{e.name} was adapted from {e.base}; choose that base to edit it")
    w = edited_latent(G, number(seed_value or 0, "Seed", 0, 2 ** 32 - 1), number(psi, "Truncation", 0, 1, integer=False),
                      DirectionControls.edits(studio, base_name, values),
                      number(mseed or 0, "Second seed", 0, 2 ** 32 - 1), number(cross or 0, "Mix from slot", 0, G.n_latent))
    w = MapperPicker.apply(studio, w, mapper_id, mapper_strength, G.n_latent)
    if delta is not None and tuple(delta.shape) == tuple(w.shape):
        w = w + delta.to(w.device)
    gens, labels = [G], [f"source ({base_name})"]
    for e in entries:
        gens.append(studio.model(e.id))
        labels.append(e.name)
    return G, gens, labels, w


def show(studio: Studio, G, gens, labels, w, preview=False):
    max_res = PREVIEW_RES if preview and not studio.device.startswith("cuda") and G.size > PREVIEW_RES else None
    rows = render(gens, w, max_resolution=max_res)
    shown = max(256, G.size) if max_res is None else 256
    return [(image_file(r[0].resize((shown, shown), Image.LANCZOS) if r[0].width < shown else r[0]), label)
            for r, label in zip(rows, labels)]


def render_edit(studio: Studio, base_name, ids, seed_value, psi, mseed, cross, mapper_id, mapper_strength, delta, *values,
                preview=False):
    G, gens, labels, w = current_latent(studio, base_name, ids, seed_value, psi, mseed, cross, mapper_id, mapper_strength,
                                        delta, values)
    return show(studio, G, gens, labels, w, preview)


@friendly
def text_edit(studio: Studio, base_name, ids, seed_value, psi, mseed, cross, mapper_id, mapper_strength, delta, text, steps,
              *values):
    """StyleCLIP's optimisation of this one latent, with live renders through every chosen model."""
    G, gens, labels, w = current_latent(studio, base_name, ids, seed_value, psi, mseed, cross, mapper_id, mapper_strength,
                                        delta, values)
    n = number(steps, "Steps", 1, 300)
    if not (text or "").strip():
        raise gr.Error("type the edit first, e.g. 'smiling' or 'blue hair'")
    names = studio.clip_names()
    clip = studio.clip(names, [1.0] * len(names))
    latest: dict = {}
    shown_at = [0.0]

    def work(report):
        return optimise_edit(G, w, text.strip(), clip, steps=n, progress=report,
                             on_latent=lambda i, cur: latest.update(w=cur))

    for kind, value in run_with_progress(work, lambda u: f"Editing '{text.strip()}': step {u[0]}/{u[1]} · "
                                                          f"CLIP loss {u[2]['clip']:.4f}"):
        if kind == "progress":
            now = time.perf_counter()
            img = gr.update()
            if "w" in latest and now - shown_at[0] >= 2.0:
                img, shown_at[0] = show(studio, G, gens, labels, latest["w"], preview=True), now
            yield progress_html(None, value), img, gr.update()
        else:
            new_delta = (value - w).detach().cpu() + (delta if delta is not None and tuple(delta.shape) ==
                                                       tuple(w.shape) else 0)
            yield (progress_html(1.0, f"Text edit '{text.strip()}' applied ({n} steps); the sliders still work "
                                      "on top of it.", "done"), show(studio, G, gens, labels, value), new_delta)


@friendly
def train_edit_mapper(studio: Studio, base_name, text, steps, request: gr.Request):
    """A reusable edit: StyleCLIP's mapper for this text on the base, listed under Latent mapper."""
    if studio.is_training(request.session_hash if request else ""):
        raise gr.Error(f"Already training ({studio.training_status()}).")
    G = studio.base(base_name)
    names = studio.clip_names()
    n = number(steps, "Steps", 1, 100_000)
    recipe = MapperRecipe(text=(text or "").strip(), iterations=n, clip_models=names, clip_weights=[1.0] * len(names),
                          preview_every=n, snapshot_every=max(1, n // 5), train_size=500 if studio.tiny else 5000,
                          test_size=100 if studio.tiny else 1000)
    recipe.validate()
    id_fn, _ = studio.identity_term(base_name)
    out = new_model_dir(f"{base_name}-{recipe.text}", studio.mapper_root)
    trainer = MapperTrainer(G, recipe, studio.clip(names, [1.0] * len(names)), studio.device, out,
                            model_name=base_name, id_fn=id_fn)
    for html, img, ev in stream_trainer(studio, trainer, request.session_hash if request else "",
                                        f"Training the edit mapper '{recipe.text}'"):
        if ev is None:
            yield html, gr.update(), gr.update(interactive=True)
        else:
            yield (html, gr.update(choices=mapper_choices(studio, base_name), value=out.name if ev.checkpoint else None),
                   gr.update(interactive=False))


def automatic(studio: Studio, preview):
    """Renders fired by value changes (also on page load): silent while the base is not downloaded,
    since the get-started panel already says what is missing; the Render button reports it."""
    def handler(*a):
        try:
            return render_edit(studio, *a, preview=preview)
        except weights.WeightsError:
            return gr.update()
    return friendly(handler)


def stop_mapper(studio: Studio, request: gr.Request):
    studio.cancel_training(request.session_hash if request else "")
