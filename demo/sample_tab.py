"""Sample tab: the same latents through the source and an adapted model, side by side; blend the
weights live; blend two adapted models; interpolations that play in the page (MP4) and download as GIF."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from nada_core.latent.editing import blend_generators, combine_styles
from nada_core.latent.sampling import (
    comparison,
    interpolation_frames,
    latents_for_seeds,
    parse_seeds,
    render,
    save_gif,
    thumbnail,
)
from nada_core.latent.video import save_mp4
from nada_core.models.stylegan2 import NOISE_MODES
from nada_core.store.library import add_model
from nada_core.store.runs import RunFolder

from .latent_tools import MapperPicker
from .state import Studio
from .ui import EXPECTED, Slider, bind, choice, enlarged, friendly, image_file, number, optional_download, reveal

MIX_SLOTS = 4
SHOWN = 256   # px the before/after pair is shown at, at least


def model_choices(studio: Studio, base: str | None = None):
    """(label, id) of every library model; with ``base``, those of another base say which they need."""
    out = []
    for e in studio.library():
        label = e.label if base is None or e.base == base else f"{e.label}  [needs base {e.base}]"
        out.append((label, e.id))
    return out


def build(studio: Studio):
    optional_download(studio, ("style",), "ready StyleGAN-NADA styles to sample without training")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            with gr.Row():
                model = gr.Dropdown(model_choices(studio), label="Adapted model", scale=4, elem_id="sample-model",
                                 allow_custom_value=True)  # checked on the server: ids only
                refresh = gr.Button("Refresh", scale=1, min_width=80, size="sm")
            seeds = gr.Textbox("0-3", label="Seeds (e.g. 0-7 or 1,5,9)", max_lines=1)
            go = gr.Button("Generate", variant="primary", elem_id="sample-go")
            with gr.Row():
                truncation = Slider(0, 1, value=0.7, step=0.05, label="Truncation psi")
                noise = gr.Radio(["const", "random", "none"], value="const", label="Noise")
            strength = Slider(0, 1, value=1.0, step=0.05, label="Strength: theta = (1-a) source + a adapted")
            mapper = MapperPicker(studio, None)
            with gr.Accordion("Blend with a second adapted model", open=False):
                other = gr.Dropdown(model_choices(studio), label="Second model (same base)",
                                 allow_custom_value=True)  # checked on the server: ids only
                mix = Slider(0, 1, value=0.5, step=0.05, label="Second model share")
            with gr.Accordion("Mix styles (domain arithmetic)", open=False, elem_id="sample-mix"):
                gr.Markdown("theta = theta_base + sum of a_i (theta_i - theta_base) over styles of one base; negative "
                            "weights subtract a style. The grid shows the base over the mix.", elem_classes=["nada-small"])
                mix_styles, mix_weights = [], []
                for i in range(MIX_SLOTS):
                    with gr.Row():
                        mix_styles.append(gr.Dropdown(model_choices(studio), value=None, label=f"Style {i + 1}", scale=3,
                                                      min_width=150, allow_custom_value=True))  # ids, checked on the server
                        mix_weights.append(Slider(-2, 2, value=1.0 if i == 0 else 0.5, step=0.05, label="weight",
                                                  scale=2, min_width=120))
                mix_go = gr.Button("Preview the mix")
                with gr.Row():
                    mix_name = gr.Textbox("", label="Save the mix as", max_lines=1, max_length=80, min_width=140)
                    mix_save = gr.Button("Save to the library", min_width=120)
            with gr.Accordion("Interpolation video", open=False):
                with gr.Row():
                    seed_a = gr.Number(0, label="Seed A", step=1, min_width=80)
                    seed_b = gr.Number(1, label="Seed B", step=1, min_width=80)
                    frames = Slider(2, 60, value=16, step=1, label="Frames", min_width=120)
                mode = gr.Radio([("Between seeds", "seeds"), ("Across domains (source -> adapted)", "domains")],
                                value="domains", label="Path")
                make = gr.Button("Make video")
                video = gr.Video(label="Interpolation", interactive=False, autoplay=True, loop=True,
                                 elem_id="sample-video", height=300, visible=False)
                gif_file = gr.File(label="Download the GIF", interactive=False, visible=False)
        with gr.Column(scale=3, min_width=300):
            out = gr.Image(format="png", label="Source (top) and adapted (bottom), same latents", type="pil",
                           interactive=False, elem_id="sample-grid", height=420)
            compare = gr.ImageSlider(label="Before / after: the source and the adapted model, one sample",
                                     type="filepath", format="png", interactive=False, height=320,
                                     elem_id="sample-compare")
            pick = Slider(1, 16, value=1, step=1, label="Sample to compare (1 = the first seed)",
                          elem_id="sample-pick")

    inputs = [model, seeds, truncation, noise, strength, other, mix, *mapper.inputs]
    # progress (and a refusal's badge) on the button: a refused click leaves the last picture in place
    go.click(bind(studio, generate), inputs, out, api_name="sample", concurrency_id="render", show_progress="minimal",
             show_progress_on=[go], scroll_to_output=True)
    rerender = bind(studio, when_chosen)   # every control of the picture renders it again once a model is chosen
    pair = bind(studio, before_after)      # and the before/after pair with it
    go.click(pair, [*inputs, pick], compare, api_visibility="private", concurrency_id="render", show_progress="hidden")
    for slider in (truncation, strength, mix, mapper.strength):
        slider.release(rerender, inputs, out, api_visibility="private", concurrency_id="render", show_progress="hidden")
        slider.release(pair, [*inputs, pick], compare, api_visibility="private", concurrency_id="render",
                       show_progress="hidden")
    for picker in (noise, mapper.choice):
        picker.change(rerender, inputs, out, api_visibility="private", concurrency_id="render", show_progress="hidden")
        picker.change(pair, [*inputs, pick], compare, api_visibility="private", concurrency_id="render",
                      show_progress="hidden")
    pick.release(pair, [*inputs, pick], compare, api_visibility="private", concurrency_id="render", show_progress="hidden")
    reveal(go.click, "sample-grid")
    reveal(mix_go.click, "sample-grid")
    made = make.click(bind(studio, make_video), [model, strength, other, mix, seed_a, seed_b, frames, mode, truncation], [video, gif_file],
               api_name="interpolate", concurrency_limit=1, concurrency_id="device", show_progress="minimal",
               show_progress_on=[make], scroll_to_output=True)
    reveal(made.then, "sample-video")
    refresh.click(bind(studio, refresh_models), None, [model, other], api_name="sample_refresh")
    mix_inputs = [*mix_styles, *mix_weights]
    mix_go.click(bind(studio, preview_mix), [seeds, truncation, *mix_inputs], out, api_name="mix", concurrency_id="render",
                 show_progress="minimal", show_progress_on=[mix_go], scroll_to_output=True)
    for slider in mix_weights:
        slider.release(bind(studio, preview_mix), [seeds, truncation, *mix_inputs], out, api_visibility="private",
                       concurrency_id="render", show_progress="hidden")
    saved_mix = mix_save.click(bind(studio, save_mix), [mix_name, *mix_inputs], [model, other], api_name="mix_save", show_progress="minimal")
    return [model, other, *mix_styles], mapper, [saved_mix]


def adapted_generator(studio: Studio, model_id, a, other_id, m):
    if not model_id:
        raise gr.Error("choose an adapted model (train one in the Adapt tab)")
    entry = studio.entry(model_id)
    G_src, G = studio.base(entry.base), studio.model(model_id)
    if other_id:
        if studio.entry(other_id).base != entry.base:
            raise gr.Error("the two models were adapted from different bases and cannot be blended")
        G = blend_generators(G, studio.model(other_id), number(m, "Second model share", 0, 1, integer=False))
    a = number(a, "Strength", 0, 1, integer=False)
    if a != 1.0:
        G = blend_generators(G_src, G, a)
    return G_src, G


@friendly
def generate(studio: Studio, model_id, seed_text, psi, noise_mode, a, other_id, m, mapper_id=None, mapper_strength=1.0):
    choice(noise_mode, "Noise", NOISE_MODES)
    G_src, G = adapted_generator(studio, model_id, a, other_id, m)
    w = latents_for_seeds(G_src, parse_seeds(seed_text, limit=16), number(psi, "Truncation", 0, 1, integer=False))
    w = MapperPicker.apply(studio, w, mapper_id, mapper_strength, G_src.n_latent)
    return image_file(comparison(render([G_src, G], w, noise_mode), largest=512))


@friendly
def before_after(studio: Studio, model_id, seed_text, psi, noise_mode, a, other_id, m, mapper_id=None,
                 mapper_strength=1.0, pick=1):
    """One sample (the ``pick``-th seed, the last one when fewer are shown) through the source and the adapted
    model, for the before/after slider: the change is judged on one face at full size. Nothing until a model is
    chosen, and nothing for a refused setting of the grid: its own handler says why, once."""
    if not model_id:
        return gr.update()
    k = number(pick, "Sample to compare", 1, 16)   # the pair's own setting: said here
    try:
        choice(noise_mode, "Noise", NOISE_MODES)
        G_src, G = adapted_generator(studio, model_id, a, other_id, m)
        seeds = parse_seeds(seed_text, limit=16)
    except (gr.Error, *EXPECTED):
        return gr.update()
    w = latents_for_seeds(G_src, seeds[min(k, len(seeds)) - 1:][:1], number(psi, "Truncation", 0, 1, integer=False))
    w = MapperPicker.apply(studio, w, mapper_id, mapper_strength, G_src.n_latent)
    (before,), (after,) = render([G_src, G], w, noise_mode)
    size = (max(SHOWN // before.width, 1) * before.width,) * 2
    return image_file(enlarged(before, size)), image_file(enlarged(after, size))


@friendly
def make_video(studio: Studio, model_id, a, other_id, m, sa, sb, n, how, psi):
    choice(how, "Path", ("seeds", "domains"))
    G_src, G = adapted_generator(studio, model_id, a, other_id, m)
    imgs = interpolation_frames(G_src, G, number(sa, "Seed A", 0, 2 ** 32 - 1), number(sb, "Seed B", 0, 2 ** 32 - 1),
                                number(n, "Frames", 2, 60), how, number(psi, "Truncation", 0, 1, integer=False))
    folder = Path(tempfile.mkdtemp(prefix="nada_video_"))
    stem = f"interpolation_{how}_{int(sa)}_{int(sb)}"
    gif = folder / f"{stem}.gif"
    save_gif(imgs, gif)
    mp4 = save_mp4(imgs, folder / f"{stem}.mp4", min_size=256)
    return gr.update(value=str(mp4), visible=True), gr.update(value=str(gif), visible=True)


def mixed_generator(studio: Studio, pairs):
    """The base and theta_base + sum a_i (theta_i - theta_base) for the chosen (style id, weight) pairs."""
    chosen = [(mid, number(a, f"Weight of style {i + 1}", -2, 2, integer=False))
              for i, (mid, a) in enumerate(pairs) if mid]
    if not chosen:
        raise gr.Error("choose at least one style to mix")
    entries = [studio.entry(mid) for mid, _ in chosen]
    base_name = entries[0].base
    if any(e.base != base_name for e in entries):
        raise gr.Error("every style in a mix must come from the same base model")
    G_base = studio.base(base_name)
    G = combine_styles(G_base, [(studio.model(mid), a) for mid, a in chosen])
    formula = " + ".join(f"{a:g} x ({e.name} - base)" for e, (_, a) in zip(entries, chosen))
    return G_base, G, base_name, formula


@friendly
def preview_mix(studio: Studio, seed_text, psi, *pairs):
    G_base, G, _, formula = mixed_generator(studio, list(zip(pairs[:MIX_SLOTS], pairs[MIX_SLOTS:])))
    w = latents_for_seeds(G_base, parse_seeds(seed_text, limit=16), number(psi, "Truncation", 0, 1, integer=False))
    gr.Info(f"base + {formula}")
    return image_file(comparison(render([G_base, G], w), largest=512))


@friendly
def save_mix(studio: Studio, name, *pairs):
    G_base, G, base_name, formula = mixed_generator(studio, list(zip(pairs[:MIX_SLOTS], pairs[MIX_SLOTS:])))
    if not (name or "").strip():
        raise gr.Error("give the mix a name")
    recipe = {"source": base_name, "target": name.strip(), "formula": f"base + {formula}",
              "styles": [[mid, a] for mid, a in zip(pairs[:MIX_SLOTS], pairs[MIX_SLOTS:]) if mid]}
    folder = add_model(studio.library_root, name.strip(), G, base_name, recipe)
    RunFolder(folder).write_thumb(thumbnail(G_base, G))
    choices = model_choices(studio)
    gr.Info(f"saved the mix as {folder.name} (base + {formula})")
    return gr.update(choices=choices), gr.update(choices=choices)


def refresh_models(studio: Studio):
    choices = model_choices(studio)
    return gr.update(choices=choices), gr.update(choices=choices)


def when_chosen(studio: Studio, model_id, *rest):
    return generate(studio, model_id, *rest) if model_id else gr.update()
