import argparse
import collections
import pickle
import sys
import types

import pytest
import torch

from nada_core.checkpoints import CheckpointError, export_rosinality, load_generator, save_generator
from nada_core.stylegan2 import seeds_to_z
from nada_core.tiny import tiny_generator


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
def ours_to_ada(G):
    """Our state dict renamed to stylegan2-ada-pytorch's G_ema names (inverse of the loader's map)."""
    sd, ada = G.state_dict(), {}
    for i in range(G.n_mlp):
        ada[f"mapping.fc{i}.weight"], ada[f"mapping.fc{i}.bias"] = sd[f"style.{i + 1}.weight"], sd[f"style.{i + 1}.bias"]
    ada["mapping.w_avg"] = torch.zeros(G.style_dim)
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


def build_ada_like_pickle(G, path, marker):
    """A pickle with the structure of an ada-pytorch network pickle: persistent objects carrying class
    source that would create ``marker`` if anyone executed it, an EasyDict, and an os.system call."""
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

    ada = ours_to_ada(G)
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
            pickle.dump({"G": None, "D": Evil(), "G_ema": build("Generator", tree),
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
