import numpy as np
import pytest
import torch

from nada_core.latent.editing import (
    Direction,
    DirectionError,
    apply_edits,
    blend_generators,
    check_compatible,
    edit_z,
    ganspace,
    load_direction_file,
)
from nada_core.models.stylegan2 import seeds_to_z
from nada_core.models.tiny import tiny_generator
from tests.conftest import DATA as REF


def test_real_interfacegan_and_e4e_files_load():
    for name in ["age", "beard", "gender", "hair_length", "smile"]:
        (d,) = load_direction_file(REF / "nada_interfacegan_boundaries" / f"{name}.pt")
        assert d.space == "W" and d.vector.shape == (512,)
        assert d.vector.norm().item() == pytest.approx(1.0, abs=1e-3)
    (pose,) = load_direction_file(REF / "e4e_directions" / "pose.pt")
    assert pose.space == "W+" and pose.vector.shape == (18, 512)
    assert torch.allclose(pose.vector.norm(dim=1), torch.ones(18), atol=1e-3)
    pcs = load_direction_file(REF / "e4e_directions" / "ffhq_pca.pt", name="ffhq")
    assert len(pcs) == 80 and pcs[0].vector.shape == (512,)
    norms = [p.vector.norm().item() for p in pcs]
    assert norms[0] > norms[10] > norms[79] > 0  # components scaled by decreasing std
    (smile_z,) = load_direction_file(REF / "interfacegan_pp_stylegan2_ffhq_z" / "boundary_Smiling.npy", space="Z")
    assert smile_z.space == "Z" and smile_z.vector.norm().item() == pytest.approx(1.0, abs=1e-4)


def test_bad_direction_file(tmp_path):
    (tmp_path / "x.pt").write_text("nope")
    with pytest.raises(DirectionError, match="not a readable"):
        load_direction_file(tmp_path / "x.pt")
    np.save(tmp_path / "y.npy", np.zeros((3, 3, 3, 3)))
    with pytest.raises(DirectionError, match="expected"):
        load_direction_file(tmp_path / "y.npy")


def test_edits_move_only_the_chosen_slots():
    G = tiny_generator()
    w = G.to_w_plus(G.mapping(seeds_to_z([1], G.style_dim)))
    d = Direction("d", torch.ones(G.style_dim), "W")
    out = apply_edits(w, [(d, 2.0, (2, 5))])
    diff = (out - w)[0]
    assert torch.allclose(diff[2:5], torch.full((3, G.style_dim), 2.0))
    assert diff[:2].abs().max() == 0 and diff[5:].abs().max() == 0
    wplus = Direction("p", torch.arange(G.n_latent, dtype=torch.float32)[:, None].expand(-1, G.style_dim), "W+")
    out = apply_edits(w, [(wplus, 0.5, None)])
    assert torch.allclose((out - w)[0, :, 0], 0.5 * torch.arange(G.n_latent, dtype=torch.float32))
    with pytest.raises(DirectionError, match="Z-space"):
        apply_edits(w, [(Direction("z", torch.ones(G.style_dim), "Z"), 1.0, None)])
    with pytest.raises(DirectionError, match="512-dimensional"):
        check_compatible(G, Direction("ffhq", torch.ones(512)))
    z = seeds_to_z([1], G.style_dim)
    assert torch.allclose(edit_z(z, Direction("z", torch.ones(G.style_dim), "Z"), -1.0), z - 1)


def test_ganspace_finds_the_main_axes_of_w():
    G = tiny_generator()
    pcs = ganspace(G, n_components=4, n_samples=4000)
    vecs = torch.stack([p.vector for p in pcs])
    units = vecs / vecs.norm(dim=1, keepdim=True)
    assert torch.allclose(units @ units.T, torch.eye(4), atol=1e-4)  # orthogonal
    w = G.mapping(seeds_to_z(range(2000), G.style_dim))
    var = ((w - w.mean(0)) @ units.T).var(0)
    assert var[0] > var[1] > var[2] > var[3]
    assert torch.allclose(vecs.norm(dim=1) ** 2, var, rtol=0.15)  # scaled by the std along each axis
    img = G.synthesis(apply_edits(G.to_w_plus(w[:1]), [(pcs[0], 3.0, None)]))
    assert (img - G.synthesis(w[:1])).abs().mean() > 1e-3  # the edit changes the picture


def test_blend_is_linear_in_the_weights():
    A, B = tiny_generator(seed=1), tiny_generator(seed=2)
    H = blend_generators(A, B, 0.25)
    for (n, a), b, h in zip(A.named_parameters(), B.parameters(), H.parameters()):
        assert torch.allclose(h, 0.75 * a + 0.25 * b, rtol=1e-5, atol=1e-5), n
    assert torch.equal(blend_generators(A, B, 0.0).conv1.conv.weight, A.conv1.conv.weight)


def test_z_space_attribute_moves_z_before_mapping():
    from nada_core.latent.sampling import edited_latent, latents_for_seeds
    from nada_core.models.stylegan2 import seeds_to_z

    G = tiny_generator()
    d = Direction("smile", torch.randn(G.style_dim), "Z")
    got = edited_latent(G, 5, 1.0, [(d, 2.0, None)])
    z = seeds_to_z([5], G.style_dim) + 2.0 * d.vector
    assert torch.allclose(got, G.to_w_plus(G.mapping(z)), atol=1e-5)
    assert torch.allclose(edited_latent(G, 5, 0.7, []), latents_for_seeds(G, [5], 0.7))


# ------------------------------------------------------------------ domain arithmetic
def _style_of(base, layer, seed):
    """The base with one layer moved, as an adapted model would differ from it."""
    import copy

    G = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.startswith(layer + "."):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return G


def test_combine_styles_is_arithmetic_on_the_weights():
    from nada_core.latent.editing import combine_styles

    base = tiny_generator()
    A, B = _style_of(base, "convs.1", 1), _style_of(base, "convs.3", 2)
    z = seeds_to_z([0, 1], base.style_dim)

    def img(G):
        with torch.no_grad():
            return G.synthesis(base.mapping(z))

    one = combine_styles(base, [(A, 1.0)])
    for (n, a), c in zip(A.state_dict().items(), one.state_dict().values()):
        assert torch.allclose(a, c, atol=1e-6), n
    assert (img(one) - img(A)).abs().max() < 1e-5
    zero = combine_styles(base, [(A, 0.0), (B, 0.0)])
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), zero.state_dict().values()))
    both = combine_styles(base, [(A, 0.5), (B, -1.5)])
    sd_base, sd_a, sd_b = base.state_dict(), A.state_dict(), B.state_dict()
    for name, t in both.state_dict().items():
        expected = sd_base[name] + 0.5 * (sd_a[name] - sd_base[name]) - 1.5 * (sd_b[name] - sd_base[name])
        assert torch.allclose(t, expected, atol=1e-6), name
    # the two styles touch different layers, so adding them carries each one's layer over exactly
    sum_ab = combine_styles(base, [(A, 1.0), (B, 1.0)]).state_dict()
    assert torch.allclose(sum_ab["convs.1.conv.weight"], sd_a["convs.1.conv.weight"], atol=1e-6)
    assert torch.allclose(sum_ab["convs.3.conv.weight"], sd_b["convs.3.conv.weight"], atol=1e-6)
    assert (img(both) - img(base)).abs().max() > 1e-2
    assert torch.equal(base.convs[1].conv.weight, tiny_generator().convs[1].conv.weight)  # base untouched
    with pytest.raises(ValueError, match="different architecture"):
        combine_styles(base, [(tiny_generator(size=64), 1.0)])
