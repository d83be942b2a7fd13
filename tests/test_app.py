"""Handler-level tests through gradio_client against the app launched on the tiny models."""
import threading
import time

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from skimage import data

from tests.app_server import launch_tiny

TRAIN_ARGS = ["tiny", "Style", "Photo", "Sketch", [], [], 4, 2, 0.002, 0, 1, 0.0, ["tiny"], 1.0, 1.0, 0, 2]


@pytest.fixture(scope="module")
def app(tmp_path_factory, request):
    lib = tmp_path_factory.mktemp("library")
    mp = pytest.MonkeyPatch()
    mp.setenv("NADA_LIBRARY_DIR", str(lib))
    demo, studio, url = launch_tiny()
    yield Client(url, verbose=False), studio, url
    demo.close()
    mp.undo()


def train(client, *overrides):
    args = list(TRAIN_ARGS)
    for i, v in overrides:
        args[i] = v
    job = client.submit(*args, api_name="/train")
    outs = list(job)
    job.result()  # raises the handler's message if it failed
    return outs


def run_selfie(client, photo, path):
    job = client.submit(handle_file(str(photo)), None, "tiny", [path], 10, True, *([0.0] * 12), *(["all layers"] * 12),
                        None, 0, api_name="/selfie")
    outs = list(job)
    job.result()
    return outs


def test_adaptation_streams_progress_and_lands_in_the_library(app):
    client, studio, _ = app
    outs = train(client)
    steps = [o[0] for o in outs if o[0].startswith("**Training**")]
    assert len(steps) == 4 and "step 1/4" in steps[0] and "step 4/4" in steps[-1] and "left" in steps[-1]
    final = outs[-1]
    assert final[0].startswith("**Finished.**")
    assert Image.open(final[1]).size == (4 * 128 + 3 * 4, 2 * 128 + 4)  # 4 seeds, source row over adapted, 128 px tiles
    assert sorted(p.rsplit(".", 1)[1] for p in final[4]) == ["pt", "safetensors"]
    assert any("photo-to-sketch" in item["caption"] for item in final[6])  # the run folder is gr.State, not sent to clients
    assert any(e.name.startswith("photo-to-sketch") and e.finished for e in studio.library())


def test_measured_step_gives_an_estimate(app):
    client, studio, _ = app
    text = client.predict("tiny", 2, ["tiny"], 1.0, 1.0, 300, api_name="/measure")
    sec = studio.seconds_per_step[("tiny", 2, ("tiny",))]
    assert sec > 0 and f"measured {sec:.2f} s/step" in text and "300 steps" in text


def test_bad_prompts_get_a_clear_message(app):
    client, _, _ = app
    with pytest.raises(Exception, match="no direction"):
        train(client, (2, "dog"), (3, "Dog"))
    with pytest.raises(Exception, match="target text is empty"):
        train(client, (3, "  "))


def test_sample_blend_and_interpolate(app):
    client, studio, _ = app
    if not studio.library():
        train(client)
    path = str(studio.library()[0].path)
    grid = client.predict(path, "0-2", 0.7, "const", 1.0, None, 0.5, api_name="/sample")
    assert Image.open(grid).size == (3 * 128 + 2 * 4, 2 * 128 + 4)  # tiny 32 px tiles shown at 128 px
    half = Image.open(client.predict(path, "0-2", 0.7, "const", 0.0, None, 0.5, api_name="/sample"))
    top, bottom = half.crop((0, 0, 392, 128)), half.crop((0, 132, 392, 260))
    assert np.array_equal(np.asarray(top), np.asarray(bottom))  # strength 0 = the source weights exactly
    gif, _ = client.predict(path, 1.0, None, 0.5, 0, 1, 5, "domains", 0.7, api_name="/interpolate")
    assert Image.open(gif).n_frames == 8  # 5 frames, ping-pong
    with pytest.raises(Exception, match="seeds must look like"):
        client.predict(path, "x-y", 0.7, "const", 1.0, None, 0.5, api_name="/sample")


def test_edit_renders_source_and_adapted_side_by_side(app):
    client, studio, _ = app
    if not studio.library():
        train(client)
    path = str(studio.library()[0].path)
    sliders = [0.0] * 12
    ranges = ["all layers"] * 12
    plain = client.predict("tiny", [path], 3, 0.7, 1, 0, *sliders, *ranges, None, 0, api_name="/edit")
    assert [item["caption"] for item in plain][0] == "source (tiny)" and len(plain) == 2
    assert Image.open(plain[0]["image"]).size == (32, 32)
    moved = client.predict("tiny", [path], 3, 0.7, 1, 0, 3.0, *sliders[1:], *ranges, None, 0, api_name="/edit")
    assert not np.array_equal(np.asarray(Image.open(moved[0]["image"])), np.asarray(Image.open(plain[0]["image"])))


