"""Handler-level tests through gradio_client against the app launched on the tiny models."""
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image, ImageDraw
from skimage import data

from demo import adapt_tab
from demo.state import Studio
from nada_core.training.adapt import Adapter, Recipe
from tests.app_server import launch_tiny, refusal, unchanged

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


NO_CROP = (1.0, 0.0, 0.0, 0.0)   # scale, shift x, shift y, rotation: the FFHQ crop as it is


def run_selfie(client, photo, model_id, colours=0, crop=NO_CROP):
    job = client.submit(handle_file(str(photo)), None, "tiny", [model_id], "Optimisation", 10, False, False, [], colours,
                        *crop, None, 1.0,
                        *([0.0] * 12),
                        *(["all layers"] * 12), None, 0, api_name="/selfie")
    outs = list(job)
    job.result()
    return outs


def test_adaptation_streams_progress_and_lands_in_the_library(app):
    client, studio, _ = app
    outs = train(client)
    # the page reads the run at its own pace: some steps are shown, in order, never one beyond the run
    shown = [int(o[0].split("Training: step ")[1].split("/")[0]) for o in outs if "Training: step" in o[0]]
    assert all("/4 · loss" in o[0] and "left" in o[0] for o in outs if "Training: step" in o[0])
    assert shown == sorted(shown) and all(1 <= s <= 4 for s in shown)
    final = outs[-1]
    assert "Finished: 4/4 steps" in final[0] and "Saved as <b>photo-to-sketch" in final[0]
    assert final[0].count("Finished") == 1  # one short status, no repeats
    assert Image.open(final[1]).size == (4 * 128 + 3 * 4, 2 * 128 + 4)  # 4 seeds, source row over adapted, 128 px tiles
    assert sorted(Path(p).name for p in final[5]) == ["photo-to-sketch.pt", "photo-to-sketch.safetensors"]
    measures = {row[2] for row in final[3]["data"]}   # the diagnostics curve: measured on the previews
    assert {"direction score", "diversity (vs source)"} <= measures
    assert all("/" not in str(o) or "library" not in str(o) for o in final[:1])  # no server paths in the status
    assert any(e.name.startswith("photo-to-sketch") and e.finished for e in studio.library())
    assert "s/step" in final[9] and "4 steps take about" in final[9]  # the estimate uses the run's own speed


def test_measured_step_gives_an_estimate(app):
    client, studio, _ = app
    text = client.predict("tiny", 2, ["tiny"], 1.0, 1.0, 300, 0, 1, api_name="/measure")
    sec = studio.seconds_per_step[("tiny", 2, ("tiny",), False)]
    assert sec > 0 and f"{sec:.2f} s/step measured" in text and "300 steps" in text
    shape = client.predict("tiny", 2, ["tiny"], 1.0, 1.0, 200, 5, 1, api_name="/measure")  # with the selection pass
    assert "with layer selection" in shape and studio.seconds_per_step[("tiny", 2, ("tiny",), True)] > 0


def test_bad_prompts_get_a_clear_message(app):
    client, _, _ = app
    # refused in the status line ("Not started: ..."), the rest of the Adapt panel as it was
    assert "no direction" in refusal(lambda: train(client, (2, "dog"), (3, "Dog"))[-1])
    assert "target text is empty" in refusal(lambda: train(client, (3, "  "))[-1])


def test_sample_blend_and_interpolate(app):
    client, studio, _ = app
    if not studio.library():
        train(client)
    path = studio.library()[0].id
    grid = client.predict(path, "0-2", 0.7, "const", 1.0, None, 0.5, None, 1.0, api_name="/sample")
    assert Image.open(grid).size == (3 * 128 + 2 * 4, 2 * 128 + 4)  # tiny 32 px tiles shown at 128 px
    half = Image.open(client.predict(path, "0-2", 0.7, "const", 0.0, None, 0.5, None, 1.0, api_name="/sample"))
    top, bottom = half.crop((0, 0, 392, 128)), half.crop((0, 132, 392, 260))
    assert np.array_equal(np.asarray(top), np.asarray(bottom))  # strength 0 = the source weights exactly
    mp4, gif = client.predict(path, 1.0, None, 0.5, 0, 1, 5, "domains", 0.7, api_name="/interpolate")
    mp4, gif = (x.get("value", x) if isinstance(x, dict) and "__type__" in x else x for x in (mp4, gif))
    gif = gif.get("path", gif) if isinstance(gif, dict) else gif
    assert Image.open(gif).n_frames == 8  # 5 frames, ping-pong
    import av
    with av.open(mp4["video"] if isinstance(mp4, dict) else mp4) as video:
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (256, 256, 3)  # 32 px frames scaled up to play at 256 px
    assert not np.array_equal(frames[0], frames[4])
    with pytest.raises(Exception, match="Seeds must look like"):
        client.predict(path, "x-y", 0.7, "const", 1.0, None, 0.5, None, 1.0, api_name="/sample")


