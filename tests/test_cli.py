import subprocess
import sys

import pytest
from PIL import Image

from nada_core.__main__ import main
from nada_core.latent.sampling import parse_seeds
from tests.conftest import ROOT


def test_parse_seeds():
    assert parse_seeds("1-4") == [1, 2, 3, 4]
    assert parse_seeds("0-2, 10") == [0, 1, 2, 10]
    for bad in ["", "a-b", "5-1", "-3", "0-100000"]:
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_adapt_then_sample_on_tiny_models(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["adapt", "--base", "tiny", "--clip", "tiny", "--source", "photo", "--target", "sketch",
                 "--iters", "3", "--preview-every", "1", "--snapshot-every", "2", "--out", str(out)]) == 0
    assert (out / "final.safetensors").is_file() and (out / "snapshots" / "step_00002.safetensors").is_file()
    assert Image.open(out / "thumb.png").size[0] > 32
    assert main(["sample", "--model", str(out / "final.safetensors"), "--seeds", "1-3", "--out", str(tmp_path / "g.png")]) == 0
    g = Image.open(tmp_path / "g.png")
    assert g.size == (3 * 32 + 2 * 4, 2 * 32 + 4)  # 3 seeds, source row above adapted row
    assert "top: tiny" in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path))
    assert main(["adapt", "--base", "ffhq-256", "--clip", "tiny", "--target", "sketch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "weights download ffhq-256" in err and "Traceback" not in err
    monkeypatch.setenv("NADA_LIBRARY_DIR", str(tmp_path / "lib"))
    assert main(["adapt", "--base", "tiny", "--clip", "tiny", "--source", "dog", "--target", "Dog"]) == 1
    assert "no direction" in capsys.readouterr().err
    assert list((tmp_path / "lib").iterdir()) == []  # a refused recipe leaves no empty run folder behind
    assert main(["sample", "--model", str(tmp_path / "nope.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_module_entry_point_lists_weights(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nada_core", "weights", "list"], cwd=ROOT, capture_output=True,
                       text=True, env={"NADA_WEIGHTS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ffhq-256" in r.stdout and "missing" in r.stdout and "dlib-landmarks" in r.stdout


def test_invert_writes_crop_reconstruction_stylised_and_pasted(tmp_path, capsys):
    from skimage import data

    from nada_core.models.tiny import tiny_generator
    from nada_core.store.checkpoints import save_generator

    Image.fromarray(data.astronaut()).save(tmp_path / "photo.jpg")
    model = save_generator(tiny_generator(seed=4), tmp_path / "style" / "final.safetensors")
    assert main(["invert", str(tmp_path / "photo.jpg"), "--base", "tiny", "--model", str(model),
                 "--steps", "5", "--out", str(tmp_path / "out")]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["aligned.png", "landmarks.png", "pasted_style.png", "reconstruction.png", "stylised_style.png"]
    assert Image.open(tmp_path / "out" / "pasted_style.png").size == (512, 512)
    (tmp_path / "empty.png").write_bytes(b"")
    assert main(["invert", str(tmp_path / "empty.png"), "--base", "tiny", "--out", str(tmp_path / "o2")]) == 1
    assert "could not read the image" in capsys.readouterr().err


def test_invert_takes_the_crop_adjustment(tmp_path, capsys):
    import numpy as np
    from skimage import data

    from nada_core.faces.align import CropAdjust, align_face, landmarks

    photo = Image.fromarray(data.astronaut())
    photo.save(tmp_path / "photo.png")
    base = ["invert", str(tmp_path / "photo.png"), "--base", "tiny", "--steps", "2"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "nudged"), "--crop-scale", "1.1", "--crop-shift", "0.02,-0.03",
                 "--crop-rotate", "5"]) == 0
    assert "reconstruction error:" in capsys.readouterr().err
    plain, nudged = (np.asarray(Image.open(tmp_path / d / "aligned.png"), dtype=int) for d in ("plain", "nudged"))
    expected, _ = align_face(photo, output_size=256, transform_size=1024, lm=landmarks(photo),
                             adjust=CropAdjust(scale=1.1, shift_x=0.02, shift_y=-0.03, rotate=5))
    assert np.array_equal(nudged, np.asarray(expected)) and np.abs(plain - nudged).mean() > 5
    for bad, message in ((["--crop-scale", "2"], "crop scale must be between 0.6 and 1.6"),
                         (["--crop-shift", "0.5,0"], "crop shift x must be between -0.3 and 0.3"),
                         (["--crop-shift", "up"], "crop shift must be DX,DY"),
                         (["--crop-rotate", "60"], "crop rotation (degrees) must be between -45 and 45")):
        assert main([*base, "--out", str(tmp_path / "bad"), *bad]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()   # refused before any work


def test_adapt_json_lines_then_resume_shows_the_saved_recipe(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    assert main(["adapt", "--base", "tiny", "--clip", "tiny", "--source", "photo", "--target", "pencil sketch",
                 "--iters", "3", "--preview-every", "2", "--snapshot-every", "3", "--identity", "off",
                 "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]  # every stdout line is one JSON object
    assert records[0]["kind"] == "start" and records[0]["recipe"]["target"] == "pencil sketch"
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["total"] == 3 for r in steps)
    for r in steps:
        assert isinstance(r["loss"], float) and set(r["losses"]) == {"tiny", "total"}
        assert r["sec_per_step"] > 0 and r["eta"] >= 0
    assert steps[-1]["eta"] == 0
    measured = [r["step"] for r in steps if "clip_score" in r]
    assert measured == [1, 2, 3]  # first, every 2nd, last (and snapshot) steps
    assert all(isinstance(r["diversity"], float) and r["identity"] is None for r in steps)
    final = records[-1]
    assert final["kind"] == "done" and final["step"] == 3 and final["save_error"] is None
    assert final["checkpoint"] == str(out / "final.safetensors") and "clip_score" in final
    assert "[" not in captured.err  # no progress bar in JSON mode

    # resume with none of the recipe options: the banner (and the run) follow the saved recipe
    assert main(["adapt", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert "adapting tiny on cpu: 'photo' -> 'pencil sketch', resuming at step 3, 3 steps, CLIP tiny" in err
    assert "300 steps" not in err and "ViT" not in err


@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
def test_adapt_reports_a_failed_final_save_and_returns_1(tmp_path, capsys, monkeypatch, as_json):
    import json
    from pathlib import Path

    import nada_core.training.adapt as adapt

    real = adapt.save_generator

    def no_space_for_final(G, path, meta=None):
        if Path(path).name == "final.safetensors":
            raise OSError(28, "No space left on device")
        return real(G, path, meta)

    monkeypatch.setattr(adapt, "save_generator", no_space_for_final)
    out = tmp_path / "run"
    argv = ["adapt", "--base", "tiny", "--clip", "tiny", "--target", "sketch", "--iters", "2", "--snapshot-every", "1",
            "--no-diagnostics", "--out", str(out)]
    assert main(argv + (["--json"] if as_json else [])) == 1
    captured = capsys.readouterr()
    assert "None" not in captured.out and not (out / "final.safetensors").exists()
    assert "error: trained 2 steps but the final model could not be saved (OSError: [Errno 28] No space left" in captured.err
    assert f"the newest snapshot is {out / 'snapshots' / 'step_00002.safetensors'}" in captured.err
    if as_json:
        final = json.loads(captured.out.splitlines()[-1])
        assert final["kind"] == "done" and final["checkpoint"] is None
        assert final["save_error"].startswith("OSError") and "clip_score" not in final


def test_ctrl_c_stops_after_the_step_and_saves(tmp_path):
    """The first Ctrl-C (SIGINT) ends an adapt run as 'cancelled' with its weights saved and exit code 130."""
    import json
    import os
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nada_core", "adapt", "--base", "tiny", "--clip", "tiny",
                             "--target", "sketch", "--iters", "100000", "--snapshot-every", "100000",
                             "--identity", "off", "--no-diagnostics", "--out", str(out), "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NADA_LIBRARY_DIR": str(tmp_path / "library")})
    records = []
    for line in proc.stdout:
        records.append(json.loads(line))
        if records[-1]["kind"] == "step" and records[-1]["step"] >= 2:
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=120)
    records += [json.loads(line) for line in rest.splitlines()]
    assert proc.returncode == 130, err
    final = records[-1]
    assert final["kind"] == "cancelled" and 2 <= final["step"] < 100000
    assert final["checkpoint"] == str(out / "final.safetensors") and (out / "final.safetensors").is_file()
    assert "stopping after this step and saving" in err and f"adapt --resume {out}" in err


def test_commands_take_a_run_folder_and_the_models_own_base(tmp_path, capsys):
    """delta export RUN_FOLDER and invert --model RUN_FOLDER (no --base: the model's recorded base, as sample)."""
    from skimage import data

    run = tmp_path / "run"
    assert main(["adapt", "--base", "tiny", "--clip", "tiny", "--source", "photo", "--target", "sketch",
                 "--iters", "2", "--out", str(run)]) == 0
    assert main(["delta", "export", str(run)]) == 0
    assert (run / "run.nada.safetensors").is_file() and "base tiny" in capsys.readouterr().out
    Image.fromarray(data.astronaut()).save(tmp_path / "photo.jpg")
    assert main(["invert", str(tmp_path / "photo.jpg"), "--model", str(run), "--steps", "3",
                 "--out", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "reconstruction.png").size == (32, 32)   # inverted into the tiny base
    assert main(["sample", "--model", str(run), "--seeds", "0-1", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["delta", "export", str(tmp_path / "nothing-here")]) == 1
    assert "no such file or model" in capsys.readouterr().err
