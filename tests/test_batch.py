"""Batch adaptation from a TOML file: up-front checks, a sequential run, and a run over a local Ray cluster
(tiny untrained models throughout)."""
import json
import os
import re

import pytest
from PIL import Image

from nada_core.__main__ import main
from nada_core.store.library import list_library
from nada_core.training import batch

try:
    import ray
except ImportError:  # CI installs it (requirements-dev.txt); elsewhere the cluster test is skipped
    ray = None

TINY = """
[defaults]
base = "tiny"
clip = "tiny"
iterations = 3
batch = 1
"""
# 1e308 is a finite number, so the file passes the checks; in float32 the weighted loss is inf at step 1
BROKEN = """
[[job]]
name = "broken"
target = "pixar character"
clip_weights = [1e308]
"""


def _table(stdout: str) -> dict[str, list[str]]:
    """The summary table's rows by job name: [index, name, status, tries, time, model or error]."""
    rows = {}
    for line in stdout.splitlines()[1:]:
        cells = re.split(r"\s{2,}", line.strip(), maxsplit=5)
        rows[cells[1]] = cells
    return rows


def test_the_file_is_checked_up_front_with_job_and_field(tmp_path, capsys):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "jobs.toml").write_text(TINY.replace("iterations = 3", "iterations = 3\niters = 5") + """
[[job]]
name = "no-target"
source = "photo"

[[job]]
name = "fractional"
target = "sketch"
iterations = 2.5

[[job]]
name = "missing-image"
style_images = ["red.png", "nope.png"]

[[job]]
name = "too-many-slots"
target = "sketch"
k = 99

[[job]]
name = "unknown-base"
target = "sketch"
base = "no-such-model"

[[job]]
name = "same-prompts"
target = "Photo"

[[job]]
name = "bad-key"
target = "sketch"
mixng = 0.9

[[job]]
name = "sketch"
target = "sketch"

[[job]]
name = "sketch"
target = "pencil sketch"

[[job]]
name = "nan-lr"
target = "sketch"
lr = nan
""")
    lib = tmp_path / "lib"
    assert main(["batch", str(tmp_path / "jobs.toml"), "--library", str(lib)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and "nothing was run" in err
    for expected in ["[defaults]: unknown key 'iters' (did you mean 'iterations'?)",
                     "job 1 ('no-target'): give a target text",
                     "job 2 ('fractional'): iterations must be a whole number (got 2.5)",
                     "job 3 ('missing-image'): style_images: nope.png: no such file",
                     "job 4 ('too-many-slots'): k must be between 1 and 8",      # the tiny base has 8 W+ slots
                     "job 5 ('unknown-base'): base 'no-such-model' is not 'tiny', a weights manifest name",
                     "job 6 ('same-prompts'): source and target are both",
                     "job 7 ('bad-key'): unknown key 'mixng' (did you mean 'mixing'?)",
                     "job 9 ('sketch'): the name 'sketch' is taken by job 8",
                     "job 10 ('nan-lr'): lr must be a finite number"]:
        assert expected in err, expected
    assert not lib.exists()  # nothing ran, nothing was created

    (tmp_path / "bad.toml").write_text("[[job]\nname = 1")
    assert main(["batch", str(tmp_path / "bad.toml")]) == 1
    assert "not valid TOML" in capsys.readouterr().err
    (tmp_path / "empty.toml").write_text(TINY)
    assert main(["batch", str(tmp_path / "empty.toml")]) == 1
    assert "no jobs" in capsys.readouterr().err

    # --check shows the plan (style images resolved beside the file, default name from the image) and trains nothing
    (tmp_path / "ok.toml").write_text(TINY + '\n[[job]]\nstyle_images = ["red.png"]\n')
    assert main(["batch", str(tmp_path / "ok.toml"), "--library", str(lib), "--check"]) == 0
    assert "photo-to-red: tiny, 'photo' -> 1 style image(s), 3 steps" in capsys.readouterr().err
    assert not lib.exists()


def test_missing_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "jobs.toml").write_text(TINY + '\n[[job]]\ntarget = "sketch"\n')
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray -> ImportError
    assert main(["batch", str(tmp_path / "jobs.toml"), "--ray", "auto"]) == 1
    assert "pip install -r requirements-cluster.txt" in capsys.readouterr().err


def test_sequential_batch_installs_models_and_retries_a_failure_once(tmp_path, capsys):
    Image.new("RGB", (48, 64), (20, 20, 220)).save(tmp_path / "blue.png")
    (tmp_path / "jobs.toml").write_text(TINY + """
[[job]]
name = "Blue Style"
style_images = ["blue.png"]
seed = 7
mixing = 0.5
""" + BROKEN)
    lib = tmp_path / "lib"
    assert main(["batch", str(tmp_path / "jobs.toml"), "--library", str(lib), "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    rows = _table(out)
    assert rows["blue-style"][2:4] == ["done", "1"] and rows["blue-style"][5] == str(lib / "blue-style")
    assert rows["broken"][2:4] == ["failed", "2"] and "the loss became inf at step 1" in rows["broken"][5]
    assert "job 2 ('broken'): try 1 failed" in err and "failed after 2 tries" in err and "1 of 2 job(s) failed" in err

    [entry] = list_library(lib)  # the app's listing: recipe.json + final weights (+ thumbnail)
    assert entry.name == "blue-style" and entry.finished and entry.base == "tiny" and entry.thumbnail
    saved = json.loads((lib / "blue-style" / "recipe.json").read_text())["recipe"]
    assert saved["seed"] == 7 and saved["mixing"] == 0.5 and saved["iterations"] == 3
    assert saved["style_images"] == [str((tmp_path / "blue.png").resolve())] and saved["clip_models"] == ["tiny"]
    assert sorted(p.name for p in (lib / "blue-style").iterdir()) == ["final.safetensors", "recipe.json", "thumb.png"]

    # a second run refuses to reuse the name, or skips the finished model when asked
    (tmp_path / "again.toml").write_text(TINY + '\n[[job]]\nname = "blue-style"\ntarget = "blue"\n')
    assert main(["batch", str(tmp_path / "again.toml"), "--library", str(lib)]) == 1
    assert "--skip-existing" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "again.toml"), "--library", str(lib), "--skip-existing"]) == 0
    assert "skipped, the library already has this model" in capsys.readouterr().err


