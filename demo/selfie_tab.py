"""Selfie tab: upload or snap a photo (shown at once with the detected faces) -> aligned face ->
inversion (encoder where it fits, else optimisation; cancellable) -> the face through every chosen
style -> pasted back into the photo. The direction sliders act on the inverted latent."""
from __future__ import annotations

import threading

import gradio as gr
from PIL import Image

from nada_core.faces.align import (
    CropAdjust,
    FaceError,
    align_face,
    aligned_points,
    detect,
    draw_faces,
    draw_landmarks,
    ffhq_quad,
    load_photo,
)
from nada_core.faces.colour import keep_colours
from nada_core.faces.psp import sketch_to_w
from nada_core.faces.selfie import invert_faces, paste_faces, pixel_error, prepare_face, prepare_faces
from nada_core.latent.editing import apply_edits
from nada_core.latent.sampling import render
from nada_core.training.mapper import optimise_edit

from .edit_tab import DirectionControls
from .latent_tools import Cancelled, MapperPicker, mapper_choices, run_with_progress
from .sample_tab import model_choices
from .state import TINY_ENCODER_NOTE, Studio
from .ui import (
    Slider,
    bind,
    enlarged,
    friendly,
    image_file,
    number,
    optional_download,
    progress_html,
    refused_in,
    reveal,
    scrub,
    status_on_error,
)

ENCODER, REFINE, OPTIMISE = "Encoder (e4e): instant", "Encoder + optimisation", "Optimisation"


MAX_FACES = 8


SHOWN = 256   # px a result picture is shown at


def methods_for(studio: Studio, base_name: str) -> list[str]:
    """The encoder is offered only where it fits: the FFHQ 1024 base with the e4e file present (or the tiny base)."""
    return [ENCODER, REFINE, OPTIMISE] if studio.encoder_fits(base_name) else [OPTIMISE]


