"""pSp conditional encoders (sketch / segmentation -> W+): layout and forward against an independent
transcription of pixel2style2pixel's published GradualStyleEncoder, the official checkpoint layout read
with weights_only, pSp's input transforms, and a drawn sketch rendered by a generator."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision import transforms

from nada_core.faces.psp import (
    SEG_COLORS,
    GradualStyleEncoder,
    PSPEncoder,
    encoder_from_checkpoint,
    load_psp,
    segmentation_input,
    segmentation_to_w,
    sketch_input,
    sketch_to_w,
)
from nada_core.models.tiny import tiny_generator

# ------------------------------------------------------------------ reference transcription
# pSp models/encoders/helpers.py get_blocks(50): (in_channel, depth, num_units); the first unit of each
# block has stride 2, the others stride 1; bottleneck_IR_SE = shortcut (MaxPool2d(1, stride) when in ==
# depth, else 1x1 conv + BN) + res_layer (BN, 3x3 conv, PReLU, 3x3 conv with the stride, BN, SE(16)).
IR_SE_50 = [(64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)]


def units():
    for in_c, depth, n in IR_SE_50:
        yield in_c, depth, 2
        for _ in range(n - 1):
            yield depth, depth, 1


def spatial(k):  # GradualStyleEncoder: coarse_ind 3, middle_ind 7
    return 16 if k < 3 else 32 if k < 7 else 64


def expected_layout(n_styles, input_nc):
    shapes = {}

    def bn(p, c):
        shapes.update({f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,), f"{p}.running_var": (c,),
                       f"{p}.num_batches_tracked": ()})

    shapes["input_layer.0.weight"] = (64, input_nc, 3, 3)
    bn("input_layer.1", 64)
    shapes["input_layer.2.weight"] = (64,)
    for i, (in_c, depth, _stride) in enumerate(units()):
        p = f"body.{i}"
        if in_c != depth:
            shapes[f"{p}.shortcut_layer.0.weight"] = (depth, in_c, 1, 1)
            bn(f"{p}.shortcut_layer.1", depth)
        bn(f"{p}.res_layer.0", in_c)
        shapes[f"{p}.res_layer.1.weight"] = (depth, in_c, 3, 3)
        shapes[f"{p}.res_layer.2.weight"] = (depth,)
        shapes[f"{p}.res_layer.3.weight"] = (depth, depth, 3, 3)
        bn(f"{p}.res_layer.4", depth)
        shapes[f"{p}.res_layer.5.fc1.weight"] = (depth // 16, depth, 1, 1)
        shapes[f"{p}.res_layer.5.fc2.weight"] = (depth, depth // 16, 1, 1)
    for k in range(n_styles):
        for j in range(int(math.log2(spatial(k)))):  # Conv2d + LeakyReLU pairs
            shapes[f"styles.{k}.convs.{2 * j}.weight"] = (512, 512, 3, 3)
            shapes[f"styles.{k}.convs.{2 * j}.bias"] = (512,)
        shapes[f"styles.{k}.linear.weight"] = (512, 512)
        shapes[f"styles.{k}.linear.bias"] = (512,)
    shapes.update({"latlayer1.weight": (512, 256, 1, 1), "latlayer1.bias": (512,),
                   "latlayer2.weight": (512, 128, 1, 1), "latlayer2.bias": (512,)})
    return shapes


def reference_forward(sd, x, n_styles):
    """pSp's GradualStyleEncoder.forward, written out with functional ops on a state dict."""
    def bn(t, p):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    x = F.prelu(bn(F.conv2d(x, sd["input_layer.0.weight"], padding=1), "input_layer.1"), sd["input_layer.2.weight"])
    taps = {}
    for i, (in_c, depth, stride) in enumerate(units()):
        p = f"body.{i}"
        if in_c == depth:
            short = F.max_pool2d(x, 1, stride)
        else:
            short = bn(F.conv2d(x, sd[f"{p}.shortcut_layer.0.weight"], stride=stride), f"{p}.shortcut_layer.1")
        r = bn(x, f"{p}.res_layer.0")
        r = F.prelu(F.conv2d(r, sd[f"{p}.res_layer.1.weight"], padding=1), sd[f"{p}.res_layer.2.weight"])
        r = bn(F.conv2d(r, sd[f"{p}.res_layer.3.weight"], stride=stride, padding=1), f"{p}.res_layer.4")
        gate = F.conv2d(F.relu(F.conv2d(r.mean((2, 3), keepdim=True), sd[f"{p}.res_layer.5.fc1.weight"])),
                        sd[f"{p}.res_layer.5.fc2.weight"])
        x = r * torch.sigmoid(gate) + short
        taps[i] = x
    c1, c2, c3 = taps[6], taps[20], taps[23]

    def up_add(a, b):
        return F.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=True) + b

    p2 = up_add(c3, F.conv2d(c2, sd["latlayer1.weight"], sd["latlayer1.bias"]))
    p1 = up_add(p2, F.conv2d(c1, sd["latlayer2.weight"], sd["latlayer2.bias"]))
    codes = []
    for k in range(n_styles):
        f = c3 if k < 3 else p2 if k < 7 else p1
        for j in range(int(math.log2(spatial(k)))):
            f = F.leaky_relu(F.conv2d(f, sd[f"styles.{k}.convs.{2 * j}.weight"], sd[f"styles.{k}.convs.{2 * j}.bias"],
                                      stride=2, padding=1), 0.01)  # nn.LeakyReLU() default slope
        f = f.reshape(-1, 512)  # EqualLinear(512, 512, lr_mul=1): weight / sqrt(512), bias as is
        codes.append(F.linear(f, sd[f"styles.{k}.linear.weight"] / math.sqrt(512), sd[f"styles.{k}.linear.bias"]))
    return torch.stack(codes, dim=1)


