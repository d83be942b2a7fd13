import subprocess
import sys

import pytest
from PIL import Image

from nada_core.__main__ import main
from nada_core.sampling import parse_seeds
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
    assert main(["adapt", "--base", "tiny", "--clip", "tiny", "--source", "dog", "--target", "Dog"]) == 1
    assert "no direction" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "nope.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_module_entry_point_lists_weights(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nada_core", "weights", "list"], cwd=ROOT, capture_output=True,
                       text=True, env={"NADA_WEIGHTS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ffhq-256" in r.stdout and "missing" in r.stdout and "dlib-landmarks" in r.stdout


def test_invert_writes_crop_reconstruction_stylised_and_pasted(tmp_path, capsys):
    from skimage import data

    from nada_core.checkpoints import save_generator
    from nada_core.tiny import tiny_generator

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
