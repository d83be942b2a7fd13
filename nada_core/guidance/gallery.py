"""A gallery of prompts known to work with StyleGAN-NADA: the domains shown in the paper (Gal et al.,
arXiv 2108.00946), the official README / notebook and the released models, each with settings to start
from. Iterations follow the official notebook's rule of thumb: style and minor domain changes ~200-400,
identity changes ~150-200, simple in-domain changes ~50; shape changes use the "Shape" preset (about
2/3 of the W+ slots trained, style mixing 0.9), everything else "Style" (adaptive layer choice over all
slots). The exact wording of a few prompts in the paper's figures is not published as text; those
follow the figure captions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .clip_guide import DEFAULT_MODELS

PRESETS = ("Style", "Shape")
SHAPE_MIXING = 0.9

# bases a gallery entry may name that are not in weights/manifest.json (load such a file by path)
EXTERNAL_BASES = {"lsun-church": "StyleGAN2 LSUN church config-f (rosinality .pt); not in the weights manifest"}


@dataclass(frozen=True)
class GalleryPrompt:
    name: str
    source: str
    target: str
    base: str = "ffhq"                       # 'ffhq' = 256 px on CPU, config-f on GPU (library.resolve_base_name)
    iterations: int = 300
    preset: str = "Style"                    # "Style" | "Shape"
    clip_models: tuple[str, ...] = DEFAULT_MODELS
    clip_weights: tuple[float, ...] = (1.0, 1.0)
    ready_model: str | None = None           # a manifest style with this change already trained
    note: str = ""

    def recipe_fields(self, n_latent: int) -> dict:
        """Keyword arguments for ``adapt.Recipe`` on a generator with ``n_latent`` W+ slots."""
        shape = self.preset == "Shape"
        return {"source": self.source, "target": self.target, "iterations": self.iterations,
                "k": round(n_latent * 2 / 3) if shape else None, "mixing": SHAPE_MIXING if shape else 0.0,
                "clip_models": list(self.clip_models), "clip_weights": list(self.clip_weights)}

    def to_dict(self) -> dict:
        return asdict(self)


def _p(name, source, target, iterations=300, preset="Style", base="ffhq", **kw) -> GalleryPrompt:
    return GalleryPrompt(name, source, target, base, iterations, preset, **kw)


GALLERY: tuple[GalleryPrompt, ...] = (
    # ---- faces (FFHQ): styles and art
    _p("Sketch", "Photo", "Sketch", ready_model="nada-sketch", note="the README's example command"),
    _p("Pixar", "Human", "Pixar character", ready_model="nada-pixar"),
    _p("Anime", "Photo", "Anime painting", ready_model="nada-anime"),
    _p("Mona Lisa", "Photo", "Mona Lisa Painting"),
    _p("Modigliani", "Photo", "Modigliani painting"),
    _p("Ukiyo-e", "Photo", "Ukiyo-e painting"),
    _p("Cubism", "Photo", "Cubism painting"),
    _p("Edvard Munch", "Photo", "Painting in the style of Edvard Munch"),
    _p("Botero", "Photo", "Fernando Botero Painting", preset="Shape"),
    _p("Disney princess", "Human", "Disney princess"),
    # ---- faces: identities and characters (identity changes: ~150-200 steps)
    _p("Joker", "Human", "The Joker", 200, ready_model="nada-joker"),
    _p("Nicolas Cage", "Human", "Nicolas Cage", 200),
    _p("Super Saiyan", "Human", "Super Saiyan", 200),
    _p("White Walker", "Human", "White Walker", 200),
    _p("Zombie", "Human", "Zombie", 200),
    _p("Werewolf", "Human", "Werewolf", 200, "Shape"),
    _p("Tolkien elf", "Human", "Tolkien elf", 200, "Shape"),
    _p("Shrek", "Human", "Shrek", 200, "Shape"),
    _p("Thanos", "Human", "Thanos", 200),
    # ---- faces: a small in-domain change (~50 steps)
    _p("Smiling", "Face", "Smiling face", 50, note="the notebook's example of a simple in-domain change"),
    # ---- dogs (AFHQ dog)
    _p("Dog to cat", "Dog", "Cat", 400, "Shape", base="afhqdog"),
    _p("Dog to pig", "Dog", "Pig", 400, "Shape", base="afhqdog"),
    _p("Dog to bear", "Dog", "Bear", 400, "Shape", base="afhqdog"),
    _p("Dog to Nicolas Cage", "Dog", "Nicolas Cage", 300, "Shape", base="afhqdog"),
    _p("Dog to the Joker", "Dog", "The Joker", 300, base="afhqdog", note="the notebook's example"),
    # ---- churches (LSUN church; bring your own base file)
    _p("Church to hut", "Church", "Hut", 300, "Shape", base="lsun-church"),
    _p("Church to snowy mountain", "Church", "Snowy mountain", 300, "Shape", base="lsun-church"),
)


def gallery(base: str | None = None) -> list[GalleryPrompt]:
    """Every entry, or those for one base ('ffhq', 'afhqdog', ...)."""
    return [g for g in GALLERY if base is None or g.base == base]


def get(name: str) -> GalleryPrompt:
    for g in GALLERY:
        if g.name.lower() == name.lower():
            return g
    raise KeyError(f"no gallery entry {name!r}; known: {', '.join(g.name for g in GALLERY)}")
