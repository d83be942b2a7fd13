"""Edit tab: latent sliders applied at once to the source and every chosen adapted model, so the
shared latent space is visible side by side. On CPU a slider drag renders a small preview (the
generator's own coarse RGB output) and the release renders full size."""
from __future__ import annotations

import gradio as gr
from PIL import Image

from nada_core import weights
from nada_core.sampling import edited_latent, render

from .sample_tab import model_choices
from .state import Studio
from .ui import Slider, friendly, number, optional_download

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
    with gr.Row(equal_height=False):
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
            render_btn = gr.Button("Render", variant="primary")
        with gr.Column(scale=3, min_width=300, elem_classes=["nada-sticky"]):
            gallery = gr.Gallery(format="png", label="Source and adapted models, same edited latent", columns=2,
                                 height=460, elem_id="edit-result", allow_preview=False, object_fit="contain",
                                 show_label=True)

    def render_edit(base_name, ids, seed_value, psi, mseed, cross, *values, preview=False):
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
        gens, labels = [G], [f"source ({base_name})"]
        for e in entries:
            gens.append(studio.model(e.id))
            labels.append(e.name)
        max_res = PREVIEW_RES if preview and not studio.device.startswith("cuda") and G.size > PREVIEW_RES else None
        rows = render(gens, w, max_resolution=max_res)
        shown = max(256, G.size) if max_res is None else 256
        return [(r[0].resize((shown, shown), Image.LANCZOS) if r[0].width < shown else r[0], label)
                for r, label in zip(rows, labels)]

    def automatic(preview):
        """Renders fired by value changes (also on page load): silent while the base is not downloaded,
        since the get-started panel already says what is missing; the Render button reports it."""
        def handler(*a):
            try:
                return render_edit(*a, preview=preview)
            except weights.WeightsError:
                return gr.update()
        return friendly(handler)

    full = friendly(lambda *a: render_edit(*a))
    auto_full, quick = automatic(False), automatic(True)

    @friendly
    def on_base(base_name):
        return ([gr.update(choices=model_choices(studio, base_name), value=[]),
                 gr.update(maximum=studio.n_latent(base_name), value=0)] + controls.configure(studio, base_name))

    inputs = [base, models, seed, truncation, mix_seed, crossover, *controls.inputs]
    live = dict(api_visibility="private", show_progress="hidden", concurrency_id="render")
    base.change(on_base, base, [models, crossover, *controls.configured()], api_visibility="private")
    for s in controls.sliders:
        s.change(quick, inputs, gallery, trigger_mode="always_last", **live)
        s.release(auto_full, inputs, gallery, **live)
    controls.attribute_alpha.release(auto_full, inputs, gallery, **live)
    for comp in (models, seed, truncation, mix_seed, crossover, controls.attribute, *controls.ranges):
        comp.change(auto_full, inputs, gallery, trigger_mode="always_last", **live)
    controls.reset.click(lambda: [gr.update(value=0)] * (N_SLOTS + 1), None, [*controls.sliders, controls.attribute_alpha],
                         api_visibility="private")
    render_btn.click(full, inputs, gallery, api_name="edit", concurrency_id="render", show_progress_on=[gallery])
    return base, models, controls
