"""Rendering the shared latent space: the same latents through the source and adapted generators,
edited latents, and interpolation frames (between seeds or across domains)."""
from __future__ import annotations

import torch
from PIL import Image

from ..models.stylegan2 import Generator, seeds_to_z
from ..store.images import grid, to_pil
from .editing import Direction, apply_edits, blend_generators, edit_z

MAX_SEED_TEXT = 200     # characters of a seed list ('0-15' or sixteen 10-digit seeds fit many times over)
MAX_SEED = 2 ** 32 - 1


def parse_seeds(text: str, limit: int = 256, field: str = "Seeds") -> list[int]:
    """'1-8', '1,3,5' or '0-3,10' -> list of seeds; refuses negative, reversed or too long lists. Ranges are
    counted before anything is built, so '0-99999999999' costs nothing; ``field`` names the input in messages."""
    text = str(text)
    if len(text) > MAX_SEED_TEXT:
        raise ValueError(f"{field}: at most {MAX_SEED_TEXT} characters (got {len(text)})")
    spans: list[tuple[int, int]] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part[1:]:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError(f"range {part} runs backwards")
            else:
                a = b = int(part)
            spans.append((a, b))
    except ValueError as e:
        detail = str(e) if "runs backwards" in str(e) else f"got {text[:40]!r}"
        raise ValueError(f"{field} must look like '1-8' or '1,3,5' ({detail})") from None
    if not spans:
        raise ValueError(f"{field}: no seeds given")
    if any(a < 0 or b > MAX_SEED for a, b in spans):
        raise ValueError(f"{field} must be between 0 and {MAX_SEED}")
    count = sum(b - a + 1 for a, b in spans)
    if count > limit:
        raise ValueError(f"{field}: {count} seeds asked for; at most {limit} at once")
    return [s for a, b in spans for s in range(a, b + 1)]


@torch.no_grad()
def latents_for_seeds(G: Generator, seeds, truncation: float = 0.7) -> torch.Tensor:
    """W+ (N, L, D) for integer seeds, truncated towards the mean (the paper's sampling: psi 0.7)."""
    z = seeds_to_z(seeds, G.style_dim, G.device)
    return G.to_w_plus(G.truncate(G.mapping(z), G.w_avg(), truncation))


@torch.no_grad()
def edited_latent(G: Generator, seed: int, truncation: float, edits: list[tuple[Direction, float, tuple | None]],
                  mix_seed: int | None = None, crossover: int = 0) -> torch.Tensor:
    """One seed's W+: Z-space directions move z before mapping, then truncation, style mixing with
    ``mix_seed`` from slot ``crossover`` on, then the W / W+ directions."""
    z = seeds_to_z([seed], G.style_dim, G.device)
    for d, alpha, _ in edits:
        if d.space == "Z":
            z = edit_z(z, d, alpha)
    w = G.to_w_plus(G.truncate(G.mapping(z), G.w_avg(), truncation))
    if mix_seed is not None and 0 < crossover < G.n_latent:
        w = G.mix(w, latents_for_seeds(G, [mix_seed], truncation), crossover)
    return apply_edits(w, [e for e in edits if e[0].space != "Z"])


@torch.no_grad()
def render(generators: list[Generator], w_plus: torch.Tensor, noise_mode: str = "const",
           max_resolution: int | None = None, noises=None) -> list[list[Image.Image]]:
    """For each generator, the images of ``w_plus`` (one row per generator)."""
    rows = []
    for G in generators:
        w = w_plus.to(G.device)
        img = G.synthesis(w, noise_mode, noises=noises, max_resolution=max_resolution)
        rows.append(to_pil(img))
    return rows


def comparison(rows: list[list[Image.Image]], largest: int = 256) -> Image.Image:
    """Rows of the same latents through different generators (source above adapted) as one picture, tiles
    between 128 px and ``largest`` so that 32 px tiny models and 1024 px models both read well."""
    return grid(rows, tile=max(128, min(largest, rows[0][0].width)))


THUMB_SEEDS = (0, 1, 2, 3)


def thumbnail(G_src: Generator, G: Generator, seeds=THUMB_SEEDS, truncation: float = 0.7) -> Image.Image:
    """A library model's picture: a few fixed seeds through its base (top) and through it (bottom)."""
    return comparison(render([G_src, G], latents_for_seeds(G_src, list(seeds), truncation)))


@torch.no_grad()
def interpolation_frames(G_src: Generator, G_adapted: Generator, seed_a: int, seed_b: int, frames: int = 24,
                         mode: str = "seeds", truncation: float = 0.7) -> list[Image.Image]:
    """'seeds': walk from seed A to seed B through the adapted model; 'domains': morph seed A's image
    from the source to the adapted domain by blending weights (theta = (1-a) src + a tgt)."""
    if not 2 <= frames <= 240:
        raise ValueError("frames must be between 2 and 240")
    ts = torch.linspace(0, 1, frames).tolist()
    if mode == "seeds":
        wa, wb = latents_for_seeds(G_src, [seed_a], truncation), latents_for_seeds(G_src, [seed_b], truncation)
        return [to_pil(G_adapted.synthesis(torch.lerp(wa, wb, t)))[0] for t in ts]
    if mode == "domains":
        w = latents_for_seeds(G_src, [seed_a], truncation)
        work = blend_generators(G_src, G_adapted, 0.0)
        out = []
        for t in ts:
            blend_generators(G_src, G_adapted, t, out=work)
            out.append(to_pil(work.synthesis(w))[0])
        return out
    raise ValueError("mode must be 'seeds' or 'domains'")


def save_gif(frames: list[Image.Image], path, fps: int = 12) -> None:
    """Ping-pong GIF so the loop has no jump."""
    seq = frames + frames[-2:0:-1]
    seq[0].save(path, save_all=True, append_images=seq[1:], duration=int(1000 / fps), loop=0)
