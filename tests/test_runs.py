"""The run lifecycle: one Run object for the CLI, the app and batch; its folder, stop, continue, the library."""
import json
import time

import pytest
import torch

from nada_core.guidance.clip_guide import load_clip
from nada_core.models.tiny import tiny_generator
from nada_core.store.library import delete_model, list_library, remove_abandoned, rename_model
from nada_core.store.runs import RunBusy, RunFolder
from nada_core.training.adapt import Adapter, Recipe
from nada_core.training.mapper import MapperRecipe, MapperTrainer
from nada_core.training.run import Run
from nada_core.training.timefmt import fmt_seconds


@pytest.fixture(scope="module")
def clip():
    return [load_clip("tiny")]


def recipe(**kw):
    base = dict(source="photo", target="sketch", iterations=6, clip_models=["tiny"], clip_weights=[1.0], k=3,
                preview_every=100, snapshot_every=4, preview_seeds=[0, 1], mixing=0.5)
    return Recipe(**{**base, **kw})


def weights(G):
    return {k: v.detach().clone() for k, v in G.state_dict().items()}


def stop_at(run, step):
    return lambda ev: run.stop() if ev.kind == "step" and ev.step == step else None


def test_stop_then_continue_equals_an_uninterrupted_run_bit_for_bit(clip, tmp_path):
    whole = Adapter(tiny_generator(), recipe(), clip, out_dir=tmp_path / "whole", base_name="tiny")
    assert Run(whole).run_here().kind == "done"

    part = Adapter(tiny_generator(), recipe(), clip, out_dir=tmp_path / "part", base_name="tiny")
    run = Run(part)
    ended = run.run_here(stop_at(run, 3))
    assert ended.kind == "cancelled" and ended.step == 3
    folder = RunFolder(tmp_path / "part")
    # the stop saved a resumable state at the step where it stopped, between the snapshot cadence (4)
    assert folder.snapshot_steps() == [3] and torch.load(folder.state_path, weights_only=True)["step"] == 3
    assert folder.finished and folder.continuable

    resumed = Adapter.resume(tmp_path / "part", tiny_generator(), clip)
    assert resumed.step == 3
    assert Run(resumed).run_here().kind == "done"
    a, b = weights(whole.G_train), weights(resumed.G_train)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == whole.history


def test_a_stopped_mapper_continues_exactly_too(clip, tmp_path):
    r = MapperRecipe(text="smile", iterations=5, clip_models=["tiny"], clip_weights=[1.0], train_size=16, test_size=4,
                     batch=2, preview_every=100, snapshot_every=100)
    whole = MapperTrainer(tiny_generator(), r, clip, out_dir=tmp_path / "whole", model_name="tiny")
    Run(whole).run_here()
    part = MapperTrainer(tiny_generator(), MapperRecipe.from_dict(r.to_dict()), clip, out_dir=tmp_path / "part",
                         model_name="tiny")
    run = Run(part)
    assert run.run_here(stop_at(run, 2)).kind == "cancelled"
    resumed = MapperTrainer.resume(tmp_path / "part", tiny_generator(), clip)
    assert resumed.step == 2
    Run(resumed).run_here()
    a, b = weights(whole.mapper), weights(resumed.mapper)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_in_its_own_thread_is_read_at_the_readers_pace_and_stops_at_once(clip, tmp_path):
    ad = Adapter(tiny_generator(), recipe(iterations=100_000, snapshot_every=0), clip, out_dir=tmp_path / "r")
    run = Run(ad, preview_seconds=0.2).start()
    deadline = time.monotonic() + 60
    while run.view().step < 15 and time.monotonic() < deadline:
        time.sleep(0.05)
    v = run.view()
    assert v.state == "running" and v.step >= 15 and v.preview is not None and v.losses
    assert v.sec_per_step > 0 and v.eta == pytest.approx(v.sec_per_step * (v.total - v.step), rel=1e-6)
    assert run.stop() and run.view().state == "stopping"       # the view says so at once
    t0 = time.monotonic()
    assert run.wait(30)
    assert time.monotonic() - t0 < 10
    end = run.view()
    assert end.state == "cancelled" and end.final.checkpoint and end.step == end.final.step
    assert RunFolder(tmp_path / "r").continuable and (tmp_path / "r" / "thumb.png").is_file()
    assert not run.stop()   # an ended run has nothing to stop


