"""Latent editing: directions (GANSpace computed from any generator, InterFaceGAN / e4e files),
edits restricted to a range of W+ slots, and weight blending between two generators.

Because an adapted generator keeps the source latent space, one edited latent is shown through
the source and every adapted model alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.stylegan2 import Generator


@dataclass
class Direction:
    """A latent direction. ``vector`` is (D,) for W or Z, (n_latent, D) for W+."""

    name: str
    vector: torch.Tensor
    space: str = "W"           # "W", "W+" or "Z" (edit z, then map)
    range: tuple[float, float] = (-3.0, 3.0)


class DirectionError(ValueError):
    pass


def load_direction_file(path: str | Path, name: str | None = None, space: str | None = None,
                        value_range: tuple[float, float] = (-3.0, 3.0)) -> list[Direction]:
    """Read a direction file as users download it: torch ``.pt`` (1,D) W or (1,L,D) W+, an
    InterFaceGAN ``.npy`` (1,D), or a GANSpace PCA dict (mean, comp, std) -> one Direction per component."""
    path = Path(path)
    name = name or path.stem
    try:
        if path.suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise DirectionError(f"{path}: not a readable direction file ({type(e).__name__}: {e})") from None
    if isinstance(data, dict) and {"comp", "std"} <= set(data):
        comp, std = data["comp"].float(), data["std"].float()
        return [Direction(f"{name} PC{i}", comp[i].reshape(-1) * std[i], space or "W", value_range)
                for i in range(comp.shape[0])]
    if not isinstance(data, torch.Tensor) or data.ndim not in (2, 3) or data.shape[0] != 1:
        raise DirectionError(f"{path}: expected a (1, D) or (1, L, D) tensor, got {getattr(data, 'shape', type(data))}")
    vec = data[0].float()
    return [Direction(name, vec, space or ("W+" if vec.ndim == 2 else "W"), value_range)]


@torch.no_grad()
def ganspace(G: Generator, n_components: int = 10, n_samples: int = 20000, seed: int = 0) -> list[Direction]:
    """GANSpace (Harkonen et al. 2020): principal axes of w = mapping(z), scaled by their standard
    deviation, so alpha is measured in standard deviations. Works for any generator, no download."""
    gen = torch.Generator().manual_seed(seed)
    device = G.device
    z = torch.randn(n_samples, G.style_dim, generator=gen).to(device)
    w = torch.cat([G.mapping(chunk) for chunk in z.split(4096)]).double()
    centred = w - w.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    std = s / (n_samples - 1) ** 0.5
    k = min(n_components, vh.shape[0])
    return [Direction(f"PC{i}", (vh[i] * std[i]).float().cpu(), "W", (-3.0, 3.0)) for i in range(k)]


def slot_mask(n_latent: int, layers: tuple[int, int] | None) -> torch.Tensor:
    """(n_latent, 1) 0/1 mask of the W+ slots ``[start, end)`` an edit applies to (all when None)."""
    m = torch.zeros(n_latent, 1)
    start, end = layers or (0, n_latent)
    m[max(0, start):min(n_latent, end)] = 1
    return m


def apply_edits(w_plus: torch.Tensor, edits: list[tuple[Direction, float, tuple[int, int] | None]]) -> torch.Tensor:
    """W+ (B, L, D) moved by ``alpha * direction`` for each (direction, alpha, slot range) in W or W+.
    Z-space directions must be applied with :func:`edit_z` before mapping."""
    out = w_plus.clone()
    L = w_plus.shape[1]
    for d, alpha, layers in edits:
        if alpha == 0:
            continue
        if d.space == "Z":
            raise DirectionError(f"{d.name} is a Z-space direction: apply it to z before mapping")
        vec = d.vector.to(out)
        if d.space == "W+" and vec.shape[0] != L:
            raise DirectionError(f"{d.name} has {vec.shape[0]} W+ slots, this generator uses {L}")
        step = vec if vec.ndim == 2 else vec.expand(L, -1)
        out = out + alpha * step * slot_mask(L, layers).to(out)
    return out


def edit_z(z: torch.Tensor, direction: Direction, alpha: float) -> torch.Tensor:
    return z + alpha * direction.vector.to(z)


def check_compatible(G: Generator, d: Direction) -> None:
    """Directions only make sense for the latent space they were found in."""
    if d.vector.shape[-1] != G.style_dim:
        raise DirectionError(f"{d.name} is {d.vector.shape[-1]}-dimensional, the generator's latents are {G.style_dim}")


@torch.no_grad()
def blend_generators(G_src: Generator, G_tgt: Generator, alpha: float, out: Generator | None = None) -> Generator:
    """theta = (1 - alpha) theta_src + alpha theta_tgt, written into ``out`` (a copy of G_src if None)."""
    import copy

    if G_src.config != G_tgt.config:
        raise ValueError("can only blend generators with the same architecture")
    out = out if out is not None else copy.deepcopy(G_src)
    src, tgt = dict(G_src.named_parameters()), dict(G_tgt.named_parameters())
    for name, p in out.named_parameters():
        p.copy_(torch.lerp(src[name], tgt[name], alpha))
    return out


@torch.no_grad()
def combine_styles(G_base: Generator, styles: list[tuple[Generator, float]], out: Generator | None = None) -> Generator:
    """Domain arithmetic: theta = theta_base + sum_i a_i (theta_i - theta_base), over every floating
    tensor of the state dict (weights and buffers), written into ``out`` (a copy of G_base if None).
    Weights may be negative (subtract a style) or above 1 (exaggerate it); every style must share the
    base's architecture, and only styles adapted from that same base make sense."""
    import copy

    for i, (G, _) in enumerate(styles):
        if G.config != G_base.config:
            raise ValueError(f"style {i + 1} has a different architecture from the base ({G.config} vs "
                             f"{G_base.config}); combine only styles adapted from this base")
    out = out if out is not None else copy.deepcopy(G_base)
    base = {k: v.detach() for k, v in G_base.state_dict().items()}
    others = [(G.state_dict(), float(a)) for G, a in styles]
    for name, t in out.state_dict().items():
        if not t.is_floating_point():
            continue
        b = base[name].to(t.device)
        acc = b.clone()
        for sd, a in others:
            if a != 0:
                acc.add_(sd[name].to(t.device) - b, alpha=a)
        t.copy_(acc)
    return out
