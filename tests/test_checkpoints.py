import argparse
import collections
import copy
import pickle
import sys
import types

import pytest
import torch

from nada_core.latent.editing import blend_generators
from nada_core.models.stylegan2 import Generator, seeds_to_z
from nada_core.models.tiny import tiny_generator
from nada_core.store.checkpoints import (
    CheckpointError,
    expected_layout,
    export_rosinality,
    load_generator,
    save_generator,
)


def images(G, seeds=(1, 2)):
    with torch.no_grad():
        return G(seeds_to_z(seeds, G.style_dim))


def test_our_format_round_trips_bit_exactly(tmp_path):
    G = tiny_generator(seed=3)
    path = save_generator(G, tmp_path / "m.safetensors", {"recipe": {"target": "sketch"}, "source": "tiny"})
    G2, info = load_generator(path)
    assert info["format"] == "nada-safetensors" and info["meta"]["recipe"]["target"] == "sketch"
    for (k, a), (k2, b) in zip(G.state_dict().items(), G2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not list(tmp_path.glob("*.part"))
    renamed = tmp_path / "no_extension_at_all"
    path.rename(renamed)
    assert load_generator(renamed)[1]["format"] == "nada-safetensors"  # by content, not extension


def test_rosinality_export_loads_strictly(tmp_path):
    G = tiny_generator(seed=4, size=64)
    path = export_rosinality(G, tmp_path / "style.pt")
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"g_ema"}
    G2, info = load_generator(path)
    assert info["format"] == "rosinality-pt" and info["config"]["size"] == 64
    assert torch.equal(images(G), images(G2))
    # the rosinality training-checkpoint layout (g_ema next to g, d, optimisers) loads too
    torch.save({"g_ema": G.state_dict(), "g": G.state_dict(), "d": {}, "args": argparse.Namespace(size=64, iter=800000)},
               tmp_path / "full.pt")
    assert torch.equal(images(load_generator(tmp_path / "full.pt")[0]), images(G))


