"""Sample tab: the same latents through the source and an adapted model, side by side; blend the
weights live; blend two adapted models; interpolations that play in the page (MP4) and download as GIF."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from nada_core.editing import blend_generators
from nada_core.images import grid
from nada_core.sampling import interpolation_frames, latents_for_seeds, parse_seeds, render, save_gif
from nada_core.video import save_mp4

from .latent_tools import MapperPicker
from .state import Studio
from .ui import Slider, friendly, number, optional_download


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
            with gr.Row():
                truncation = Slider(0, 1, value=0.7, step=0.05, label="Truncation psi")
                noise = gr.Radio(["const", "random", "none"], value="const", label="Noise")
            strength = Slider(0, 1, value=1.0, step=0.05, label="Strength: theta = (1-a) source + a adapted")
            mapper = MapperPicker(studio, None)
            go = gr.Button("Generate", variant="primary", elem_id="sample-go")
            with gr.Accordion("Blend with a second adapted model", open=False):
                other = gr.Dropdown(model_choices(studio), label="Second model (same base)",
                                 allow_custom_value=True)  # checked on the server: ids only
                mix = Slider(0, 1, value=0.5, step=0.05, label="Second model share")
            with gr.Accordion("Interpolation video", open=False):
                with gr.Row():
                    seed_a = gr.Number(0, label="Seed A", step=1, min_width=80)
                    seed_b = gr.Number(1, label="Seed B", step=1, min_width=80)
                    frames = Slider(2, 60, value=16, step=1, label="Frames", min_width=120)
                mode = gr.Radio([("Between seeds", "seeds"), ("Across domains (source -> adapted)", "domains")],
                                value="domains", label="Path")
                make = gr.Button("Make video")
        with gr.Column(scale=3, min_width=300):
            out = gr.Image(format="png", label="Source (top) and adapted (bottom), same latents", type="pil",
                           interactive=False, elem_id="sample-grid", height=420)
            video = gr.Video(label="Interpolation", interactive=False, autoplay=True, loop=True, elem_id="sample-video",
                             height=300)
            gif_file = gr.File(label="Download the GIF", interactive=False)

    def adapted_generator(model_id, a, other_id, m):
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
    def generate(model_id, seed_text, psi, noise_mode, a, other_id, m, mapper_id=None, mapper_strength=1.0):
        if noise_mode not in ("const", "random", "none"):
            raise gr.Error("noise must be const, random or none")
        G_src, G = adapted_generator(model_id, a, other_id, m)
        w = latents_for_seeds(G_src, parse_seeds(seed_text, limit=16), number(psi, "Truncation", 0, 1, integer=False))
        w = MapperPicker.apply(studio, w, mapper_id, mapper_strength, G_src.n_latent)
        return grid(render([G_src, G], w, noise_mode), tile=max(128, min(512, G.size)))

    @friendly
    def make_video(model_id, a, other_id, m, sa, sb, n, how, psi):
        if how not in ("seeds", "domains"):
            raise gr.Error("path must be 'seeds' or 'domains'")
        G_src, G = adapted_generator(model_id, a, other_id, m)
        imgs = interpolation_frames(G_src, G, number(sa, "Seed A", 0, 2 ** 32 - 1), number(sb, "Seed B", 0, 2 ** 32 - 1),
                                    number(n, "Frames", 2, 60), how, number(psi, "Truncation", 0, 1, integer=False))
        folder = Path(tempfile.mkdtemp(prefix="nada_video_"))
        stem = f"interpolation_{how}_{int(sa)}_{int(sb)}"
        gif = folder / f"{stem}.gif"
        save_gif(imgs, gif)
        mp4 = save_mp4(imgs, folder / f"{stem}.mp4", min_size=256)
        return str(mp4), str(gif)

    def refresh_models():
        choices = model_choices(studio)
        return gr.update(choices=choices), gr.update(choices=choices)

    inputs = [model, seeds, truncation, noise, strength, other, mix, *mapper.inputs]
    go.click(generate, inputs, out, api_name="sample", concurrency_id="render", show_progress_on=[out])
    strength.release(generate, inputs, out, api_visibility="private", concurrency_id="render", show_progress="hidden")
    mix.release(generate, inputs, out, api_visibility="private", concurrency_id="render", show_progress="hidden")
    make.click(make_video, [model, strength, other, mix, seed_a, seed_b, frames, mode, truncation], [video, gif_file],
               api_name="interpolate", concurrency_limit=1, concurrency_id="device", show_progress_on=[video])
    refresh.click(refresh_models, None, [model, other], api_name="sample_refresh")
    def when_chosen(model_id, *rest):
        return generate(model_id, *rest) if model_id else gr.update()

    mapper.strength.release(when_chosen, inputs, out, api_visibility="private", concurrency_id="render",
                            show_progress="hidden")
    mapper.choice.change(when_chosen, inputs, out, api_visibility="private", concurrency_id="render",
                         show_progress="hidden")
    return [model, other], mapper
