"""Keep the photo's colours: chroma moves to the photo's with the strength, luma stays, 0 changes nothing."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from nada_core.faces.colour import keep_colours, rgb_to_ycbcr, ycbcr_to_rgb
from nada_core.models.tiny import tiny_generator
from nada_core.store.images import from_pil

STRENGTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((256, 256), Image.LANCZOS)


def ycbcr(img: Image.Image) -> np.ndarray:
    """(3, H, W) Y, Cb, Cr in 0..255 levels, computed with the BT.601 weights written out here."""
    r, g, b = np.asarray(img, dtype=np.float64).transpose(2, 0, 1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return np.stack([y, (b - y) / 1.772, (r - y) / 1.402])


def chroma_error(img, photo) -> float:
    return float(np.abs(ycbcr(img)[1:] - ycbcr(photo)[1:]).mean())


def test_the_colour_space_round_trips():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ycbcr_to_rgb(rgb_to_ycbcr(x)), x, atol=1e-6)
    assert torch.allclose(rgb_to_ycbcr(torch.ones(1, 3, 1, 1)).flatten(), torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)


def test_chroma_follows_the_strength_and_luma_stays(photo):
    # a "style" that recolours the astronaut: channels rotated (her suit and the flag change hue) and softened
    r, g, b = photo.split()
    stylised = Image.merge("RGB", (b, r, g)).filter(ImageFilter.GaussianBlur(1.5))
    errors, luma = [], []
    for s in STRENGTHS:
        out = keep_colours(stylised, photo, s)
        assert isinstance(out, Image.Image) and out.size == stylised.size
        errors.append(chroma_error(out, photo))
        luma.append(float(np.abs(ycbcr(out)[0] - ycbcr(stylised)[0]).max()))
    assert np.asarray(keep_colours(stylised, photo, 0.0)).tobytes() == np.asarray(stylised).tobytes()
    assert all(a > b for a, b in zip(errors, errors[1:])), f"chroma error by strength {STRENGTHS}: {errors}"
    # at 1 only 8-bit rounding (and chroma shortened where the photo's colour does not exist at the style's luma)
    assert errors[-1] < 0.1 * errors[0], f"chroma error at 1: {errors[-1]:.2f} levels against {errors[0]:.2f} at 0"
    assert max(luma) <= 0.51, f"luma moved by up to {max(luma):.2f} levels (8-bit rounding allows 0.5)"


def test_tensors_from_a_generator_keep_their_luma_exactly(photo):
    G = tiny_generator(seed=3, size=64)
    with torch.no_grad():
        stylised = G.synthesis(G.to_w_plus(G.mapping(torch.randn(2, G.style_dim,
                                                                 generator=torch.Generator().manual_seed(0)))))
    target = from_pil(photo)   # 256 px: resized to the 64 px faces inside
    before = rgb_to_ycbcr((stylised.clamp(-1, 1) + 1) / 2)
    errs = []
    for s in STRENGTHS[1:]:   # (0 returns the input itself, below)
        out = keep_colours(stylised, target, s)
        assert out.shape == stylised.shape and out.min() >= -1 and out.max() <= 1   # luma of the clamped images
        after = rgb_to_ycbcr((out + 1) / 2)
        assert float((after[:, 0] - before[:, 0]).abs().max()) < 1e-5
        small = torch.nn.functional.interpolate((target + 1) / 2, size=64, mode="bicubic", antialias=True).clamp(0, 1)
        errs.append(float((after[:, 1:] - rgb_to_ycbcr(small)[:, 1:]).abs().mean()))
    assert torch.equal(keep_colours(stylised, target, 0.0), stylised)
    assert stylised.abs().max() > 1   # raw generator output: 0 leaves even that as it is
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_strength_outside_0_to_1_is_refused(photo):
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="between 0 and 1"):
            keep_colours(photo, photo, bad)


def test_invert_keep_colours_gives_the_stylised_face_the_photos_chroma(tmp_path, capsys):
    from skimage import data

    from nada_core.__main__ import main
    from nada_core.store.checkpoints import save_generator

    Image.fromarray(data.astronaut()).save(tmp_path / "photo.jpg")
    model = save_generator(tiny_generator(seed=4), tmp_path / "style" / "final.safetensors")
    runs = {}
    for name, extra in (("plain", []), ("kept", ["--keep-colours"]), ("half", ["--keep-colours", "0.5"])):
        assert main(["invert", str(tmp_path / "photo.jpg"), "--base", "tiny", "--model", str(model), "--steps", "2",
                     "--out", str(tmp_path / name), *extra]) == 0
        runs[name] = Image.open(tmp_path / name / "stylised_style.png").convert("RGB")
    aligned = Image.open(tmp_path / "plain" / "aligned.png").convert("RGB").resize(runs["plain"].size, Image.LANCZOS)
    err = {k: chroma_error(v, aligned) for k, v in runs.items()}
    assert err["kept"] < err["half"] < err["plain"] and err["kept"] < 0.25 * err["plain"], err
    luma = float(np.abs(ycbcr(runs["kept"])[0] - ycbcr(runs["plain"])[0]).max())
    assert luma <= 1.01, f"the style's luma moved by {luma:.2f} levels"   # two 8-bit roundings
    capsys.readouterr()
    assert main(["invert", str(tmp_path / "photo.jpg"), "--base", "tiny", "--keep-colours", "2"]) == 1
    assert "--keep-colours must be between 0 and 1" in capsys.readouterr().err