def test_selfie_flow(app, tmp_path):
    client, studio, _ = app
    if not studio.library():
        train(client)
    path = str(studio.library()[0].path)
    Image.fromarray(data.astronaut()).save(tmp_path / "me.jpg")
    outs = run_selfie(client, tmp_path / "me.jpg", path)
    status, aligned, recon, stylised, pasted = outs[-1]
    assert "Inverted with optimisation" in status
    assert Image.open(aligned).size == (256, 256) and Image.open(recon).size == (32, 32)
    assert len(stylised) == 1 and Image.open(pasted[0]["image"]).size == (512, 512)
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(Exception, match="could not read the image"):
        run_selfie(client, tmp_path / "bad.jpg", path)
    Image.new("RGB", (200, 200), (90, 120, 150)).save(tmp_path / "wall.png")
    with pytest.raises(Exception, match="no face found"):
        run_selfie(client, tmp_path / "wall.png", path)


def test_two_clients_train_in_order_and_nothing_is_lost(app):
    _, studio, url = app
    before = {e.name for e in studio.library()}
    results = {}

    def run(name, target):
        client = Client(url, verbose=False)
        args = list(TRAIN_ARGS)
        args[3], args[6] = target, 6
        job = client.submit(*args, api_name="/train")
        stamped = [(time.time(), out) for out in job]
        job.result()
        results[name] = stamped

    threads = [threading.Thread(target=run, args=("a", "Cartoon")), threading.Thread(target=run, args=("b", "Statue"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(r[-1][1][0].startswith("**Finished.**") for r in results.values())
    spans = sorted((r[0][0], r[-1][0]) for r in results.values())  # (first output, last output) per client
    assert spans[0][1] <= spans[1][0] + 0.5, spans  # the second run started only after the first finished
    new = {e.name for e in studio.library()} - before
    assert {n.split("-to-")[1].split("-")[0] for n in new} == {"cartoon", "statue"}
    # one training at a time: the runs did not overlap
    assert studio.training is None


def test_every_tab_says_what_is_missing_when_nothing_is_downloaded(tmp_path, monkeypatch):
    from demo.app import build_demo
    from demo.state import Studio

    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("NADA_LIBRARY_DIR", str(tmp_path / "lib"))
    demo = build_demo(Studio(device="cpu"))
    texts = [c["props"].get("value") or "" for c in demo.config["components"] if c["type"] == "markdown"]
    missing = [t for t in texts if t.startswith("**Missing for")]
    assert len(missing) == 4  # one panel per tab
    assert all("weights download ffhq-256" in t for t in missing)
    assert "e4e" in missing[3] and "dlib" not in missing[3]  # the landmark file ships with a pip package
    assert "weights download --kind direction" in missing[2] and "zdir-Smiling" not in missing[2]  # grouped
    buttons = [c["props"].get("value") for c in demo.config["components"] if c["type"] == "button"]
    assert buttons.count("Download") == 4
    assert not any("Untrained tiny models" in t for t in texts)  # the banner is only for --tiny


def test_download_button_fetches_a_missing_file(tmp_path, monkeypatch):
    import hashlib
    import json

    from demo.app import build_demo
    from demo.state import Studio
    from nada_core import weights
    from tests.http_server import Files, serve

    payload = b"weights" * 1000
    Files.files, Files.cut_after, Files.requests = {"/ffhq.pkl": payload}, {}, []
    srv, base = serve()
    manifest = {"version": 1, "assets": {"ffhq-256": {"kind": "generator", "file": "generators/ffhq.pkl", "url": base + "/ffhq.pkl",
                                                      "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload),
                                                      "label": "FFHQ 256"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(weights, "MANIFEST_PATH", tmp_path / "manifest.json")
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("NADA_LIBRARY_DIR", str(tmp_path / "lib"))
    try:
        demo = build_demo(Studio(device="cpu"))
        download = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "download")
        seen = []
        remaining = download("ffhq-256", progress=lambda frac, desc="": seen.append(frac))
        assert (tmp_path / "w" / "generators" / "ffhq.pkl").read_bytes() == payload
        assert seen and seen[-1] == 1.0
        assert remaining == ""  # nothing is missing any more, so the panel's text empties
    finally:
        srv.shutdown()


def test_blend_two_adapted_models(app):
    client, studio, _ = app
    while len(studio.library()) < 2:
        train(client, (3, f"Statue {len(studio.library())}"))
    a, b = (str(e.path) for e in studio.library()[:2])

    def adapted_row(other, mix):
        img = np.asarray(Image.open(client.predict(a, "0-1", 0.7, "const", 1.0, other, mix, api_name="/sample")))
        return img[132:260]

    only_b = np.asarray(Image.open(client.predict(b, "0-1", 0.7, "const", 1.0, None, 0.5, api_name="/sample")))[132:260]
    only_a = np.asarray(Image.open(client.predict(a, "0-1", 0.7, "const", 1.0, None, 0.5, api_name="/sample")))[132:260]
    assert np.array_equal(adapted_row(b, 1.0), only_b) and np.array_equal(adapted_row(b, 0.0), only_a)
    half = adapted_row(b, 0.5).astype(int)
    assert not np.array_equal(half, only_a) and not np.array_equal(half, only_b)
