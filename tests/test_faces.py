import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from nada_core.faces.align import (
    CropAdjust,
    FaceError,
    align_face,
    aligned_points,
    detect,
    ffhq_quad,
    landmarks,
    load_photo,
    paste_back,
)
from nada_core.faces.invert import E4EEncoder, invert, load_e4e, project
from nada_core.faces.selfie import Inversion, invert_face, paste_faces, pixel_error, prepare_face, prepare_faces, render
from nada_core.models.tiny import tiny_generator
from nada_core.store.images import to_pil


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(data.astronaut())  # Eileen Collins, a real photograph shipped with scikit-image


def test_landmarks_fall_on_the_face(astronaut):
    faces = detect(astronaut)
    assert faces.count == 1  # the weak detection on the suit patch is ignored
    left, top, right, bottom = faces.boxes[0]
    lm = faces.landmarks[0]
    assert lm.shape == (68, 2)
    assert (lm[:, 0] > left - 15).all() and (lm[:, 0] < right + 15).all()
    assert (lm[:, 1] > top - 15).all() and (lm[:, 1] < bottom + 25).all()
    eye_l, eye_r, nose, mouth = lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48:60].mean(0)
    assert eye_l[0] < nose[0] < eye_r[0] and max(eye_l[1], eye_r[1]) < nose[1] < mouth[1]


def test_alignment_puts_eyes_and_mouth_where_ffhq_does(astronaut):
    size = 256
    aligned, quad = align_face(astronaut, output_size=size, transform_size=1024)
    assert aligned.size == (size, size)
    lm = landmarks(aligned)  # detect again on the aligned crop
    eyes = np.stack([lm[36:42].mean(0), lm[42:48].mean(0)])
    mouth = (lm[48] + lm[54]) / 2
    # FFHQ geometry: eyes level and symmetric about the centre, a quarter of the width apart when the
    # eye distance sets the crop scale, the mouth centred below. Tolerance: 2.5% of the image (6.4 px).
    tol = 0.025 * size
    assert abs(eyes[0, 1] - eyes[1, 1]) < tol
    assert abs(eyes.mean(0)[0] - size / 2) < tol and abs(mouth[0] - size / 2) < tol
    assert abs((eyes[1, 0] - eyes[0, 0]) - size / 4) < tol
    assert 0.40 * size < eyes.mean(0)[1] < 0.52 * size and 0.62 * size < mouth[1] < 0.75 * size
    # and exactly where the quad says they should be
    orig = landmarks(astronaut)
    expected = aligned_points(np.stack([orig[36:42].mean(0), orig[42:48].mean(0)]), quad, size)
    assert np.abs(expected - eyes).max() < tol


def test_paste_back_changes_only_the_face_region(astronaut):
    aligned, quad = align_face(astronaut, output_size=256, transform_size=1024)
    stylised = Image.fromarray(255 - np.asarray(aligned))  # an obviously different face
    out = paste_back(astronaut, stylised, quad)
    assert out.size == astronaut.size
    diff = np.abs(np.asarray(out, dtype=int) - np.asarray(astronaut, dtype=int)).sum(-1)
    ys, xs = np.nonzero(diff)
    assert len(xs) > 5000  # the face really changed
    lo, hi = quad.min(0), quad.max(0)
    assert xs.min() >= lo[0] - 2 and xs.max() <= hi[0] + 2 and ys.min() >= lo[1] - 2 and ys.max() <= hi[1] + 2
    face = landmarks(astronaut)
    cx, cy = face[30].astype(int)
    assert diff[cy, cx] > 100  # the nose tip was replaced


def test_a_face_near_the_edge_is_padded_by_reflection(astronaut):
    tight = astronaut.crop((150, 40, 300, 190))   # the crop square reaches past the picture: the padding path
    aligned, quad = align_face(tight, output_size=64, transform_size=128)
    assert aligned.size == (64, 64) and (quad.min() < 0 or quad.max() > 150)
    assert np.asarray(aligned).std() > 20   # a picture, not a blank


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FaceError, match="no face found"):
        landmarks(Image.new("RGB", (300, 300), (120, 90, 60)))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(FaceError, match="could not read"):
        load_photo(tmp_path / "broken.jpg")


def test_exif_rotation_rgba_greyscale_and_huge_photos(astronaut, tmp_path):
    rotated = astronaut.rotate(90, expand=True)  # stored sideways, EXIF says "rotate back"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    assert load_photo(tmp_path / "r.jpg").size == astronaut.size
    assert detect(load_photo(tmp_path / "r.jpg")).count == 1
    assert detect(load_photo(astronaut.convert("L"))).count == 1
    assert detect(load_photo(astronaut.convert("RGBA"))).count == 1
    huge = astronaut.resize((3072, 3072), Image.BICUBIC)
    lm_big, lm = landmarks(huge), landmarks(astronaut)
    assert np.abs(lm_big / 6 - lm).mean() < 3  # same landmarks, in full-resolution coordinates


