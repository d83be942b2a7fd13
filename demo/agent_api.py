"""Tools for agents: the studio's four main actions (adapt, sample, stylise a photo, check a prompt) as small
documented endpoints. ``python app.py --mcp`` serves them as MCP tools, and the API page lists them with the
page's own endpoints; the page's events are kept off the tool list, so an agent sees a short list of actions
rather than every slider of the page.

Each tool is a module-level function taking the studio, with type hints and an Args section (Gradio reads both
for the tool's description); they check their inputs as the tabs do and report progress through gr.Progress."""
import html
import re

import gradio as gr
from PIL import Image

from nada_core.faces.align import CropAdjust
from nada_core.faces.selfie import invert_faces, prepare_face, stylize_faces
from nada_core.store.images import grid

from . import adapt_tab, sample_tab
from .state import Studio
from .ui import bind, enlarged, friendly, image_file, number

TOOLS = ("adapt", "sample_grid", "stylise_photo", "check_prompt")
MAX_PROMPT = 300   # characters of a prompt, as the Adapt tab's text boxes allow


def _prompt(text, field: str) -> str:
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_PROMPT:
        raise gr.Error(f"{field} must be a text of 1 to {MAX_PROMPT} characters")
    return text.strip()


def _plain(status_html: str) -> str:
    """A tab's status line as plain text (an agent reads words, not markup)."""
    return html.unescape(re.sub(r"<[^>]+>", "", status_html)).strip()


@friendly
def check_prompt(studio: Studio, source: str, target: str) -> str:
    """How well CLIP separates two prompts, before any training: the direction's strength and consistency per
    CLIP model, a verdict, and a measured better wording when there is one.

    Args:
        source: what the base model makes now, e.g. "photo".
        target: the domain to adapt it to, e.g. "sketch" or "pixar character".
    Returns:
        The prompt report in plain words.
    """
    text, _, _ = adapt_tab.check(studio, _prompt(source, "source"), _prompt(target, "target"), studio.clip_names(), None)
    if not text:
        raise gr.Error("CLIP is not downloaded: python -m nada_core weights download clip-ViT-B-32 clip-ViT-B-16")
    return text.replace("**", "")


@friendly
def sample_grid(studio: Studio, model: str, seeds: str = "0-3", truncation: float = 0.7) -> str:
    """The same random faces through the source model (top row) and an adapted model (bottom row).

    Args:
        model: a library model id (as adapt returns it, or as the Sample tab lists it).
        seeds: which random faces, e.g. "0-3" or "1,5,9" (at most 16).
        truncation: truncation psi from 0 to 1; lower is more typical, higher more varied.
    Returns:
        The comparison grid as a PNG image.
    """
    return sample_tab.generate(studio, model, seeds, truncation, "const", 1.0, None, 0.5)


def adapt(studio: Studio, target: str, source: str = "photo", iterations: int = 300, base: str = "",
          progress=gr.Progress()) -> str:
    """Train a new model: the base generator moved from the source domain to the target one by CLIP's text
    direction (StyleGAN-NADA), saved in the library. Takes minutes on a GPU; progress is reported per step.

    Args:
        target: the domain to adapt to, e.g. "sketch" or "pixar character".
        source: what the base makes now, e.g. "photo".
        iterations: training steps, 1 to 2000 (about 300 for a style, 50 for a small change).
        base: the base model's name (empty: the studio's default).
    Returns:
        What happened, with the new model's library id to sample or stylise with.
    """
    base_name = base or studio.default_base()
    n = number(iterations, "iterations", 1, 2000)
    names = studio.clip_names()
    before = {e.id for e in studio.library()}
    last = None
    for out in adapt_tab.train(studio, base_name, "Style", _prompt(source, "source"), _prompt(target, "target"), [], [],
                               n, 2, 0.002, 0, 1, 0.0, names, 1.0, 1.0, 0, adapt_tab.PREVIEW_SECONDS):
        last = out
        step = re.search(r"step (\d+)/(\d+)", _plain(str(out[0])))
        if step:
            progress((int(step.group(1)), int(step.group(2))), desc="training", unit="steps")
    status = _plain(str(last[0])) if last else ""
    if "nada-warn" in str(last[0]) and "Finished" not in status:
        raise gr.Error(status)
    made = [e.id for e in studio.library() if e.id not in before]
    return f"{status} Model id: {made[0]}" if made else status


