"""Small UI helpers shared by the tabs: user-facing errors (no server paths, one log line each),
checked numbers, the progress line, the untrained-model banner and the 'get started' panel."""
from __future__ import annotations

import functools
import hashlib
import html
import inspect
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr
import gradio.utils as gradio_utils
from PIL import Image

from nada_core.faces.align import FaceError
from nada_core.guidance.clip_guide import ClipLoadError, PromptError
from nada_core.latent.editing import DirectionError
from nada_core.store import weights
from nada_core.store.checkpoints import CheckpointError
from nada_core.store.packs import download_pack, load_packs, missing_assets, pack_size
from nada_core.training.timefmt import fmt_seconds  # noqa: F401 (re-exported: the tabs take it from here)

from .state import TINY_BANNER, Studio

log = logging.getLogger("nada_studio")
EXPECTED = (ValueError, weights.WeightsError, FaceError, CheckpointError, ClipLoadError, PromptError,
            DirectionError, OSError, KeyError)


def scrub(message: str) -> str:
    """Remove server paths from a message: the repo and library folders become relative, an upload's
    temporary folder disappears (users know their files by name), other absolute paths keep their last part."""
    parts = URL.split(message)   # URLs (odd parts) are meant to be shown whole
    return "".join(part if i % 2 else _scrub_paths(part) for i, part in enumerate(parts))


URL = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s'\"<>()]*[^\s'\"<>().,;:!?])")


def _scrub_paths(message: str) -> str:
    roots = sorted({str(weights.REPO_ROOT), str(weights.weights_dir().parent)}, key=len, reverse=True)
    for root in roots:
        message = message.replace(root + "/", "")
    tmp = re.escape(tempfile.gettempdir())
    message = re.sub(tmp + r"/[^\s'\"]*/([^/\s'\"]+)", r"\1", message)
    return re.sub(r"(?<![\w.:])/(?:[\w.+-]+/)+([\w.+-]+)", r"\1", message)


def _as_gr_error(e: Exception, where: str) -> gr.Error:
    """Expected user errors are logged in one line (Gradio's own traceback print is switched off);
    only unexpected ones get a traceback, once, in our log."""
    if isinstance(e, gr.Error):
        log.info("%s: %s", where, e.message if hasattr(e, "message") else e)
        e.print_exception = False
        return e
    if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
        log.warning("%s: disk full", where)
        return gr.Error("The disk is full: nothing was lost, but free some space and try again.", print_exception=False)
    if isinstance(e, EXPECTED):
        message = scrub(str(e))
        log.info("%s: %s: %s", where, type(e).__name__, message)
        return gr.Error(message, print_exception=False)
    log.error("unexpected error in %s\n%s", where, traceback.format_exc())
    return gr.Error(f"Something went wrong ({type(e).__name__}: {scrub(str(e))[:300]}). Details are in the server log.",
                    print_exception=False)


def friendly(fn):
    """Turn any failure in a handler into a visible message instead of a stack trace or silence."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise _as_gr_error(e, fn.__name__) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise _as_gr_error(e, fn.__name__) from None
    return wrapper


REVEAL_JS = """() => {
  const e = document.getElementById(%s);
  if (!e) return;
  const r = e.getBoundingClientRect();
  if (r.top < 0 || r.top + Math.min(r.height, window.innerHeight - 16) > window.innerHeight) {
    window.scrollTo(0, window.scrollY + r.top - 8);   // all of it in view (its top, where taller than the window)
  }
}"""


def reveal(event, elem_id: str) -> None:
    """Bring an action's result (the element ``elem_id``) into view when it is not: on a phone results sit below
    the controls, and an action inside an accordion often sits below its result. ``event`` is the trigger's
    listener (``button.click``, ``handler_event.then``); this runs in the page only."""
    event(None, None, None, js=REVEAL_JS % json.dumps(elem_id), api_visibility="private", show_progress="hidden")


def bind(studio: Studio, handler: Callable) -> Callable:
    """A module-level handler ``handler(studio, ...)`` as the event function Gradio calls: the studio is given,
    and the signature Gradio reads (its inputs, ``gr.Request``, generator or not) is the rest of the handler's."""
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def bound(*args, **kwargs):
            yield from handler(studio, *args, **kwargs)
    else:
        @functools.wraps(handler)
        def bound(*args, **kwargs):
            return handler(studio, *args, **kwargs)
    signature = inspect.signature(handler)
    bound.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    return bound


def enlarged(img, size: tuple[int, int]):
    """``img`` at ``size`` for a side-by-side view: a small model's picture scaled up by whole pixels (kept sharp),
    a larger one resampled."""
    if img.size == tuple(size):
        return img
    sharp = size[0] % img.width == 0 and size[1] % img.height == 0
    return img.resize(tuple(size), Image.NEAREST if sharp else Image.LANCZOS)


