"""Video tab: a clip's faces through the chosen styles (the clip checked from its header before anything
runs; one MP4 per style, sound kept), in the studio's device slot as training is, with a live preview and
a Stop that keeps the frames done; and live stylisation from the webcam, one style at a time, each visitor
with their own tracker and codes (the previous frame's code starts the next frame's inversion)."""
from __future__ import annotations

import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
import gradio.utils as gradio_utils
import numpy as np
from PIL import Image

from nada_core.faces.video import ClipResult, VideoStyliser, output_paths, stylize_clip
from nada_core.store.clips import ClipLimits, probe

from .sample_tab import model_choices
from .state import Studio
from .ui import Slider, bind, fmt_seconds, friendly, image_file, number, progress_html, status_on_error

LIMITS = ClipLimits(max_bytes=100 * 2 ** 20, max_seconds=30.0, max_frames=900, max_side=1920)
POLL_SECONDS = 0.25
PREVIEW_SECONDS = 1.0          # the preview image is refreshed at most this often
STREAM_EVERY = 0.2             # seconds between webcam frames the browser sends
WEBCAM_STEPS, WEBCAM_FIRST_STEPS = 2, 20
N_OUTPUTS = 4                  # status, preview, video, files


@dataclass
class JobView:
    """What the page shows of a video job; ``unit`` makes the other tabs say 'frame x/y' while it holds the slot."""

    state: str                 # running | stopping | done | cancelled | error
    step: int
    total: int
    frames_per_second: float = 0.0
    faces: int = 0
    preview: object = None     # the latest frame done (first style), an RGB array
    version: int = 0
    unit: str = "frame"

    @property
    def ended(self) -> bool:
        return self.state in ("done", "cancelled", "error")


class VideoJob:
    """``stylize_clip`` in its own thread, so the device is never waiting for the browser; the page polls
    :meth:`view`. ``stop`` asks it to finish the frames done; ``on_end`` (freeing the device slot) runs in
    its thread once the files are closed."""

    def __init__(self, path, info, styliser: VideoStyliser, outputs: dict, display_name: str, on_end=None):
        self._args = (path, info, styliser, outputs, display_name)
        self._stop, self._lock, self._on_end = threading.Event(), threading.Lock(), on_end
        self._view = JobView("running", 0, info.frames)
        self.result: ClipResult | None = None
        self.error: BaseException | None = None

    def start(self) -> "VideoJob":
        threading.Thread(target=self._work, daemon=True, name="nada-video").start()
        return self

    def _work(self) -> None:
        path, info, styliser, outputs, name = self._args
        try:
            self.result = stylize_clip(path, info, styliser, outputs, progress=self._progress, stop=self._stop,
                                       limits=LIMITS, display_name=name)
            self._set(state="cancelled" if self.result.cancelled else "done")
        except BaseException as e:  # noqa: BLE001 - handed to the page
            self.error = e
            self._set(state="error")
        finally:
            if self._on_end:
                self._on_end(self)

    def _progress(self, p) -> None:
        self._set(step=p.done, total=p.total, frames_per_second=p.frames_per_second, faces=p.faces, preview=p.preview)

    def _set(self, **changes) -> None:
        with self._lock:
            self._view = replace(self._view, **changes, version=self._view.version + 1)

    def view(self) -> JobView:
        with self._lock:
            return self._view

    @property
    def ended(self) -> bool:
        return self.view().ended

    def stop(self) -> bool:
        """Finish after the current frame; False if the job has ended."""
        if self.ended:
            return False
        self._stop.set()
        self._set(state="stopping")
        return True

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ended and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.02)
        return self.ended


def limits_text(limits: ClipLimits = LIMITS) -> str:
    return (f"Clips up to {limits.max_seconds:g} s, {limits.max_frames} frames, {limits.max_side} px on the long side "
            f"and {limits.max_bytes >> 20} MB. Faces are tracked, inverted and stylised frame by frame; frames "
            "without a face stay as they are; the sound is kept. One MP4 per style.")