# ------------------------------------------------------------------ encoder and projector
def test_e4e_checkpoint_with_the_real_layout_loads_strictly(tmp_path):
    enc = E4EEncoder()
    sd = enc.state_dict()
    for key in ["input_layer.0.weight", "input_layer.2.weight", "body.3.shortcut_layer.0.weight",
                "body.23.res_layer.5.fc2.weight", "styles.0.convs.6.weight", "styles.17.convs.10.weight",
                "styles.17.linear.weight", "latlayer1.weight", "latlayer2.bias"]:
        assert key in sd, key
    assert len([k for k in sd if k.startswith("body.") and k.endswith("res_layer.1.weight")]) == 24  # IR-SE-50
    avg = torch.randn(18, 512)
    ckpt = {"state_dict": {**{f"encoder.{k}": v for k, v in sd.items()}, "decoder.style.1.weight": torch.zeros(1)},
            "latent_avg": avg, "opts": {"encoder_type": "Encoder4Editing"}}
    torch.save(ckpt, tmp_path / "e4e_ffhq_encode.pt")
    loaded = load_e4e(tmp_path / "e4e_ffhq_encode.pt")
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        w = loaded(x)
        enc.eval()
        raw = enc(x)  # same weights, latent_avg zero
    assert w.shape == (1, 18, 512)
    assert torch.allclose(w - raw, avg[None], atol=1e-4)
    torch.save({"state_dict": ckpt["state_dict"]}, tmp_path / "no_avg.pt")
    with pytest.raises(ValueError, match="latent_avg"):
        load_e4e(tmp_path / "no_avg.pt")


def test_projector_recovers_a_generated_face():
    G = tiny_generator()
    w_true = G.to_w_plus(G.mapping(torch.randn(1, G.style_dim, generator=torch.Generator().manual_seed(5))))
    with torch.no_grad():
        target = G.synthesis(w_true)
        start_err = (G.synthesis(G.mean_latent()) - target).pow(2).mean().item()
    seen = []
    w, recon, noises = project(G, target, steps=120, progress=lambda s, n, l: seen.append(l))
    err = (recon - target).pow(2).mean().item()
    assert len(seen) == 120 and seen[-1] < seen[0]
    assert err < 0.25 * start_err, (err, start_err)
    assert w.shape == (1, G.n_latent, G.style_dim) and noises is None  # W+ only by default
    w3, recon3, noises3 = project(G, target, steps=5, optimize_noise=True)
    assert len(noises3) == G.num_layers and all(n.shape == b.shape for n, b in zip(noises3, G.noise_buffers()))
    w2, recon2 = invert(target, G, steps=40)
    assert (recon2 - target).pow(2).mean().item() < start_err


def test_selfie_pipeline_on_a_real_photo(astronaut):
    G = tiny_generator()
    face = prepare_face(astronaut, output_size=G.size)
    assert face.faces_found == 1 and face.aligned.size == (32, 32)
    inv = invert_face(face, G, steps=10)
    assert inv.method == "optimisation" and inv.reconstruction.size == (32, 32)
    other = tiny_generator(seed=9)
    styl = render(other, inv)
    assert styl.size == (32, 32) and np.asarray(styl).std() > 1
    pasted = paste_back(face.photo, styl, face.quad)
    assert pasted.size == astronaut.size


def test_several_faces_use_the_largest_and_report_the_count(astronaut):
    canvas = Image.new("RGB", (900, 512), "white")
    canvas.paste(astronaut.resize((300, 300)), (0, 100))
    canvas.paste(astronaut, (350, 0))  # the larger copy, on the right
    face = prepare_face(canvas, output_size=64)
    assert face.faces_found == 2
    assert face.quad[:, 0].min() > 350  # the crop comes from the larger face


# ------------------------------------------------------------------ noise: W+ only by default, never in stylised renders
def test_inversion_refines_w_plus_only_unless_noise_is_asked_for(astronaut):
    G = tiny_generator()
    face = prepare_face(astronaut, output_size=G.size)
    plain = invert_face(face, G, steps=5)
    assert plain.noises is None
    with torch.no_grad():  # the reconstruction is the model's own rendering of the W+ (stored noise)
        own = to_pil(G.synthesis(plain.w_plus, noise_mode="const"))[0]
    assert np.array_equal(np.asarray(plain.reconstruction), np.asarray(own))
    fitted = invert_face(face, G, steps=5, optimize_noise=True)
    assert fitted.noises is not None and len(fitted.noises) == G.num_layers
    with torch.no_grad():
        with_maps = to_pil(G.synthesis(fitted.w_plus, noises=fitted.noises))[0]
        without = to_pil(G.synthesis(fitted.w_plus, noise_mode="const"))[0]
    assert np.array_equal(np.asarray(fitted.reconstruction), np.asarray(with_maps))  # the reconstruction view uses them
    assert not np.array_equal(np.asarray(with_maps), np.asarray(without))