def test_the_step_rate_is_wall_clock_time_including_previews(clip, tmp_path):
    ad = Adapter(tiny_generator(), recipe(iterations=12, snapshot_every=0, preview_every=1), clip)
    seen = []
    t0 = time.monotonic()
    Run(ad).run_here(lambda ev: seen.append((time.monotonic(), ev)) if ev.kind == "step" else None)
    wall = (seen[-1][0] - t0) / len(seen)
    # every step renders a preview here; the trainer's own step time leaves that out, the run's rate does not
    assert seen[-1][1].sec_per_step == pytest.approx(wall, rel=0.35)
    assert seen[-1][1].sec_per_step > sum(e.timings.get("train_forward_backward", 0) for _, e in seen[-3:]) / 3


def test_a_finished_run_gets_its_thumbnail_and_pruned_snapshots_and_a_short_stop_is_set_aside(clip, tmp_path):
    ad = Adapter(tiny_generator(), recipe(iterations=6, snapshot_every=1), clip, out_dir=tmp_path / "lib" / "done")
    Run(ad, keep_snapshots=2).run_here()
    folder = RunFolder(tmp_path / "lib" / "done")
    assert folder.snapshot_steps() == [5, 6] and folder.thumb_path.is_file()

    short = Adapter(tiny_generator(), recipe(iterations=50), clip, out_dir=tmp_path / "lib" / "short")
    run = Run(short, set_aside_below=0.1)
    run.run_here(stop_at(run, 2))
    assert run.view().set_aside and not (tmp_path / "lib" / "short").exists()
    assert (tmp_path / "lib" / ".trash" / "short" / "final.safetensors").is_file()


def test_a_training_run_cannot_be_renamed_or_deleted_and_its_files_never_split(clip, tmp_path):
    root = tmp_path / "lib"
    ad = Adapter(tiny_generator(), recipe(iterations=100_000, snapshot_every=3), clip, out_dir=root / "busy",
                 base_name="tiny")
    run = Run(ad).start()
    deadline = time.monotonic() + 60
    while not RunFolder(root / "busy").snapshots() and time.monotonic() < deadline:
        time.sleep(0.05)
    (entry,) = list_library(root)
    assert entry.training and "[training]" in entry.label
    with pytest.raises(RunBusy, match="busy is training; stop the run before you rename it"):
        rename_model(root, "busy", "other")
    with pytest.raises(RunBusy, match="before you delete it"):
        delete_model(root, "busy")
    run.stop()
    run.wait(30)
    assert (root / "busy" / "recipe.json").is_file() and (root / "busy" / "final.safetensors").is_file()
    assert rename_model(root, "busy", "other") == "other"   # once it has stopped
    assert [e.id for e in list_library(root)] == ["other"] and not list_library(root)[0].training


def test_a_rename_while_the_run_finishes_is_refused_so_thumbnail_and_weights_stay_together(clip, tmp_path):
    root = tmp_path / "lib"
    ad = Adapter(tiny_generator(), recipe(iterations=4, snapshot_every=2), clip, out_dir=root / "ending",
                 base_name="tiny")
    refused = []
    write_thumb = RunFolder.write_thumb

    def rename_meanwhile(folder, image):   # another visitor renames while the ending writes the thumbnail
        try:
            rename_model(root, "ending", "elsewhere")
        except RunBusy as e:
            refused.append(str(e))
        return write_thumb(folder, image)

    RunFolder.write_thumb = rename_meanwhile
    try:
        final = Run(ad).run_here()
    finally:
        RunFolder.write_thumb = write_thumb
    assert final.kind == "done" and refused == ["ending is training; stop the run before you rename it"]
    folder = RunFolder(root / "ending")
    assert folder.finished and folder.thumb_path.is_file() and folder.recipe_path.is_file()
    assert not (root / "elsewhere").exists() and not folder.is_active()
    assert rename_model(root, "ending", "elsewhere") == "elsewhere"   # once it has ended