def build(studio: Studio):
    base_default = studio.default_base()
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            gr.Markdown(limits_text(), elem_classes=["nada-small"])
            # a file input, not gr.Video: a corrupt or oversized upload must reach our checks, which explain it
            upload = gr.File(label="Your clip (MP4, MOV, WebM)", file_types=["video"], elem_id="video-upload",
                             height=110)
            with gr.Row():
                base = gr.Dropdown([(studio.base_label(n), n) for n in studio.base_names()], value=base_default,
                                   label="Base model", min_width=140, allow_custom_value=True)  # checked on the server
                styles = gr.Dropdown(model_choices(studio, base_default), multiselect=True, label="Styles to apply",
                                     elem_id="video-styles", min_width=140, allow_custom_value=True)  # ids, checked
            steps = Slider(1, 30, value=5, step=1, label="Optimisation steps a frame (when no encoder fits the base)")
            colours = Slider(0, 1, value=0, step=0.05, label="Keep my photo's colours (video and webcam; 0 = the style's)",
                             elem_id="video-colours")
            with gr.Row():
                go = gr.Button("Stylise the video", variant="primary", elem_id="video-go", min_width=100)
                stop = gr.Button("Stop", elem_id="video-stop", min_width=100)
        with gr.Column(scale=3, min_width=300):
            status = gr.HTML(progress_html(None, "Upload a clip with a visible face.", "idle"), elem_id="video-status")
            preview = gr.Image(label="Latest frame done (first style)", type="filepath", interactive=False, height=240)
            result = gr.Video(label="Result (first style)", interactive=False, height=300, elem_id="video-result")
            files = gr.File(label="Every style (MP4)", file_count="multiple", interactive=False, height=120)
    with gr.Accordion("Live from your webcam (one style)", open=False, elem_id="video-webcam"):
        gr.Markdown("Your camera's frames go through the same pipeline (tracking, inversion started at the previous "
                    f"frame's code, {WEBCAM_STEPS} steps a frame without an encoder). It pauses while someone's "
                    "training or video holds the device.", elem_classes=["nada-small"])
        cam_style = gr.Dropdown(model_choices(studio, base_default), label="Style", elem_id="video-cam-style",
                                allow_custom_value=True)
        with gr.Row():
            cam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Camera", elem_id="video-cam")
            live = gr.Image(label="Stylised", type="filepath", interactive=False, elem_id="video-live")
        rate = gr.Markdown("", elem_id="video-rate")
    cam_state = gr.State(None)

    go.click(bind(studio, before_start), None, status, api_visibility="private", show_progress="hidden").success(
        bind(studio, run), [upload, base, styles, steps, colours], [status, preview, result, files], api_name="video", concurrency_limit=1,
        concurrency_id="device", show_progress="minimal", show_progress_on=[status], scroll_to_output=True)
    stop.click(bind(studio, stop_video), None, status, api_name="video_stop", show_progress="hidden")
    cam.stream(bind(studio, live_frame), [cam, base, cam_style, cam_state, colours], [live, rate, cam_state], api_name="webcam",
               stream_every=STREAM_EVERY, time_limit=600, concurrency_limit=1, concurrency_id="webcam",
               show_progress="hidden")
    base.change(bind(studio, on_base), base, [styles, cam_style], api_visibility="private", show_progress="hidden")
    for box in (styles, cam_style):   # models trained since the page opened
        box.focus(lambda b: gr.update(choices=model_choices(studio, b)), base, box, api_visibility="private",
                  show_progress="hidden")
    return base, styles


def checked_styles(studio: Studio, base_name, ids) -> list:
    ids = [i for i in (ids or []) if i]
    for e in (studio.entry(i) for i in ids):
        if e.base != base_name:
            raise gr.Error(f"'{e.name}' was adapted from {e.base}, not {base_name}; choose styles of one base")
    return ids


def inverter(studio: Studio, base_name):
    """(encoder or None, perceptual losses, note) for this base."""
    enc, why = studio.e4e(base_name)
    return (enc, {}, "e4e") if enc is not None else (None, studio.perceptual()[0], why)


@friendly
def before_start(studio: Studio, request: gr.Request):
    """Answers at once, outside the device queue: who holds the device, and that this video waits for it."""
    active = studio.active_run()
    if active and active[1] == _session(request):
        raise gr.Error(f"Already running ({studio.training_status()}). Press Stop to end it first.")
    if active:
        return progress_html(None, f"Waiting: another visitor holds the device ({studio.training_status()}); "
                                   "your video starts when it is free.", "wait")
    return progress_html(0, "Checking the clip...", "run")