def build(studio: Studio):
    optional_download(studio, ("encoder",), "the e4e encoder for instant selfies on FFHQ 1024")
    optional_download(studio, ("psp-encoder",), "pSp's sketch and segmentation encoders (draw a face)")
    base_default = studio.default_base()
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            # A file input, not gr.Image: a corrupt upload must reach our loader, which explains the problem
            upload = gr.File(label="Your photo (JPEG, PNG, ...)", file_types=["image"], elem_id="selfie-upload",
                             height=130)
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
            with gr.Row():
                every_face = gr.Checkbox(False, label=f"Every face (group photo, up to {MAX_FACES})", min_width=160)
                face_pick = gr.CheckboxGroup([f"Face {k + 1}" for k in range(MAX_FACES)], value=[], label="Faces to stylise",
                                             visible=False, min_width=160)
            colours = Slider(0, 1, value=0, step=0.05, label="Keep my photo's colours (0 = the style's own)",
                             elem_id="selfie-colours")
            with gr.Accordion("Adjust the crop (seen on the photo before anything runs)", open=False,
                              elem_id="selfie-crop"):
                crop = [Slider(*CropAdjust.RANGES[name], value=default, step=step, label=label, min_width=120)
                        for name, default, step, label in CROP_SLIDERS]
            mapper = MapperPicker(studio, base_default)
            with gr.Accordion("Edit by text", open=False):
                with gr.Row():
                    edit_text = gr.Textbox("", label="Edit", placeholder="e.g. smiling", max_lines=1, max_length=300,
                                           min_width=150)
                    edit_steps = gr.Number(40, label="Steps", step=1, min_width=80)
                text_go = gr.Button("Apply the text edit")
            with gr.Accordion("Draw a face (pSp sketch-to-face)", open=False, elem_id="selfie-sketch") as sketch_box:
                gr.Markdown("Draw dark lines on white; pixel2style2pixel's sketch encoder turns the drawing into a "
                            "latent of the FFHQ 1024 model, shown through the source and every chosen style.",
                            elem_classes=["nada-small"])
                # no image sources and a brush: the pad opens with the brush as its tool, so the first touch draws
                sketch = gr.Sketchpad(label="Sketch", type="pil", height=300, canvas_size=(512, 512),
                                      brush=gr.Brush(default_size=4, colors=["#000000"], color_mode="fixed"),
                                      layers=False, elem_id="selfie-sketchpad")
                sketch_go = gr.Button("Render the drawing")
            with gr.Accordion("Inversion settings and webcam", open=False):
                steps = Slider(10, 1000, value=100 if studio.tiny else 300, step=10, label="Optimisation steps")
                fit_noise = gr.Checkbox(False, label="Also fit noise maps (closer reconstruction; styles never use them)")
                webcam = gr.Image(label="...or take a photo with the webcam", type="numpy", sources=["webcam"])
            controls = DirectionControls(z_attributes=False, open=False)  # an inverted face has no z
        with gr.Column(scale=3, min_width=300):
            status = gr.HTML(progress_html(None, "Upload a photo with a visible face.", "idle"), elem_id="selfie-status")
            with gr.Row(equal_height=False):
                photo = gr.Image(format="jpeg", label="Your photo: detected faces (green = the one used)", type="pil",
                                 interactive=False, height=240, elem_id="selfie-photo", min_width=200, scale=3)
                aligned = gr.Image(format="png", label="Aligned face with landmarks", type="pil", interactive=False,
                                   height=240, min_width=160, scale=2)
            with gr.Row(equal_height=False):   # side by side on a laptop, stacked on a phone
                stylised = gr.Gallery(format="png", label="Stylised", columns=2, height=300, allow_preview=True,
                                      interactive=False,   # an input of the before/after slider, never an upload
                                      elem_id="selfie-result", elem_classes=["nada-captioned"], object_fit="contain",
                                      min_width=220)
                pasted = gr.Gallery(format="png", label="Pasted back into your photo", columns=1, height=300,
                                    allow_preview=True, object_fit="contain", elem_id="selfie-pasted", min_width=220)
            compare = gr.ImageSlider(label="Before / after: your aligned photo and the first style", type="filepath",
                                     format="png", interactive=False, height=300, elem_id="selfie-compare")
            recon = gr.Image(format="png", label="Reconstruction (the inverted latent through the source model)",
                             type="pil", interactive=False, height=256)
    session = gr.State(None)

    @friendly
    def on_base(base_name):
        methods = methods_for(studio, base_name)
        return gr.update(choices=model_choices(studio, base_name), value=[]), gr.update(choices=methods, value=methods[0])

    shown = upload.change(friendly(bind(studio, show_faces)), [upload, webcam, *crop], [photo, status, face_pick, aligned],
                          api_visibility="private", show_progress="hidden")
    webcam.change(friendly(bind(studio, show_faces)), [upload, webcam, *crop], [photo, status, face_pick, aligned],
                  api_visibility="private", show_progress="hidden")
    for s in crop:   # the nudged crop drawn on the photo, and the crop it gives, at once
        s.release(friendly(bind(studio, show_faces)), [upload, webcam, *crop], [photo, status, face_pick, aligned],
                  api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    stylised.change(bind(studio, before_after), [session, stylised], compare, api_visibility="private",
                    show_progress="hidden")
    reveal(shown.then, "selfie-photo")
    reveal(go.click, "selfie-status")
    ran = go.click(bind(studio, run), [upload, webcam, base, models, method, steps, fit_noise, every_face, face_pick, colours,
                                       *crop, *mapper.inputs,
                   *controls.inputs],
             [status, photo, aligned, recon, stylised, pasted, session], api_name="selfie",
             concurrency_limit=1, concurrency_id="device", show_progress="minimal", show_progress_on=[status],
             scroll_to_output=True)
    cancel.click(bind(studio, stop), None, None, api_visibility="private", show_progress="hidden")
    reveal(ran.then, "selfie-result")
    reveal(sketch_go.click, "selfie-result")
    sketch_go.click(bind(studio, render_sketch), [sketch, base, models, *mapper.inputs], [status, stylised],
                    api_name="sketch", concurrency_limit=1, concurrency_id="device", show_progress_on=[stylised])
    sketch_box.expand(None, None, None, js=PICK_BRUSH_JS)
    for s in controls.sliders:
        s.release(bind(studio, re_edit), [session, *mapper.inputs, *controls.inputs], [stylised, pasted], api_visibility="private",
                  concurrency_id="render", show_progress="hidden")
    for comp in (mapper.choice,):
        comp.change(bind(studio, re_edit), [session, *mapper.inputs, *controls.inputs], [stylised, pasted], api_visibility="private",
                    concurrency_id="render", show_progress="hidden")
    colours.release(bind(studio, recolour), [session, colours, *mapper.inputs, *controls.inputs],
                    [stylised, pasted, session], api_name="selfie_colours", concurrency_id="render",
                    show_progress="hidden")
    mapper.strength.release(bind(studio, re_edit), [session, *mapper.inputs, *controls.inputs], [stylised, pasted],
                            api_visibility="private", concurrency_id="render", show_progress="hidden")
    text_go.click(bind(studio, text_edit), [session, edit_text, edit_steps, *mapper.inputs, *controls.inputs],
                  [status, stylised, pasted, session], api_name="selfie_text_edit", concurrency_limit=1,
                  concurrency_id="device", show_progress="minimal", show_progress_on=[status])
    base.change(on_base, base, [models, method], api_visibility="private")
    base.change(lambda b: gr.update(choices=mapper_choices(studio, b), value=None), base, mapper.choice,
                api_visibility="private", show_progress="hidden")
    controls.reset.click(lambda: [gr.update(value=0)] * len(controls.sliders), None, controls.sliders,
                         api_visibility="private")
    return base, models, controls, mapper


CROP_SLIDERS = (("scale", 1.0, 0.02, "Crop size"), ("shift_x", 0.0, 0.01, "Move right"),
                ("shift_y", 0.0, 0.01, "Move down"), ("rotate", 0.0, 1, "Turn (degrees, clockwise)"))


def crop_of(scale, shift_x, shift_y, rotate) -> CropAdjust:
    """The crop sliders as the core's CropAdjust; out of range (a client can send anything) is refused."""
    try:
        return CropAdjust(scale=scale, shift_x=shift_x, shift_y=shift_y, rotate=rotate)
    except ValueError as e:
        raise gr.Error(str(e), print_exception=False) from None


def show_faces(studio: Studio, file, cam, scale=1.0, shift_x=0.0, shift_y=0.0, rotate=0.0):
    """Right after upload (and as the crop is nudged): the photo with every detected face boxed and its crop
    square drawn, and the aligned crop the largest face gets, before anything heavy runs. A photo that cannot
    be read, or a crop out of range, is said in the status line (no error overlay on the photo)."""
    img = file if file else cam
    if img is None:
        return (None, progress_html(None, "Upload a photo with a visible face.", "idle"), gr.update(visible=False),
                gr.update())
    try:
        crop = crop_of(scale, shift_x, shift_y, rotate)
    except gr.Error as e:   # the photo and crop shown stay as they were
        return gr.update(), progress_html(None, e.message, "warn"), gr.update(), gr.update()
    try:
        picture = load_photo(img)
    except FaceError as e:
        return None, progress_html(None, scrub(str(e)), "warn"), gr.update(visible=False), None
    faces = detect(picture)
    if not faces.count:
        return (draw_faces(picture, faces), progress_html(None, "No face found: try a frontal, well-lit photo.", "warn"),
                gr.update(value=[], visible=False), None)
    more = (f" {faces.count} faces found (numbered, largest first); the largest is used unless you tick Every face."
            if faces.count > 1 else " Face found.")
    labels = [f"Face {k + 1}" for k in range(min(faces.count, MAX_FACES))]
    quads = [ffhq_quad(lm, crop) for lm in faces.landmarks[:MAX_FACES]]
    lm = faces.landmarks[0]
    preview, quad = align_face(picture, output_size=SHOWN, transform_size=1024, lm=lm, adjust=crop)
    nudged = "" if crop.is_default else " Crop adjusted (blue square)."
    return (draw_faces(picture, faces, quads=quads),
            progress_html(None, more.strip() + nudged + " Choose styles, then Stylise me.", "idle"),
            gr.update(choices=labels, value=labels, visible=faces.count > 1),
            draw_landmarks(preview, aligned_points(lm, quad, SHOWN)))


def latent(studio: Studio, state, face_index, mapper_id, mapper_strength, values):
    inv = state["invs"][face_index]
    w = apply_edits(inv.w_plus, DirectionControls.edits(studio, state["base"], values))
    w = MapperPicker.apply(studio, w, mapper_id, mapper_strength, w.shape[1])
    delta = state.get("deltas", {}).get(face_index)
    return w + delta.to(w.device) if delta is not None else w


def outputs_for(studio: Studio, state, mapper_id, mapper_strength, values):
    """Every chosen face through every style (each model's own noise: the photo's detail stays out of
    the style), then all of them pasted back into one photo per style."""
    faces, ids, colours = state["faces"], state["ids"], state.get("colours", 0.0)
    names = [studio.entry(i).name for i in ids]
    per_style = []
    for model_id in ids:
        G = studio.model(model_id)
        per_style.append([render([G], latent(studio, state, k, mapper_id, mapper_strength, values))[0][0]
                          for k in range(len(faces))])
    gallery = []
    for name, imgs in zip(names, per_style):
        for k, img in enumerate(imgs):
            face = f" (face {k + 1})" if len(faces) > 1 else ""
            gallery.append((image_file(img), name + face))
            if colours:   # beside the plain result, so the difference is seen
                gallery.append((image_file(keep_colours(img, faces[k].aligned, colours)), f"{name}{face}, your colours"))
    if colours:
        per_style = [[keep_colours(img, faces[k].aligned, colours) for k, img in enumerate(imgs)] for imgs in per_style]
    pasted = [(image_file(paste_faces(faces[0].photo, faces, imgs)), name) for name, imgs in zip(names, per_style)]
    return gallery, pasted


def readable(img):
    """A small model's picture enlarged (pixels kept sharp) so that it reads at the size it is shown."""
    scale = max(1, SHOWN // max(img.size))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def styles_for(studio: Studio, base_name, ids) -> list:
    """The chosen style ids, each checked to be an adaptation of ``base_name`` (it shares its latent space)."""
    ids = list(ids or [])
    for e in (studio.entry(i) for i in ids):
        if e.base != base_name:
            raise gr.Error(f"the style {e.name} needs the base {e.base}; choose that base or another style")
    return ids


@status_on_error(0, 7)
@friendly
def run(studio: Studio, file, cam, base_name, ids, how, n_steps, noise, every_face, chosen, colours, crop_scale,
        crop_shift_x, crop_shift_y, crop_rotate, mapper_id, mapper_strength, request: gr.Request, *values):
    img = file if file else cam
    if img is None:
        raise gr.Error("upload a photo first (JPEG or PNG with a visible face)")
    # every setting is checked before the (slow) alignment
    G = studio.base(base_name)
    ids = styles_for(studio, base_name, ids)
    if how not in methods_for(studio, base_name):
        raise gr.Error(f"'{how}' is not available for {base_name}; choose {OPTIMISE}")
    n = 0 if how == ENCODER else number(n_steps, "Optimisation steps", 1, 1000)
    colours = number(colours or 0, "Keep my photo's colours", 0, 1, integer=False)
    crop = crop_of(crop_scale, crop_shift_x, crop_shift_y, crop_rotate)
    DirectionControls.edits(studio, base_name, values)
    if mapper_id:
        studio.mapper(mapper_id, G.n_latent)
    flag = studio.cancel_flags.setdefault(_session(request), threading.Event())
    flag.clear()
    yield progress_html(0, "Aligning the face...", "run"), gr.update(), None, None, [], [], None
    size = max(256, min(G.size, 1024))  # shown at >= 256 px
    if every_face:
        found = prepare_faces(img, output_size=size, max_faces=MAX_FACES, adjust=crop)
        picked = [k for k in range(len(found)) if f"Face {k + 1}" in (chosen or [f"Face {k + 1}"])]
        faces = [found[k] for k in picked] or found[:1]
        note = f"{len(faces)} of {found[0].faces_found} faces stylised. "
    else:
        faces = [prepare_face(img, output_size=size, adjust=crop)]
        note = f"{faces[0].faces_found} faces found; using the largest. " if faces[0].faces_found > 1 else ""
    enc = None
    if how in (ENCODER, REFINE):
        enc, why = studio.e4e(base_name)
        if why:
            raise gr.Error(why)
    perceptual, loss_name = studio.perceptual() if n > 0 else ({}, "")
    yield (progress_html(0, f"{note}Aligned. Inverting...", "run"), gr.update(), image_file(faces[0].overlay(), name="aligned"),
           None, [], [], None)

    def work(report):
        return invert_faces(faces, G, enc, n, perceptual=perceptual, progress=report, optimize_noise=bool(noise))

    try:
        for kind, value in run_with_progress(work, lambda u: f"Inverting: step {u[0]}/{u[1]} · loss {u[2]:.4f}",
                                             cancel=flag):
            if kind == "progress":
                yield (progress_html(None, value, "run"), gr.update(), gr.update(), gr.update(), gr.update(),
                       gr.update(), gr.update())
            else:
                invs = value
    except Cancelled:
        yield progress_html(None, "Cancelled.", "warn"), gr.update(), gr.update(), None, [], [], None
        return
    state = {"faces": faces, "invs": invs, "base": base_name, "ids": ids, "deltas": {}, "colours": colours}
    gal, pas = outputs_for(studio, state, mapper_id, mapper_strength, values)
    loss_note = f" Reconstruction loss: {loss_name}." if loss_name else ""
    styles = (f" Your face in {len(ids)} style(s) is below; the sliders and text edits act on it." if ids
              else " Choose styles to see yourself in them.")
    untrained = f" ({TINY_ENCODER_NOTE})" if enc is not None and studio.tiny else ""
    errors = ", ".join(f"{pixel_error(f.aligned, i.reconstruction):.1%}" for f, i in zip(faces, invs))
    error_note = (f" Reconstruction error: {errors} (mean per-pixel difference from the aligned photo; lower is "
                  "better, and a nudged crop can lower it).")
    msg = f"{note}Inverted with {invs[0].method}{untrained}.{loss_note}{error_note}{styles}"
    yield (progress_html(1.0, msg, "done"), gr.update(), image_file(faces[0].overlay(), name="aligned"),
           image_file(readable(invs[0].reconstruction), name="reconstruction"), gal, pas,
           state)


@friendly
def before_after(studio: Studio, state, gallery):
    """The before/after slider: the aligned photo against the first stylised face shown (at the photo's size),
    so the style is judged against the very crop it was made from. Empty until there is a result."""
    if not state or not gallery:
        return None
    first = gallery[0]
    styled = Image.open(first[0] if isinstance(first, (tuple, list)) else first).convert("RGB")
    photo = state["faces"][0].aligned
    return image_file(photo), image_file(enlarged(styled, photo.size))


@friendly
def text_edit(studio: Studio, state, text, steps, mapper_id, mapper_strength, *values):
    """StyleCLIP's optimisation on each inverted face (identity kept where dlib or ArcFace is available)."""
    if not state:
        raise gr.Error("stylise a photo first, then edit it by text")
    if not (text or "").strip():
        raise gr.Error("type the edit first, e.g. 'smiling' or 'blue hair'")
    n = number(steps, "Steps", 1, 300)
    G = studio.base(state["base"])
    names = studio.clip_names()
    clip = studio.clip(names, [1.0] * len(names))
    id_fn, _ = studio.identity_term(state["base"])
    starts = [latent(studio, state, k, mapper_id, mapper_strength, values) for k in range(len(state["faces"]))]

    def work(report):
        return [optimise_edit(G, w, text.strip(), clip, steps=n, id_fn=id_fn, progress=report) for w in starts]

    for kind, value in run_with_progress(work, lambda u: f"Editing '{text.strip()}': step {u[0]}/{u[1]}"):
        if kind == "progress":
            yield progress_html(None, value, "run"), gr.update(), gr.update(), gr.update()
        else:
            deltas = dict(state.get("deltas", {}))
            for k, (w0, w1) in enumerate(zip(starts, value)):
                deltas[k] = (w1 - w0).cpu() + (deltas[k] if k in deltas else 0)
            state = {**state, "deltas": deltas}
            gal, pas = outputs_for(studio, state, mapper_id, mapper_strength, values)
            yield progress_html(1.0, f"Text edit '{text.strip()}' applied.", "done"), gal, pas, state


# Gradio's sketchpad opens with no tool chosen ("select the draw tool to start"): the first stroke would be lost
PICK_BRUSH_JS = """() => {
  let tries = 0;
  const pick = () => {
    const pad = document.getElementById('selfie-sketchpad');
    const brush = pad && pad.querySelector('button[aria-label="Brush"]');
    if (brush && pad.dataset.brushPicked) return;
    if (brush) { pad.dataset.brushPicked = '1'; brush.click(); return; }
    if (++tries < 100) setTimeout(pick, 100);   // the editor draws its toolbar a moment after opening
  };
  pick();
}"""


def _blank(image: Image.Image) -> bool:
    """A canvas without a stroke: one colour all over once laid on white (as the encoder sees it)."""
    flat = Image.new("RGB", image.size, "white")
    flat.paste(image.convert("RGB"), mask=image.getchannel("A") if "A" in image.getbands() else None)
    lo, hi = flat.convert("L").getextrema()
    return hi - lo < 10


@refused_in(0, 2)
def render_sketch(studio: Studio, drawing, base_name, ids, mapper_id, mapper_strength):
    """A drawing -> pSp's sketch encoder -> W+ of FFHQ 1024 (of the tiny base, with its untrained tiny
    encoder, on ``--tiny``) -> (the status line, the source and every chosen style)."""
    image = drawing.get("composite") if isinstance(drawing, dict) else drawing
    if image is None or _blank(image):
        raise gr.Error("draw a face first: the canvas is empty")
    if not studio.sketch_fits(base_name):
        raise gr.Error("the sketch encoder was trained for the FFHQ 1024 base; choose it as the base model")
    G = studio.base(base_name)
    ids = styles_for(studio, base_name, ids)
    w = sketch_to_w(image, studio.psp("psp-sketch"))
    w = MapperPicker.apply(studio, w, mapper_id, mapper_strength, G.n_latent)
    gens = [G] + [studio.model(i) for i in ids]
    names = ["source"] + [studio.entry(i).name for i in ids]
    untrained = f" ({TINY_ENCODER_NOTE})" if studio.tiny else ""
    faces = [(image_file(row[0]), name + untrained) for row, name in zip(render(gens, w), names)]
    return progress_html(1.0, f"Rendered the drawing through {len(names)} model(s){untrained}.", "done"), faces


@friendly
def recolour(studio: Studio, state, colours, mapper_id, mapper_strength, *values):
    """The colours slider: the same faces and styles with the photo's chroma by the new strength."""
    colours = number(colours or 0, "Keep my photo's colours", 0, 1, integer=False)
    if not state:
        return gr.update(), gr.update(), state
    state = {**state, "colours": colours}
    return (*outputs_for(studio, state, mapper_id, mapper_strength, values), state)


@friendly
def re_edit(studio: Studio, state, mapper_id, mapper_strength, *values):
    if not state:
        return gr.update(), gr.update()
    return outputs_for(studio, state, mapper_id, mapper_strength, values)


def stop(studio: Studio, request: gr.Request):
    flag = studio.cancel_flags.get(_session(request))
    if flag:
        flag.set()


def _session(request: gr.Request | None) -> str:
    return request.session_hash if request else ""
