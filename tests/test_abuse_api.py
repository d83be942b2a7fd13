"""The abuse corpus through the real Gradio API (gradio_client against the app on tiny models): path
probes, bad images, bad numbers, a disk that fills while saving. Each asserts the message, that
nothing was lost, and that the server still serves."""
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from nada_core.models.tiny import tiny_generator
from nada_core.store.checkpoints import save_generator
from nada_core.store.images import open_image
from nada_core.store.runs import RunFolder
from tests.app_server import launch_tiny, refusal

SLIDERS, RANGES = [0.0] * 12, ["all layers"] * 12
TRAIN = ["tiny", "Style", "Photo", "Sketch", [], [], 3, 2, 0.002, 0, 1, 0.0, ["tiny"], 1.0, 1.0, 0, 2, "off", "off", "ours"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    lib = tmp_path_factory.mktemp("library")
    mp = pytest.MonkeyPatch()
    mp.setenv("NADA_LIBRARY_DIR", str(lib))
    demo, studio, url = launch_tiny()
    client = Client(url, verbose=False)
    client.predict(*TRAIN, api_name="/train")
    yield client, studio, tmp_path_factory.mktemp("files")
    demo.close()
    mp.undo()


def error_of(fn) -> str:
    """The refusal's message, raised or in the call's message line (see tests.app_server.refusal)."""
    return refusal(fn)


def still_serves(client, studio):
    model = studio.library()[0].id
    img = Image.open(client.predict(model, "0", 0.7, "const", 1.0, None, 0.5, None, 1.0, api_name="/sample"))
    assert img.size == (128, 2 * 128 + 4)


def test_models_are_chosen_by_name_never_by_path(app):
    client, studio, files = app
    real = files / "real_generator.safetensors"
    save_generator(tiny_generator(seed=3), real)          # a valid generator that exists on disk
    probes = ["/etc/passwd", "/proc/self/environ", "../../../../etc/passwd", str(real), str(files / "missing.pt"),
              studio.library()[0].path.as_posix()]        # even the library file's own path is not a name
    answers = set()
    for p in probes:
        answers.add(error_of(lambda: client.predict(p, "0", 0.7, "const", 1.0, None, 0.5, None, 1.0, api_name="/sample")))
        answers.add(error_of(lambda: client.predict("tiny", [p], 0, 0.7, 1, 0, None, 1.0, *SLIDERS, *RANGES, None, 0,
                                                    api_name="/edit")))
    # one identical answer whether the path exists or not: nothing reveals what is on disk
    assert len(answers) == 1 and "unknown model: choose one from the library list" in answers.pop()
    base_probe = error_of(lambda: client.predict(str(real), *TRAIN[1:], api_name="/train"))
    assert "unknown model" in base_probe
    still_serves(client, studio)


def raw_call(url: str, api: str, body: str) -> str:
    """POST a hand-written JSON body (NaN and Infinity included, as any script can send them) to
    Gradio's HTTP API and return the event stream's text."""
    import json
    import urllib.request

    req = urllib.request.Request(f"{url}gradio_api/call/{api}", data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        event = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event}", timeout=120) as r:
        return r.read().decode()


def test_bad_numbers_name_their_field(app):
    import json

    client, studio, _ = app
    for index, value, field in [(6, "NaN", "Iterations"), (6, "1e308", "Iterations"), (6, "2.5", "Iterations"),
                                (15, "Infinity", "Seed"), (15, "-1", "Seed"), (7, "1e9", "Batch"), (8, "NaN", "Learning rate")]:
        args = [json.dumps(a) for a in TRAIN]
        args[index] = value
        stream = raw_call(client.src, "train", '{"data": [' + ", ".join(args) + "]}")
        # in the status line, or (a slider's range, checked by Gradio before the handler) as Gradio's error
        assert ("Not started: " + field in stream and "nada-warn" in stream) or \
            ("event: error" in stream and f'"error": "{field}: Value' in stream), stream[-300:]
        assert "Traceback" not in stream
    model = json.dumps(studio.library()[0].id)
    stream = raw_call(client.src, "sample", f'{{"data": [{model}, "0", NaN, "const", 1.0, null, 0.5, null, 1.0]}}')
    assert "event: error" in stream and "Truncation" in stream
    stream = raw_call(client.src, "interpolate", f'{{"data": [{model}, 1.0, null, 0.5, 0, 1, 1000000, "seeds", 0.7]}}')
    assert "event: error" in stream and "Frames" in stream
    still_serves(client, studio)


def _png_header_only(path, width, height):
    """A PNG that declares width x height but holds one tiny compressed row: opening it is cheap,
    decoding it would need gigabytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def test_bad_images_get_clear_messages(app, tmp_path):
    client, studio, _ = app
    model = studio.library()[0].id
    _png_header_only(tmp_path / "huge.png", 40000, 40000)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")

    def selfie(path):
        return client.predict(handle_file(str(path)), None, "tiny", [model], "Optimisation", 10, False, False, [], 0, 1.0, 0, 0, 0,
                              None, 1.0, *SLIDERS,
                              *RANGES, None, 0, api_name="/selfie")

    msg = error_of(lambda: selfie(tmp_path / "huge.png"))
    assert "image too large (40000 x 40000); the limit is 50 megapixels" in msg and "huge.png" in msg
    msg = error_of(lambda: selfie(tmp_path / "broken.jpg"))
    assert "broken.jpg: could not read the image" in msg
    assert "/tmp" not in msg and "gradio" not in msg  # the user's file name, never the server's upload path
    args = list(TRAIN)
    args[4] = [handle_file(str(tmp_path / "huge.png"))]
    assert "image too large" in error_of(lambda: client.predict(*args, api_name="/train"))
    still_serves(client, studio)


def test_oversized_photo_files_are_refused_before_decoding(tmp_path):
    big = tmp_path / "holiday.jpg"
    with open(big, "wb") as f:
        f.truncate(26 * 2 ** 20)   # 26 MB on disk (sparse), over the 25 MB limit for photos
    with pytest.raises(ValueError, match=r"holiday.jpg: file too large \(26 MB\); the limit is 25 MB"):
        open_image(big)


def test_stale_part_files_are_removed_when_the_studio_starts(tmp_path, monkeypatch):
    from demo.state import Studio

    monkeypatch.setenv("NADA_LIBRARY_DIR", str(tmp_path))
    run = tmp_path / "_tiny" / "photo-to-sketch" / "snapshots"
    run.mkdir(parents=True)
    (run / ".step_00010.safetensors.abc123.part").write_bytes(b"half a file")   # left by kill -9 mid-save
    (run / "step_00005.safetensors").write_bytes(b"kept")
    Studio(device="cpu", tiny=True)
    assert not list(tmp_path.rglob("*.part")) and (run / "step_00005.safetensors").read_bytes() == b"kept"


def test_high_bit_depth_photos_are_scaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 1, 64 * 64).reshape(64, 64) * 65535).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    rgb = np.asarray(open_image(tmp_path / "grey16.png"))
    assert rgb.shape == (64, 64, 3)
    assert (rgb == 255).mean() < 0.01 and abs(rgb.mean() - 127.5) < 2  # a ramp, not 89% white
    Image.fromarray((ramp / 65535).astype(np.float32), "F").save(tmp_path / "float.tiff")
    assert abs(np.asarray(open_image(tmp_path / "float.tiff")).mean() - 127.5) < 2


def test_mixed_size_style_images_train(app, tmp_path):
    client, studio, _ = app
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (64, 64), (20, 20, 220)).save(tmp_path / "blue.jpg")
    args = list(TRAIN)
    args[3] = ""
    args[4] = [handle_file(str(tmp_path / "red.png")), handle_file(str(tmp_path / "blue.jpg"))]
    out = client.predict(*args, api_name="/train")
    assert "Finished" in out[0]
    assert any(e.name.startswith("photo-to-red-blue") for e in studio.library())  # named after its images


def test_a_full_disk_loses_nothing(app, monkeypatch):
    """Every error type a real full disk raises on the final save keeps the model for Retry."""
    from safetensors import SafetensorError

    import nada_core.store.checkpoints as ck
    client, studio, _ = app
    real_save = ck.save_file if hasattr(ck, "save_file") else None
    for error in (OSError(28, "No space left on device"), RuntimeError("PytorchStreamWriter failed writing file"),
                  SafetensorError("Error while serializing: IoError(No space left on device)")):
        before = {e.id for e in studio.library()}

        def failing(*a, error=error, **k):
            raise error
        monkeypatch.setattr("safetensors.torch.save_file", failing)
        job = client.submit(*TRAIN, api_name="/train")
        outs = list(job)
        job.result()
        status = outs[-1][0]
        assert "Saving failed" in status and "kept in memory" in status, status
        assert studio.unsaved, "the trained model must stay in memory"
        monkeypatch.undo()
        adapter = next(iter(studio.unsaved.values()))[1]
        assert adapter.save_final() is not None  # what Retry does: the model was not lost
        assert {e.id for e in studio.library()} - before
        studio.unsaved.clear()
    assert real_save is None or ck.save_file is real_save
    still_serves(client, studio)


def test_seed_range_bombs_are_refused_at_once(app):
    import time

    client, studio, _ = app
    model = studio.library()[0].id
    for seeds in ("0-100000000", "0-99999999999", "1," * 100_000):
        t0 = time.perf_counter()
        sample = error_of(lambda: client.predict(model, seeds, 0.7, "const", 1.0, None, 0.5, None, 1.0,
                                                 api_name="/sample"))
        mix = error_of(lambda: client.predict(seeds, 0.7, model, None, None, None, 1.0, 0, 0, 0, api_name="/mix"))
        assert time.perf_counter() - t0 < 10   # two round trips; the refusal itself is measured in test_abuse
        for message in (sample, mix):
            assert "Seeds" in message and ("at most 16" in message or "4294967295" in message
                                           or "at most 200 characters" in message), message
    still_serves(client, studio)


def test_long_texts_are_refused_by_the_server(app):
    client, studio, _ = app
    model = studio.library()[0].id
    before = {e.id for e in studio.library()}
    long = "x" * 100_000   # the page's boxes stop at 300 or 80 characters; a script does not
    args = list(TRAIN)
    args[3] = long
    assert "the target text must be at most 300 characters (got 100000)" in error_of(
        lambda: client.predict(*args, api_name="/train"))
    assert "at most 300 characters" in error_of(lambda: client.predict("tiny", long, 2, api_name="/edit_mapper"))
    assert "a model name is at most 80 characters" in error_of(
        lambda: client.predict(model, long, api_name="/library_rename"))
    assert "a model name is at most 80 characters" in error_of(
        lambda: client.predict(long, model, None, None, None, 1.0, 0, 0, 0, api_name="/mix_save"))
    assert {e.id for e in studio.library()} == before and not list(studio.mapper_root.glob("*x" * 10 + "*"))
    still_serves(client, studio)


def test_reserved_folder_names_are_refused_or_avoided(app):
    client, studio, _ = app
    model = studio.library()[0].id
    assert "one of the library's own folders" in error_of(lambda: client.predict(model, "Mappers",
                                                                                 api_name="/library_rename"))
    client.predict("mappers", model, None, None, None, 1.0, 0, 0, 0, api_name="/mix_save")
    assert studio.entry("mappers-2").recipe["target"] == "mappers"     # saved beside the mappers' folder, not in it
    assert not (studio.mapper_root / "final.safetensors").exists()
    still_serves(client, studio)


def test_damaged_deltas_and_non_finite_models_get_clear_messages_at_import(app, tmp_path):
    import json as json_

    import torch
    from safetensors.torch import save_file

    from nada_core.store.delta import delta_info, export_delta

    client, studio, _ = app
    before = sorted(p.name for p in studio.library_root.iterdir())
    base = tiny_generator()
    good = export_delta(tiny_generator(seed=4), base, {"source_model": "tiny"}, tmp_path / "good.nada.safetensors")
    header = delta_info(good)
    for name, text, why in [("meta list.nada.safetensors", json_.dumps({**header, "meta": [1]}), "its meta is a JSON array"),
                            ("listed.nada.safetensors", "[1, 2]", "its metadata is a JSON array"),
                            ("deep.nada.safetensors", "[" * 100_000 + "]" * 100_000, "nests deeper than 32 levels")]:
        save_file({"convs.2.noise.weight": torch.zeros(1)}, tmp_path / name, metadata={"nada-delta": text})
        message = error_of(lambda: client.predict(handle_file(str(tmp_path / name)), "tiny", api_name="/library_import"))
        assert f"{name}: not a NADA delta: " in message and why in message, message
        assert "Something went wrong" not in message and "Expected a StyleGAN2 generator" not in message
    G = tiny_generator(seed=2)
    with torch.no_grad():
        G.input.input[0, 0, 0, 0] = float("nan")
    torch.save({"g_ema": G.state_dict()}, tmp_path / "diverged.pt")
    message = error_of(lambda: client.predict(handle_file(str(tmp_path / "diverged.pt")), "tiny",
                                              api_name="/library_import"))
    assert "diverged.pt: tensor 'input.input' holds NaN or infinite values" in message, message
    assert sorted(p.name for p in studio.library_root.iterdir()) == before
    still_serves(client, studio)


def test_a_full_disk_during_import_mix_save_or_download_says_so_and_leaves_no_folder(app, tmp_path, monkeypatch):
    import errno

    import torch

    client, studio, _ = app
    model = studio.library()[0].id
    torch.save({"g_ema": tiny_generator(seed=8).state_dict()}, tmp_path / "new style.pt")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def folders():
        return sorted(p.name for p in studio.library_root.rglob("*"))

    before = folders()
    with monkeypatch.context() as m:
        m.setattr("safetensors.torch.save_file", disk_full)
        for message in (error_of(lambda: client.predict(handle_file(str(tmp_path / "new style.pt")), "tiny",
                                                        api_name="/library_import")),
                        error_of(lambda: client.predict("Full disk mix", model, None, None, None, 1.0, 0, 0, 0,
                                                        api_name="/mix_save"))):
            assert "The disk is full" in message, message
        assert folders() == before
    client.predict("Mix to download", model, None, None, None, 0.5, 0, 0, 0, api_name="/mix_save")
    before = folders()
    with monkeypatch.context() as m:
        m.setattr("torch.save", disk_full)   # the rosinality .pt written on a first download
        assert "The disk is full" in error_of(lambda: client.predict("mix-to-download", api_name="/library_download"))
    assert folders() == before   # no half-written .pt, nothing else
    _, files = client.predict("mix-to-download", api_name="/library_download")
    assert sorted(Path(f).name for f in files["value"]) == ["mix-to-download.pt", "mix-to-download.safetensors"]
    still_serves(client, studio)


def test_a_training_run_cannot_be_renamed_or_deleted_by_another_visitor(app):
    client, studio, _ = app
    trainer, other = Client(client.src, verbose=False), Client(client.src, verbose=False)
    args = list(TRAIN)
    args[3], args[6] = "Granite", 2000
    job = trainer.submit(*args, api_name="/train")
    running = None
    for _ in range(600):
        running = next((e for e in studio.library() if e.training), None)
        active = studio.active_run()
        if running and active and active[0].view().step >= 250:   # past the share a stopped run keeps its place
            break
        time.sleep(0.05)
    assert running is not None and not job.done()
    assert f"{running.id} is training; stop the run before you rename it" in error_of(
        lambda: other.predict(running.id, "taken over", api_name="/library_rename"))
    assert "stop the run before you delete it" in error_of(lambda: other.predict(running.id, api_name="/library_delete"))
    trainer.predict(api_name="/stop")
    job.result()
    entry = studio.entry(running.id)   # still listed, whole: the recipe, the weights where it stopped, the thumbnail
    folder = RunFolder(entry.folder.path)
    assert folder.recipe_path.is_file() and folder.finished and folder.thumb_path.is_file() and folder.state_path.is_file()
    assert not (studio.library_root / "taken-over").exists()
    still_serves(client, studio)
