"""Sample tab: the same latents through the source and an adapted model, side by side; blend the
weights live; blend two adapted models; interpolation GIFs between seeds or across domains."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from nada_core.editing import blend_generators
from nada_core.images import grid
from nada_core.sampling import interpolation_frames, latents_for_seeds, parse_seeds, render, save_gif

from .state import Studio
from .ui import banner, friendly, missing_panel


def model_choices(studio: Studio, base: str | None = None):
    return [(e.label, str(e.path)) for e in studio.library() if base is None or e.base == base]


def base_of(studio: Studio, path: str) -> str:
    for e in studio.library():
        if str(e.path) == path:
            return e.base
    raise gr.Error("that model is no longer in the library; press Refresh")


def build(studio: Studio):
    banner(studio)
    missing_panel(studio, ("generator", "style"), "sampling (a base generator, or a ready StyleGAN-NADA style)")
    with gr.Row():
        model = gr.Dropdown(model_choices(studio), label="Adapted model", scale=3, allow_custom_value=True)
        refresh = gr.Button("Refresh library", scale=1)
    with gr.Row():
        seeds = gr.Textbox("0-3", label="Seeds (e.g. 0-7 or 1,5,9)")
        truncation = gr.Slider(0, 1, value=0.7, step=0.05, label="Truncation psi")
        noise = gr.Radio(["const", "random", "none"], value="const", label="Noise")
    with gr.Row():
        strength = gr.Slider(0, 1, value=1.0, step=0.05, label="Strength: theta = (1-a) source + a adapted")
        other = gr.Dropdown(model_choices(studio), label="Blend with a second adapted model (optional)",
                            allow_custom_value=True)
        mix = gr.Slider(0, 1, value=0.5, step=0.05, label="Second model share")
    go = gr.Button("Generate", variant="primary")
    out = gr.Image(format="png", label="Source (top) and adapted (bottom), same latents", type="pil", interactive=False,
                   elem_id="sample-grid")
    with gr.Accordion("Interpolation", open=False):
        with gr.Row():
            seed_a = gr.Number(0, label="Seed A", precision=0)
            seed_b = gr.Number(1, label="Seed B", precision=0)
            frames = gr.Slider(2, 60, value=16, step=1, label="Frames")
            mode = gr.Radio([("Between seeds", "seeds"), ("Across domains (source -> adapted)", "domains")],
                            value="domains", label="Path")
        make = gr.Button("Make GIF")
        gif = gr.Image(format="png", label="Interpolation", type="filepath", interactive=False)
        gif_file = gr.File(label="Download GIF", interactive=False)

    def adapted_generator(path, a, other_path, m):
        if not path:
            raise gr.Error("choose an adapted model (train one in the Adapt tab)")
        base_name = base_of(studio, path)
        G_src, G = studio.base(base_name), studio.model(path)
        if other_path:
            if base_of(studio, other_path) != base_name:
                raise gr.Error("the two models were adapted from different bases and cannot be blended")
            G = blend_generators(G, studio.model(other_path), float(m))
        if float(a) != 1.0:
            G = blend_generators(G_src, G, float(a))
        return G_src, G

    @friendly
    def generate(path, seed_text, psi, noise_mode, a, other_path, m):
        G_src, G = adapted_generator(path, a, other_path, m)
        w = latents_for_seeds(G_src, parse_seeds(seed_text, limit=16), float(psi))
        return grid(render([G_src, G], w, noise_mode), tile=max(128, min(512, G.size)))

    @friendly
    def make_gif(path, a, other_path, m, sa, sb, n, how, psi):
        G_src, G = adapted_generator(path, a, other_path, m)
        imgs = interpolation_frames(G_src, G, int(sa), int(sb), int(n), how, float(psi))
        target = Path(tempfile.mkdtemp(prefix="nada_gif_")) / f"interpolation_{how}_{int(sa)}_{int(sb)}.gif"
        save_gif(imgs, target)
        return str(target), str(target)

    def refresh_models():
        choices = model_choices(studio)
        return gr.update(choices=choices), gr.update(choices=choices)

    inputs = [model, seeds, truncation, noise, strength, other, mix]
    go.click(generate, inputs, out, api_name="sample")
    strength.release(generate, inputs, out, api_visibility="private")
    mix.release(generate, inputs, out, api_visibility="private")
    make.click(make_gif, [model, strength, other, mix, seed_a, seed_b, frames, mode, truncation], [gif, gif_file],
               api_name="interpolate")
    refresh.click(refresh_models, None, [model, other], api_name="sample_refresh")
    return [model, other]
