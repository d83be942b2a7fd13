"""Selfie tab: upload or snap a photo -> aligned face with landmarks -> inversion -> the face through
every chosen model -> pasted back into the photo. The Edit tab's sliders act on the inverted latent."""
from __future__ import annotations

import gradio as gr

from nada_core.align import paste_back
from nada_core.editing import apply_edits
from nada_core.sampling import render
from nada_core.selfie import encoder_for, invert_face, prepare_face

from .edit_tab import DirectionControls
from .sample_tab import model_choices
from .state import Studio
from .ui import banner, friendly, missing_panel


def build(studio: Studio):
    banner(studio)
    missing_panel(studio, ("generator", "encoder", "landmarks"), "selfies (base generator; the e4e encoder makes it fast)")
    with gr.Row():
        with gr.Column():
            # A file input, not gr.Image: a corrupt upload must reach our loader, which explains the problem
            upload = gr.File(label="Upload your photo (JPEG, PNG, ...)", file_types=["image"], elem_id="selfie-upload")
            webcam = gr.Image(label="...or take one with the webcam", type="pil", sources=["webcam"])
        with gr.Column():
            base = gr.Dropdown([(studio.base_label(n), n) for n in studio.base_names()], value=studio.default_base(),
                               label="Base model")
            models = gr.Dropdown(model_choices(studio, studio.default_base()), multiselect=True, allow_custom_value=True,
                                 label="Styles to apply")
            steps = gr.Slider(0, 1000, value=100 if studio.tiny else 300, step=10,
                              label="Optimisation steps (0 = encoder only, when the e4e encoder fits)")
            use_encoder = gr.Checkbox(True, label="Start from the e4e encoder when it fits this base")
            go = gr.Button("Stylise me", variant="primary")
    status = gr.Markdown("")
    with gr.Row():
        aligned = gr.Image(format="png", label="Aligned face with landmarks", type="pil", interactive=False)
        recon = gr.Image(format="png", label="Reconstruction (the inverted latent through the source model)", type="pil", interactive=False)
    stylised = gr.Gallery(format="png", label="Stylised", columns=4, height=280, allow_preview=True, elem_id="selfie-gallery")
    pasted = gr.Gallery(format="png", label="Pasted back into your photo", columns=3, height=320, allow_preview=True)
    controls = DirectionControls(z_attributes=False)  # an inverted face has no z
    session = gr.State(None)

    def outputs_for(state, values):
        face, inv, base_name, paths = state["face"], state["inv"], state["base"], state["paths"]
        w = apply_edits(inv.w_plus, DirectionControls.edits(studio, base_name, values))
        edited = type(inv)(w, inv.noises, inv.reconstruction, inv.method)
        gens = [studio.model(p) for p in paths]
        known = studio.model_names() if paths else {}
        names = [known.get(p, p) for p in paths]
        rows = render(gens, edited.w_plus, noises=edited.noises) if gens else []
        faces = [r[0] for r in rows]
        return list(zip(faces, names)), [(paste_back(face.photo, f, face.quad), n) for f, n in zip(faces, names)]

    @friendly
    def run(file, cam, base_name, paths, n_steps, encoder_on, *values, progress=gr.Progress()):
        img = file if file else cam
        if img is None:
            raise gr.Error("upload a photo first (JPEG or PNG with a visible face)")
        G = studio.base(base_name)
        face = prepare_face(img, output_size=max(256, min(G.size, 1024)))  # shown at >= 256 px
        note = f"{face.faces_found} faces found; using the largest. " if face.faces_found > 1 else ""
        yield (f"{note}Face aligned. Inverting...", face.overlay(), None, [], [], None)
        enc, why = encoder_for(base_name, G, studio.device) if encoder_on else (None, None)
        if why:
            note += why + ". "
        perceptual, how = studio.perceptual() if int(n_steps) > 0 else ({}, "")
        if how:
            note += f"Reconstruction loss: {how}. "
        inv = invert_face(face, G, enc, int(n_steps), perceptual=perceptual,
                          progress=lambda s, n, loss: progress(s / n, desc=f"inverting: step {s}/{n}, loss {loss:.4f}"))
        state = {"face": face, "inv": inv, "base": base_name, "paths": list(paths or [])}
        gal, pas = outputs_for(state, values)
        msg = f"{note}Inverted with {inv.method}." + ("" if paths else " Choose styles to see yourself in them.")
        yield (msg, face.overlay(), inv.reconstruction, gal, pas, state)

    @friendly
    def re_edit(state, *values):
        if not state:
            return gr.update(), gr.update()
        return outputs_for(state, values)

    @friendly
    def on_base(base_name):
        return gr.update(choices=model_choices(studio, base_name), value=[])

    go.click(run, [upload, webcam, base, models, steps, use_encoder, *controls.inputs],
             [status, aligned, recon, stylised, pasted, session], api_name="selfie")
    for s in controls.sliders:
        s.release(re_edit, [session, *controls.inputs], [stylised, pasted], api_visibility="private")
    base.change(on_base, base, models, api_visibility="private")
    controls.reset.click(lambda: [gr.update(value=0)] * len(controls.sliders), None, controls.sliders,
                         api_visibility="private")
    return base, models, controls
