"""GAN inversion: the e4e encoder (one forward pass, FFHQ only) and an optimisation projector that
works with any generator (and can refine the encoder's answer).

The encoder network (``models.encoders.E4EEncoder``) mirrors the layout of ``e4e_ffhq_encode.pt`` (Tov et
al. 2021): an IR-SE-50 backbone, a feature pyramid, and 18 map-to-style blocks predicting W+ offsets from a
single base code; this module loads it and runs it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..models.encoders import INPUT_SIZE, E4EEncoder
from ..models.stylegan2 import Generator
from .perceptual import lpips_loss


def load_e4e(path: str | Path, device: str | torch.device = "cpu") -> E4EEncoder:
    """Build the encoder from an e4e checkpoint (``state_dict`` with ``encoder.*`` keys, ``latent_avg``)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt.get("state_dict", ckpt)
    enc_sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    n_styles = 1 + max(int(k.split(".")[1]) for k in enc_sd if k.startswith("styles."))
    enc = E4EEncoder(n_styles)
    enc.load_state_dict(enc_sd, strict=True)
    avg = ckpt.get("latent_avg")
    if avg is None:
        raise ValueError(f"{path}: no latent_avg in the e4e checkpoint")
    enc.latent_avg = avg.reshape(-1, avg.shape[-1]).expand(n_styles, -1).clone()
    return enc.to(device).eval().requires_grad_(False)


def encoder_input(aligned: torch.Tensor) -> torch.Tensor:
    """Aligned face (B, 3, H, W) in [-1, 1] -> the encoder's 256x256 input."""
    return F.interpolate(aligned, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                         antialias=True) if aligned.shape[-1] != INPUT_SIZE else aligned


# ------------------------------------------------------------------ optimisation projector
def _noise_regularisation(noises: list[torch.Tensor]) -> torch.Tensor:
    """StyleGAN2 projector's penalty on spatial autocorrelation of the noise maps, over a pyramid."""
    loss = 0.0
    for n in noises:
        while True:
            loss = loss + (n * torch.roll(n, 1, dims=3)).mean().pow(2) + (n * torch.roll(n, 1, dims=2)).mean().pow(2)
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return loss


def reconstruction_loss(img: torch.Tensor, target: torch.Tensor, clip=None, clip_target=None,
                        clip_weight: float = 0.5, lpips=None) -> torch.Tensor:
    """LPIPS (VGG16) plus a light pixel term when LPIPS is given; otherwise a multi-scale pixel loss
    (256 down to 32 px) plus, when a CLIP member is given, a CLIP image-embedding loss."""
    if lpips is not None:
        return lpips_loss(lpips, img, target) + 0.1 * F.mse_loss(F.avg_pool2d(img, 4), F.avg_pool2d(target, 4))
    loss, x, y = 0.0, img, target
    if x.shape[-1] > 256:
        x, y = F.interpolate(x, size=256, mode="area"), F.interpolate(y, size=256, mode="area")
    while True:
        loss = loss + F.mse_loss(x, y)
        if x.shape[-1] <= 32:
            break
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    if clip is not None:
        loss = loss + clip_weight * (1 - F.cosine_similarity(clip.encode_images(img), clip_target, dim=-1)).mean()
    return loss


