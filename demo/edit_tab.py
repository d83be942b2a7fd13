"""Edit tab: latent sliders applied at once to the source and every chosen adapted model, so the
shared latent space is visible side by side. On CPU a slider drag renders a small preview (the
generator's own coarse RGB output) and the release renders full size."""
from __future__ import annotations

import gradio as gr
from nada_core import weights
from nada_core.sampling import edited_latent, render

from .sample_tab import model_choices
from .state import Studio
from .ui import banner, friendly, missing_panel

N_SLOTS = 12            # slider rows; each is bound to whatever direction the base offers at that index
LAYER_RANGES = {"all layers": None, "coarse (pose, shape)": (0, 4), "middle (features)": (4, 8), "fine (colour, texture)": (8, 99)}
PREVIEW_RES = 128


class DirectionControls:
    """A column of direction sliders with a layer-range picker each, an optional Z-space attribute
    (for seeds: InterFaceGAN++ boundaries move z before mapping), and a reset button."""

    def __init__(self, z_attributes: bool = True):
        self.sliders, self.ranges = [], []
        with gr.Accordion("Directions", open=True):
            for i in range(N_SLOTS):
                with gr.Row(visible=i < 6) as row:
                    self.sliders.append(gr.Slider(-3, 3, value=0, step=0.1, label=f"PC{i}", scale=3))
                    self.ranges.append(gr.Dropdown(list(LAYER_RANGES), value="all layers", label="layers", scale=1))
                self.sliders[-1].row = row
            with gr.Row(visible=z_attributes):
                self.attribute = gr.Dropdown([], value=None, allow_custom_value=True, scale=1,
                                             label="Attribute (InterFaceGAN++, edits z; FFHQ 1024, when downloaded)")
                self.attribute_alpha = gr.Slider(-3, 3, value=0, step=0.1, label="Attribute strength", scale=3)
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
        out = [(d, float(a), LAYER_RANGES.get(r)) for d, a, r in zip(dirs, alphas, ranges) if float(a) != 0]
        attribute, strength = (list(values[2 * N_SLOTS:]) + [None, 0])[:2]
        if attribute and float(strength or 0) != 0:
            match = [d for d in studio.z_directions(base_name) if d.name == attribute]
            if not match:
                raise gr.Error(f"attribute {attribute!r} is not available for {base_name}")
            out.append((match[0], float(strength), None))
        return out


def build(studio: Studio):
    banner(studio)
    missing_panel(studio, ("generator", "direction"), "editing (a base generator; InterFaceGAN directions are optional)")
    base_names = studio.base_names()
    with gr.Row():
        base = gr.Dropdown([(studio.base_label(n), n) for n in base_names], value=studio.default_base(), label="Base model")
        models = gr.Dropdown(model_choices(studio, studio.default_base()), multiselect=True, allow_custom_value=True,
                             label="Adapted models shown beside the source")
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0)
        truncation = gr.Slider(0, 1, value=0.7, step=0.05, label="Truncation psi")
        mix_seed = gr.Number(1, label="Style-mixing seed", precision=0)
        crossover = gr.Slider(0, 18, value=0, step=1, label="Mix from W+ slot (0 = off)")
    controls = DirectionControls()
    render_btn = gr.Button("Render", variant="primary")
    gallery = gr.Gallery(format="png", label="Source and adapted models, same edited latent", columns=4, height=320,
                         elem_id="edit-gallery", allow_preview=False, object_fit="contain")

    def render_edit(base_name, paths, seed_value, psi, mseed, cross, *values, preview=False):
        if not base_name:
            raise gr.Error("choose a base model")
        G = studio.base(base_name)
        w = edited_latent(G, int(seed_value or 0), float(psi), DirectionControls.edits(studio, base_name, values),
                          int(mseed or 0), int(cross or 0))
        gens, labels = [G], [f"source ({base_name})"]
        names = studio.model_names() if paths else {}
        for p in paths or []:
            gens.append(studio.model(p))
            labels.append(names.get(p, p))
        max_res = PREVIEW_RES if preview and not studio.device.startswith("cuda") and G.size > PREVIEW_RES else None
        rows = render(gens, w, max_resolution=max_res)
        return [(r[0], label) for r, label in zip(rows, labels)]

    def automatic(preview):
        """Renders fired by value changes (also on page load): silent while the base is not downloaded,
        since the panel above already says what is missing; the Render button reports it."""
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
        return [gr.update(choices=model_choices(studio, base_name), value=[])] + controls.configure(studio, base_name)

    inputs = [base, models, seed, truncation, mix_seed, crossover, *controls.inputs]
    base.change(on_base, base, [models, *controls.configured()], api_visibility="private")
    for s in controls.sliders:
        s.change(quick, inputs, gallery, trigger_mode="always_last", api_visibility="private", show_progress="hidden")
        s.release(auto_full, inputs, gallery, api_visibility="private")
    controls.attribute_alpha.release(auto_full, inputs, gallery, api_visibility="private")
    for comp in (models, seed, truncation, mix_seed, crossover, controls.attribute, *controls.ranges):
        comp.change(auto_full, inputs, gallery, trigger_mode="always_last", api_visibility="private")
    controls.reset.click(lambda: [gr.update(value=0)] * (N_SLOTS + 1), None, [*controls.sliders, controls.attribute_alpha],
                         api_visibility="private")
    render_btn.click(full, inputs, gallery, api_name="edit")
    return base, models, controls