def number(value, field: str, lo: float, hi: float, integer: bool = True):
    """A number from a client (any JSON value) checked against its field's range; the message names the field."""
    kind = "a whole number" if integer else "a number"
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{field} must be {kind} between {lo:g} and {hi:g}") from None
    if not math.isfinite(x) or not lo <= x <= hi or (integer and x != int(x)):
        raise gr.Error(f"{field} must be {kind} between {lo:g} and {hi:g} (got {str(value)[:30]})")
    return int(x) if integer else x


def choice(value, field: str, allowed: tuple, default=None):
    """One of the server's options as a client sent it (``None`` = ``default`` where one is given); the message
    names the field and the options."""
    value = default if value is None and default is not None else value
    if value not in allowed:
        raise gr.Error(f"{field}: choose one of {', '.join(map(str, allowed))}")
    return value


def image_file(img, format: str = "png", name: str = "image", live: bool = False) -> str:
    """An output image written once, atomically, in Gradio's cache folder (named by its content's hash), from
    where Gradio serves it as is. Returning the PIL image instead makes Gradio rewrite <cache>/<hash>/image.png
    in place for every identical result, and a download of the same file running meanwhile is cut short
    ('Too little data for declared Content-Length'; see bench/load.py). ``live``: a picture shown during a run,
    compressed lightly, since its encoding takes CPU from the training beside it."""
    buf = io.BytesIO()
    img.save(buf, format=format, **({"compress_level": 1} if live and format == "png" else {}))
    data = buf.getvalue()
    folder = Path(gradio_utils.get_upload_folder()) / "nada_outputs" / hashlib.sha256(data).hexdigest()[:32]
    path = folder / f"{name}.{format}"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=folder, prefix=".part-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, path)
    return str(path)


def named_copy(path, filename: str) -> str:
    """``path`` offered for download under ``filename`` (a hard link in a fresh temporary folder, else a copy):
    every model's weights file is called final.safetensors on disk, which would make downloads collide."""
    import shutil

    target = Path(tempfile.mkdtemp(prefix="nada_download_")) / filename
    try:
        try:
            os.link(path, target)
        except OSError:
            shutil.copy(path, target)
    except BaseException:   # a full disk: no half copy, no empty folder
        shutil.rmtree(target.parent, ignore_errors=True)
        raise
    return str(target)