def test_edit_renders_source_and_adapted_side_by_side(app):
    client, studio, _ = app
    if not studio.library():
        train(client)
    path = studio.library()[0].id
    sliders = [0.0] * 12
    ranges = ["all layers"] * 12
    plain = client.predict("tiny", [path], 3, 0.7, 1, 0, None, 1.0, *sliders, *ranges, None, 0, api_name="/edit")
    assert [item["caption"] for item in plain][0] == "source (tiny)" and len(plain) == 2
    assert Image.open(plain[0]["image"]).size == (256, 256)  # shown at a readable size
    moved = client.predict("tiny", [path], 3, 0.7, 1, 0, None, 1.0, 3.0, *sliders[1:], *ranges, None, 0, api_name="/edit")
    assert not np.array_equal(np.asarray(Image.open(moved[0]["image"])), np.asarray(Image.open(plain[0]["image"])))


def chroma(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("YCbCr"), dtype=np.float64)[..., 1:]


def test_selfie_flow(app, tmp_path):
    client, studio, _ = app
    if not studio.library():
        train(client)
    path = studio.library()[0].id
    Image.fromarray(data.astronaut()).save(tmp_path / "me.jpg")
    outs = run_selfie(client, tmp_path / "me.jpg", path)
    status, photo, aligned, recon, stylised, pasted = outs[-1]
    assert "Inverted with optimisation" in status
    assert Image.open(aligned).size == (256, 256) and Image.open(recon).size == (256, 256)   # 32 px, shown enlarged
    assert (Path(aligned).name, Path(recon).name) == ("aligned.png", "reconstruction.png")   # the atomic output path
    assert len(stylised) == 1 and Image.open(pasted[0]["image"]).size == (512, 512)
    # "Keep my photo's colours": each style shown plain and with the photo's chroma, side by side
    *_, aligned, _, stylised, pasted = run_selfie(client, tmp_path / "me.jpg", path, colours=1.0)[-1]
    assert [s["caption"] for s in stylised] == [studio.entry(path).name, f"{studio.entry(path).name}, your colours"]
    photo_chroma = chroma(Image.open(aligned).resize((32, 32), Image.LANCZOS))
    plain, kept = (chroma(Image.open(s["image"])) for s in stylised)
    assert np.abs(kept - photo_chroma).mean() < 0.5 * np.abs(plain - photo_chroma).mean()
    stylised, pasted = client.predict(0, None, 1.0, *([0.0] * 12), *(["all layers"] * 12), None, 0,
                                      api_name="/selfie_colours")
    assert len(stylised) == 1      # the slider back at 0: the style's own colours only
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    assert "bad.jpg: could not read the image" in refusal(lambda: run_selfie(client, tmp_path / "bad.jpg", path)[-1])
    Image.new("RGB", (200, 200), (90, 120, 150)).save(tmp_path / "wall.png")
    assert "no face found" in refusal(lambda: run_selfie(client, tmp_path / "wall.png", path)[-1])


