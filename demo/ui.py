"""Small UI helpers shared by the tabs: user-facing errors, the untrained-model banner, and the
'what is missing' panel with a download button."""
from __future__ import annotations

import functools
import inspect
import logging
import traceback

import gradio as gr

from nada_core import weights
from nada_core.align import FaceError
from nada_core.checkpoints import CheckpointError
from nada_core.clip_guide import ClipLoadError, PromptError
from nada_core.editing import DirectionError

from .state import TINY_BANNER, Studio

log = logging.getLogger("nada_studio")
EXPECTED = (ValueError, weights.WeightsError, FaceError, CheckpointError, ClipLoadError, PromptError,
            DirectionError, OSError, KeyError)


def _as_gr_error(e: Exception) -> gr.Error:
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
        return gr.Error("The disk is full: nothing was lost, but free some space and try again.")
    if isinstance(e, EXPECTED):
        return gr.Error(str(e))
    log.error("unexpected error\n%s", traceback.format_exc())
    return gr.Error(f"Something went wrong ({type(e).__name__}: {e}). Details are in the server log.")


def friendly(fn):
    """Turn any failure in a handler into a visible message instead of a stack trace or silence."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise _as_gr_error(e) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise _as_gr_error(e) from None
    return wrapper


def banner(studio: Studio) -> None:
    if studio.tiny:
        gr.Markdown(TINY_BANNER, elem_classes=["tiny-banner"])


GROUPED = {"direction": "Latent directions (optional)"}   # many small files: one line, one button


def missing_text(studio: Studio, kinds: tuple[str, ...], why: str) -> str:
    missing = studio.missing(kinds)
    if not missing:
        return ""
    lines = [f"**Missing for {why}:**"]
    for a in missing:
        if a.kind not in GROUPED:
            lines.append(f"- {a.label or a.name} (`{a.name}`): {a.how_to_get()}")
    for kind, label in GROUPED.items():
        n = sum(a.kind == kind for a in missing)
        if n:
            lines.append(f"- {label}: {n} files, `python -m nada_core weights download --kind {kind}` "
                         "or the button below")
    return "\n".join(lines)


def _download_choices(missing) -> list[tuple[str, str]]:
    choices = [(a.label or a.name, a.name) for a in missing if a.url and a.kind not in GROUPED]
    for kind, label in GROUPED.items():
        n = sum(a.kind == kind and bool(a.url) for a in missing)
        if n:
            choices.append((f"{label}: all {n} files", f"kind:{kind}"))
    return choices


def missing_panel(studio: Studio, kinds: tuple[str, ...], why: str):
    """Markdown listing what is missing plus a dropdown + button to download it with progress."""
    missing = studio.missing(kinds)
    with gr.Group(visible=bool(missing)) as group:
        info = gr.Markdown(missing_text(studio, kinds, why))
        with gr.Row():
            choices = _download_choices(missing)
            pick = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Download", scale=3)
            go = gr.Button("Download", scale=1)

    @friendly
    def download(name, progress=gr.Progress()):
        if not name:
            raise gr.Error("choose what to download")
        if name.startswith("kind:"):
            assets = [a for a in studio.missing((name[5:],)) if a.url]
        else:
            assets = [weights.get_asset(name)]
        for i, asset in enumerate(assets):
            weights.download(asset, progress=lambda d, t, a=asset: progress(
                (d / t) if t else 0, desc=f"{a.name} ({i + 1}/{len(assets)}): {d >> 20} MiB"))
        gr.Info(f"downloaded {len(assets)} file(s) to {weights.weights_dir()}")
        return missing_text(studio, kinds, why)

    go.click(download, pick, info, api_visibility="private")
    return group