def progress_html(fraction: float | None, text: str, state: str = "run") -> str:
    """The one progress display of a tab: a bar (when a fraction is known) and a short status line."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))  # **name** -> bold, after escaping
    bar = ""
    if fraction is not None:
        pct = max(0.0, min(1.0, fraction)) * 100
        bar = f'<div class="nada-bar"><div style="width:{pct:.1f}%"></div></div>'
    return f'<div class="nada-status nada-{state}">{bar}<span>{text}</span></div>'


def banner(studio: Studio) -> None:
    if studio.tiny:
        gr.Markdown(TINY_BANNER, elem_classes=["tiny-banner"])


def launch_command(args: str) -> str:
    """A command that works when pasted: the interpreter that runs this app, not a bare ``python``."""
    return f"{sys.executable} -m nada_core {args}"


# ------------------------------------------------------------------ get started
def _pack_line(pack) -> str:
    missing = missing_assets(pack)
    if not missing:
        return f"**{pack.label}**: ready."
    size, unknown = pack_size(pack)
    shown = f"{size / 2 ** 30:.1f} GB" if size >= 2 ** 30 else f"{size / 2 ** 20:.0f} MB"
    if unknown and not size:
        shown = "size unknown (no answer from the servers: offline?)"
    elif unknown:
        shown += f" + {unknown} file(s) of unknown size"
    return f"**{pack.label}** ({len(missing)} files, {shown}): {pack.unlocks}."


NEXT_STEP = ("Press the button again to resume, or download the files by hand (URLs and target paths below) "
             "and reload the page.")


def by_hand_text(studio: Studio) -> str:
    rows = ["| file | URL | save as |", "|---|---|---|"]
    for a in studio.missing(("generator", "clip", "encoder", "style")):
        how = a.url or a.how_to_get()
        rows.append(f"| `{a.name}` | {how} | `{scrub(str(a.path))}` |")
    cmd = launch_command("weights download ffhq-256 clip-ViT-B-32 clip-ViT-B-16")
    return ("Download from a terminal (resumes, verifies):\n\n```\n" + cmd + "\n```\n\nor fetch the files by hand "
            "and save them where the table says, then reload this page:\n\n" + "\n".join(rows))


def get_started(studio: Studio):
    """Shown instead of a wall of paths when the base model or CLIP is missing: one button per starter
    pack with its size and what it unlocks, one combined progress, and the by-hand route collapsed."""
    needed = studio.missing(("generator", "clip"))
    packs = load_packs()
    with gr.Group(visible=bool(needed) and not studio.tiny, elem_id="get-started") as panel:
        gr.Markdown(f"**Get started:** download a starter pack (StyleGAN2 + CLIP, verified, into `weights/`), or try "
                    f"everything offline with `{sys.executable} app.py --tiny` (tiny untrained models).")
        lines = gr.Markdown("\n\n".join(_pack_line(p) for p in packs.values()))
        with gr.Row():
            buttons = {n: gr.Button(f"Download the {p.label}", variant="primary" if n == "cpu" else "secondary",
                                    elem_id=f"pack-{n}") for n, p in packs.items()}
        status = gr.HTML("", elem_id="pack-status")
        with gr.Accordion("By hand (URLs and target paths)", open=False):
            gr.Markdown(by_hand_text(studio))

    def fetch(name):
        pack = packs[name]
        try:
            for kind, value in run_with_progress(lambda report: download_pack(pack, report),
                                                 lambda u: progress_html(u[0], u[1])):
                if kind == "progress":
                    yield value, gr.update()
        except Exception as e:  # noqa: BLE001 - a lasting status in the panel says what failed and what to do
            yield progress_html(None, f"{pack.label}: not downloaded. {_as_gr_error(e, 'download_pack').message} "
                                f"{NEXT_STEP}", "warn"), gr.update()
            return
        yield (progress_html(1.0, f"{pack.label}: done. Reload the page to use the new models.", "done"),
               "\n\n".join(_pack_line(p) for p in packs.values()))

    for name, button in buttons.items():
        button.click(functools.partial(fetch, name), None, [status, lines], api_visibility="private",
                     show_progress="hidden", concurrency_id="downloads", concurrency_limit=1)
    return panel


def optional_download(studio: Studio, kinds: tuple[str, ...], what: str):
    """One quiet line with a button for optional files of a tab (directions, the e4e encoder, ready styles)."""
    missing = [a for a in studio.missing(kinds) if a.url]
    with gr.Row(visible=bool(missing) and not studio.tiny, elem_classes=["nada-optional"]) as row:
        gr.Markdown(f"Optional: {what} ({len(missing)} file(s) not downloaded).")
        go = gr.Button("Download", size="sm", scale=0, min_width=110)
        status = gr.HTML("")

    def fetch(progress=gr.Progress()):
        todo = [a for a in studio.missing(kinds) if a.url]
        try:
            for i, asset in enumerate(todo):
                weights.download(asset, progress=lambda d, t, a=asset, i=i: progress(
                    (i + (d / t if t else 0)) / len(todo), desc=f"{a.name} ({i + 1}/{len(todo)})"))
        except Exception as e:  # noqa: BLE001 - a lasting status beside the button
            return progress_html(None, f"Not downloaded. {_as_gr_error(e, 'optional_download').message} {NEXT_STEP}",
                                 "warn")
        return progress_html(1.0, f"{len(todo)} file(s) downloaded; reload the page to use them.", "done")

    go.click(fetch, None, status, api_visibility="private", show_progress_on=[status],
             concurrency_id="downloads", concurrency_limit=1)
    return row


class Slider(gr.Slider):
    """gr.Slider whose own range check names the field ("Batch: Value 1e9 is greater than ...") and logs one
    line instead of a traceback: clients can send any number through the API."""

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error as e:
            log.info("refused %s: %s", self.label, e.message)
            raise gr.Error(f"{self.label}: {e.message}", print_exception=False) from None


def run_with_progress(work: Callable[[Callable], object], describe: Callable[[tuple], str],
                      cancel: threading.Event | None = None, every: float = 0.5) -> Iterator[tuple]:
    """Run ``work(report)`` in a thread; ``report(*progress)`` may raise to cancel. Yields
    ('progress', html) while it runs and ('result', value) at the end (re-raising its error)."""
    updates, result = [], {}

    def report(*args):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        updates.append(args)

    def target():
        try:
            result["value"] = work(report)
        except BaseException as e:  # noqa: BLE001 - handed back to the handler's thread
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(every)
        if updates:
            yield "progress", describe(updates[-1])
    if "error" in result:
        raise result["error"]
    yield "result", result.get("value")


class Cancelled(Exception):
    """Raised inside a job's progress report once the user pressed Cancel."""


def refused_in(index: int, n_outputs: int, prefix: str = ""):
    """A refusal (bad input, a busy device, a missing file: anything the user can fix) answers in the output
    ``index``, the handler's message area, and as a toast, and leaves its other outputs as they were, so no
    component of the panel turns into an error placeholder. Unexpected failures still raise."""
    def answer(e: Exception, where: str) -> tuple:
        error = _as_gr_error(e, where)
        if error.message.startswith("Something went wrong"):
            raise error
        gr.Warning(error.message)
        updates = [gr.update()] * n_outputs
        text = error.message if error.message.startswith("Already") else prefix + error.message
        updates[index] = progress_html(None, text, "warn")
        return tuple(updates) if n_outputs > 1 else updates[0]

    def wrap(fn):
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - sorted by answer()
                    yield answer(e, fn.__name__)
            return gen

        @functools.wraps(fn)
        def plain(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - sorted by answer()
                return answer(e, fn.__name__)
        return plain
    return wrap


def status_on_error(index: int, n_outputs: int):
    """For a streaming handler whose output ``index`` is its tab's status line: a refusal says
    'Not started: ...' there (never leaving it at 'Starting...') and as a toast."""
    return refused_in(index, n_outputs, prefix="Not started: ")
