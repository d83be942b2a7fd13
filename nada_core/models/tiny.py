"""Tiny, deterministic, *untrained* stand-ins for the pretrained models, and the one place that knows
the name "tiny".

Pretrained weights cannot be downloaded everywhere (CI has no internet), so every code path is
also exercised on these: a small StyleGAN2 with the real layout, a small open_clip CLIP with
the real tokenizer, and small e4e / pSp-sketch encoders (the real classes, narrow and shallow,
fitted to the tiny generator's W+). Their output is noise-like by construction; the UI labels
them as untrained. Wherever a base or a CLIP model is chosen by name, :func:`is_tiny` says
whether the name means these.
"""
from __future__ import annotations

import math

import torch

from .encoders import E4EEncoder, PSPEncoder
from .stylegan2 import Generator

TINY_NAME = "tiny"         # the name of the tiny base and the tiny CLIP, wherever models are named
TINY_GENERATOR = {"size": 32, "style_dim": 64, "n_mlp": 2, "channel_multiplier": 1, "channel_max": 32}
TINY_ENCODER_STAGES = ((16, 16, 1), (16, 32, 1), (32, 48, 1), (48, 64, 1))   # IR-SE stages: 4 units, not 24


def is_tiny(name: object) -> bool:
    """Whether a model name (a base, a CLIP model, a style's recorded base) means the tiny stand-ins."""
    return name == TINY_NAME


def tiny_n_latent() -> int:
    """W+ slots of the tiny generator (known without building it)."""
    return 2 * int(math.log2(TINY_GENERATOR["size"])) - 2


def _init_like_training(G: Generator, gen: torch.Generator) -> None:
    """Random weights with the statistics of a trained model: non-zero noise strengths and
    biases, so that every parameter influences the image and the tests can see it."""
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise.weight"):
                p.copy_(0.05 * torch.rand(p.shape, generator=gen))
            elif name.endswith("bias") and "modulation" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def tiny_generator(seed: int = 0, **overrides) -> Generator:
    """A deterministic small generator (32 px, 32 channels by default); same seed, same weights."""
    cfg = {**TINY_GENERATOR, **overrides}
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G = Generator(**cfg)
    _init_like_training(G, gen)
    return G.eval()


def tiny_clip(seed: int = 0, image_size: int = 32, embed_dim: int = 32):
    """(model, tokenizer) for a random-init open_clip CLIP with the real BPE tokenizer."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=image_size)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(embed_dim, vision, text, quick_gelu=True)
    model.eval().requires_grad_(False)
    model.visual.image_mean = (0.48145466, 0.4578275, 0.40821073)
    model.visual.image_std = (0.26862954, 0.26130258, 0.27577711)
    return model, open_clip.get_tokenizer("ViT-B-32")


def _tiny_latent_avg(seed: int) -> torch.Tensor:
    """The tiny generator's truncation centre, repeated per slot: the encoders' codes start where its w live."""
    with torch.no_grad():
        return tiny_generator(seed).w_avg().detach().reshape(1, -1).expand(tiny_n_latent(), -1).clone()


def tiny_e4e(seed: int = 0) -> E4EEncoder:
    """An untrained e4e encoder for the tiny generator (``seed``): the real class, 4 IR-SE units, W+ of
    (n_latent, style_dim) = (8, 64), ``latent_avg`` the generator's centre; same seed, same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = E4EEncoder(tiny_n_latent(), TINY_GENERATOR["style_dim"], TINY_ENCODER_STAGES)
    enc.latent_avg = _tiny_latent_avg(seed)
    return enc.eval().requires_grad_(False)


def tiny_psp_sketch(seed: int = 0) -> PSPEncoder:
    """An untrained pSp sketch encoder (1 input channel, ``label_nc`` 1) for the tiny generator, like
    :func:`tiny_e4e`; with ``start_from_latent_avg`` as pSp's sketch model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = PSPEncoder(tiny_n_latent(), 1, 1, _tiny_latent_avg(seed), {"start_from_latent_avg": True, "tiny": True},
                         TINY_GENERATOR["style_dim"], TINY_ENCODER_STAGES)
    return enc.eval().requires_grad_(False)
