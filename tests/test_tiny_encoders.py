"""The tiny untrained stand-ins for e4e and pSp's sketch encoder: the real classes on the real code paths, and the
studio's selfie and Draw-a-face handlers using them on --tiny instead of refusing."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from skimage import data

from nada_core.faces.invert import invert_with_noise
from nada_core.faces.psp import sketch_to_w
from nada_core.faces.selfie import invert_face, prepare_face
from nada_core.latent.sampling import render
from nada_core.models.encoders import E4EEncoder, PSPEncoder
from nada_core.models.tiny import tiny_e4e, tiny_generator, tiny_n_latent, tiny_psp_sketch
from nada_core.store.images import from_pil


@pytest.fixture(scope="module")
def drawing():
    img = Image.new("L", (300, 280), 255)
    d = ImageDraw.Draw(img)
    d.ellipse((70, 40, 230, 250), outline=0, width=4)
    d.ellipse((110, 110, 140, 130), outline=0, width=3)
    d.ellipse((160, 110, 190, 130), outline=0, width=3)
    d.arc((115, 180, 185, 215), 10, 170, fill=0, width=3)
    return img


@pytest.fixture(scope="module")
def astronaut_face():
    return prepare_face(Image.fromarray(data.astronaut()), output_size=256)


def test_tiny_encoders_are_the_real_classes_fitted_to_the_tiny_generator_and_seeded():
    G = tiny_generator()
    e4e, sketch = tiny_e4e(), tiny_psp_sketch()
    assert type(e4e) is E4EEncoder and type(sketch) is PSPEncoder and sketch.task == "sketch" and sketch.input_nc == 1
    assert e4e.n_styles == sketch.n_styles == G.n_latent == tiny_n_latent() == 8
    keys = set(e4e.state_dict())
    assert {"input_layer.0.weight", "body.3.res_layer.5.fc2.weight", "styles.7.linear.weight", "latlayer1.weight",
            "latlayer2.bias"} <= keys and not any(k.startswith("body.4.") for k in keys)   # 4 IR-SE units, not 24
    # latent_avg is the tiny generator's truncation centre, in every slot
    assert torch.allclose(e4e.latent_avg, G.w_avg().expand(8, -1), atol=1e-6)
    assert torch.allclose(sketch.latent_avg, e4e.latent_avg)
    # deterministic: same seed, same weights; another seed, other weights
    same, other = tiny_e4e(), tiny_e4e(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(e4e.state_dict().values(), same.state_dict().values()))
    assert not torch.equal(e4e.styles[3].linear.weight, other.styles[3].linear.weight)


def test_tiny_e4e_inverts_a_photo_on_the_encoder_path(astronaut_face):
    G, enc = tiny_generator(), tiny_e4e()
    target = from_pil(astronaut_face.aligned, G.size)
    w, img, noises, method = invert_with_noise(target, G, enc, steps=0)
    assert method == "e4e" and noises is None
    assert w.shape == (1, G.n_latent, G.style_dim) and img.shape == (1, 3, G.size, G.size)
    with torch.no_grad():
        assert torch.allclose(img, G.synthesis(w))
    inv = invert_face(astronaut_face, G, enc, steps=0)   # the selfie pipeline's call, same answer
    assert inv.method == "e4e" and torch.allclose(inv.w_plus, w)
    # the code depends on the photo (an untrained encoder, but an encoder): a flipped face moves it
    w_flip, *_ = invert_with_noise(target.flip(-1), G, enc, steps=0)
    assert (w_flip - w).abs().max() > 1e-4 and (w - enc.latent_avg).abs().max() > 1e-4


def test_tiny_sketch_encoder_maps_a_drawing_to_w_plus_rendered_through_source_and_a_style(drawing):
    G, style, enc = tiny_generator(), tiny_generator(seed=4), tiny_psp_sketch()
    w = sketch_to_w(drawing, enc)
    assert w.shape == (1, G.n_latent, G.style_dim) and torch.isfinite(w).all()
    blank = sketch_to_w(Image.new("L", (256, 256), 255), enc)
    assert (w - blank).abs().max() > 1e-4            # the drawing, not only latent_avg, sets the code
    (src,), (styled,) = render([G, style], w)
    assert src.size == styled.size == (G.size, G.size)
    a, b = np.asarray(src, dtype=float), np.asarray(styled, dtype=float)
    assert a.std() > 0 and np.abs(a - b).mean() > 1   # the same code through two generators: two pictures


# ------------------------------------------------------------------ the studio on --tiny
@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from demo.state import Studio

    mp = pytest.MonkeyPatch()
    mp.setenv("NADA_LIBRARY_DIR", str(tmp_path_factory.mktemp("library")))
    yield Studio(device="cpu", tiny=True)
    mp.undo()


def test_the_tiny_studio_offers_the_encoder_and_inverts_with_it(studio, tmp_path):
    from demo import selfie_tab
    from demo.state import TINY_ENCODER_NOTE

    assert selfie_tab.methods_for(studio, "tiny") == [selfie_tab.ENCODER, selfie_tab.REFINE, selfie_tab.OPTIMISE]
    enc, why = studio.e4e("tiny")
    assert isinstance(enc, E4EEncoder) and why is None and studio.e4e("tiny")[0] is enc   # built once
    Image.fromarray(data.astronaut()).save(tmp_path / "me.jpg")
    outs = list(selfie_tab.run(studio, str(tmp_path / "me.jpg"), None, "tiny", [], selfie_tab.ENCODER, 10, False,
                               False, [], 0, 1.0, 0, 0, 0, None, 1.0, None, *([0.0] * 12), *(["all layers"] * 12), None, 0))
    status, _, _, recon, _, _, state = outs[-1]
    assert "Inverted with e4e" in status and TINY_ENCODER_NOTE in status
    assert state["invs"][0].method == "e4e" and state["invs"][0].w_plus.shape == (1, 8, 64)
    assert Image.open(recon).size == (256, 256)   # the 32 px reconstruction, enlarged to be seen (a file, atomic)


def test_the_tiny_studio_renders_a_drawing_instead_of_refusing(studio, drawing):
    from demo import selfie_tab
    from demo.state import TINY_ENCODER_NOTE

    assert studio.sketch_fits("tiny") and isinstance(studio.psp("psp-sketch"), PSPEncoder)
    rgba = drawing.convert("RGBA")
    status, gallery = selfie_tab.render_sketch(studio, {"background": None, "layers": [rgba], "composite": rgba}, "tiny", [],
                                       None, 1.0)
    assert [caption for _, caption in gallery] == [f"source ({TINY_ENCODER_NOTE})"]
    with Image.open(gallery[0][0]) as shown:
        assert shown.size == (32, 32) and np.asarray(shown).std() > 0
    with pytest.raises(Exception, match="only the sketch encoder has a tiny stand-in"):
        studio.psp("psp-seg")
