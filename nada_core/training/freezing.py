"""Adaptive layer freezing (StyleGAN-NADA Sec. 3.3) and manual layer presets.

Each iteration: optimise a copy of W+ for a few SGD steps on the global CLIP loss through the
current trainable generator; the W+ slots that move most are the ones the target needs. Only the
convolutions reading those slots are trained, as the generator's slot map says
(``Generator.slot_consumers``); ToRGB layers and the mapping network stay frozen, so the last slot,
which feeds only a ToRGB, trains nothing.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..models.stylegan2 import Generator, StyledConv

PRESETS = ("auto", "all", "texture", "shape")

# What a first run chooses between (paper Sec. 4): styles and textures train every layer for ~300 steps;
# shape changes (dog -> cat) adapt about 2/3 of the W+ slots per step with style mixing 0.9, ~200 steps.
STARTER_PRESETS = {
    "Style": {"slots": "all", "mixing": 0.0, "iterations": 300},
    "Shape": {"slots": "two_thirds", "mixing": 0.9, "iterations": 200},
}


def shape_slot_count(n_latent: int) -> int:
    """The paper's 'about 2/3 of the slots' for shape changes."""
    return round(n_latent * 2 / 3)


def starter_settings(name: str, n_latent: int) -> dict:
    """{'k', 'mixing', 'iterations'} of a starter preset for a generator with ``n_latent`` W+ slots;
    k = 0 means every slot (no layer selection pass)."""
    p = STARTER_PRESETS[name]
    k = 0 if p["slots"] == "all" else shape_slot_count(n_latent)
    return {"k": k, "mixing": p["mixing"], "iterations": p["iterations"]}


def select_slots(G_train: Generator, w_plus: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                 k: int, iters: int, lr: float = 0.01, noise_mode: str = "const") -> list[int]:
    """Top-``k`` W+ slots by mean |W+ - W+0| after ``iters`` SGD steps on ``loss_fn(G_train(W+))``,
    largest change first. With k >= n_latent every slot is chosen and no pass is run."""
    L = w_plus.shape[1]
    if k >= L or iters <= 0:
        return list(range(L))
    w0 = w_plus.detach()
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=lr)
    for _ in range(iters):
        loss = loss_fn(G_train.synthesis(w, noise_mode))
        (grad,) = torch.autograd.grad(loss, [w])  # gradients for W+ only, none for the weights
        w.grad = grad
        opt.step()
    change = (w.detach() - w0).abs().mean(dim=(0, 2))
    return torch.topk(change, k).indices.tolist()


def layers_for_slots(G: Generator, slots) -> list[nn.Module]:
    """The convolutions that read the given W+ slots, per ``G.slot_consumers()`` (no duplicates, in slot
    order; ToRGB readers are left out, slots outside the map give nothing)."""
    table = G.slot_consumers()
    layers: list[nn.Module] = []
    for s in slots:
        for name in table.get(int(s), ()):
            layer = G.get_submodule(name)
            if isinstance(layer, StyledConv) and all(layer is not m for m in layers):
                layers.append(layer)
    return layers


def synthesis_layers(G: Generator) -> list[nn.Module]:
    """Every synthesis layer (the 'all' preset): constant input, convolutions and ToRGBs."""
    return [G.input, G.conv1, G.to_rgb1, *G.convs, *G.to_rgbs]


def preset_slots(preset: str, n_latent: int) -> list[int]:
    """Fixed slot choices: 'texture' the fine half (colour, texture), 'shape' the coarse 2/3."""
    if preset in ("all", "auto"):
        return list(range(n_latent))
    if preset == "texture":
        return list(range(n_latent // 2, n_latent))
    if preset == "shape":
        return list(range(shape_slot_count(n_latent)))
    raise ValueError(f"unknown layer preset {preset!r}; choose one of {', '.join(PRESETS)}")


def set_trainable(G: Generator, layers) -> None:
    """Freeze every parameter of ``G`` except those of ``layers``."""
    G.requires_grad_(False)
    for layer in layers:
        layer.requires_grad_(True)
