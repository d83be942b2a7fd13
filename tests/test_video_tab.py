"""The Video tab's handlers through gradio_client against the app on the tiny models (no browser)."""
import time
from types import SimpleNamespace

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from nada_core.models.tiny import tiny_generator
from nada_core.store.checkpoints import save_generator
from nada_core.store.clips import probe, read_frames
from nada_core.store.runs import RunFolder
from tests.app_server import launch_tiny, refusal
from tests.clips import face_chroma_gap, moving_face, no_face, patched_frame_count, write_clip


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    lib = tmp_path_factory.mktemp("library")
    mp = pytest.MonkeyPatch()
    mp.setenv("NADA_LIBRARY_DIR", str(lib))
    for name, seed in (("ink", 4), ("pop", 5)):   # two finished runs adapted from the tiny base
        run = RunFolder(lib / "_tiny" / name)
        run.create({"base": "tiny", "recipe": {"source": "photo", "target": name}})
        save_generator(tiny_generator(seed=seed), run.final_path, {"source_model": "tiny"})
    demo, studio, url = launch_tiny()
    yield demo, studio, url
    demo.close()
    mp.undo()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames = [no_face()] * 2 + moving_face(8, 128) + [no_face()] * 2
    return write_clip(frames, tmp_path_factory.mktemp("clip") / "me.mp4", fps=12, audio=True)


def test_a_clip_through_two_styles_holds_the_device_slot(app, clip):
    _, studio, url = app
    client = Client(url, verbose=False)
    job = client.submit(handle_file(str(clip)), "tiny", ["ink", "pop"], 2, api_name="/video")
    held = []
    while not job.done():
        held.append(studio.training_status())
        time.sleep(0.05)
    outs = list(job)
    status, _, video, files = job.result()
    assert any(h and h.startswith("frame ") and h.endswith("/12") for h in held)   # other tabs see 'frame x/12'
    assert studio.active_run() is None                                             # and the slot is free again
    assert "12 frames, 8 with a face stylised" in status
    assert any("Frame " in o[0] and "frames/s" in o[0] for o in outs[:-1])          # live progress
    assert any(o[1] for o in outs)                                                  # with a preview frame
    assert len(files) == 2 and sorted(p.rsplit("/", 1)[1] for p in files) == ["me-stylised-ink.mp4",
                                                                            "me-stylised-pop.mp4"]
    shown = probe(video["video"] if isinstance(video, dict) else video)
    assert (shown.frames, shown.width, shown.height, shown.fps, shown.audio) == (12, 128, 128, 12, "aac")


def test_keep_my_colours_reaches_the_video_and_the_webcam(app, clip):
    demo, studio, url = app
    client = Client(url, verbose=False)
    source = [rgb for rgb, _ in read_frames(clip, probe(clip))]

    def video(colours):
        _, _, out, _ = client.predict(handle_file(str(clip)), "tiny", ["ink"], 2, colours, api_name="/video")
        path = out["video"] if isinstance(out, dict) else out
        return [rgb for rgb, _ in read_frames(path, probe(path))]

    plain, kept = face_chroma_gap(source, video(0.0)), face_chroma_gap(source, video(1.0))
    assert kept < 0.6 * plain, (kept, plain)
    webcam = next(f.fn for f in demo.fns.values() if f.api_name == "webcam")
    frames = moving_face(4, 128)

    def live(colours):
        state, shown = None, []
        for frame in frames:
            out, _, state = webcam(frame, "tiny", "ink", state, colours)
            shown.append(np.asarray(Image.open(out).convert("RGB")))
        return face_chroma_gap(frames, shown)

    assert live(1.0) < 0.6 * live(0.0)
    assert "Keep my photo's colours" in refusal(lambda: client.predict(handle_file(str(clip)), "tiny", ["ink"], 2, 5,
                                                                      api_name="/video"))