def test_a_short_run_set_aside_leaves_no_lock_behind(clip, tmp_path):
    short = Adapter(tiny_generator(), recipe(iterations=50), clip, out_dir=tmp_path / "lib" / "short")
    run = Run(short, set_aside_below=0.1)
    run.run_here(stop_at(run, 2))
    trashed = tmp_path / "lib" / ".trash" / "short"
    assert run.view().set_aside and not (trashed / ".active").exists() and not RunFolder(trashed).is_active()


def test_a_second_process_cannot_train_in_a_folder_that_is_training(clip, tmp_path):
    ad = Adapter(tiny_generator(), recipe(iterations=3), clip, out_dir=tmp_path / "r")
    with RunFolder(tmp_path / "r").active():
        events = list(ad.run())
    assert [e.kind for e in events] == ["error"] and "already training" in events[0].message
    assert not RunFolder(tmp_path / "r").finished


def test_a_crashed_run_is_listed_as_continuable_and_an_empty_one_is_cleared(clip, tmp_path):
    root = tmp_path / "lib"
    ad = Adapter(tiny_generator(), recipe(iterations=8, snapshot_every=2), clip, out_dir=root / "crashed",
                 base_name="tiny")
    for ev in ad.run():   # "killed" after its snapshot at step 4: no final weights, no ending
        if ev.step == 5:
            break
    (root / "crashed" / "final.safetensors").unlink(missing_ok=True)
    (entry,) = list_library(root)
    assert not entry.finished and entry.continuable and entry.path.name == "step_00004.safetensors"
    assert entry.folder.path == root / "crashed" and "[unfinished" in entry.label
    resumed = Adapter.resume(entry.folder.path, tiny_generator(), clip)
    assert resumed.step == 4

    empty = root / "killed-early"
    empty.mkdir()
    (empty / "recipe.json").write_text(json.dumps({"base": "tiny", "recipe": {}}))
    assert remove_abandoned(root) == ["killed-early"] and not empty.exists() and (root / "crashed").exists()


def test_one_time_formatter_a_clock_for_terminals_and_words_for_the_app():
    """Every ETA and duration comes from one formatter: m:ss / h:mm:ss on a terminal, words in the app."""
    assert fmt_seconds(None) == fmt_seconds(None, clock=True) == "?"
    assert [fmt_seconds(s, clock=True) for s in (0, 1.0, 65, 3723)] == ["0:00", "0:01", "1:05", "1:02:03"]
    assert [fmt_seconds(s) for s in (0, 45, 65, 3723)] == ["0 s", "45 s", "1 min 05 s", "1 h 02 min"]
    assert fmt_seconds(59.6) == "1 min 00 s" and fmt_seconds(59.6, clock=True) == "1:00"  # both round


def test_only_the_run_folder_module_spells_the_run_file_names():
    """Issue 17: every run file name in one place (nada_core/store/runs.py); elsewhere the code asks RunFolder
    (string literals are checked, docstrings and comments may name the files)."""
    import ast
    from pathlib import Path

    names = ["recipe.json", "final.safetensors", "mapper.json", "mapper.safetensors", "state.pt", "diagnostics.json",
             "thumb.png", "snapshots", "step_"]
    root = Path(__file__).resolve().parents[1]
    spelled = []
    for path in [*root.glob("nada_core/**/*.py"), *root.glob("demo/*.py"), root / "app.py"]:
        if path.name == "runs.py":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
                and n.body and isinstance(n.body[0], ast.Expr)}
        spelled += [f"{path.relative_to(root)}:{c.lineno} {c.value!r}" for c in ast.walk(tree)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and id(c) not in docs
                    and any(n == c.value or (n.endswith((".json", ".safetensors", ".pt", ".png", "_")) and n in c.value)
                            for n in names)]
    assert spelled == []