def test_two_clients_train_in_order_and_nothing_is_lost(app):
    _, studio, url = app
    before = {e.name for e in studio.library()}
    results = {}

    def run(name, target, steps):
        client = Client(url, verbose=False)
        args = list(TRAIN_ARGS)
        args[3], args[6] = target, steps
        job = client.submit(*args, api_name="/train")
        stamped = [(time.time(), out) for out in job]
        job.result()
        results[name] = stamped

    threads = [threading.Thread(target=run, args=("a", "Cartoon", 200)),
               threading.Thread(target=run, args=("b", "Statue", 150))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while studio.active_run() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    (_, holder) = studio.active_run()
    # a third visitor is told a run holds the device; its holder is refused a second start
    waiting = adapt_tab.before_start(studio, SimpleNamespace(session_hash="a third visitor"))
    assert "Waiting: another run is training (step " in waiting and "yours starts when it ends" in waiting
    with pytest.raises(gr.Error, match="Already training"):
        adapt_tab.before_start(studio, SimpleNamespace(session_hash=holder))
    for t in threads:
        t.join(timeout=300)
    assert all("Finished" in r[-1][1][0] for r in results.values())
    for name, total in (("a", 200), ("b", 150)):   # each page showed only its own run
        lines = [out[0] for _, out in results[name] if "Training: step " in out[0] or "Finished" in out[0]]
        assert lines and all(f"/{total}" in line for line in lines), (name, lines)
    spans = sorted((r[0][0], r[-1][0]) for r in results.values())  # (first output, last output) per client
    assert spans[0][1] <= spans[1][0] + 0.5, spans  # the second run started only after the first finished
    new = {e.name for e in studio.library()} - before
    assert {n.split("-to-")[1].split("-")[0] for n in new} == {"cartoon", "statue"}
    # one training at a time: the runs did not overlap
    assert studio.active_run() is None


def test_without_weights_the_page_offers_starter_packs(tmp_path, monkeypatch):
    from demo.app import build_demo

    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("NADA_LIBRARY_DIR", str(tmp_path / "lib"))
    import nada_core.store.packs as packs
    monkeypatch.setattr(packs, "remote_size", lambda asset, timeout=5.0: None)  # offline: sizes unknown
    demo = build_demo(Studio(device="cpu"))
    texts = [c["props"].get("value") or "" for c in demo.config["components"] if c["type"] == "markdown"]
    assert sum("**Get started:**" in t for t in texts) == 1 and any("--tiny" in t for t in texts)
    assert any("CPU starter pack" in t and "size unknown" in t for t in texts)
    by_hand = next(t for t in texts if "save as" in t)
    assert sys.executable + " -m nada_core weights download" in by_hand  # a command that works when pasted
    assert "weights/generators/" in by_hand and str(tmp_path) not in by_hand.replace("weights/", "")
    buttons = [c["props"].get("value") for c in demo.config["components"] if c["type"] == "button"]
    assert "Download the CPU starter pack" in buttons and "Download the GPU starter pack" in buttons
    assert not any("Untrained tiny models" in t for t in texts)  # the banner is only for --tiny


def test_starter_pack_downloads_with_one_progress(tmp_path, monkeypatch):
    import hashlib
    import json

    from nada_core.store import packs, weights
    from tests.http_server import Files, serve

    a, b = b"generator" * 3000, b"clip" * 1000
    Files.reset({"/g.pkl": a, "/c.bin": b})
    srv, base = serve()
    manifest = {"version": 1, "assets": {
        "g": {"kind": "generator", "file": "generators/g.pkl", "url": base + "/g.pkl", "sha256": hashlib.sha256(a).hexdigest()},
        "c": {"kind": "clip", "file": "clip/c.bin", "url": base + "/c.bin", "size": len(b)}},
        "packs": {"cpu": {"label": "CPU", "assets": ["g", "c"], "unlocks": "x"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(weights, "MANIFEST_PATH", tmp_path / "manifest.json")
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setattr(packs, "_SIZE_CACHE", {})
    try:
        pack = packs.load_packs()["cpu"]
        assert packs.pack_size(pack) == (len(a) + len(b), 0)  # the generator's size came from a HEAD request
        seen = []
        assert packs.download_pack(pack, lambda frac, text: seen.append(frac)) == ["g", "c"]
        assert (tmp_path / "w" / "generators" / "g.pkl").read_bytes() == a and (tmp_path / "w" / "clip" / "c.bin").read_bytes() == b
        assert seen == sorted(seen) and seen[-1] == 1.0 and 0 < seen[0] < 1  # one progress over the whole pack
        assert packs.pack_size(pack) == (0, 0) and not packs.missing_assets(pack)
    finally:
        srv.shutdown()


def test_a_failed_pack_or_optional_download_leaves_a_lasting_status_in_its_panel(tmp_path, monkeypatch):
    import functools
    import json

    from demo.app import build_demo
    from nada_core.store import packs, weights
    from tests.app_server import free_port

    url = f"http://127.0.0.1:{free_port()}/mirror"   # nobody listens: offline
    manifest = json.loads(weights.MANIFEST_PATH.read_text())   # the real manifest, every URL on the dead host
    for name, asset in manifest["assets"].items():
        if asset.get("url"):
            asset["url"] = f"{url}/{name}"
    first = next(n for n in manifest["packs"]["cpu"]["assets"] if manifest["assets"][n].get("url"))
    label = manifest["packs"]["cpu"]["label"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(weights, "MANIFEST_PATH", tmp_path / "manifest.json")
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("NADA_LIBRARY_DIR", str(tmp_path / "lib"))
    monkeypatch.setattr(packs, "remote_size", lambda asset, timeout=5.0: None)
    demo = build_demo(Studio(device="cpu"))
    ids = {c["id"]: c for c in demo.config["components"]}
    pack = next(f for f in demo.fns.values() if isinstance(f.fn, functools.partial) and f.fn.func.__name__ == "fetch")
    assert ids[pack.outputs[0]._id]["props"]["elem_id"] == "pack-status"   # an HTML line in the panel, not a toast
    assert pack.fn.args == ("cpu",)
    *_, (status, _) = list(pack.fn())
    assert f"{label}: not downloaded." in status and f"cannot reach {url}/{first}" in status
    assert "Press the button again to resume" in status and str(tmp_path) not in status
    optional = [f for f in demo.fns.values() if getattr(f.fn, "__qualname__", "").startswith("optional_download")]
    assert len(optional) == 4   # Sample's styles, Edit's directions, Selfie's e4e and pSp encoders
    for f in optional:
        status = f.fn()
        assert ids[f.outputs[0]._id]["type"] == "html"   # beside its button, where it stays
        assert "Not downloaded." in status and f"cannot reach {url}/" in status and "download the files by hand" in status


def test_blend_two_adapted_models(app):
    client, studio, _ = app
    while len(studio.library()) < 2:
        train(client, (3, f"Statue {len(studio.library())}"))
    a, b = (e.id for e in studio.library()[:2])

    def adapted_row(other, mix):
        img = np.asarray(Image.open(client.predict(a, "0-1", 0.7, "const", 1.0, other, mix, None, 1.0, api_name="/sample")))
        return img[132:260]

    only_b = np.asarray(Image.open(client.predict(b, "0-1", 0.7, "const", 1.0, None, 0.5, None, 1.0, api_name="/sample")))[132:260]
    only_a = np.asarray(Image.open(client.predict(a, "0-1", 0.7, "const", 1.0, None, 0.5, None, 1.0, api_name="/sample")))[132:260]
    assert np.array_equal(adapted_row(b, 1.0), only_b) and np.array_equal(adapted_row(b, 0.0), only_a)
    half = adapted_row(b, 0.5).astype(int)
    assert not np.array_equal(half, only_a) and not np.array_equal(half, only_b)


def test_library_import_rename_delete(app, tmp_path):
    from nada_core.models.tiny import tiny_generator
    from nada_core.store.checkpoints import export_rosinality, save_generator

    client, studio, _ = app
    export_rosinality(tiny_generator(seed=5), tmp_path / "my style.pt")       # a user's rosinality file
    status, table, *_ = client.predict(handle_file(str(tmp_path / "my style.pt")), "tiny", api_name="/library_import")
    assert "Imported <b>my style.pt</b> as <b>my-style</b>" in status
    assert "my-style" in [row[0] for row in table["data"]]
    entry = studio.entry("my-style")
    assert entry.thumbnail is not None and entry.path.name == "final.safetensors"
    assert entry.path.parent.parent == studio.library_root  # copied into the library, not read from the upload
    grid = client.predict("my-style", "0", 0.7, "const", 1.0, None, 0.5, None, 1.0, api_name="/sample")
    assert Image.open(grid).size == (128, 2 * 128 + 4)
    # a file of another architecture is refused with its own name, not a server path; a refusal answers in the
    # message line and leaves the table, pictures and picker as they were (no error placeholders)
    save_generator(tiny_generator(seed=1, size=64), tmp_path / "big.safetensors")
    answer = client.predict(handle_file(str(tmp_path / "big.safetensors")), "tiny", api_name="/library_import")
    assert "big.safetensors is a 64 px generator with a different architecture" in answer[0]
    assert "/tmp" not in answer[0] and unchanged(answer[1:])
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04junk")
    answer = client.predict(handle_file(str(tmp_path / "junk.pkl")), "tiny", api_name="/library_import")
    assert "junk.pkl" in answer[0] and unchanged(answer[1:])
    assert not [e for e in studio.library() if e.name in ("big", "junk")]   # no empty folder left behind

    status, table, *_ = client.predict("my-style", "Watercolour faces", api_name="/library_rename")
    names = [row[0] for row in table["data"]]
    assert "watercolour-faces" in names and "my-style" not in names
    answer = client.predict("watercolour-faces", "Watercolour faces", api_name="/library_rename")
    assert "already exists" in answer[0] and unchanged(answer[1:])
    answer = client.predict(None, "x", api_name="/library_rename")
    assert "choose" in answer[0].lower() and unchanged(answer[1:])
    status, files = client.predict("watercolour-faces", api_name="/library_download")
    names = sorted(Path(f).name for f in files["value"])
    assert names == ["watercolour-faces.pt", "watercolour-faces.safetensors"]  # named after the model
    status, table, *_ = client.predict("watercolour-faces", api_name="/library_delete")
    assert "Deleted" in status and "watercolour-faces" not in [row[0] for row in table["data"]]
    assert not (studio.library_root / "watercolour-faces").exists()
    answer = client.predict("../../etc", api_name="/library_delete")
    assert "unknown model" in answer[0] and unchanged(answer[1:])




def test_a_short_stopped_run_is_kept_only_when_asked(app):
    from nada_core.store.library import restore

    client, studio, url = app
    before = {e.id for e in studio.library()}
    job = client.submit(*[*TRAIN_ARGS[:3], "Bronze statue", *TRAIN_ARGS[4:6], 400, *TRAIN_ARGS[7:]], api_name="/train")
    deadline = time.time() + 120
    while time.time() < deadline and not (studio.active_run() and studio.active_run()[0].view().step >= 2):
        time.sleep(0.05)
    studio.active_run()[0].stop()   # what Stop does for its own session
    final = list(job)[-1]
    job.result()
    assert "Stopped:" in final[0] and "short run" in final[0]
    assert {e.id for e in studio.library()} == before          # not listed
    kept = restore(studio.library_root, "photo-to-bronze-statue")  # what "Keep this short run" does
    assert kept.name in {e.id for e in studio.library()}


def test_focus_the_domain_then_sample_with_the_mapper(app):
    client, studio, _ = app
    if not [e for e in studio.library() if e.kind == "run"]:
        train(client)
    model = next(e.id for e in studio.library() if e.kind == "run")
    job = client.submit(model, "", 3, ["tiny"], 1.0, 1.0, api_name="/focus")
    outs = list(job)
    job.result()
    shown = [o[0] for o in outs if ": step " in o[0]]   # read at the page's pace: any shown step is of this run
    assert all("/3 ·" in t for t in shown) and "Saved as mapper" in outs[-1][0]
    previews = {Path(o[1]["value"]).name for o in outs if isinstance(o[1], dict) and o[1].get("value")}
    assert previews == {"before_after.png"}, previews   # before/after previews through the atomic output path (ui.image_file)
    mappers = studio.mappers(model)
    assert mappers and mappers[0]["generator"] == model and mappers[0]["text"] == studio.entry(model).recipe["target"]
    mid = mappers[0]["id"]

    def adapted_row(mapper, strength):
        return np.asarray(Image.open(client.predict(model, "0-1", 0.7, "const", 1.0, None, 0.5, mapper, strength,
                                                    api_name="/sample")))

    plain = adapted_row(None, 1.0)
    assert np.array_equal(adapted_row(mid, 0.0), plain)          # strength 0: the latents are untouched
    assert not np.array_equal(adapted_row(mid, 2.0), plain)      # the mapper moves them
    with pytest.raises(Exception, match="unknown model"):
        adapted_row("/etc/passwd", 1.0)


def test_text_edit_moves_every_model_together(app):
    client, studio, _ = app
    if not studio.library():
        train(client)
    path = studio.library()[0].id
    sliders, ranges = [0.0] * 12, ["all layers"] * 12
    plain = client.predict("tiny", [path], 3, 0.7, 1, 0, None, 1.0, *sliders, *ranges, None, 0, api_name="/edit")
    job = client.submit("tiny", [path], 3, 0.7, 1, 0, None, 1.0, "a red face", 8, *sliders, *ranges, None, 0,
                        api_name="/text_edit")
    outs = list(job)
    job.result()
    status, gallery = outs[-1][0], outs[-1][1]
    assert "Text edit &#x27;a red face&#x27; applied" in status and len(gallery) == 2
    for before, after in zip(plain, gallery):  # the source and the adapted model both changed
        assert not np.array_equal(np.asarray(Image.open(before["image"])), np.asarray(Image.open(after["image"])))


def test_group_photo_stylises_every_chosen_face(app, tmp_path):
    client, studio, _ = app
    if not studio.library():
        train(client)
    model = studio.library()[0].id
    face = Image.fromarray(data.astronaut())
    canvas = Image.new("RGB", (1024, 512), (128, 128, 128))
    canvas.paste(face, (0, 0))
    canvas.paste(face.transpose(Image.FLIP_LEFT_RIGHT), (512, 0))
    canvas.save(tmp_path / "two.png")
    job = client.submit(handle_file(str(tmp_path / "two.png")), None, "tiny", [model], "Optimisation", 10, False, True,
                        ["Face 1", "Face 2"], 0, *NO_CROP, None, 1.0, *([0.0] * 12), *(["all layers"] * 12), None, 0,
                        api_name="/selfie")
    outs = list(job)
    job.result()
    status, _, _, _, stylised, pasted = outs[-1]
    assert "2 of 2 faces stylised" in status and len(stylised) == 2 and len(pasted) == 1
    result = np.asarray(Image.open(pasted[0]["image"])).astype(int)
    original = np.asarray(canvas).astype(int)
    left, right = np.abs(result[150:350, 150:350] - original[150:350, 150:350]), np.abs(
        result[150:350, 662:862] - original[150:350, 662:862])
    assert left.mean() > 5 and right.mean() > 5       # both faces changed
    assert np.abs(result[480:, :] - original[480:, :]).max() <= 1  # far from both faces: untouched


def test_a_run_continues_from_the_ui(app):
    client, studio, _ = app
    outs = train(client, (3, "Marble statue"))
    run = next(e.id for e in studio.library() if e.id.startswith("photo-to-marble-statue"))
    job = client.submit(run, 3, 2, api_name="/resume")
    outs = list(job)
    job.result()
    shown = [int(o[0].split("Training: step ")[1].split("/")[0]) for o in outs if "Training: step " in o[0]]
    assert all(5 <= s <= 7 for s in shown) and "Finished: 7/7 steps" in outs[-1][0]  # the step count goes on
    forms = [[o.get("value") if isinstance(o, dict) else o for o in out[-3:]] for out in outs]
    assert ["Photo", "Marble statue", 7] in forms, forms   # the form shows the continued run's recipe
    assert studio.entry(run).path.name == "final.safetensors"
    assert "unknown model" in refusal(lambda: client.predict("/etc", 3, 2, api_name="/resume"))


def test_a_crashed_run_continues_in_the_app_and_one_killed_before_its_first_snapshot_is_cleared(app, tmp_path):
    client, studio, _ = app
    recipe = Recipe(source="photo", target="clay", iterations=8, clip_models=["tiny"], clip_weights=[1.0], k=3,
                    snapshot_every=2, preview_every=100)
    ad = Adapter(studio.base("tiny"), recipe, studio.clip(["tiny"], [1.0]), "cpu", studio.library_root / "crashed",
                 "tiny")
    for ev in ad.run():   # "kill -9" after the snapshot at step 4: no final weights, no ending
        if ev.step == 5:
            break
    (studio.library_root / "crashed" / "final.safetensors").unlink(missing_ok=True)
    assert "crashed" in [run_id for _, run_id in adapt_tab.resumable(studio)]   # offered under Continue a run
    outs = list(client.submit("crashed", 2, 2, api_name="/resume"))
    shown = [int(o[0].split("Training: step ")[1].split("/")[0]) for o in outs if "Training: step " in o[0]]
    assert all(5 <= s <= 6 for s in shown) and "Finished: 6/6 steps" in outs[-1][0]   # from the snapshot at 4
    assert studio.entry("crashed").finished

    killed = studio.library_root / "killed-early"
    killed.mkdir()
    (killed / "recipe.json").write_text('{"base": "tiny", "recipe": {}}')
    Studio(device="cpu", tiny=True)   # the next start of the app
    assert not killed.exists() and studio.entry("crashed").finished


def test_gallery_entries_fill_the_form(app):
    client, studio, _ = app
    out = client.predict("Dog to cat", "tiny", api_name="/gallery")
    base, preset, source, target, iterations, k, mixing = out[:7]
    assert (source, target, preset) == ("Dog", "Cat", "Shape") and iterations == 400
    assert "afhqdog" in out[-1]  # the note says which base the recipe was made for
    assert k == round(studio.n_latent("tiny") * 2 / 3) and mixing == 0.9  # the 2/3 rule on this base's slots


def test_domain_arithmetic_mixes_and_saves(app):
    client, studio, _ = app
    while len([e for e in studio.library() if e.kind == "run"]) < 2:
        train(client, (3, f"Bronze {len(studio.library())}"))
    a, b = [e.id for e in studio.library() if e.kind == "run"][:2]

    def mixed(styles, weights):
        return np.asarray(Image.open(client.predict("0-1", 0.7, *styles, *weights, api_name="/mix")))

    only_a = np.asarray(Image.open(client.predict(a, "0-1", 0.7, "const", 1.0, None, 0.5, None, 1.0, api_name="/sample")))
    assert np.array_equal(mixed([a, None, None, None], [1.0, 0, 0, 0])[132:260], only_a[132:260])  # one style at 1
    zero = mixed([a, None, None, None], [0.0, 0, 0, 0])
    assert np.array_equal(zero[132:260], zero[:128])                                          # at 0: the base
    both = mixed([a, b, None, None], [1.0, -0.5, 0, 0])
    assert not np.array_equal(both[132:260], only_a[132:260])
    model_update, _ = client.predict("A minus half B", a, b, None, None, 1.0, -0.5, 0, 0, api_name="/mix_save")
    saved = studio.entry("a-minus-half-b")
    assert "1 x (" in saved.recipe["formula"] and "-0.5 x (" in saved.recipe["formula"]
    row = np.asarray(Image.open(client.predict("a-minus-half-b", "0-1", 0.7, "const", 1.0, None, 0.5, None, 1.0,
                                               api_name="/sample")))[132:260]
    assert np.abs(row.astype(int) - both[132:260].astype(int)).max() <= 1  # the saved model renders the mix


def test_style_delta_round_trip_through_the_library(app, tmp_path):
    import shutil

    client, studio, _ = app
    if not [e for e in studio.library() if e.kind == "run"]:
        train(client)
    model = next(e.id for e in studio.library() if e.kind == "run")
    _, files = client.predict(model, api_name="/library_delta")
    path = next(f for f in (files["value"] if isinstance(files, dict) else files) if str(f).endswith(".nada.safetensors"))
    path = path["path"] if isinstance(path, dict) else path
    full = studio.entry(model).path.stat().st_size
    shutil.copy(path, tmp_path / "gifted style.nada.safetensors")
    status, *_ = client.predict(handle_file(str(tmp_path / "gifted style.nada.safetensors")), "tiny",
                                api_name="/library_import")
    assert "Imported" in status and "gifted-style" in status
    a = np.asarray(Image.open(client.predict(model, "0-1", 0.7, "const", 1.0, None, 0.5, None, 1.0, api_name="/sample")))
    b = np.asarray(Image.open(client.predict("gifted-style", "0-1", 0.7, "const", 1.0, None, 0.5, None, 1.0,
                                             api_name="/sample")))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # float16 differences: the same images
    assert Path(path).stat().st_size < full


def test_weights_check_button_repairs_a_damaged_file(app, tmp_path, monkeypatch):
    import hashlib
    import json

    from nada_core.store import weights
    from tests.http_server import Files, serve

    client, _, _ = app
    payload = b"generator weights" * 5000
    Files.reset({"/g.pkl": payload})
    srv, base = serve()
    manifest = {"version": 1, "assets": {"g": {"kind": "generator", "file": "generators/g.pkl", "url": base + "/g.pkl",
                                               "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(weights, "MANIFEST_PATH", tmp_path / "manifest.json")
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path / "w"))
    try:
        (tmp_path / "w" / "generators").mkdir(parents=True)
        (tmp_path / "w" / "generators" / "g.pkl").write_bytes(payload[:-1] + b"X")   # one flipped byte
        html = client.predict(api_name="/weights_check")
        assert "1 file(s) checked; g: repaired (was sha256 mismatch)" in html
        assert (tmp_path / "w" / "generators" / "g.pkl").read_bytes() == payload
        assert "all verified" in client.predict(api_name="/weights_check")
    finally:
        srv.shutdown()


def test_a_sketch_renders_on_the_tiny_base_with_the_untrained_encoder_named(app, tmp_path):
    client, _, _ = app

    def send(drawing):
        drawing.save(tmp_path / "sketch.png")
        f = handle_file(str(tmp_path / "sketch.png"))
        return client.predict({"background": f, "layers": [], "composite": f}, "tiny", [], None, 1.0,
                              api_name="/sketch")

    blank = Image.new("RGB", (256, 256), "white")
    assert "the canvas is empty" in refusal(lambda: send(blank))   # said in the status line, the gallery kept
    ImageDraw.Draw(blank).ellipse((64, 40, 192, 216), outline="black", width=4)
    status, gallery = send(blank)
    assert "Rendered the drawing through 1 model" in status
    assert [item["caption"] for item in gallery] == ["source (untrained tiny encoder: noise by design)"]
    assert Image.open(gallery[0]["image"]).size == (32, 32)


def test_snapshots_are_iterations_and_a_kept_one_gets_a_thumbnail(app):
    client = Client(app[2], verbose=False)   # one client = one browser session: the run folder stays in its state
    studio = app[1]
    args = list(TRAIN_ARGS)
    args[3], args[6] = "Charcoal", 20                  # 20 iterations: a snapshot every 2
    final = client.predict(*args, api_name="/train")
    snapshot_update = final[6]
    assert snapshot_update["maximum"] == 20 and snapshot_update["step"] == 2 and snapshot_update["value"] == 20
    assert snapshot_update["minimum"] == 12            # the newest 5 snapshots are kept
    assert final[8] is not None                        # the newest snapshot's preview shows at once
    status = client.predict(14, api_name="/keep_snapshot")
    assert "Iteration 14 saved as" in status
    kept = studio.entry("photo-to-charcoal-step14")
    assert kept.thumbnail is not None and kept.path.name == "final.safetensors"
    with pytest.raises(Exception, match="no snapshot at iteration 13"):
        client.predict(13, api_name="/keep_snapshot")
    with pytest.raises(Exception, match="Snapshot at iteration: Value 3 is less than minimum value 12"):
        client.predict(3, api_name="/keep_snapshot")    # pruned: the scrubber's own range says so


def test_precision_compile_and_parity_settings_reach_the_saved_recipe(app):
    client, studio, _ = app
    args = [*TRAIN_ARGS[:3], "Pastel drawing", *TRAIN_ARGS[4:]]
    assert "'fast'" in refusal(lambda: client.predict(*args, "off", "fast", api_name="/train"))  # not offered
    assert "'mine'" in refusal(lambda: client.predict(*args, "off", "off", "mine", api_name="/train"))
    client.predict(*args, "bf16", "off", "official", api_name="/train")
    recipe = studio.entry("photo-to-pastel-drawing").recipe
    assert (recipe["amp"], recipe["compile"], recipe["parity"]) == ("bf16", "off", "official")
    client.predict(*[*TRAIN_ARGS[:3], "Pencil drawing", *TRAIN_ARGS[4:]], api_name="/train")  # older clients: defaults
    recipe = studio.entry("photo-to-pencil-drawing").recipe
    assert (recipe["amp"], recipe["compile"], recipe["parity"]) == ("off", "off", "ours")


def test_a_library_model_downloads_as_onnx_that_runs_like_pytorch(app):
    from nada_core.models.export import onnx_difference

    client, studio, _ = app
    if not [e for e in studio.library() if e.kind == "run"]:
        train(client)
    model = next(e.id for e in studio.library() if e.kind == "run")
    status, files = client.predict(model, api_name="/library_onnx")
    paths = sorted((Path(f) for f in files["value"]), key=lambda p: p.name)
    assert "as ONNX" in status and [p.name.split(".")[-2] for p in paths] == ["mapping", "synthesis"]
    G = studio.model(model)
    assert onnx_difference(G, paths[1]) <= 1e-3 and onnx_difference(G, paths[0], mapping=True) <= 1e-3
    assert "unknown model" in refusal(lambda: client.predict("/etc/passwd", api_name="/library_onnx"))


def test_an_edit_mapper_trains_through_the_api_and_is_listed(app):
    """Edit > Train an edit mapper ends in success (it once ended in a NameError after saving) and the new mapper
    is the one chosen in the Latent mapper list."""
    client, studio, _ = app
    job = client.submit("tiny", "smiling", 4, api_name="/edit_mapper")
    outs = list(job)
    job.result()
    status, chosen = outs[-1][:2]
    assert "finished after 4/4 steps" in status and "went wrong" not in status.lower()
    names = [p.name for p in studio.mapper_root.iterdir() if p.is_dir()]
    chosen = chosen["value"] if isinstance(chosen, dict) else chosen
    assert chosen in names and chosen.startswith("tiny-smiling")


def test_a_nudged_crop_is_seen_at_once_and_used_by_the_selfie(app, tmp_path):
    from demo import selfie_tab

    client, studio, _ = app
    if not studio.library():
        train(client)
    model = studio.library()[0].id
    Image.fromarray(data.astronaut()).save(tmp_path / "me.png")
    photo, status, _, preview = selfie_tab.show_faces(studio, str(tmp_path / "me.png"), None)
    nudged_photo, nudged_status, _, nudged = selfie_tab.show_faces(studio, str(tmp_path / "me.png"), None, 1.3, 0.05,
                                                                   -0.05, 10)
    assert preview.size == nudged.size == (256, 256) and "Crop adjusted" in nudged_status
    assert np.abs(np.asarray(preview, dtype=int) - np.asarray(nudged, dtype=int)).mean() > 5
    blue = (np.asarray(nudged_photo) == (60, 140, 255)).all(-1).sum()   # the crop square drawn on the photo
    assert blue > 500 and not np.array_equal(np.asarray(photo), np.asarray(nudged_photo))
    _, refused, *rest = selfie_tab.show_faces(studio, str(tmp_path / "me.png"), None, 5, 0, 0, 0)
    assert "crop scale must be between 0.6 and 1.6" in refused and unchanged(rest)
    # the run aligns with the same crop, and says how close the reconstruction came
    plain = run_selfie(client, tmp_path / "me.png", model)[-1]
    moved = run_selfie(client, tmp_path / "me.png", model, crop=(1.3, 0.05, -0.05, 10))[-1]
    assert np.array_equal(np.asarray(Image.open(moved[2])), np.asarray(nudged))   # the crop previewed is the crop used
    assert not np.array_equal(np.asarray(Image.open(plain[2])), np.asarray(Image.open(moved[2])))
    for status in (plain[0], moved[0]):
        error = float(status.split("Reconstruction error: ")[1].split("%")[0])
        assert 0 < error < 60
    # through the API the slider's own check answers first, naming the slider
    assert "Turn (degrees, clockwise): Value 90 is greater than maximum value 45" in refusal(
        lambda: run_selfie(client, tmp_path / "me.png", model, crop=(1.0, 0, 0, 90))[-1])


def test_before_after_sliders_get_the_two_images_at_one_size(app, tmp_path):
    from demo import sample_tab, selfie_tab

    client, studio, _ = app
    if not studio.library():
        train(client)
    model = studio.library()[0].id
    # Sample: the third seed through the source and the adapted model, enlarged alike to 256 px
    before, after = sample_tab.before_after(studio, model, "4,5,6", 0.7, "const", 1.0, None, 0.5, None, 1.0, 3)
    before, after = Image.open(before), Image.open(after)
    assert before.size == after.size == (256, 256)
    from nada_core.latent.sampling import latents_for_seeds, render

    (src,), (adapted,) = render([studio.base("tiny"), studio.model(model)],
                                latents_for_seeds(studio.base("tiny"), [6], 0.7))      # seed 6, 32 px
    assert np.array_equal(np.asarray(before.resize((32, 32), Image.NEAREST)), np.asarray(src))
    assert np.array_equal(np.asarray(after.resize((32, 32), Image.NEAREST)), np.asarray(adapted))
    assert np.abs(np.asarray(src, dtype=int) - np.asarray(adapted, dtype=int)).mean() > 1   # a real before and after
    last = sample_tab.before_after(studio, model, "4,5,6", 0.7, "const", 1.0, None, 0.5, None, 1.0, 16)
    assert np.array_equal(np.asarray(Image.open(last[0])), np.asarray(before))   # past the seeds shown: the last one
    assert sample_tab.before_after(studio, None, "0", 0.7, "const", 1.0, None, 0.5) == {"__type__": "update"}
    with pytest.raises(Exception, match="Sample to compare must be a whole number between 1 and 16"):
        sample_tab.before_after(studio, model, "0", 0.7, "const", 1.0, None, 0.5, None, 1.0, 17)
    # a refused seed range is the grid's to say (once): the pair stays as it is
    assert sample_tab.before_after(studio, model, "0-100000000", 0.7, "const", 1.0, None, 0.5) == {"__type__": "update"}
    # Selfie: the aligned photo against the first stylised face, at the photo's size
    Image.fromarray(data.astronaut()).save(tmp_path / "me.png")
    values = [0.0] * 12 + ["all layers"] * 12
    outs = list(selfie_tab.run(studio, str(tmp_path / "me.png"), None, "tiny", [model], "Optimisation", 5, False, False,
                               [], 0, 1.0, 0, 0, 0, None, 1.0, None, *values))
    *_, gallery, _, state = outs[-1]
    photo, styled = (Image.open(p) for p in selfie_tab.before_after(studio, state, gallery))
    assert photo.size == styled.size == (256, 256)
    assert np.array_equal(np.asarray(photo), np.asarray(state["faces"][0].aligned))
    first = Image.open(gallery[0][0])
    assert np.array_equal(np.asarray(styled.resize(first.size, Image.NEAREST)), np.asarray(first))
    assert selfie_tab.before_after(studio, None, []) is None


def test_the_agents_stylise_tool_gives_one_sheet_of_the_pasted_photo_and_the_pair(app, tmp_path):
    from demo import agent_api

    client, studio, _ = app
    if not studio.library():
        train(client)
    model = studio.library()[0].id
    Image.fromarray(data.astronaut()).save(tmp_path / "me.png")
    steps = []
    sheet = agent_api.stylise_photo(studio, str(tmp_path / "me.png"), model, 3, 1.0,
                                    progress=lambda p, **kw: steps.append(p))
    sheet = np.asarray(Image.open(sheet).convert("RGB")).astype(int)
    assert sheet.shape == (512 + 256, 512, 3) and steps[-1] == (3, 3)   # the photo over the aligned/stylised pair
    photo = data.astronaut().astype(int)
    assert np.abs(sheet[:512] - photo)[400:].mean() < 3     # the photo pasted back, unchanged far from the face
    assert np.abs(sheet[:512] - photo)[60:200, 160:280].mean() > 5          # and the face stylised
    assert np.abs(sheet[512:, :256] - sheet[512:, 256:]).mean() > 5         # aligned beside its stylised version
    with pytest.raises(Exception, match="crop scale must be between 0.6 and 1.6"):
        agent_api.stylise_photo(studio, str(tmp_path / "me.png"), model, 3, 2.0, progress=lambda p, **kw: None)
    with pytest.raises(Exception, match="target must be a text of 1 to 300 characters"):
        agent_api.check_prompt(studio, "photo", "x" * 301)
