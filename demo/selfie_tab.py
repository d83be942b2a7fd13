"""Selfie tab: upload or snap a photo (shown at once with the detected faces) -> aligned face ->
inversion (encoder where it fits, else optimisation; cancellable) -> the face through every chosen
style -> pasted back into the photo. The direction sliders act on the inverted latent."""
from __future__ import annotations

import threading

import gradio as gr

from nada_core.align import detect, draw_faces, load_photo, paste_back
from nada_core.editing import apply_edits
from nada_core.sampling import render
from nada_core.selfie import encoder_for, invert_face, prepare_face

from .edit_tab import DirectionControls
from .sample_tab import model_choices
from .state import Studio
from .ui import Slider, friendly, number, optional_download, progress_html

ENCODER, REFINE, OPTIMISE = "Encoder (e4e): instant", "Encoder + optimisation", "Optimisation"


class Cancelled(Exception):
    pass


def methods_for(studio: Studio, base_name: str) -> list[str]:
    """The encoder is offered only where it fits: the FFHQ 1024 base with the e4e file present."""
    fits = base_name == "ffhq-1024" and not studio.tiny and not studio.missing(("encoder",))
    return [ENCODER, REFINE, OPTIMISE] if fits else [OPTIMISE]


def build(studio: Studio):
    optional_download(studio, ("encoder",), "the e4e encoder for instant selfies on FFHQ 1024")
    base_default = studio.default_base()
    cancel_flags: dict[str, threading.Event] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            # A file input, not gr.Image: a corrupt upload must reach our loader, which explains the problem
            upload = gr.File(label="Your photo (JPEG, PNG, ...)", file_types=["image"], elem_id="selfie-upload",
                             height=110)
            with gr.Row():
                base = gr.Dropdown([(studio.base_label(n), n) for n in studio.base_names()], value=base_default,
                                   label="Base model", min_width=140, allow_custom_value=True)  # names are checked on the server
                models = gr.Dropdown(model_choices(studio, base_default), multiselect=True, label="Styles to apply",
                                     elem_id="selfie-styles", min_width=140,
                                 allow_custom_value=True)  # checked on the server: ids only
            methods = methods_for(studio, base_default)
            method = gr.Radio(methods, value=methods[0], label="Inversion", elem_id="selfie-method")
            with gr.Row():
                go = gr.Button("Stylise me", variant="primary", elem_id="selfie-go", min_width=100)
                cancel = gr.Button("Cancel", elem_id="selfie-cancel", min_width=100)
            with gr.Accordion("Inversion settings and webcam", open=False):
                steps = Slider(10, 1000, value=100 if studio.tiny else 300, step=10, label="Optimisation steps")
                fit_noise = gr.Checkbox(False, label="Also fit noise maps (closer reconstruction; styles never use them)")
                webcam = gr.Image(label="...or take a photo with the webcam", type="numpy", sources=["webcam"])
            controls = DirectionControls(z_attributes=False, open=False)  # an inverted face has no z
        with gr.Column(scale=3, min_width=300):
            status = gr.HTML(progress_html(None, "Upload a photo with a visible face.", "idle"), elem_id="selfie-status")
            photo = gr.Image(format="jpeg", label="Your photo: detected faces (green = the one used)", type="pil",
                             interactive=False, height=280, elem_id="selfie-photo")
            with gr.Row():
                aligned = gr.Image(format="png", label="Aligned face with landmarks", type="pil", interactive=False,
                                   height=256, min_width=200)
                recon = gr.Image(format="png", label="Reconstruction (source model)", type="pil", interactive=False,
                                 height=256, min_width=200)
            stylised = gr.Gallery(format="png", label="Stylised", columns=3, height=300, allow_preview=True,
                                  elem_id="selfie-result", object_fit="contain")
            pasted = gr.Gallery(format="jpeg", label="Pasted back into your photo", columns=2, height=320,
                                allow_preview=True, object_fit="contain")
    session = gr.State(None)

    @friendly
    def show_faces(file, cam):
        """Right after upload: the photo with every detected face boxed, before anything heavy runs."""
        img = file if file else cam
        if img is None:
            return None, progress_html(None, "Upload a photo with a visible face.", "idle")
        picture = load_photo(img)
        faces = detect(picture)
        if not faces.count:
            return draw_faces(picture, faces), progress_html(None, "No face found: try a frontal, well-lit photo.", "warn")
        more = f" {faces.count} faces found; the largest (green) is used." if faces.count > 1 else " Face found."
        return draw_faces(picture, faces), progress_html(None, more.strip() + " Choose styles, then Stylise me.", "idle")

    def outputs_for(state, values):
        face, inv, base_name, ids = state["face"], state["inv"], state["base"], state["ids"]
        w = apply_edits(inv.w_plus, DirectionControls.edits(studio, base_name, values))
        gens = [studio.model(i) for i in ids]
        rows = render(gens, w) if gens else []    # each model's own noise: the photo's detail stays out of the style
        faces = [r[0] for r in rows]
        names = [studio.entry(i).name for i in ids]
        return list(zip(faces, names)), [(paste_back(face.photo, f, face.quad), n) for f, n in zip(faces, names)]

    @friendly
    def run(file, cam, base_name, ids, how, n_steps, noise, request: gr.Request, *values):
        img = file if file else cam
        if img is None:
            raise gr.Error("upload a photo first (JPEG or PNG with a visible face)")
        # every setting is checked before the (slow) alignment
        G = studio.base(base_name)
        ids = list(ids or [])
        for e in (studio.entry(i) for i in ids):
            if e.base != base_name:
                raise gr.Error(f"the style {e.name} needs the base {e.base}; choose that base or another style")
        if how not in methods_for(studio, base_name):
            raise gr.Error(f"'{how}' is not available for {base_name}; choose {OPTIMISE}")
        n = 0 if how == ENCODER else number(n_steps, "Optimisation steps", 1, 1000)
        DirectionControls.edits(studio, base_name, values)
        flag = cancel_flags.setdefault(_session(request), threading.Event())
        flag.clear()
        yield progress_html(0, "Aligning the face...", "run"), gr.update(), None, None, [], [], None
        face = prepare_face(img, output_size=max(256, min(G.size, 1024)))  # shown at >= 256 px
        note = f"{face.faces_found} faces found; using the largest. " if face.faces_found > 1 else ""
        enc = None
        if how in (ENCODER, REFINE):
            enc, why = encoder_for(base_name, G, studio.device)
            if why:
                raise gr.Error(why)
        perceptual, loss_name = studio.perceptual() if n > 0 else ({}, "")
        yield progress_html(0, f"{note}Face aligned. Inverting...", "run"), gr.update(), face.overlay(), None, [], [], None

        updates = []

        def report(s, total, loss):
            if flag.is_set():
                raise Cancelled()
            updates.append((s, total, loss))

        result: dict = {}

        def work():
            try:
                result["inv"] = invert_face(face, G, enc, n, perceptual=perceptual, progress=report,
                                            optimize_noise=bool(noise))
            except BaseException as e:  # noqa: BLE001 - handed back to the handler
                result["error"] = e

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
            if updates:
                s, total, loss = updates[-1]
                yield (progress_html(s / total, f"Inverting: step {s}/{total} · loss {loss:.4f}", "run"), gr.update(),
                       gr.update(), gr.update(), gr.update(), gr.update(), gr.update())
        if isinstance(result.get("error"), Cancelled):
            yield progress_html(None, "Cancelled.", "warn"), gr.update(), gr.update(), None, [], [], None
            return
        if "error" in result:
            raise result["error"]
        inv = result["inv"]
        state = {"face": face, "inv": inv, "base": base_name, "ids": ids}
        gal, pas = outputs_for(state, values)
        loss_note = f" Reconstruction loss: {loss_name}." if loss_name else ""
        msg = f"{note}Inverted with {inv.method}.{loss_note}" + ("" if ids else " Choose styles to see yourself in them.")
        yield progress_html(1.0, msg, "done"), gr.update(), face.overlay(), inv.reconstruction, gal, pas, state

    @friendly
    def re_edit(state, *values):
        if not state:
            return gr.update(), gr.update()
        return outputs_for(state, values)

    def stop(request: gr.Request):
        flag = cancel_flags.get(_session(request))
        if flag:
            flag.set()

    @friendly
    def on_base(base_name):
        methods = methods_for(studio, base_name)
        return gr.update(choices=model_choices(studio, base_name), value=[]), gr.update(choices=methods, value=methods[0])

    upload.change(show_faces, [upload, webcam], [photo, status], api_visibility="private", show_progress_on=[photo])
    webcam.change(show_faces, [upload, webcam], [photo, status], api_visibility="private", show_progress="hidden")
    go.click(run, [upload, webcam, base, models, method, steps, fit_noise, *controls.inputs],
             [status, photo, aligned, recon, stylised, pasted, session], api_name="selfie",
             concurrency_limit=1, concurrency_id="device", show_progress="minimal", show_progress_on=[status])
    cancel.click(stop, None, None, api_visibility="private", show_progress="hidden")
    for s in controls.sliders:
        s.release(re_edit, [session, *controls.inputs], [stylised, pasted], api_visibility="private",
                  concurrency_id="render", show_progress="hidden")
    base.change(on_base, base, [models, method], api_visibility="private")
    controls.reset.click(lambda: [gr.update(value=0)] * len(controls.sliders), None, controls.sliders,
                         api_visibility="private")
    return base, models, controls


def _session(request: gr.Request | None) -> str:
    return request.session_hash if request else ""
