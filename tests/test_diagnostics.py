from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from nada_core.faces.align import align_face
from nada_core.guidance.clip_guide import ClipMember
from nada_core.models.stylegan2 import seeds_to_z
from nada_core.models.tiny import tiny_clip, tiny_generator
from nada_core.store.images import from_pil
from nada_core.training.diagnostics import (
    COLLAPSE_RATIO,
    Diagnostics,
    best_snapshot,
    clip_score,
    diversity,
    mean_pairwise_distance,
)


@pytest.fixture(scope="module")
def member():
    model, tok = tiny_clip()
    return ClipMember("tiny", model, tok)


@pytest.fixture(scope="module")
def previews():
    """Four source images and their 'adapted' versions from another generator, same latents (32 px)."""
    G, G2 = tiny_generator(), tiny_generator(seed=7)
    with torch.no_grad():
        w = G.mapping(seeds_to_z([0, 1, 2, 3], G.style_dim))
        return G.synthesis(w), G2.synthesis(w)


@pytest.fixture(scope="module")
def face():
    aligned, _ = align_face(Image.fromarray(data.astronaut()), output_size=256, transform_size=1024)
    return aligned


def hand_unit_feats(model, images):
    mean = torch.tensor(model.visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std).view(1, 3, 1, 1)
    with torch.no_grad():  # the tiny CLIP reads 32 px: no resize or crop needed
        e = model.encode_image(((images + 1) / 2 - mean) / std).double()
    return e / e.norm(dim=1, keepdim=True)


def test_clip_score_equals_a_hand_computation(member, previews):
    src, ada = previews
    direction = member.text_direction("photo", "sketch")
    d_img = hand_unit_feats(member.model, ada) - hand_unit_feats(member.model, src)
    d = direction.double()
    expected = np.mean([(row @ d / (row.norm() * d.norm())).item() for row in d_img])
    assert clip_score([member], [direction], src, ada) == pytest.approx(expected, abs=1e-5)
    assert clip_score([member], [-direction], src, ada) == pytest.approx(-expected, abs=1e-5)
    assert clip_score([member], [direction], src, src) == 0.0  # nothing changed, no direction


def test_diversity_is_relative_to_the_source_and_alarms_on_collapse(member, previews):
    src, ada = previews
    u_src, u_ada = hand_unit_feats(member.model, src), hand_unit_feats(member.model, ada)

    def hand_div(u):
        return np.mean([1 - (u[i] @ u[j]).item() for i in range(4) for j in range(4) if i != j])

    assert diversity([member], src, ada) == pytest.approx(hand_div(u_ada) / hand_div(u_src), rel=1e-4)
    assert diversity([member], src, src) == pytest.approx(1.0)
    assert mean_pairwise_distance(torch.randn(1, 8)) is None

    diag = Diagnostics.for_prompts([member], "photo", "sketch", identity=False)
    same = ada[:1].expand(4, -1, -1, -1)  # every adapted preview identical: mode collapse
    collapsed = diag.observe(SimpleNamespace(step=40, preview=(src, same)))
    assert collapsed["diversity"] == pytest.approx(0.0, abs=1e-6) and collapsed["collapse"] is True
    healthy = diag.observe(SimpleNamespace(step=50, preview=(src, ada)))
    assert healthy["collapse"] is (healthy["diversity"] < COLLAPSE_RATIO)
    assert diag.observe(SimpleNamespace(step=51, preview=None)) is None
    assert [h["step"] for h in diag.history] == [40, 50]


def test_observer_measures_identity_only_for_faces(member, face, previews):
    x = from_pil(face, 256)
    diag = Diagnostics.for_prompts([member], "photo", "sketch")
    out = diag.observe(SimpleNamespace(step=1, preview=(x.expand(2, -1, -1, -1), x.expand(2, -1, -1, -1))))
    assert diag.identity is True and out["identity"] == pytest.approx(0.0, abs=1e-6)
    assert out["clip_score"] == 0.0 and set(out) == {"step", "clip_score", "diversity", "identity", "collapse"}
    diag2 = Diagnostics.for_prompts([member], "photo", "sketch")
    out2 = diag2.observe(SimpleNamespace(step=1, preview=previews))
    assert diag2.identity is False and out2["identity"] is None


def test_best_snapshot_prefers_a_high_score_before_diversity_drops():
    h = [{"step": 50, "clip_score": 0.10, "diversity": 0.9, "collapse": False},
         {"step": 100, "clip_score": 0.25, "diversity": 0.8, "collapse": False},
         {"step": 150, "clip_score": 0.26, "diversity": 0.6, "collapse": False},
         {"step": 200, "clip_score": 0.31, "diversity": 0.3, "collapse": True},
         {"step": 250, "clip_score": 0.35, "diversity": 0.2, "collapse": True}]
    advice = best_snapshot(h)
    assert advice.step == 100  # within 0.02 of the best pre-collapse score (0.26), and earlier
    assert "step 200" in advice.reason
    assert best_snapshot(h, tolerance=0.0).step == 150
    assert best_snapshot(h, available_steps=[50, 150, 250]).step == 150
    assert best_snapshot([{"step": 10, "clip_score": -0.1, "diversity": 1.0, "collapse": False}]) is None
    assert best_snapshot([]) is None
    no_collapse = [dict(e, collapse=False) for e in h]
    assert best_snapshot(no_collapse).step == 250


def test_observer_built_from_an_adapter_uses_its_members_and_directions(member, previews):
    from nada_core.training.adapt import Adapter, Recipe

    style = [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1]
    r = Recipe(source="photo", target="", style_images=["s.png"], iterations=1, clip_models=["tiny"], clip_weights=[1.0])
    ad = Adapter(tiny_generator(), r, [member], style_images=style)
    diag = ad.diagnostics_observer()  # image-guided: scored against the image direction
    assert diag.members == [member] and diag.identity is None  # "auto": decided on the first preview
    assert torch.equal(diag.directions[0], ad.directions[0])
    src, ada = previews
    out = diag.observe(SimpleNamespace(step=3, preview=(src, ada)))
    assert out["clip_score"] == pytest.approx(clip_score([member], ad.directions, src, ada), abs=1e-7)
    assert diag.identity is False and out["identity"] is None  # no face in an untrained generator's images
    assert Diagnostics.for_adapter(ad, identity=False).identity is False
    with pytest.raises(ValueError, match="identity"):
        Diagnostics([member], ad.directions, identity="yes")
