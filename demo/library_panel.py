"""The model library, under every tab: thumbnails and a table (recipe, date, size), rename, delete
(confirmed), download, and import of a generator file, the only way a user's file becomes a model."""
from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from nada_core.latent.sampling import thumbnail
from nada_core.models.export import export_onnx
from nada_core.store import weights
from nada_core.store.checkpoints import export_rosinality, read_safetensors_header, safetensors_metadata
from nada_core.store.delta import export_delta
from nada_core.store.library import delete_model, disk_use, import_file, rename_model

from .state import Studio
from .ui import bind, named_copy, progress_html, refused_in

COLUMNS = ["model", "from -> to", "base", "steps", "date", "size"]
MAX_IMPORT_BYTES = 2 << 30


def table(studio: Studio) -> pd.DataFrame:
    rows = []
    for e in studio.library():
        r = e.recipe
        planned, trained = (r.get("iterations"), _trained_steps(e.path)) if e.kind == "run" else (None, None)
        steps = "" if planned is None else str(planned) if trained in (None, planned) else f"{trained} of {planned}"
        rows.append([e.name, f"{r.get('source', '?')} -> {r.get('target') or 'image style'}", e.base,
                     steps + ("" if e.finished or not steps else " (unfinished)"),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)) if e.created else "",
                     _size(e.size_bytes)])
    return pd.DataFrame(rows, columns=COLUMNS)


def thumbnails(studio: Studio):
    return [(str(e.thumbnail) if e.thumbnail else np.full((64, 64, 3), 200, np.uint8), e.name) for e in studio.library()]


def _trained_steps(path: Path) -> int | None:
    """The step a model file was saved at (our safetensors metadata, read within bounds, without the tensors)."""
    try:
        meta = (safetensors_metadata(read_safetensors_header(path)[0], "nada") or {}).get("meta")
        step = meta.get("step") if isinstance(meta, dict) else None
        return int(step) if step is not None else None
    except (OSError, ValueError, TypeError):
        return None


