"""Recipe.parity: which parameters receive gradients in one training step, ours against the official code's.

The official rules below are written down as data from reading rinongal/StyleGAN-nada (commit dc8406a), not
taken from nada_core, so that a mistake in nada_core/training/official.py shows up here."""
import pytest

from nada_core.guidance.clip_guide import load_clip
from nada_core.models.tiny import tiny_generator
from nada_core.training import adapt
from nada_core.training.adapt import Adapter, Recipe

# ZSSGAN/model/sg2_model.py, Generator.__init__: its children in construction order, which is what
# ZSSGAN/model/ZSSGAN.py SG2Generator.get_all_layers() returns (list(self.generator.children())).
OFFICIAL_ALL_LAYERS = ["style", "input", "conv1", "to_rgb1", "convs", "upsamples", "to_rgbs", "noises"]
# ZSSGAN.py, SG2Generator.get_training_layers(phase): get_all_layers()[1:3] + get_all_layers()[4][a:b],
# i.e. input + conv1 + convs[a:b]; 'all' returns get_all_layers(); any other phase (None) the [:] slice.
OFFICIAL_PHASE_SLICES = {"texture": (2, 10), "shape": (0, 2), None: (0, None)}
# ZSSGAN.py, ZSSGAN.determine_opt_layers: idx_to_layer = all_layers[2:4] + list(all_layers[4]) (conv1, to_rgb1,
# then every conv); the chosen slot s trains idx_to_layer[s] (its ToRGB and learned-constant lines are commented
# out). ZSSGAN.forward with auto_layer_iters > 0: unfreeze all, determine_opt_layers, freeze all, unfreeze those.


def official_phase(G, phase):
    if phase == "all":   # every child; the mapping network ('style') is fed nothing (input_is_latent): no gradient
        return expand(G, [c for c in OFFICIAL_ALL_LAYERS if c != "style"])
    start, stop = OFFICIAL_PHASE_SLICES[phase]
    return expand(G, OFFICIAL_ALL_LAYERS[1:3]) | {f"convs.{i}" for i in range(len(G.convs))[start:stop]}


def official_slots(G, slots):
    table = OFFICIAL_ALL_LAYERS[2:4] + [f"convs.{i}" for i in range(len(G.convs))]
    assert len(table) == G.n_latent
    return {table[s] for s in slots}


def expand(G, names):
    """Top-level names -> the per-layer module names used below (convs.3, to_rgbs.1, ...)."""
    out = set()
    for n in names:
        if n in ("convs", "to_rgbs"):
            out |= {f"{n}.{i}" for i in range(len(getattr(G, n)))}
        elif any(True for _ in G.get_submodule(n).parameters()):
            out.add(n)
    return out


def ours_slots(G, slots):
    """Ours: the convolutions reading the slots (Generator.slot_consumers), never a ToRGB."""
    table = G.slot_consumers()
    return {n for s in slots for n in table[s] if not n.startswith("to_rgb")}


def module_of(param_name):
    parts = param_name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("convs", "to_rgbs") else parts[0]