def project(G: Generator, target: torch.Tensor, steps: int = 200, w_init: torch.Tensor | None = None,
            lr: float = 0.05, noise_weight: float = 1e5, clip=None, lpips=None,
            progress: Callable[[int, int, float], None] | None = None, optimize_noise: bool = False,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
    """Optimise W+ so that G reproduces ``target`` (1, 3, S, S) in [-1, 1], starting from ``w_init``
    (e.g. the encoder's answer) or the mean latent. By default G renders with its own stored noise
    (noise_mode "const") throughout. With ``optimize_noise`` the per-layer noise maps are optimised
    too (the StyleGAN2 projector): a closer reconstruction, but the maps absorb the photo's fine
    detail, so they belong to the reconstruction view only, never to stylised renders.
    Returns (W+, image, optimised noise maps or None)."""
    device = target.device
    if target.shape[-1] != G.size:
        target = F.interpolate(target, size=(G.size, G.size), mode="area" if target.shape[-1] > G.size else "bilinear")
    with torch.no_grad():
        w_avg = G.w_avg()
        w_std = (G.mapping(torch.randn(4096, G.style_dim, generator=torch.Generator().manual_seed(seed)).to(device))
                 - w_avg).pow(2).sum(1).mean().sqrt().item()
        start = G.to_w_plus(w_init.to(device) if w_init is not None else w_avg.to(device))
        clip_target = clip.encode_images(target) if clip is not None else None
    w = start.detach().clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    noises = [torch.randn(b.shape, generator=gen).to(device).requires_grad_(True) for b in G.noise_buffers()] \
        if optimize_noise else None
    params = [w] + (noises or [])
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    G.requires_grad_(False)
    loss_value = float("nan")
    for step in range(steps):
        t = step / max(1, steps)
        ramp = min(1.0, (1 - t) / 0.25)
        ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
        ramp *= min(1.0, t / 0.05)
        for g in opt.param_groups:
            g["lr"] = lr * ramp
        noise_strength = 0.05 * w_std * max(0.0, 1 - t / 0.75) ** 2
        w_noisy = w + torch.randn(w.shape, generator=gen).to(device) * noise_strength
        img = G.synthesis(w_noisy, noises=noises)  # noises None: the model's own (const) noise
        loss = reconstruction_loss(img, target, clip, clip_target, lpips=lpips)
        if optimize_noise:
            loss = loss + noise_weight * _noise_regularisation(noises)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n in noises or []:  # keep each noise map zero-mean, unit-variance
                n.sub_(n.mean()).div_(n.square().mean().sqrt() + 1e-8)
        loss_value = float(loss.detach())
        if progress:
            progress(step + 1, steps, loss_value)
    with torch.no_grad():
        w_final = w.detach()
        noises = [n.detach() for n in noises] if noises is not None else None
        return w_final, G.synthesis(w_final, noises=noises), noises


def refine(G: Generator, target: torch.Tensor, w_start: torch.Tensor, steps: int = 10, lr: float = 0.01,
           clip=None, lpips=None) -> torch.Tensor:
    """W+ after ``steps`` Adam steps from ``w_start`` towards ``target`` (1, 3, S, S) in [-1, 1], rendered at the
    target's size. For video, started from the previous frame's code: a constant small rate and no noise in
    the code, since :func:`project`'s warm-up, noise and ramp (made to leave the mean latent) would make the
    codes of neighbouring frames jump."""
    if steps <= 0:
        return w_start.detach()
    size = target.shape[-1]
    if size > G.size:
        target, size = F.interpolate(target, size=(G.size, G.size), mode="area"), G.size
    with torch.no_grad():
        clip_target = clip.encode_images(target) if clip is not None else None
    w = G.to_w_plus(w_start.to(target.device)).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    G.requires_grad_(False)
    for _ in range(steps):
        img = G.synthesis(w)
        if img.shape[-1] != size:
            img = F.interpolate(img, size=(size, size), mode="area")
        loss = reconstruction_loss(img, target, clip, clip_target, lpips=lpips)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return w.detach()


def invert_with_noise(aligned: torch.Tensor, G: Generator, encoder: E4EEncoder | None = None, steps: int = 200,
                      progress: Callable[[int, int, float], None] | None = None, clip=None, lpips=None,
                      optimize_noise: bool = False):
    """(W+, reconstruction, noise maps or None, method): the encoder's answer, refined by ``steps`` of
    optimisation (of W+ only unless ``optimize_noise``), or optimisation from the mean latent when
    there is no encoder. Noise maps come back only when optimised; they serve the reconstruction view,
    while stylised renders use each model's own noise (as StyleGAN-NADA renders inversions)."""
    w_init, method = None, "optimisation"
    if encoder is not None:
        with torch.no_grad():
            w_init = encoder(encoder_input(aligned.to(next(encoder.parameters()).device))).to(aligned.device)
        if w_init.shape[1] != G.n_latent:
            raise ValueError(f"the encoder predicts {w_init.shape[1]} W+ slots, the generator uses {G.n_latent}")
        method = "e4e"
        if steps <= 0:
            with torch.no_grad():
                return w_init, G.synthesis(w_init), None, method
        method = "e4e + optimisation"
    if steps <= 0:
        raise ValueError("choose at least one optimisation step: no encoder fits this generator")
    w, img, noises = project(G, aligned, steps=steps, w_init=w_init, clip=clip, lpips=lpips, progress=progress,
                             optimize_noise=optimize_noise)
    return w, img, noises, method


def invert(aligned: torch.Tensor, G: Generator, encoder: E4EEncoder | None = None, steps: int = 200,
           clip=None, progress: Callable[[int, int, float], None] | None = None, lpips=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned face (1, 3, S, S) in [-1, 1] -> (W+, reconstruction)."""
    w, img, _, _ = invert_with_noise(aligned, G, encoder, steps, progress, clip=clip, lpips=lpips)
    return w, img