def _size(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MB"


def usage_text(studio: Studio) -> str:
    n = len(studio.library())
    return f"{n} model(s); the library uses {_size(disk_use(studio.library_root))} on disk."


def build(studio: Studio):
    with gr.Accordion("Model library", open=False, elem_id="library"):
        usage = gr.Markdown(usage_text(studio), elem_classes=["nada-small"])
        thumbs = gr.Gallery(thumbnails(studio), format="png", label="Models", columns=4, fit_columns=False, height="auto",
                            allow_preview=False, object_fit="contain", elem_id="library-thumbs", elem_classes=["nada-captioned"])
        listing = gr.Dataframe(table(studio), interactive=False, elem_id="library-table", wrap=True, max_height=260)
        with gr.Row(equal_height=False):
            with gr.Column(min_width=280):
                pick = gr.Dropdown([e.id for e in studio.library()], label="Model", elem_id="library-pick",
                                 allow_custom_value=True)  # checked on the server: ids only
                with gr.Row():
                    new_name = gr.Textbox(label="New name", max_lines=1, max_length=80, min_width=140)
                    rename = gr.Button("Rename", size="sm", min_width=80)
                with gr.Row():
                    download = gr.Button("Download", size="sm", min_width=80)
                    delta = gr.Button("Download style delta", size="sm", min_width=80)
                    onnx = gr.Button("Download as ONNX", size="sm", min_width=80)
                    delete = gr.Button("Delete...", size="sm", variant="stop", min_width=80)
                    confirm = gr.Button("Yes, delete it", size="sm", variant="stop", visible=False, min_width=80,
                                        elem_id="library-confirm")
                files = gr.File(label="Files", interactive=False, file_count="multiple", visible=False)
            with gr.Column(min_width=280):
                upload = gr.File(label="Import a generator or a style delta (.pt, .pkl, .safetensors, .nada.safetensors)",
                                 file_types=[".pt", ".pkl", ".safetensors"], elem_id="library-import")
                import_base = gr.Dropdown([(studio.base_label(n), n) for n in studio.base_names()],
                                          value=studio.default_base(), label="It was adapted from", allow_custom_value=True)  # names are checked on the server
                import_btn = gr.Button("Import", size="sm")
                check_weights = gr.Button("Check downloaded weights (repair damaged files)", size="sm")
        message = gr.HTML("", elem_id="library-message")
    changed = gr.State(0)   # set only when the library changed: the other tabs refresh on it, not on a refusal

    outs = [message, listing, thumbs, pick, usage, changed]

    # every action answers in the message line (refusals too); the table, pictures and picker only change on success
    shown = dict(show_progress_on=[message])
    rename.click(bind(studio, do_rename), [pick, new_name], outs, api_name="library_rename", **shown)
    delete.click(bind(studio, ask), pick, [message, confirm], api_visibility="private", show_progress="hidden")
    confirm.click(bind(studio, do_delete), pick, [*outs, confirm], api_name="library_delete", **shown)
    download.click(bind(studio, do_download), pick, [message, files], api_name="library_download", **shown)
    delta.click(bind(studio, do_delta), pick, [message, files], api_name="library_delta", concurrency_id="device",
                concurrency_limit=1, **shown)
    onnx.click(bind(studio, do_onnx), pick, [message, files], api_name="library_onnx", concurrency_id="device",
               concurrency_limit=1, **shown)
    check_weights.click(bind(studio, do_check_weights), None, message, api_name="weights_check", concurrency_id="downloads",
                        concurrency_limit=1, **shown)
    import_btn.click(bind(studio, do_import), [upload, import_base], outs, api_name="library_import",
                                concurrency_limit=1, concurrency_id="device", **shown)
    return listing, thumbs, pick, usage, changed


def refreshed(studio: Studio, text: str, state: str = "done"):
    gr.Info(re.sub(r"</?b>|\*\*", "", text))
    ids = [e.id for e in studio.library()]
    return (progress_html(None, text, state), table(studio), thumbnails(studio), gr.update(choices=ids, value=None),
            usage_text(studio), time.monotonic_ns())


@refused_in(0, 6)
def do_rename(studio: Studio, model_id, name):
    reserved = [e.id for e in studio.library() if e.kind != "run"]
    new_id = rename_model(studio.library_root, model_id, name, reserved)
    return refreshed(studio, f"Renamed to **{new_id}**.")


@refused_in(0, 2)
def ask(studio: Studio, model_id):
    if not model_id:
        raise gr.Error("choose a model first")
    entry = studio.entry(model_id)
    return progress_html(None, f"Delete **{entry.name}** for good? Press *Yes, delete it*.", "warn"), gr.update(visible=True)


@refused_in(0, 7)
def do_delete(studio: Studio, model_id):
    entry = studio.entry(model_id)
    if entry.kind != "run":
        raise gr.Error(f"{entry.name} is a downloaded ready style; remove it from weights/ to delete it")
    delete_model(studio.library_root, model_id)
    return (*refreshed(studio, f"Deleted **{entry.name}**."), gr.update(visible=False))


@refused_in(0, 2)
def do_download(studio: Studio, model_id):
    entry = studio.entry(model_id)
    if entry.kind != "run":
        raise gr.Error(f"{entry.name} is a ready style: its source is listed in weights/manifest.json")
    pt = entry.path.parent / f"{entry.id}.pt"
    if not pt.is_file():  # imports, mixes and kept snapshots get their rosinality file on first download
        export_rosinality(studio.model(model_id), pt)
    files = [named_copy(entry.path, f"{entry.id}.safetensors"), named_copy(pt, pt.name)]
    return progress_html(None, f"**{entry.name}**: the files are below.", "done"), gr.update(value=files, visible=True)


@refused_in(0, 2)
def do_delta(studio: Studio, model_id):
    """Only the trained layers' difference from the base (fp16) with the base's fingerprint: a few MB
    to share instead of the whole generator."""
    entry = studio.entry(model_id)
    folder = Path(tempfile.mkdtemp(prefix="nada_delta_"))
    meta = {"source_model": entry.base, "recipe": entry.recipe, "name": entry.name}
    try:
        path = export_delta(studio.model(model_id), studio.base(entry.base), meta,
                            folder / f"{entry.name}.nada.safetensors")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return (progress_html(None, f"The style delta of **{entry.name}** is below (only its trained layers' difference "
                          "from the base).", "done"), gr.update(value=[str(path)], visible=True))


@refused_in(0, 2)
def do_onnx(studio: Studio, model_id):
    """The model's synthesis network from W+ and its mapping network from z, as two ONNX files (noise baked in,
    any batch size) to run with ONNX Runtime, outside Python too."""
    entry = studio.entry(model_id)
    G = studio.model(model_id)
    folder = Path(tempfile.mkdtemp(prefix="nada_onnx_"))
    paths = [export_onnx(G, folder / f"{entry.name}.synthesis.onnx"),
             export_onnx(G, folder / f"{entry.name}.mapping.onnx", mapping=True)]
    return (progress_html(None, f"**{entry.name}** as ONNX: the synthesis network (input ws, {G.n_latent} x "
                          f"{G.style_dim}) and the whole generator from z; README: Run a style outside Python.",
                          "done"), gr.update(value=[str(p) for p in paths], visible=True))


@refused_in(0, 1)
def do_check_weights(studio: Studio, progress=gr.Progress()):
    results = weights.repair(progress=lambda name, done, total: progress(done / total if total else 0,
                                                                         desc=f"fetching {name} again"))
    if not results:
        return progress_html(None, "No downloaded weights to check yet.", "idle")
    bad = [f"{n}: {r}" for n, r in results if r not in ("ok",)]
    text = f"{len(results)} file(s) checked; " + ("all verified." if not bad else "; ".join(bad) + ".")
    return progress_html(None, text, "done" if not any("failed" in b for b in bad) else "warn")


@refused_in(0, 6)
def do_import(studio: Studio, file, base_name, progress=gr.Progress()):
    if not file:
        raise gr.Error("choose a generator file to import")
    upload_path = Path(file)
    display = upload_path.name
    base = studio.base(base_name)
    progress(0.3, desc=f"checking {display}")
    folder = import_file(studio.library_root, upload_path, display, base_name, base, MAX_IMPORT_BYTES,
                         lambda G: thumbnail(base, G.to(studio.device)))
    return refreshed(studio, f"Imported **{display}** as **{folder.name}**.")