@pytest.mark.skipif(ray is None and not os.environ.get("CI"),
                    reason="Ray is not installed (pip install -r requirements-cluster.txt)")
def test_ray_cluster_runs_jobs_in_parallel_and_reports_the_failure(tmp_path, capsys):
    from nada_core.models.tiny import tiny_generator
    from nada_core.store.library import add_model

    lib = tmp_path / "lib"
    add_model(lib, "Library Base", tiny_generator(seed=3), "tiny", {})   # a library model as base: always shipped
    Image.new("RGB", (64, 48), (240, 200, 20)).save(tmp_path / "yellow.jpg")  # images always travel with the job
    (tmp_path / "jobs.toml").write_text(TINY + """
[[job]]
name = "yellow"
style_images = ["yellow.jpg"]

[[job]]
name = "from-library"
base = "library-base"
target = "watercolor painting"
preset = "texture"
""" + BROKEN)
    # a local cluster of 2 CPUs, with this package as the job's code (as `--ray ADDRESS` sets it up itself)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"working_dir": str(batch._stage_code(_mkdir(tmp_path / "code")))})
    try:
        code = main(["batch", str(tmp_path / "jobs.toml"), "--library", str(lib), "--ray", "auto", "--ship-weights"])
        assert ray.is_initialized()  # a cluster the command found running is left running
    finally:
        ray.shutdown()
    out, err = capsys.readouterr()
    assert code == 1, err
    assert "Ray cluster: 1 node(s), no GPU, 2 CPUs; 1 CPU(s) per job" in err
    rows = _table(out)
    assert rows["yellow"][2:4] == ["done", "1"] and rows["from-library"][2:4] == ["done", "1"]
    assert rows["broken"][2:4] == ["failed", "2"] and "the loss became inf at step 1" in rows["broken"][5]
    assert "job 3 ('broken'): try 1 failed" in err and "failed after 2 tries" in err

    entries = {e.name: e for e in list_library(lib) if e.name != "library-base"}
    assert sorted(entries) == ["from-library", "yellow"]
    assert all(e.finished and e.thumbnail for e in entries.values())
    assert entries["from-library"].base == "library-base"
    assert entries["from-library"].recipe["preset"] == "texture"
    assert entries["yellow"].recipe["style_images"] == [str((tmp_path / "yellow.jpg").resolve())]