def test_stylised_renders_never_take_the_optimised_noise():
    G, style = tiny_generator(), tiny_generator(seed=9)
    w = G.to_w_plus(G.mapping(torch.randn(1, G.style_dim, generator=torch.Generator().manual_seed(2))))
    g = torch.Generator().manual_seed(3)
    maps = [torch.randn(b.shape, generator=g) for b in G.noise_buffers()]
    blank = Image.new("RGB", (G.size, G.size))
    with_maps, without_maps = Inversion(w, maps, blank, "optimisation"), Inversion(w, None, blank, "optimisation")
    with torch.no_grad():
        own = to_pil(style.synthesis(w, noise_mode="const"))[0]
        leaked = to_pil(style.synthesis(w, noises=maps))[0]
    assert not np.array_equal(np.asarray(own), np.asarray(leaked))  # the maps would change the picture
    assert np.array_equal(np.asarray(render(style, with_maps)), np.asarray(own))
    assert np.array_equal(np.asarray(render(style, without_maps)), np.asarray(own))


# ------------------------------------------------------------------ group photos
@pytest.fixture(scope="module")
def two_faces(astronaut):
    canvas = Image.new("RGB", (1100, 560), (200, 200, 200))
    canvas.paste(astronaut, (20, 24))
    canvas.paste(astronaut.resize((420, 420)), (640, 70))  # a smaller copy on the right
    return canvas


def test_prepare_faces_aligns_every_face_largest_first(two_faces):
    faces = prepare_faces(two_faces, output_size=64)
    assert len(faces) == 2 and all(f.faces_found == 2 and f.aligned.size == (64, 64) for f in faces)
    assert faces[0].quad[:, 0].max() < 600 < faces[1].quad[:, 0].min()  # left (larger) copy first
    assert faces[0].box[2] - faces[0].box[0] > faces[1].box[2] - faces[1].box[0]
    assert len(prepare_faces(two_faces, output_size=64, max_faces=1)) == 1
    with pytest.raises(FaceError, match="no face found"):
        prepare_faces(Image.new("RGB", (300, 300), (120, 90, 60)))


def _changed_near(before, after, face, pad=10):
    left, top, right, bottom = face.box
    a = np.asarray(before, dtype=int)[top + pad:bottom - pad, left + pad:right - pad]
    b = np.asarray(after, dtype=int)[top + pad:bottom - pad, left + pad:right - pad]
    return np.abs(a - b).sum(-1).mean()


def test_group_photo_stylises_and_pastes_every_face(two_faces):
    faces = prepare_faces(two_faces, output_size=64)
    G, style = tiny_generator(), tiny_generator(seed=9)
    from nada_core.faces.selfie import invert_faces, stylize_faces

    seen = []
    invs = invert_faces(faces, G, steps=3, progress=lambda s, n, loss: seen.append((s, n)))
    assert seen == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]  # one count over both faces
    imgs, pasted = stylize_faces(faces, invs, style)
    assert len(imgs) == 2 and pasted.size == two_faces.size
    for face in faces:
        assert _changed_near(two_faces, pasted, face) > 30  # both faces replaced
    diff = np.abs(np.asarray(pasted, dtype=int) - np.asarray(two_faces, dtype=int)).sum(-1)
    far = np.ones(diff.shape, dtype=bool)
    for face in faces:  # everything outside the faces' crop squares (plus a margin) is untouched
        lo, hi = np.floor(face.quad.min(0)).astype(int) - 3, np.ceil(face.quad.max(0)).astype(int) + 3
        far[max(lo[1], 0):hi[1], max(lo[0], 0):hi[0]] = False
    assert far.sum() > 0.3 * far.size and diff[far].max() == 0
    # pasting one face at a time gives the same photo as pasting both
    one = paste_faces(two_faces, faces[1:], imgs[1:])
    assert _changed_near(two_faces, one, faces[0]) == 0 and _changed_near(two_faces, one, faces[1]) > 30
    with pytest.raises(ValueError, match="2 faces but 1"):
        paste_faces(two_faces, faces, imgs[:1])