@status_on_error(0, N_OUTPUTS)
@friendly
def run(studio: Studio, file, base_name, ids, n_steps, colours=0.0, request: gr.Request = None):
    session = _session(request)
    if studio.is_training(session):
        raise gr.Error(f"Already running ({studio.training_status()}).")
    if not file:
        raise gr.Error("upload a clip first (MP4, MOV or WebM with a visible face)")
    path = Path(file)
    name = path.name
    info = probe(path, LIMITS, name)   # refused here, before a model is loaded or a frame decoded
    G = studio.base(base_name)
    ids = checked_styles(studio, base_name, ids)
    if not ids:
        raise gr.Error("choose at least one style")
    n = number(n_steps, "Optimisation steps a frame", 1, 30)
    enc, perceptual, how = inverter(studio, base_name)
    models = {studio.entry(i).name: studio.model(i) for i in ids}
    styliser = VideoStyliser(G, models, enc, steps=n, perceptual=perceptual, fps=float(info.fps),
                             keep_colours=number(colours or 0, "Keep my photo's colours", 0, 1, integer=False))
    folder = Path(tempfile.mkdtemp(prefix="video-", dir=_outputs_root()))
    outputs = output_paths(folder / f"{path.stem}-stylised.mp4", list(models))
    job = VideoJob(path, info, styliser, outputs, name, on_end=studio.finish_training)
    studio.start_job(job, session)
    job.start()
    what = f"{info.frames} frames, {len(models)} style(s), inversion: {styliser.method}" + (
        f" ({how})" if enc is None and how else "")
    yield progress_html(0, f"Stylising {name}: {what}...", "run"), None, None, None
    shown, shown_at = -1, 0.0
    try:
        while not job.ended:
            time.sleep(POLL_SECONDS)
            view = job.view()
            if view.version == shown:
                continue
            shown = view.version
            img = gr.update()
            if view.preview is not None and time.monotonic() - shown_at >= PREVIEW_SECONDS:
                img, shown_at = image_file(Image.fromarray(view.preview), "jpeg", "frame"), time.monotonic()
            yield progress_html(view.step / max(1, view.total), _status(view), "warn" if view.state == "stopping"
                                else "run"), img, gr.update(), gr.update()
    except GeneratorExit:   # the page went away: stop, keeping what is done
        job.stop()
        raise
    if job.error is not None:
        raise job.error
    res = job.result
    paths = [str(p) for p in res.outputs.values()]
    text = f"{res.message[0].upper()}{res.message[1:]}." + (" The clip has no sound." if not info.audio else "")
    last = job.view().preview
    yield (progress_html(res.done / max(1, res.total), text, "warn" if res.cancelled else "done"),
           image_file(Image.fromarray(last), "jpeg", "frame") if last is not None else gr.update(),
           paths[0] if paths else None, paths or None)


def stop_video(studio: Studio, request: gr.Request):
    if studio.cancel_training(_session(request)):
        return progress_html(None, "Stopping after the current frame; the frames done are kept...", "warn")
    return gr.update()


@friendly
def live_frame(studio: Studio, frame, base_name, style_id, state, colours=0.0, request: gr.Request = None):
    """One webcam frame through the chosen style with this visitor's tracker and codes."""
    if frame is None:
        return gr.update(), gr.update(), state
    if not style_id:
        return _shown(frame), "Choose a style to see yourself in it.", state
    active = studio.active_run()
    if active:
        return _shown(frame), (f"Paused: the device is busy ({studio.training_status()}); the camera resumes when it "
                       "is free."), state
    key = (base_name, style_id)
    if state is None or state["key"] != key:
        G = studio.base(base_name)
        (style_id,) = checked_styles(studio, base_name, [style_id])
        enc, _, _ = inverter(studio, base_name)
        styliser = VideoStyliser(G, {style_id: studio.model(style_id)}, enc, steps=WEBCAM_STEPS,
                                 first_steps=WEBCAM_FIRST_STEPS, fps=1 / STREAM_EVERY)
        state = {"key": key, "styliser": styliser, "done": deque(maxlen=10)}
    start = time.perf_counter()
    state["styliser"].keep_colours = number(colours or 0, "Keep my photo's colours", 0, 1, integer=False)
    out = state["styliser"](frame, time.monotonic())
    took = time.perf_counter() - start
    state["done"].append(time.monotonic())
    return _shown(out.frames[style_id]), _rate(state["done"], took, out.faces), state


def _shown(frame: np.ndarray) -> str:
    """A webcam frame through the one atomic output path (lossless, lightly compressed: it is live)."""
    return image_file(Image.fromarray(np.ascontiguousarray(frame)), name="webcam", live=True)


@friendly
def on_base(studio: Studio, base_name):
    choices = model_choices(studio, base_name)
    return gr.update(choices=choices, value=[]), gr.update(choices=choices, value=None)


def _status(view: JobView) -> str:
    if view.state == "stopping":
        return f"Stopping after the current frame... ({view.step}/{view.total} done)"
    if not view.step:
        return "Starting: the first frame inverts each face from scratch..."
    left = (view.total - view.step) / view.frames_per_second if view.frames_per_second > 0 else None
    return (f"Frame {view.step}/{view.total} · {view.frames_per_second:.2f} frames/s · {view.faces} face(s) · "
            f"about {fmt_seconds(left)} left")


def _rate(done: deque, took: float, faces: int) -> str:
    """Frames/s over the last frames this visitor got back, and this frame's own time."""
    fps = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else 0.0
    return f"**{fps:.1f} frames/s** · {took * 1000:.0f} ms this frame · {faces} face(s)"


def _outputs_root() -> Path:
    root = Path(gradio_utils.get_upload_folder()) / "nada_outputs"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _session(request: gr.Request | None) -> str:
    return request.session_hash if request else ""
