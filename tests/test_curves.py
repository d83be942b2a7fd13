"""The Adapt tab's curves (loss legend, bounded points) and the Sample controls that render again."""
import numpy as np

from demo import sample_tab
from demo.adapt_tab import CURVE_POINTS, _loss_frame
from tests.app_server import launch_tiny


def losses(models, steps):
    return [{"step": s, "loss": 1.0 / (s + 1) + k, "model": m} for s in range(steps) for k, m in enumerate(models)]


def test_the_legend_names_only_curves_that_are_drawn():
    one = _loss_frame(losses(["ViT-B/32", "total"], 20))
    assert sorted(one["model"].unique()) == ["ViT-B/32"]            # with one model its total is the same line
    two = _loss_frame(losses(["ViT-B/32", "ViT-B/16", "total"], 20))
    assert sorted(two["model"].unique()) == ["ViT-B/16", "ViT-B/32", "total"]
    assert len(two) == 3 * 20 and two["loss"].dtype == np.float64 and two["step"].dtype == np.int64
    assert _loss_frame([]) is None


def test_a_long_run_is_plotted_with_bounded_points_that_keep_its_mean():
    rows = losses(["ViT-B/32", "ViT-B/16", "total"], 10_000)
    frame = _loss_frame(rows)
    per_curve = frame.groupby("model").size()
    assert per_curve.max() <= CURVE_POINTS and per_curve.min() >= CURVE_POINTS - 5
    for k, m in enumerate(["ViT-B/32", "ViT-B/16"]):
        raw = np.mean([r["loss"] for r in rows if r["model"] == m])
        shown = frame[frame["model"] == m]["loss"].mean()
        assert abs(shown - raw) < 0.01 * raw   # bins of equal size: the mean of the means is the mean
    assert frame["step"].is_monotonic_increasing


def test_truncation_and_the_other_picture_controls_render_the_grid_again(monkeypatch, tmp_path):
    monkeypatch.setenv("NADA_LIBRARY_DIR", str(tmp_path))
    demo, studio, _ = launch_tiny()
    try:
        ids = {c["id"]: c["props"].get("label") for c in demo.config["components"]}
        grid = next(c["id"] for c in demo.config["components"] if c["props"].get("elem_id") == "sample-grid")
        rerenders = {ids[t[0]] for d in demo.config["dependencies"] for t in d["targets"]
                     if grid in d["outputs"] and t[1] in ("release", "change")
                     and demo.fns[d["id"]].fn.__name__ == "when_chosen"}
        assert {"Truncation psi", "Noise", "Second model share", "Mapper strength", "Latent mapper (optional)"} <= rerenders
        assert any(label.startswith("Strength: theta") for label in rerenders)
    finally:
        demo.close()
    assert sample_tab.when_chosen(studio, None, "0-1") == {"__type__": "update"}   # nothing chosen: the grid stays
