"""CLIP guidance for StyleGAN-NADA: an ensemble of frozen open_clip models, the text/image target
directions, and the directional and global losses (paper Sec. 3, formulas in GUIDE.md section 3).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.tiny import TINY_NAME, is_tiny, tiny_clip
from ..store import weights
from ..store.images import resize_and_crop
from .text_limits import text_problem

DEFAULT_MODELS = ("ViT-B-32", "ViT-B-16")


def _imagenet_templates() -> list[str]:
    """The 79 ImageNet prompt templates StyleGAN-NADA averages over: CLIP's 80 without 'a photo of many {}.'."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES if t("{}") != "a photo of many {}."]


IMAGENET_TEMPLATES = _imagenet_templates()


class PromptError(ValueError):
    """A prompt that cannot guide training, with the reason a user can act on."""


def check_prompts(source: str, target: str, tokenizer=None) -> list[str]:
    """Raise PromptError for unusable prompts; return warnings (e.g. truncation) for usable ones."""
    for problem in (text_problem(source, "the source text"), text_problem(target, "the target text")):
        if problem:
            raise PromptError(problem)
    source, target = (source or "").strip(), (target or "").strip()
    if not target:
        raise PromptError("the target text is empty: describe the new domain, e.g. 'Sketch' or 'Pixar character'")
    if not source:
        raise PromptError("the source text is empty: describe what the generator makes now, e.g. 'Photo' or 'Human'")
    if source.lower() == target.lower():
        raise PromptError(f"source and target are both '{source}': there is no direction to learn")
    warnings = []
    if tokenizer is not None:
        ctx = getattr(tokenizer, "context_length", 77)
        longest = max(len(tokenizer.encode(t.format(p))) for t in IMAGENET_TEMPLATES for p in (source, target))
        if longest + 2 > ctx:
            warnings.append(f"a prompt is longer than CLIP's {ctx} tokens once placed in the templates; "
                            "CLIP only reads the first part, the rest was truncated")
    return warnings


# ------------------------------------------------------------------ contract: pure functions
def preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Generator images in [-1, 1] (any size) -> CLIP input, differentiably: [0,1], bicubic resize of
    the short side to ``size``, centre crop, CLIP mean/std."""
    x = resize_and_crop((images + 1) / 2, size)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def encode_text_templates(clip_model, tokenizer, text: str, templates=IMAGENET_TEMPLATES) -> torch.Tensor:
    """(T, D) unit embeddings of ``text`` placed in each template."""
    device = next(clip_model.parameters()).device
    tokens = tokenizer([t.format(text) for t in templates]).to(device)
    return F.normalize(clip_model.encode_text(tokens).float(), dim=-1)


def text_direction(clip_model, tokenizer, source: str, target: str) -> torch.Tensor:
    """dT = normalize(mean_t[norm(E_T(t(target))) - norm(E_T(t(source)))]), a (D,) unit vector."""
    diff = encode_text_templates(clip_model, tokenizer, target) - encode_text_templates(clip_model, tokenizer, source)
    return F.normalize(diff.mean(0), dim=-1)


def directional_loss(feats_frozen: torch.Tensor, feats_trained: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Batch mean of 1 - cos(dI, dT), dI = norm(E_I(trained)) - norm(E_I(frozen)); feats are raw (B, D)."""
    d_img = F.normalize(feats_trained, dim=-1) - F.normalize(feats_frozen, dim=-1)
    return (1 - F.cosine_similarity(d_img, direction.to(d_img).expand_as(d_img), dim=-1)).mean()