def _mkdir(p):
    p.mkdir()
    return p


def test_cluster_plan_takes_one_gpu_per_job_or_n_cpus():
    class FakeRay:
        def __init__(self, *nodes):
            self._nodes = [{"Alive": True, "Resources": r} for r in nodes] + [{"Alive": False, "Resources": {"CPU": 64}}]

        def nodes(self):
            return self._nodes

    resources, device, plan = batch._cluster_plan(FakeRay({"CPU": 16, "GPU": 4}, {"CPU": 8}), 2)
    assert resources == {"num_gpus": 1, "num_cpus": 2} and device == "cuda" and "4 GPU(s); one job per GPU" in plan
    resources, device, plan = batch._cluster_plan(FakeRay({"CPU": 8}, {"CPU": 4}), 4)
    assert resources == {"num_cpus": 4} and device == "cpu" and "no GPU, 12 CPUs; 4 CPU(s) per job" in plan
    with pytest.raises(batch.BatchError, match="no node of the cluster has 16 CPUs.*lower --cpus-per-job"):
        batch._cluster_plan(FakeRay({"CPU": 8}), 16)


def test_progress_lines_redraw_in_place_on_a_terminal(tmp_path, monkeypatch):
    import io

    monkeypatch.setenv("COLUMNS", "120")  # lines are cut to the terminal's width
    monkeypatch.setenv("LINES", "40")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    (tmp_path / "jobs.toml").write_text(TINY + '\n[[job]]\nname = "a"\ntarget = "sketch"\n'
                                               '\n[[job]]\nname = "b"\ntarget = "pixar"\n')
    jobs, _ = batch.load_jobs(tmp_path / "jobs.toml")
    results = [batch.JobResult(j) for j in jobs]
    term = Terminal()
    view = batch.ProgressView(results, term)
    view.refresh(force=True)
    batch._apply_event(results[0], {"kind": "step", "step": 2, "total": 3, "loss": 0.5, "sec_per_step": 1.0,
                                    "eta": 1.0}, view)
    view.note("job 2 ('b'): warning: something")
    text = term.getvalue()
    assert text.count("\x1b[2F\x1b[J") == 1   # the two job lines were erased once, before the note
    assert "  1 a    running  [#############.......] 2/3 loss 0.5000 1.00s/it ETA 0:01" in text
    assert text.index("warning: something") < text.rindex("  2 b    queued")


def test_ctrl_c_stops_the_job_through_its_run_keeps_it_resumable_and_starts_no_other(tmp_path):
    """A local batch job trains through training.run.Run: the first Ctrl-C is Run.stop, which saves the weights and
    the resumable state; the run lands in the library (continuable) and the next job never starts."""
    import signal
    import subprocess
    import sys
    import time

    from nada_core.models.tiny import tiny_generator
    from nada_core.store.runs import RunFolder
    from nada_core.training.adapt import Adapter
    from tests.conftest import ROOT

    (tmp_path / "jobs.toml").write_text(TINY.replace("iterations = 3", "iterations = 100000") + """
[[job]]
name = "long"
target = "sketch"

[[job]]
name = "never"
target = "pixar character"
""")
    lib, tmp = tmp_path / "lib", tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "nada_core", "batch", str(tmp_path / "jobs.toml"), "--library",
                             str(lib), "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TMPDIR": str(tmp)})
    deadline = time.monotonic() + 120
    while not list(tmp.glob("nada-batch-*/long/.active")) and time.monotonic() < deadline:   # training has begun
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopping the job after this step and saving it; no other job starts" in err
    assert "stopped by Ctrl-C; 1 job(s) not started" in err and f"adapt --resume {lib / 'long'}" in err
    rows = _table(out)
    assert rows["long"][2] == "stopped" and rows["never"][2] == "queued"
    [entry] = list_library(lib)
    assert entry.name == "long" and entry.continuable and entry.finished and entry.thumbnail
    run = RunFolder(lib / "long")
    assert run.state_path.is_file() and len(run.snapshots()) == 1
    from nada_core.guidance.clip_guide import load_ensemble

    resumed = Adapter.resume(lib / "long", tiny_generator(), load_ensemble(["tiny"], [1.0]))
    assert 1 <= resumed.step == run.snapshot_steps()[0] < 100000 and resumed.recipe.iterations == 100000
    assert not list(tmp.glob("nada-batch-*"))   # the temporary run folder went
