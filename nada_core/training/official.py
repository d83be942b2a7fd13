"""The layers the official StyleGAN-NADA code trains (``Recipe.parity == "official"``), for runs that must
reproduce it rather than follow our slot map (``Generator.slot_consumers``, see ``freezing``).

Read from rinongal/StyleGAN-nada, ``ZSSGAN/model/ZSSGAN.py``: ``SG2Generator.get_all_layers()`` lists the
children of ``sg2_model.Generator`` in the order they are built (style, input, conv1, to_rgb1, convs, upsamples,
to_rgbs, noises), and

* with layer selection (``--auto_layer_iters`` > 0) ``ZSSGAN.forward`` unfreezes everything, picks the top-k
  slots (``determine_opt_layers``), freezes everything and unfreezes ``[conv1, to_rgb1, *convs][slot]`` for
  each chosen slot: slot 0 -> conv1, slot 1 -> to_rgb1, slot i >= 2 -> convs[i-2] (the convolution reading
  slot i-1). The constant input and the other ToRGBs stay frozen. k = n_latent (the README's command,
  ``--auto_layer_k 18 --auto_layer_iters 1``) trains conv1, to_rgb1 and every conv, the same set each step;
* without it (``--auto_layer_iters 0``) ``get_training_layers(phase)`` is unfrozen once: input, conv1 and
  convs[a:b] for 'texture' [2:10], 'shape' [0:2], 'no_fine' [0:10], 'shape_expanded' [0:3], every conv for
  the default phase, and every child for 'all' (the mapping network then requires grad but receives none:
  the trained generator is fed W; ours shares the frozen mapping network instead).

Whole modules are unfrozen, so a StyledConv trains its kernel, modulation, noise strength and bias, and a
ToRGB its kernel, modulation and bias, as ours do.
"""
from __future__ import annotations

from torch import nn

from ..models.stylegan2 import Generator

PARITIES = ("ours", "official")
# get_training_layers' conv ranges per phase (None: every conv); our fixed presets name the official phase
PHASE_CONVS = {None: (0, None), "texture": (2, 10), "shape": (0, 2), "no_fine": (0, 10), "shape_expanded": (0, 3)}
PRESET_PHASE = {"auto": None, "texture": "texture", "shape": "shape", "all": "all"}


def slot_layers(G: Generator, slots) -> list[nn.Module]:
    """``determine_opt_layers``' modules for the chosen W+ slots (no duplicates, in slot order)."""
    table = [G.conv1, G.to_rgb1, *G.convs]      # one entry per slot: len == n_latent
    layers: list[nn.Module] = []
    for s in slots:
        layer = table[int(s)]
        if all(layer is not m for m in layers):
            layers.append(layer)
    return layers


def phase_layers(G: Generator, phase: str | None) -> list[nn.Module]:
    """``get_training_layers(phase)``: what a run without layer selection trains."""
    if phase == "all":
        return [G.input, G.conv1, G.to_rgb1, *G.convs, *G.to_rgbs]
    start, stop = PHASE_CONVS[phase]
    return [G.input, G.conv1, *list(G.convs)[start:stop]]


def fixed_layers(G: Generator, preset: str, auto_layer_iters: int) -> list[nn.Module]:
    """What an official run trains when the layers do not change per step: with layer selection on and every
    slot chosen (preset 'auto', k = n_latent), ``slot_layers`` of all slots; otherwise the phase that our
    preset names ('auto' with ``auto_layer_iters`` = 0 is the default phase)."""
    if preset == "auto" and auto_layer_iters > 0:
        return slot_layers(G, range(G.n_latent))
    return phase_layers(G, PRESET_PHASE[preset])