def randomise(module, seed):
    """Random weights of trained-like scale, batch-norm statistics and PReLU slopes included."""
    g = torch.Generator().manual_seed(seed)
    sd = module.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            base = name.rsplit(".", 1)[0]
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(0.75 + 0.5 * torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean") or (name.endswith(".bias")):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith(".weight") and f"{base}.running_mean" in sd:  # batch-norm scale
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            elif t.ndim == 1:  # PReLU slopes
                t.copy_(0.25 * torch.rand(t.shape, generator=g))
            elif name.endswith("linear.weight"):  # equalised: N(0, 1), scaled at run time
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
    return module


# ------------------------------------------------------------------ fixtures
N_STYLES = 8  # tiny_generator's n_latent (32 px); slots 0-2 coarse, 3-6 middle, 7 fine: every branch runs


@pytest.fixture(scope="module")
def drawing():
    """A face sketch drawn with PIL lines: dark strokes on white, 300x280 so that it must be resized."""
    img = Image.new("L", (300, 280), 255)
    d = ImageDraw.Draw(img)
    d.ellipse((70, 40, 230, 250), outline=0, width=4)
    d.ellipse((110, 110, 140, 130), outline=0, width=3)
    d.ellipse((160, 110, 190, 130), outline=0, width=3)
    d.line((150, 130, 140, 170, 155, 172), fill=0, width=3)
    d.arc((115, 180, 185, 215), 10, 170, fill=0, width=3)
    return img


@pytest.fixture(scope="module")
def sketch_net():
    return randomise(GradualStyleEncoder(N_STYLES, input_nc=1), seed=1).eval()


@pytest.fixture(scope="module")
def raw_codes(sketch_net, drawing):
    with torch.no_grad():
        return sketch_net(sketch_input(drawing))


# ------------------------------------------------------------------ architecture
@pytest.mark.parametrize("input_nc", [3, 1, 19])
def test_state_dict_has_psps_names_and_shapes(input_nc):
    with torch.device("meta"):  # the full 18-slot encoder (267 M parameters) without allocating it
        enc = GradualStyleEncoder(18, input_nc)
        wrapped = PSPEncoder(18, input_nc)
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == expected_layout(18, input_nc)
    assert len([k for k in got if k.endswith("res_layer.1.weight")]) == 24  # IR-SE-50
    # as stored in official checkpoints: state_dict["encoder.<name>"]; latent_avg is not a weight
    assert set(wrapped.state_dict()) == {f"encoder.{k}" for k in got}


def test_forward_matches_the_reference_transcription(sketch_net, raw_codes, drawing):
    x = sketch_input(drawing)
    with torch.no_grad():
        ref = reference_forward(sketch_net.state_dict(), x, N_STYLES)
    assert raw_codes.shape == (1, N_STYLES, 512)
    scale = ref.abs().max().item()
    assert 1e-2 < scale < 1e4 and torch.isfinite(raw_codes).all()
    assert (raw_codes - ref).abs().max().item() <= 1e-5 * max(1.0, scale)
    # each slot reads its own features: the slots differ
    assert (raw_codes[0, 0] - raw_codes[0, 7]).abs().max() > 1e-3 * scale


# ------------------------------------------------------------------ checkpoints
def official_opts(**over):
    opts = {"exp_dir": "/x", "dataset_type": "celebs_sketch_to_face", "encoder_type": "GradualStyleEncoder",
            "input_nc": 1, "label_nc": 1, "output_size": 1024, "batch_size": 8, "learning_rate": 0.0001,
            "optim_name": "ranger", "train_decoder": False, "start_from_latent_avg": True, "learn_in_w": False,
            "lpips_lambda": 0.8, "id_lambda": 0.0, "l2_lambda": 1.0, "w_norm_lambda": 0.005,
            "stylegan_weights": "pretrained_models/stylegan2-ffhq-config-f.pt", "checkpoint_path": None,
            "max_steps": 500000, "save_interval": 5000, "resize_factors": None, "device": "cuda:0"}
    opts.update(over)
    return opts


@pytest.fixture(scope="module")
def official_file(sketch_net, tmp_path_factory):
    """What pSp's coach saves: the whole net's state dict (encoder.* and decoder.*), opts as a dict,
    latent_avg when trained with start_from_latent_avg."""
    avg = torch.randn(N_STYLES, 512, generator=torch.Generator().manual_seed(3))
    sd = {f"encoder.{k}": v for k, v in sketch_net.state_dict().items()}
    sd.update({"decoder.style.1.weight": torch.randn(512, 512), "decoder.input.input": torch.randn(1, 512, 4, 4)})
    path = tmp_path_factory.mktemp("psp") / "psp_celebs_sketch_to_face.pt"
    torch.save({"state_dict": sd, "latent_avg": avg, "opts": official_opts()}, path)
    return path, avg


@pytest.fixture(scope="module")
def loaded(official_file, drawing):
    enc = load_psp(official_file[0])
    return enc, sketch_to_w(drawing, enc)


def test_official_checkpoint_loads_with_weights_only_and_adds_latent_avg(official_file, loaded, raw_codes):
    avg = official_file[1]
    enc, w = loaded
    assert isinstance(enc, PSPEncoder) and enc.task == "sketch" and enc.input_nc == 1 and enc.n_styles == N_STYLES
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    assert enc.opts["dataset_type"] == "celebs_sketch_to_face"
    # pSp: codes = encoder(x) + latent_avg
    assert w.shape == (1, N_STYLES, 512)
    assert (w - (raw_codes + avg)).abs().max().item() <= 1e-5 * max(1.0, raw_codes.abs().max().item())


def test_latent_avg_follows_the_opts(sketch_net):
    """start_from_latent_avg from opts (dict or argparse Namespace); without opts, a stored latent_avg is used
    (pSp saves it only then); one stored w is repeated over the slots; bad files say what is wrong."""
    sd = {f"encoder.{k}": v for k, v in sketch_net.state_dict().items()}
    w_avg = torch.randn(1, 512)
    on = encoder_from_checkpoint({"state_dict": sd, "latent_avg": w_avg, "opts": official_opts()})
    assert torch.equal(on.latent_avg, w_avg.expand(N_STYLES, -1))
    off = encoder_from_checkpoint({"state_dict": sd, "latent_avg": w_avg,
                                   "opts": argparse.Namespace(**official_opts(start_from_latent_avg=False))})
    assert off.latent_avg is None and off.task == "sketch"
    bare = encoder_from_checkpoint({"state_dict": sd, "latent_avg": w_avg})
    assert bare.latent_avg is not None and bare.task == "sketch"  # label_nc from the input channels
    assert encoder_from_checkpoint(sd).latent_avg is None  # a bare state dict
    with pytest.raises(ValueError, match="no latent_avg"):
        encoder_from_checkpoint({"state_dict": sd, "opts": official_opts()})
    with pytest.raises(ValueError, match="not supported"):
        encoder_from_checkpoint({"state_dict": sd, "opts": official_opts(encoder_type="BackboneEncoderUsingLastLayerIntoW")})
    with pytest.raises(ValueError, match="slots"):
        encoder_from_checkpoint({"state_dict": sd, "latent_avg": torch.zeros(18, 512), "opts": official_opts()})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        encoder_from_checkpoint({"state_dict": {**sd, "encoder.extra.weight": torch.zeros(1)}})


def test_opts_stored_as_a_namespace_read_with_weights_only(tmp_path):
    """Some pSp-style files keep opts as an argparse Namespace: allowed, nothing else is."""
    path = tmp_path / "ns.pt"
    torch.save({"state_dict": {"decoder.x": torch.zeros(1)}, "opts": argparse.Namespace(label_nc=1)}, path)
    with pytest.raises(ValueError, match="no encoder"):  # read fine; just no encoder in it
        load_psp(path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {}, "opts": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        load_psp(tmp_path / "evil.pt")


# ------------------------------------------------------------------ inputs
def test_sketch_input_is_psps_transform(drawing):
    x = sketch_input(drawing)
    assert x.shape == (1, 1, 256, 256) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and x.min() < 0.2 and (x > 0.99).float().mean() > 0.8  # lines on paper
    ref = transforms.Compose([transforms.Resize((256, 256)), transforms.ToTensor()])(drawing.convert("L"))
    assert torch.allclose(x[0], ref, atol=1e-6)  # pSp: Resize, ToTensor, no Normalize
    assert torch.allclose(sketch_input(drawing.convert("RGB")), x, atol=1e-6)
    # a drawing canvas: transparent background is white paper, not black
    canvas = Image.new("RGBA", drawing.size, (0, 0, 0, 0))
    canvas.paste(Image.new("RGBA", drawing.size, (0, 0, 0, 255)), mask=Image.eval(drawing, lambda v: 255 - v))
    assert torch.allclose(sketch_input(canvas), x, atol=2 / 255)
    assert torch.allclose(sketch_input(np.asarray(drawing)), x, atol=1e-6)
    assert torch.allclose(sketch_input(x[0, 0]), x)  # a tensor in [0, 1] at 256 passes through


def test_segmentation_input_is_psps_one_hot():
    labels = np.zeros((512, 512), np.uint8)
    labels[100:450, 120:400] = 1  # skin
    labels[200:240, 170:230] = 4  # l_eye
    labels[200:240, 290:350] = 5  # r_eye
    labels[0:90] = 13  # hair
    x = segmentation_input(labels)
    assert x.shape == (1, 19, 256, 256) and x.dtype == torch.float32
    assert torch.equal(x.sum(1), torch.ones(1, 256, 256))  # exactly one class per pixel
    # pSp: Resize((256, 256)) on the 'L' label image (bilinear), ToOneHot(19), ToTensor
    pil = transforms.Resize((256, 256))(Image.fromarray(labels))
    ref = np.eye(19, dtype=np.float32)[np.asarray(pil)].transpose(2, 0, 1)
    assert torch.equal(x[0], torch.from_numpy(ref))
    assert x[0, 4, 110, 100] == 1 and x[0, 13, 10, 10] == 1 and x[0, 0, 250, 5] == 1
    nearest = segmentation_input(labels, resample="nearest")
    assert set(nearest[0].sum((1, 2)).nonzero().flatten().tolist()) == {0, 1, 4, 5, 13}
    # the same map as a palette image, a tensor, and painted in pSp's colours
    p = Image.frombytes("P", labels.shape[::-1], labels.tobytes())
    p.putpalette(np.asarray(SEG_COLORS, np.uint8).tobytes())
    assert torch.equal(segmentation_input(torch.from_numpy(labels).long()), x)
    painted = Image.fromarray(np.asarray(SEG_COLORS, np.uint8)[labels])
    assert torch.equal(segmentation_input(painted, resample="nearest"), nearest)
    assert torch.equal(segmentation_input(p), x)  # a palette PNG: its indices are the labels
    with pytest.raises(ValueError, match="0..18"):
        segmentation_input(np.full((256, 256), 19))


def test_segmentation_to_w_checks_the_model():
    seg = randomise(PSPEncoder(1, input_nc=19, label_nc=19), seed=2).eval()  # one coarse slot: cheap
    assert seg.task == "segmentation"
    labels = np.zeros((256, 256), np.int64)
    labels[60:200, 70:190] = 1
    w = segmentation_to_w(labels, seg)
    assert w.shape == (1, 1, 512) and torch.isfinite(w).all()
    with pytest.raises(ValueError, match="sketch model takes 1"):
        sketch_to_w(Image.new("L", (64, 64), 255), seg)


# ------------------------------------------------------------------ end to end
def test_a_drawn_sketch_becomes_an_image(loaded):
    """sketch -> pSp encoder (loaded from its file) -> W+ -> generator: the image-to-image path, on a tiny
    generator whose n_latent is the encoder's slot count."""
    enc, w = loaded  # sketch_to_w(drawing, load_psp(file))
    G = tiny_generator(style_dim=512)
    assert G.n_latent == enc.n_styles
    with torch.no_grad():
        img = G.synthesis(w)
    assert img.shape == (1, 3, G.size, G.size) and torch.isfinite(img).all() and img.std() > 0


# ------------------------------------------------------------------ manifest
def test_manifest_names_the_official_models():
    from nada_core.store import weights

    m = weights.load_manifest()
    sketch, seg = m["psp-sketch"], m["psp-seg"]
    assert sketch.extra["task"] == "sketch" and seg.extra["task"] == "segmentation"
    assert sketch.file.endswith("psp_celebs_sketch_to_face.pt") and seg.file.endswith("psp_celebs_seg_to_face.pt")
    assert len(sketch.url.split("/")[6]) == 40 and len(sketch.sha256) == 64  # mirror pinned to a commit
    assert "1VpEKc6E6yG3xhYuZ0cq8D2_1CbT0Dstz" in seg.url  # the README's Drive id
    # their own kind: the selfie tab's "encoder" checks and downloads stay about e4e
    assert sketch.kind == seg.kind == "psp-encoder"
    assert [n for n, a in m.items() if a.kind == "encoder"] == ["e4e-ffhq"]
