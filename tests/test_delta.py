import copy

import pytest
import torch

from nada_core.__main__ import main
from nada_core.models.stylegan2 import seeds_to_z
from nada_core.models.tiny import tiny_generator
from nada_core.store.checkpoints import load_generator, save_generator
from nada_core.store.delta import DeltaError, apply_delta, delta_info, export_delta, fingerprint


def adapted_from(G_base, layers=("convs.2", "convs.3"), seed=1):
    """A copy of the base with the given layers changed, as a short NADA run leaves them."""
    G = copy.deepcopy(G_base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if any(name.startswith(layer + ".") for layer in layers):
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return G


def images(G):
    with torch.no_grad():
        return G.synthesis(G.mapping(seeds_to_z([0, 1, 2], G.style_dim)))


def test_round_trip_reproduces_the_model_to_float16_precision(tmp_path):
    base = tiny_generator()
    styled = adapted_from(base)
    path = export_delta(styled, base, {"source_model": "tiny", "recipe": {"target": "sketch"}}, tmp_path / "s.nada.safetensors")
    info = delta_info(path)
    assert info["meta"]["recipe"]["target"] == "sketch" and info["base_fingerprint"] == fingerprint(base)
    trained = [n for n, _ in base.named_parameters() if n.startswith(("convs.2.", "convs.3."))]
    assert info["tensors"] == len(trained) == 10  # per layer: conv weight, modulation weight + bias, noise, bias
    rebuilt = apply_delta(path, base)
    ref, got, plain = images(styled), images(rebuilt), images(base)
    assert (ref - plain).abs().max() > 1e-2  # the style really changes the pictures
    assert (got - ref).abs().max() < 2e-3    # ... and the delta keeps that change
    for (name, a), b in zip(styled.state_dict().items(), rebuilt.state_dict().values()):
        diff = (a - base.state_dict()[name]).abs().max()
        assert (a - b).abs().max() <= 1e-3 * diff + 1e-6 * a.abs().max(), name  # float16 relative precision of the difference
    assert torch.equal(rebuilt.style[1].weight, base.style[1].weight)  # untouched tensors are exact


def test_refuses_a_different_base(tmp_path):
    base = tiny_generator()
    path = export_delta(adapted_from(base), base, {"source_model": "tiny"}, tmp_path / "s.nada.safetensors")
    with pytest.raises(DeltaError, match="trained from tiny"):
        apply_delta(path, tiny_generator(seed=3))
    nudged = copy.deepcopy(base)
    with torch.no_grad():
        nudged.input.input[0, 0, 0, 0] += 1e-3  # one value off is a different base
    with pytest.raises(DeltaError, match="fingerprint"):
        apply_delta(path, nudged)
    with pytest.raises(DeltaError, match="made for"):
        apply_delta(path, tiny_generator(size=64))
    save_generator(base, tmp_path / "full.safetensors")
    with pytest.raises(DeltaError, match="not a NADA Studio style delta"):
        apply_delta(tmp_path / "full.safetensors", base)


def test_fingerprint_ignores_device_layout_but_sees_values():
    base = tiny_generator()
    assert fingerprint(base) == fingerprint(copy.deepcopy(base)) == fingerprint(tiny_generator())
    assert fingerprint(base) != fingerprint(tiny_generator(seed=1))


def test_delta_is_much_smaller_when_few_layers_changed(tmp_path):
    base = tiny_generator(size=64, channel_max=64)
    styled = adapted_from(base, layers=("convs.4",))
    full = save_generator(styled, tmp_path / "full.safetensors").stat().st_size
    delta = export_delta(styled, base, {}, tmp_path / "s.nada.safetensors").stat().st_size
    assert delta < 0.2 * full, (delta, full)


def test_cli_export_and_apply(tmp_path, capsys):
    base = tiny_generator()
    styled = adapted_from(base)
    model = save_generator(styled, tmp_path / "run" / "final.safetensors", {"source_model": "tiny", "step": 300})
    assert main(["delta", "export", str(model), "--out", str(tmp_path / "sketch.nada.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "sketch.nada.safetensors" in out and "% of the full model" in out and "base tiny" in out
    assert main(["delta", "apply", str(tmp_path / "sketch.nada.safetensors"), "--out", str(tmp_path / "back.safetensors")]) == 0
    G, info = load_generator(tmp_path / "back.safetensors")
    assert info["meta"]["source_model"] == "tiny" and info["meta"]["step"] == 300
    assert (images(G) - images(styled)).abs().max() < 2e-3
    other = save_generator(tiny_generator(seed=5), tmp_path / "other.safetensors")
    assert main(["delta", "apply", str(tmp_path / "sketch.nada.safetensors"), "--base", str(other),
                 "--out", str(tmp_path / "bad.safetensors")]) == 1
    assert "fingerprint" in capsys.readouterr().err and not (tmp_path / "bad.safetensors").exists()
