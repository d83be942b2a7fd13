import math

import pytest
import torch

from nada_core.guidance.clip_guide import (
    IMAGENET_TEMPLATES,
    ClipLoadError,
    PromptError,
    check_prompts,
    directional_loss,
    global_loss,
    load_clip,
    preprocess,
    text_direction,
)


def test_templates_are_the_79_of_the_paper():
    assert len(IMAGENET_TEMPLATES) == 79
    assert "a bad photo of a {}." in IMAGENET_TEMPLATES and "a photo of many {}." not in IMAGENET_TEMPLATES


def test_directional_loss_by_hand():
    f0 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    f1 = torch.tensor([[0.0, 5.0, 0.0], [0.0, 3.0, 4.0]])
    d = torch.tensor([0.0, 1.0, 0.0])
    # sample 1: unit(f1)-unit(f0) = (-1, 1, 0) -> cos with d = 1/sqrt2
    # sample 2: (0, .6, .8) - (0, 1, 0) = (0, -.4, .8) -> cos = -.4/sqrt(.8)
    expected = ((1 - 1 / math.sqrt(2)) + (1 + 0.4 / math.sqrt(0.8))) / 2
    assert directional_loss(f0, f1, d).item() == pytest.approx(expected, rel=1e-6)
    # raw-embedding scale does not matter; only directions do
    assert directional_loss(7 * f0, 0.1 * f1, d).item() == pytest.approx(expected, rel=1e-6)


def test_global_loss_by_hand():
    feats = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    text = torch.tensor([1.0, 0.0])
    assert global_loss(feats, text).item() == pytest.approx(((1 - 1 / math.sqrt(2)) + 0.0) / 2, rel=1e-6)


def test_preprocess_matches_clip_normalisation():
    img = torch.zeros(1, 3, 32, 32)  # mid-grey in [-1, 1]
    out = preprocess(img, 16, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    assert out.shape == (1, 3, 16, 16)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.5]))
    x = torch.randn(1, 3, 40, 64, requires_grad=True)
    preprocess(x, 24, (0, 0, 0), (1, 1, 1)).sum().backward()  # differentiable, non-square ok
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_text_direction_is_unit_and_antisymmetric():
    m = load_clip("tiny")
    d = text_direction(m.model, m.tokenizer, "photo", "sketch")
    assert d.shape == (32,) and d.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(text_direction(m.model, m.tokenizer, "sketch", "photo"), -d, atol=1e-5)
    assert torch.allclose(m.text_direction("photo", "sketch"), d, atol=1e-6)  # cached member path agrees


def test_prompt_errors_and_truncation_warning():
    m = load_clip("tiny")
    with pytest.raises(PromptError, match="target text is empty"):
        check_prompts("photo", "   ")
    with pytest.raises(PromptError, match="source text is empty"):
        check_prompts("", "sketch")
    with pytest.raises(PromptError, match="no direction"):
        check_prompts("Photo", "photo")
    assert check_prompts("photo", "sketch", m.tokenizer) == []
    (w,) = check_prompts("photo", "x " * 149, m.tokenizer)   # 77 tokens within the 300 characters allowed
    assert "truncated" in w


def test_unknown_and_missing_clip_models(tmp_path, monkeypatch):
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(ClipLoadError, match="unknown CLIP model"):
        load_clip("ViT-X-99")
    with pytest.raises(ClipLoadError, match=r"weights download clip-ViT-B-32"):
        load_clip("ViT-B-32")


def test_real_clip_loader_reads_an_open_clip_checkpoint(tmp_path, monkeypatch):
    """The path real users take: the manifest's file for ViT-B-32 loaded through open_clip (random weights
    saved in the published open_clip safetensors layout stand in for the download)."""
    import open_clip
    from safetensors.torch import save_file

    from nada_core.store import weights

    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path))
    torch.manual_seed(0)
    original = open_clip.create_model("ViT-B-32", force_quick_gelu=True).eval()
    path = weights.get_asset("clip-ViT-B-32").path
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    member = load_clip("ViT-B-32")
    assert member.image_size == 224 and not any(p.requires_grad for p in member.model.parameters())
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        want = original.encode_image(preprocess(img, 224, original.visual.image_mean, original.visual.image_std))
        got = member.encode_images(img)
    assert torch.allclose(got, want, atol=1e-5)
    assert member.text_direction("photo", "sketch").shape == (512,)


def test_bf16_clip_encodes_float32_images_without_autocast():
    """On CUDA CLIP is loaded in bf16 (open_clip's precision="bf16" keeps class/positional embeddings in
    float32); a run with amp off feeds it float32 images outside autocast (this failed on an H100)."""
    from open_clip.model import convert_weights_to_lp

    from nada_core.guidance.clip_guide import ClipMember, encode_pooled
    from nada_core.models.tiny import tiny_clip

    model, tok = tiny_clip()
    reference = ClipMember("tiny", model, tok).encode_images(torch.rand(2, 3, 32, 32) * 2 - 1)
    convert_weights_to_lp(model, torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32  # the mixed layout that broke the old cast
    member = ClipMember("tiny", model, tok)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = member.encode_images(images)
    assert feats.dtype == torch.float32 and feats.shape == reference.shape and torch.isfinite(feats).all()
    assert torch.isfinite(encode_pooled(member, images)).all()


def test_packed_attention_computes_what_multihead_attention_does():
    """ClipMember swaps nn.MultiheadAttention for PackedSelfAttention (faster under autograd on CPU); images,
    texts and the gradients that reach the images must not change."""
    import copy

    from nada_core.guidance.clip_guide import ClipMember, PackedSelfAttention
    from nada_core.models.tiny import tiny_clip

    model, tok = tiny_clip()
    plain = copy.deepcopy(model)
    member = ClipMember("tiny", model, tok)
    packed_layers = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert packed_layers and all(type(m) is PackedSelfAttention for m in packed_layers)
    assert model.state_dict().keys() == plain.state_dict().keys()

    images = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    ours = member.encode_images(images)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), images)
    theirs = ClipMember.__new__(ClipMember)           # the unpacked model through the same preprocessing
    theirs.model = plain
    ref = ClipMember.encode_images(theirs, images)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), images)
    assert (ours - ref).norm() / ref.norm() < 1e-5 and (g_ours - g_ref).norm() / g_ref.norm() < 1e-5
    tokens = tok(["a photo of a dog", "a sketch"])
    with torch.no_grad():                               # the text tower's causal mask goes through the packed path
        t_ours, t_ref = model.encode_text(tokens), plain.encode_text(tokens)
    assert (t_ours - t_ref).norm() / t_ref.norm() < 1e-5

    layer = packed_layers[0]                            # uses the packed path cannot serve go to the parent
    x = torch.randn(2, 5, layer.embed_dim)
    want = torch.nn.MultiheadAttention.forward(layer, x, x, x, need_weights=True)
    got = layer(x, x, x, need_weights=True)
    assert torch.allclose(got[0], want[0]) and got[1] is not None
    keep = torch.ones(5, 5, dtype=torch.bool).triu(1)   # boolean masks mean "masked" here, "kept" in SDPA
    assert torch.allclose(layer(x, x, x, need_weights=False, attn_mask=keep)[0],
                          torch.nn.MultiheadAttention.forward(layer, x, x, x, need_weights=False, attn_mask=keep)[0])