def test_cli_invert_all_faces(two_faces, tmp_path):
    from nada_core.__main__ import main
    from nada_core.store.checkpoints import save_generator

    two_faces.save(tmp_path / "group.png")
    model = save_generator(tiny_generator(seed=4), tmp_path / "style" / "final.safetensors")
    assert main(["invert", str(tmp_path / "group.png"), "--base", "tiny", "--model", str(model), "--all-faces",
                 "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["face1_aligned.png", "face1_reconstruction.png", "face1_stylised_style.png",
                     "face2_aligned.png", "face2_reconstruction.png", "face2_stylised_style.png", "pasted_style.png"]
    pasted = Image.open(tmp_path / "out" / "pasted_style.png")
    assert pasted.size == two_faces.size
    faces = prepare_faces(two_faces, output_size=64)
    assert all(_changed_near(two_faces, pasted.convert("RGB"), f) > 30 for f in faces)


# ---------------------------------------------------------------------------- adjustable crop
def side(quad):
    return np.hypot(*(quad[3] - quad[0]))


def angle(quad):
    top = quad[3] - quad[0]
    return np.degrees(np.arctan2(top[1], top[0]))


def test_the_default_crop_adjustment_is_todays_crop_bit_for_bit(astronaut):
    lm = landmarks(astronaut)
    plain, quad = align_face(astronaut, output_size=256, transform_size=1024, lm=lm)
    same, same_quad = align_face(astronaut, output_size=256, transform_size=1024, lm=lm, adjust=CropAdjust())
    assert np.array_equal(quad, same_quad) and np.array_equal(quad, ffhq_quad(lm))
    assert np.array_equal(np.asarray(plain), np.asarray(same))


def test_crop_scale_shift_and_rotation_move_the_quad_as_said(astronaut):
    lm = landmarks(astronaut)
    q = ffhq_quad(lm)
    s, c = side(q), q.mean(0)
    big = ffhq_quad(lm, CropAdjust(scale=1.2))
    assert side(big) == pytest.approx(1.2 * s, rel=1e-9) and np.allclose(big.mean(0), c)
    assert angle(big) == pytest.approx(angle(q), abs=1e-9)
    turned = ffhq_quad(lm, CropAdjust(rotate=10))
    assert angle(turned) == pytest.approx(angle(q) + 10, abs=1e-9)    # clockwise on the photo (y down)
    assert side(turned) == pytest.approx(s) and np.allclose(turned.mean(0), c)
    moved = ffhq_quad(lm, CropAdjust(shift_x=0.1, shift_y=-0.05))
    right, down = (q[3] - q[0]) / s, (q[1] - q[0]) / s                # the crop's own axes
    assert np.allclose(moved - q, (0.1 * right - 0.05 * down) * s)    # every corner moved by the same vector
    # the aligned crop follows: a larger crop shows the eyes closer together
    size = 256
    tight, qt = align_face(astronaut, output_size=size, transform_size=1024, lm=lm)
    wide, qw = align_face(astronaut, output_size=size, transform_size=1024, lm=lm, adjust=CropAdjust(scale=1.25))
    eyes = np.stack([lm[36:42].mean(0), lm[42:48].mean(0)])
    gap_t, gap_w = (np.diff(aligned_points(eyes, qq, size), axis=0)[0, 0] for qq in (qt, qw))
    assert gap_w == pytest.approx(gap_t / 1.25, rel=1e-6)
    assert np.abs(np.asarray(tight, dtype=int) - np.asarray(wide, dtype=int)).mean() > 5


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": 3}, "crop scale must be between 0.6 and 1.6"),
    ({"scale": float("nan")}, "crop scale must be between"),
    ({"shift_x": 0.5}, "crop shift x must be between -0.3 and 0.3"),
    ({"shift_y": -1}, "crop shift y must be between -0.3 and 0.3"),
    ({"rotate": 90}, r"crop rotation \(degrees\) must be between -45 and 45"),
    ({"rotate": "a lot"}, "crop rotation .* must be a number"),
])
def test_out_of_range_crop_adjustments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CropAdjust(**kwargs)


def test_a_shift_parses_from_text():
    assert CropAdjust.parse_shift("0.02,-0.03") == (0.02, -0.03)
    for bad in ("0.02", "a,b", "1,2,3"):
        with pytest.raises(ValueError, match="crop shift must be DX,DY"):
            CropAdjust.parse_shift(bad)


def test_the_reconstruction_error_is_the_mean_pixel_difference(astronaut):
    face = prepare_face(astronaut, output_size=32)
    assert pixel_error(face.aligned, face.aligned) == 0
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    expected = np.abs(np.asarray(face.aligned, dtype=float) - 128).mean() / 255
    assert pixel_error(face.aligned, grey) == pytest.approx(expected)
    assert 0.05 < expected < 0.5