def global_loss(feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Batch mean of 1 - cos(E_I(G(w)), E_T(text)) (the official code's 1 - logits/100)."""
    return (1 - F.cosine_similarity(feats, text_feats.to(feats).expand_as(feats), dim=-1)).mean()


def embedding_norm_loss(feats_frozen: torch.Tensor, feats_trained: torch.Tensor) -> torch.Tensor:
    """Optional regulariser: keep the CLIP embedding norm of adapted images near the source's."""
    n0, n1 = feats_frozen.norm(dim=-1), feats_trained.norm(dim=-1)
    return ((n1 - n0) / n0).pow(2).mean()


# ------------------------------------------------------------------ the ensemble
class PackedSelfAttention(torch.nn.MultiheadAttention):
    """CLIP's self-attention (batch-first, one input) as a projection, ``scaled_dot_product_attention`` and an
    output projection: the same numbers as ``nn.MultiheadAttention`` (5e-7 relative in float32). PyTorch's
    module transposes a batch-first input to sequence-first before projecting it, and with autograd on (CLIP's
    pass over the trained images) that strided projection ran as a batched product per token, much slower on
    CPU than one packed projection (figures: bench/results/README.md). Other uses (key padding masks,
    boolean masks, attention weights asked for, dropout while training, cross-attention) go to the parent."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        packed = (query is key is value and query.dim() == 3 and self.batch_first and self._qkv_same_embed_dim
                  and self.bias_k is None and not self.add_zero_attn and key_padding_mask is None
                  and not need_weights and not is_causal and (self.dropout == 0 or not self.training)
                  and (attn_mask is None or (attn_mask.dim() == 2 and attn_mask.is_floating_point())))
        if not packed:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        b, n, e = query.shape
        h = self.num_heads
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4)
        mask = None if attn_mask is None else attn_mask.to(qkv.dtype)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, e)), None


def pack_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Make the model's ``nn.MultiheadAttention`` layers ``PackedSelfAttention`` (same parameters and names)."""
    for m in model.modules():
        if type(m) is torch.nn.MultiheadAttention:
            m.__class__ = PackedSelfAttention
    return model


def image_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a CLIP image tower takes: that of its first convolution or linear layer. open_clip's bf16
    precision (ours on CUDA) converts those but keeps embeddings such as ``class_embedding`` in float32, so
    the first parameter's dtype is not the input's; under autocast either works, without it only this one."""
    for m in model.visual.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            return m.weight.dtype
    return next(model.parameters()).dtype


@dataclass
class ClipMember:
    name: str
    model: torch.nn.Module
    tokenizer: object
    weight: float = 1.0
    _text_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if next(self.model.parameters()).device.type == "cpu":  # measured there; CUDA runs PyTorch's module
            pack_attention(self.model)

    def with_weight(self, weight: float) -> "ClipMember":
        """The same loaded model at another ensemble weight, sharing its text-embedding cache."""
        return dataclasses.replace(self, weight=weight, _text_cache=self._text_cache)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raw image embeddings (B, D), differentiable w.r.t. ``images`` in [-1, 1]."""
        x = preprocess(images.float(), self.image_size, self.model.visual.image_mean, self.model.visual.image_std)
        return self.model.encode_image(x.to(image_dtype(self.model))).float()

    def text_features(self, text: str, templates=IMAGENET_TEMPLATES) -> torch.Tensor:
        """Mean unit text embedding over templates, cached: text is never re-encoded in the loop."""
        key = (text, tuple(templates))
        if key not in self._text_cache:
            self._text_cache[key] = encode_text_templates(self.model, self.tokenizer, text, templates)
        return self._text_cache[key]

    def text_direction(self, source: str, target: str) -> torch.Tensor:
        return F.normalize((self.text_features(target) - self.text_features(source)).mean(0), dim=-1)

    def global_text(self, target: str, template: str = "a {}") -> torch.Tensor:
        """E_T(template.format(target)) unit vector for the global loss: 'a {target}' as the official
        ``lambda_global`` term; the bare '{}' as its layer-selection pass (``determine_opt_layers``)."""
        return self.text_features(target, templates=(template,))[0]

    @torch.no_grad()
    def image_direction(self, style_images: torch.Tensor, source_images: torch.Tensor) -> torch.Tensor:
        """Image-guided target: normalize(mean norm(E_I(style)) - mean norm(E_I(source)))."""
        style = F.normalize(self.encode_images(style_images), dim=-1).mean(0)
        source = F.normalize(self.encode_images(source_images), dim=-1).mean(0)
        return F.normalize(style - source, dim=-1)


class ClipLoadError(RuntimeError):
    pass


def load_clip(name: str, device: str | torch.device = "cpu", weight: float = 1.0) -> ClipMember:
    """Load an OpenAI CLIP model by open_clip name from the weights folder (see weights/manifest.json).
    On CUDA it runs in bfloat16 (half precision, the same format as the trainer's autocast); it is frozen
    and in eval mode everywhere."""
    import open_clip

    if is_tiny(name):
        model, tok = tiny_clip()
        return ClipMember(TINY_NAME, model.to(device), tok, weight)
    if name not in open_clip.list_models():
        raise ClipLoadError(f"unknown CLIP model {name!r}; try one of {', '.join(DEFAULT_MODELS)}")
    asset = f"clip-{name}"
    try:
        path = weights.require(asset)
    except weights.WeightsError as e:
        raise ClipLoadError(str(e)) from None
    model = open_clip.create_model(name, pretrained=str(path), force_quick_gelu=True, device=device,
                                   precision="bf16" if torch.device(device).type == "cuda" else "fp32")
    model.eval().requires_grad_(False)
    return ClipMember(name, model, open_clip.get_tokenizer(name), weight)


def load_ensemble(names, model_weights=None, device="cpu") -> list[ClipMember]:
    model_weights = list(model_weights or [1.0] * len(names))
    if len(model_weights) != len(names):
        raise ClipLoadError("give one weight per CLIP model")
    return [load_clip(n, device, w) for n, w in zip(names, model_weights) if w != 0]


# ------------------------------------------------------------------ the latent mapper's losses (StyleCLIP / NADA)
def clip_pool_matrix(size: int, out: int, up: int = 7, device=None, dtype=torch.float32) -> torch.Tensor:
    """(out, size) averaging matrix of the official mapper's resize: nearest upsampling by ``up`` followed by
    average pooling into ``out`` bins. Entry (i, j) is the share of output bin i covered by input pixel j;
    bins of fractional width are weighted by overlap (for the official sizes the width is an integer and
    this is exactly ``AvgPool2d(size // 32)`` of ``Upsample(scale_factor=7)``)."""
    width = size * up / out
    starts = torch.arange(out, dtype=torch.float64)[:, None] * width
    lo = torch.arange(size, dtype=torch.float64)[None, :] * up
    overlap = (torch.minimum(starts + width, lo + up) - torch.maximum(starts, lo)).clamp(min=0)
    return (overlap / width).to(device=device, dtype=dtype)


def pool_for_clip(images: torch.Tensor, clip_size: int, up: int = 7) -> torch.Tensor:
    """The official mapper's CLIP resize, ``AvgPool2d(size // 32)(Upsample(scale_factor=7)(x))`` (1024 -> 224),
    generalised to pool to ``clip_size`` from any size; computed as two small matrix products, never
    materialising the 7x image (7168^2 pixels per channel at 1024 px)."""
    h, w = images.shape[-2:]
    mh = clip_pool_matrix(h, clip_size, up, images.device, images.dtype)
    mw = mh if w == h else clip_pool_matrix(w, clip_size, up, images.device, images.dtype)
    return mh @ images @ mw.T


def encode_pooled(member: "ClipMember", images: torch.Tensor) -> torch.Tensor:
    """CLIP image features as the official mapper computes them: ``pool_for_clip`` of the generator's [-1, 1]
    image straight into the image encoder (StyleCLIP's CLIPLoss applies no [0, 1] shift or mean/std)."""
    x = pool_for_clip(images.float(), member.image_size)
    return member.model.encode_image(x.to(image_dtype(member.model))).float()


def plain_text_features(member: "ClipMember", text: str) -> torch.Tensor:
    """(D,) unit embedding of ``text`` on its own (the mapper tokenises the bare description, no templates)."""
    return member.text_features(text, templates=("{}",))[0]


def clip_text_loss(members: list["ClipMember"], images: torch.Tensor, text: str,
                   feats: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The mapper's CLIP loss: sum over models of weight * batch mean of ``1 - logit/100`` = ``1 - cos(E_I, E_T)``
    (OpenAI CLIP's logit scale is 100). Returns (loss, per-model features of ``images``) so callers can reuse them."""
    feats = feats if feats is not None else [encode_pooled(m, images) for m in members]
    loss = sum(m.weight * global_loss(f, plain_text_features(m, text).to(f)) for m, f in zip(members, feats))
    return loss, feats


def embedding_norm_mse(feats_before: torch.Tensor, feats_after: torch.Tensor) -> torch.Tensor:
    """The mapper's embedding-norm loss: ``MSE(|E_I(x)|, |E_I(x_hat)|)`` over the batch (StyleGAN-NADA)."""
    return F.mse_loss(feats_after.norm(dim=-1), feats_before.norm(dim=-1))