def stylise_photo(studio: Studio, photo: str, model: str, steps: int = 100, crop_scale: float = 1.0,
                  progress=gr.Progress()) -> str:
    """A face photo in an adapted model's style: the face is aligned (FFHQ crop), inverted into the base model
    by optimisation, rendered through the style, and pasted back into the photo.

    Args:
        photo: the photo file (JPEG or PNG) with a visible face; the largest face is used.
        model: a library model id of the style.
        steps: optimisation steps of the inversion, 1 to 1000 (more: closer to the photo, slower).
        crop_scale: the face crop's size against the FFHQ crop, 0.6 to 1.6.
    Returns:
        One picture: the photo with the stylised face pasted back, and under it the aligned face beside its
        stylised version (judge the likeness there; more steps come closer).
    """
    if not photo:
        raise gr.Error("give a photo file with a visible face")
    n = number(steps, "steps", 1, 1000)
    try:
        crop = CropAdjust(scale=crop_scale)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    entry = studio.entry(model)
    G, G_style = studio.base(entry.base), studio.model(model)
    face = prepare_face(photo, output_size=max(256, min(G.size, 1024)), adjust=crop)
    perceptual, _ = studio.perceptual()
    inv, = invert_faces([face], G, None, n, perceptual=perceptual,
                        progress=lambda s, total, loss: progress((s, total), desc="inverting", unit="steps"))
    (styled,), pasted = stylize_faces([face], [inv], G_style)
    return image_file(result_sheet(pasted, face.aligned, enlarged(styled, face.aligned.size)), name="stylised")


def result_sheet(pasted: Image.Image, aligned: Image.Image, styled: Image.Image) -> Image.Image:
    """One picture for an agent (an MCP tool gives back one image): the pasted photo over the aligned face and
    its stylised version, side by side at half the photo's width each."""
    half = pasted.width // 2
    sheet = Image.new("RGB", (pasted.width, pasted.height + half), "white")
    sheet.paste(pasted, (0, 0))
    sheet.paste(grid([[aligned, styled]], pad=pasted.width - 2 * half, tile=half), (0, pasted.height))
    return sheet


def build(studio: Studio) -> None:
    """The tools' endpoints, on components never shown (they give each tool its schema)."""
    with gr.Column(visible=False):
        source, target = gr.Textbox(label="source"), gr.Textbox(label="target")
        report = gr.Textbox(label="prompt report")
        model, seeds, psi = gr.Textbox(label="model"), gr.Textbox("0-3", label="seeds"), gr.Number(0.7, label="truncation")
        grid = gr.Image(format="png", type="filepath", label="grid")
        iterations, base, trained = gr.Number(300, label="iterations"), gr.Textbox("", label="base"), gr.Textbox(label="result")
        photo, steps, crop_scale = (gr.File(label="photo", file_types=["image"]), gr.Number(100, label="steps"),
                                    gr.Number(1.0, label="crop_scale"))
        stylised = gr.Image(format="png", type="filepath", label="stylised photo")
        trigger = gr.Button()
    trigger.click(bind(studio, check_prompt), [source, target], report, api_name="check_prompt",
                  concurrency_id="prompt", concurrency_limit=1)
    trigger.click(bind(studio, sample_grid), [model, seeds, psi], grid, api_name="sample_grid", concurrency_id="render")
    trigger.click(friendly(bind(studio, adapt)), [target, source, iterations, base], trained, api_name="adapt",
                  concurrency_id="device", concurrency_limit=1)
    trigger.click(friendly(bind(studio, stylise_photo)), [photo, model, steps, crop_scale], stylised,
                  api_name="stylise_photo", concurrency_id="device", concurrency_limit=1)


def keep_only_the_tools(demo: gr.Blocks) -> None:
    """Gradio makes every public endpoint an MCP tool unless its function is marked as something else (the mark
    gradio.mcp's tool/resource/prompt decorators set); the page's own events are marked as the page's, so an
    agent's tool list holds the four tools only, while the API page and gradio_client see every endpoint as
    before. Called once the Blocks is built (its load events are added as it closes), before launch."""
    for fn in demo.fns.values():
        if fn.fn is not None and fn.api_name not in TOOLS:
            fn.fn._mcp_type = "page"