def test_stop_keeps_the_frames_done(app, tmp_path):
    _, studio, url = app
    long_clip = write_clip(moving_face(40, 128), tmp_path / "long.mp4", fps=12)
    client = Client(url, verbose=False)
    job = client.submit(handle_file(str(long_clip)), "tiny", ["ink"], 2, api_name="/video")
    while not (studio.training_status() or "").startswith("frame 3/"):
        assert not job.done(), job.result()
        time.sleep(0.02)
    client.predict(api_name="/video_stop")
    status, _, video, files = job.result()
    done = int(status.split("Cancelled at frame ")[1].split()[0])
    assert 3 <= done < 40 and f"the {done} frames done are saved" in status
    assert probe(video["video"] if isinstance(video, dict) else video).frames == done
    assert "The clip has no sound." in status


def test_refusals_name_the_problem(app, clip, tmp_path):
    _, _, url = app
    client = Client(url, verbose=False)
    (tmp_path / "million.mp4").write_bytes(patched_frame_count(clip, 10 ** 6))
    start = time.perf_counter()
    # each refused in the status line ("Not started: ..."), the rest of the tab as it was
    answer = refusal(lambda: client.predict(handle_file(str(tmp_path / "million.mp4")), "tiny", ["ink"], 2,
                                            api_name="/video"))
    assert "million.mp4: too many frames (1000000); the limit is 900" in answer
    assert time.perf_counter() - start < 10
    (tmp_path / "junk.mp4").write_text("not a video")
    assert "junk.mp4: could not read the video" in refusal(
        lambda: client.predict(handle_file(str(tmp_path / "junk.mp4")), "tiny", ["ink"], 2, api_name="/video"))
    assert "choose at least one style" in refusal(
        lambda: client.predict(handle_file(str(clip)), "tiny", [], 2, api_name="/video"))
    assert "unknown model" in refusal(
        lambda: client.predict(handle_file(str(clip)), "tiny", ["../../etc"], 2, api_name="/video"))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_webcam_frames_keep_the_session_state_and_show_the_rate(app):
    demo, studio, _ = app
    fn = next(f.fn for f in demo.fns.values() if f.api_name == "webcam")
    frames, state, shown = moving_face(6, 128), None, []
    for frame in frames:
        out, rate, state = fn(frame, "tiny", "ink", state, None)
        out = pixels(out)   # a file written once, atomically, like every picture the server sends
        shown.append(out)
        assert out.shape == frame.shape
    assert state["styliser"].tracker.detections == 2   # one tracker for the session: detection every 5th frame
    assert all(np.abs(o.astype(int) - f).mean() > 3 for o, f in zip(shown, frames))   # the face stylised live
    assert "frames/s" in rate and "1 face(s)" in rate and float(rate.split("**")[1].split()[0]) > 0
    still, _, _ = fn(no_face(), "tiny", "ink", state, None)
    assert np.array_equal(pixels(still), no_face())
    assert fn(frames[0], "tiny", None, state, None)[1].startswith("Choose a style")


def test_another_visitors_job_is_named_and_pauses_the_webcam(app):
    from demo.video_tab import JobView

    demo, studio, _ = app
    webcam = next(f.fn for f in demo.fns.values() if f.api_name == "webcam")
    before = next(f.fn for f in demo.fns.values()
                  if getattr(f.fn, "__name__", "") == "before_start" and f.fn.__module__ == "demo.video_tab")
    theirs = SimpleNamespace(ended=False, view=lambda: JobView("running", 3, 12), stop=lambda: True)
    studio.start_job(theirs, "someone else")
    try:
        assert "another visitor holds the device (frame 3/12)" in before(SimpleNamespace(session_hash="me"))
        frame = moving_face(1, 128)[0]
        out, rate, _ = webcam(frame, "tiny", "ink", None, None)
        assert np.array_equal(pixels(out), frame) and rate.startswith("Paused: the device is busy (frame 3/12)")
        assert studio.cancel_training("me") is False          # nobody stops another visitor's job
    finally:
        studio.finish_training(theirs)
    assert "Checking the clip" in before(SimpleNamespace(session_hash="me"))