def test_corrupt_and_foreign_files_get_one_clear_error(tmp_path):
    G = tiny_generator()
    good = save_generator(G, tmp_path / "g.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(good.read_bytes()[:3000])
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    bad_sd = {k: v for k, v in G.state_dict().items() if k != "conv1.conv.weight"}
    torch.save({"g_ema": bad_sd}, tmp_path / "missing_key.pt")
    for name, pattern in [("trunc.safetensors", "damaged or truncated"), ("text.pt", "unrecognised"),
                          ("other.pt", "does not fit"), ("missing_key.pt", "does not fit"), ("absent.pt", "no such file")]:
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_generator(tmp_path / name)
        assert name in str(e.value)


# ---------------------------------------------------------------- NVIDIA stylegan2-ada-pytorch pickles
def ours_to_ada(G, w_avg=None):
    """Our state dict renamed to stylegan2-ada-pytorch's G_ema names (inverse of the loader's map)."""
    sd, ada = G.state_dict(), {}
    for i in range(G.n_mlp):
        ada[f"mapping.fc{i}.weight"], ada[f"mapping.fc{i}.bias"] = sd[f"style.{i + 1}.weight"], sd[f"style.{i + 1}.bias"]
    ada["mapping.w_avg"] = torch.zeros(G.style_dim) if w_avg is None else w_avg
    ada["synthesis.b4.const"] = sd["input.input"][0]

    def layer(dst, src, n):
        ada[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
        ada[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
        ada[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
        ada[f"{dst}.noise_strength"] = sd[f"{src}.noise.weight"][0]
        ada[f"{dst}.bias"] = sd[f"{src}.activate.bias"]
        ada[f"{dst}.noise_const"] = sd[f"noises.noise_{n}"][0, 0]
        ada[f"{dst}.resample_filter"] = torch.ones(4, 4)

    def rgb(dst, src):
        ada[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
        ada[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
        ada[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
        ada[f"{dst}.bias"] = sd[f"{src}.bias"].flatten()

    layer("synthesis.b4.conv1", "conv1", 0)
    rgb("synthesis.b4.torgb", "to_rgb1")
    for j in range(len(G.to_rgbs)):
        r = 2 ** (j + 3)
        layer(f"synthesis.b{r}.conv0", f"convs.{2 * j}", 2 * j + 1)
        layer(f"synthesis.b{r}.conv1", f"convs.{2 * j + 1}", 2 * j + 2)
        rgb(f"synthesis.b{r}.torgb", f"to_rgbs.{j}")
    return ada


def build_ada_like_pickle(G, path, marker, w_avg=None, evil=False):
    """A pickle with the structure of an ada-pytorch network pickle: persistent objects carrying class
    source that would create ``marker`` if anyone executed it, and an EasyDict; ``evil`` adds an
    os.system call (which real pickles never contain, and which makes the file refused)."""
    persistence = types.ModuleType("torch_utils.persistence")
    dnnlib = types.ModuleType("dnnlib")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called while dumping")

    class EasyDict(dict):
        pass

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib", "EasyDict"
    dnnlib.EasyDict = EasyDict
    evil_src = f"open({str(marker)!r}, 'w').write('pwned')\n"

    class Node:
        def __init__(self, class_name, params=None, children=None):
            self.meta = {"type": "class", "version": 6, "module_src": evil_src, "class_name": class_name,
                         "state": {"training": False, "_parameters": collections.OrderedDict(params or {}),
                                   "_buffers": collections.OrderedDict(), "_modules": collections.OrderedDict(children or {}),
                                   "_init_kwargs": EasyDict(z_dim=G.style_dim)}}

        def __reduce__(self):
            return _reconstruct_persistent_obj, (self.meta,)

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    ada = ours_to_ada(G, w_avg)
    tree = {}
    for key, t in ada.items():
        parts = key.split(".")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = torch.nn.Parameter(t.clone()) if t.ndim else t.clone()

    def build(name, sub):
        params = {k: v for k, v in sub.items() if not isinstance(v, dict)}
        kids = {k: build(k, v) for k, v in sub.items() if isinstance(v, dict)}
        return Node(name, params, kids)

    sys.modules["torch_utils.persistence"], sys.modules["dnnlib"] = persistence, dnnlib
    sys.modules.setdefault("torch_utils", types.ModuleType("torch_utils"))
    try:
        with open(path, "wb") as f:
            pickle.dump({"G": None, "D": Evil() if evil else None, "G_ema": build("Generator", tree),
                         "training_set_kwargs": EasyDict(resolution=G.size)}, f)
    finally:
        del sys.modules["torch_utils.persistence"], sys.modules["dnnlib"]


def test_nvidia_pickle_loads_without_running_its_code(tmp_path):
    G = tiny_generator(seed=5, size=64, channel_multiplier=2, channel_max=48)
    marker = tmp_path / "pwned"
    build_ada_like_pickle(G, tmp_path / "ffhq.pkl", marker)
    G2, info = load_generator(tmp_path / "ffhq.pkl")
    assert not marker.exists()
    assert info["format"] == "nvidia-ada-pkl" and info["config"]["channel_multiplier"] == 2
    assert torch.equal(images(G), images(G2))


def test_nvidia_w_avg_is_the_truncation_centre_and_travels_with_the_model(tmp_path):
    """NVIDIA's tools truncate towards the file's tracked ``mapping.w_avg``, not a fresh sample mean: so do we,
    and our save/export/copy/blend keep it."""
    G = tiny_generator(seed=5, size=64, channel_multiplier=2, channel_max=48)
    w_avg = torch.randn(1, G.style_dim, generator=torch.Generator().manual_seed(9))
    build_ada_like_pickle(G, tmp_path / "ffhq.pkl", tmp_path / "pwned", w_avg=w_avg[0].clone())
    G2, info = load_generator(tmp_path / "ffhq.pkl")
    assert info["w_avg"] == "file" and torch.equal(G2.w_avg(), w_avg)
    assert not torch.allclose(G2.mean_latent(), w_avg)
    z = seeds_to_z((1, 2), G.style_dim)
    with torch.no_grad():
        at_centre = G2.synthesis(w_avg.expand(2, -1))
        assert torch.equal(G2(z, truncation_psi=0.0), at_centre)
        half = G2(z, truncation_psi=0.5)
    assert not torch.equal(half, G(z, truncation_psi=0.5))  # G computes its centre: a different one
    G3, info3 = load_generator(save_generator(G2, tmp_path / "m.safetensors"))
    assert info3["w_avg"] == "file" and torch.equal(G3.w_avg(), w_avg)
    with torch.no_grad():
        assert torch.equal(G3(z, truncation_psi=0.5), half)
    G4, info4 = load_generator(export_rosinality(G2, tmp_path / "m.pt"))  # as pSp/e4e's top-level latent_avg
    assert info4["w_avg"] == "file" and torch.equal(G4.w_avg(), w_avg)
    assert torch.equal(copy.deepcopy(G2).w_avg(), w_avg)
    assert torch.equal(blend_generators(G2, G3, 0.5).w_avg(), w_avg)
    # a plain model keeps computing its centre, and saving it adds nothing
    G5, info5 = load_generator(save_generator(G, tmp_path / "plain.safetensors"))
    assert info5["w_avg"] == "computed" and G5.stored_w_avg is None


def test_rosinality_latent_avg_per_slot_is_used(tmp_path):
    G = tiny_generator(seed=7)
    w = torch.randn(1, G.style_dim, generator=torch.Generator().manual_seed(1))
    torch.save({"g_ema": G.state_dict(), "latent_avg": w.repeat(G.n_latent, 1)}, tmp_path / "psp.pt")
    G2, info = load_generator(tmp_path / "psp.pt")
    assert info["w_avg"] == "file" and torch.allclose(G2.w_avg(), w)
    torch.save({"g_ema": G.state_dict(), "latent_avg": torch.zeros(3)}, tmp_path / "odd.pt")  # wrong size: ignored
    assert load_generator(tmp_path / "odd.pt")[1]["w_avg"] == "computed"


def test_pickle_without_g_ema_is_refused(tmp_path):
    with open(tmp_path / "x.pkl", "wb") as f:
        pickle.dump({"D": 1}, f)
    with pytest.raises(CheckpointError, match="G_ema"):
        load_generator(tmp_path / "x.pkl")


def test_legacy_torch_serialization_is_a_rosinality_file_not_a_pickle(tmp_path):
    G = tiny_generator(seed=6)
    torch.save({"g_ema": G.state_dict()}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert open(tmp_path / "old.pt", "rb").read(2) == b"\x80\x02"
    G2, info = load_generator(tmp_path / "old.pt")
    assert info["format"] == "rosinality-pt" and torch.equal(images(G), images(G2))


@pytest.mark.parametrize("cfg", [{"size": 8}, {"size": 32, "style_dim": 64, "n_mlp": 2, "channel_multiplier": 1, "channel_max": 32},
                                 {"size": 128, "style_dim": 8, "n_mlp": 1, "channel_multiplier": 4, "channel_max": 1024}])
def test_expected_layout_is_the_generators_state_dict(cfg):
    """Files are checked against this layout before a generator is built, so it must match the real one."""
    assert expected_layout(cfg) == {k: tuple(v.shape) for k, v in Generator(**cfg).state_dict().items()}


def test_restricted_reader_rebuilds_tensors_like_torch(tmp_path):
    """Our reader replaces torch.load for every pickle-based file: dtypes, views, storages used by several tensors,
    parameters and empty tensors come back as torch would give them, in all pickle protocols."""
    from nada_core.store.checkpoints import load_torch_file, restricted_loads

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    objs = {"view": base[1:, 2:], "t": base.t(), "bf16": torch.randn(3, dtype=torch.bfloat16), "i64": torch.arange(5),
            "bool": torch.tensor([True, False]), "param": torch.nn.Parameter(torch.randn(2, 2)),
            "empty": torch.zeros(0, 5), "scalar": torch.tensor(3.5), "ns": argparse.Namespace(lr=0.002)}

    def same(out):
        return all(torch.equal(out[k], v.detach()) and out[k].dtype == v.dtype
                   for k, v in objs.items() if isinstance(v, torch.Tensor))

    for proto in range(2, 6):
        assert same(restricted_loads(pickle.dumps(objs, protocol=proto)))
    for zipped in (True, False):
        torch.save(objs, tmp_path / "x.pt", _use_new_zipfile_serialization=zipped)
        out = load_torch_file(tmp_path / "x.pt")
        assert same(out) and out["view"].untyped_storage().data_ptr() == out["t"].untyped_storage().data_ptr()