def trained(ad):
    """(modules with a nonzero gradient, parameters of those modules whose gradient is missing or zero)."""
    grads = {n: p.grad for n, p in ad.G_train.named_parameters()}
    hit = {module_of(n) for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    holes = [n for n, g in grads.items() if module_of(n) in hit and (g is None or not g.abs().sum() > 0)]
    return hit, holes


SIZE = 256   # 14 W+ slots, convs 0..11: enough convs that the 'texture' phase's [2:10] cuts some off


@pytest.fixture(scope="module")
def clip():
    return [load_clip("tiny")]


def step(clip, **kw):
    r = Recipe(source="photo", target="sketch", iterations=1, clip_models=["tiny"], clip_weights=[1.0],
               preview_seeds=[0], **kw)
    ad = Adapter(tiny_generator(size=SIZE), r, clip)
    result = ad.train_step()
    return ad, result.slots


CASES = [  # (recipe settings, what the official code trains, what ours trains)
    ({"preset": "auto"}, lambda G: official_slots(G, range(G.n_latent)), lambda G: ours_slots(G, range(G.n_latent))),
    ({"preset": "auto", "auto_layer_iters": 0}, lambda G: official_phase(G, None), lambda G: ours_slots(G, range(14))),
    ({"preset": "texture"}, lambda G: official_phase(G, "texture"), lambda G: ours_slots(G, range(7, 14))),
    ({"preset": "shape"}, lambda G: official_phase(G, "shape"), lambda G: ours_slots(G, range(9))),
    ({"preset": "all"}, lambda G: official_phase(G, "all"), lambda G: official_phase(G, "all")),
]


@pytest.mark.parametrize("settings,official_rule,ours_rule", CASES, ids=[str(c[0]) for c in CASES])
def test_fixed_layers_in_both_modes(clip, settings, official_rule, ours_rule):
    for parity, rule in (("official", official_rule), ("ours", ours_rule)):
        ad, _ = step(clip, parity=parity, **settings)
        hit, holes = trained(ad)
        assert hit == rule(ad.G_train), f"{parity} {settings}: trained {sorted(hit)}"
        assert not holes, f"{parity} {settings}: parameters of trained layers without gradient: {holes}"


def test_the_two_modes_differ_where_the_readme_says():
    G = tiny_generator(size=SIZE)
    every = range(G.n_latent)
    assert official_slots(G, every) - ours_slots(G, every) == {"to_rgb1"}
    assert official_phase(G, None) - ours_slots(G, every) == {"input"}
    assert official_slots(G, [1, 13]) == {"to_rgb1", "convs.11"} and ours_slots(G, [1, 13]) == {"convs.0"}


def test_layer_selection_trains_the_official_layers_of_the_chosen_slots(clip):
    ad, slots = step(clip, parity="official", k=3)
    hit, holes = trained(ad)
    assert len(slots) == 3 and hit == official_slots(ad.G_train, slots) and not holes, (slots, sorted(hit))


@pytest.mark.parametrize("parity", ["official", "ours"])
def test_forced_slots_one_and_last(clip, monkeypatch, parity):
    """Slot 1 and the last slot, where the two maps differ most (the official code trains to_rgb1 and the last
    conv; ours the conv reading slot 1 and nothing for the last slot, which only the final ToRGB reads)."""
    monkeypatch.setattr(adapt, "select_slots", lambda *a, **kw: [1, 13, 4])
    ad, slots = step(clip, parity=parity, k=3)
    hit, holes = trained(ad)
    expected = official_slots(ad.G_train, slots) if parity == "official" else ours_slots(ad.G_train, slots)
    assert slots == [1, 13, 4] and hit == expected and not holes, sorted(hit)


def test_parity_is_checked_and_recorded(clip):
    with pytest.raises(ValueError, match="parity"):
        step(clip, parity="upstream")
    assert Recipe.from_dict({"target": "x"}).parity == "ours"   # runs saved before the field
    assert Recipe.from_dict(Recipe(parity="official").to_dict()).parity == "official"


def test_batch_jobs_and_the_cli_take_parity(tmp_path):
    import json

    from nada_core.__main__ import main
    from nada_core.training import batch

    head = '[defaults]\nbase = "tiny"\nclip = "tiny"\n\n[[job]]\nname = "a"\ntarget = "sketch"\nparity = '
    (tmp_path / "jobs.toml").write_text(head + '"official"\n')
    jobs, _ = batch.load_jobs(tmp_path / "jobs.toml")
    assert jobs[0].recipe.parity == "official"
    (tmp_path / "bad.toml").write_text(head + '"upstream"\n')
    with pytest.raises(batch.BatchError, match=r"job 1 \('a'\): parity must be ours or official"):
        batch.load_jobs(tmp_path / "bad.toml")

    out = tmp_path / "run"
    assert main(["adapt", "--base", "tiny", "--clip", "tiny", "--target", "sketch", "--iters", "1", "--parity",
                 "official", "--auto-layer-iters", "0", "--no-diagnostics", "--out", str(out)]) == 0
    recipe = json.loads((out / "recipe.json").read_text())["recipe"]
    assert recipe["parity"] == "official" and recipe["auto_layer_iters"] == 0
