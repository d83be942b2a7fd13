"""Latent mappers and text edits in the latent space of a (possibly adapted) generator.

* ``LevelsMapper``: StyleCLIP's levels mapper as StyleGAN-NADA trains it. W+ is split into coarse
  (slots 0-3), medium (4-7) and fine (8-) groups, each through its own PixelNorm + 4 x EqualLinear
  (512 -> 512, lr_mul 0.01, fused leaky ReLU); a switched-off group contributes zeros. The edit is
  ``w_hat = w + strength * 0.1 * mapper(w)``. Parameter names are the official ones (including its
  spelling ``course_mapping``), so StyleCLIP / StyleGAN-NADA mapper checkpoints load (``load_mapper``).
* ``MapperTrainer``: trains a mapper for a text with the official losses (CLIP, latent L2, CLIP
  embedding norm, identity) and Ranger, through the shared run loop of ``training.Trainer``.
* ``optimise_edit``: StyleCLIP's latent optimisation (CLIP loss + L2 to the start code).

Two quirks of the official layers, kept or offered on purpose (both tested against hand computations):

* PixelNorm normalises over dim 1. The official mapper feeds it (batch, slots, 512) codes, so it
  normalises each channel over the group's slots (not each code over its channels). Every official
  checkpoint was trained that way, so ours does the same.
* The fused leaky ReLU bias. The intended math (and StyleCLIP's pure-PyTorch op) adds one bias per
  channel: ``bias_layout="channel"``, our default. The official CUDA kernel indexes the bias as if
  dim 1 were the channels, so code element (sample b, slot s, channel c) gets ``bias[(b * slots + s) % 512]``
  (and the official CPU fallback raises on such inputs). ``bias_layout="cuda"`` reproduces that
  indexing for checkpoints trained under it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..guidance.clip_guide import ClipMember, clip_text_loss, embedding_norm_mse, encode_pooled
from ..guidance.text_limits import text_problem
from ..models.fingerprint import fingerprint, fingerprint_matches
from ..models.stylegan2 import EqualLinear, Generator, PixelNorm
from ..store.checkpoints import atomic_write, read_safetensors_header, safetensors_metadata, sniff
from ..store.runs import MAPPER, RunFolder
from .loop import Phases, StepResult, Trainer
from .ranger import Ranger

MAPPER_FORMAT = "nada-studio-mapper"
MAPPER_VERSION = 1
EDIT_SCALE = 0.1                      # w_hat = w + 0.1 * mapper(w) (official)
GROUPS = (("course_mapping", 0, 4), ("medium_mapping", 4, 8), ("fine_mapping", 8, None))
BIAS_LAYOUTS = ("channel", "cuda")


class MapperError(ValueError):
    """A mapper file that cannot be used, or one that does not fit the generator."""


# --------------------------------------------------------------------------- the network
class MapperLinear(EqualLinear):
    """EqualLinear (lr_mul 0.01) + fused leaky ReLU (slope 0.2, gain sqrt 2) on (B, slots, C) codes."""

    def __init__(self, dim: int, lr_mul: float = 0.01, bias_layout: str = "channel"):
        super().__init__(dim, dim, lr_mul=lr_mul, activation=True)
        if bias_layout not in BIAS_LAYOUTS:
            raise ValueError(f"bias_layout must be one of {BIAS_LAYOUTS}, got {bias_layout!r}")
        self.bias_layout = bias_layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale)
        bias = self.bias * self.lr_mul
        if self.bias_layout == "cuda" and out.ndim == 3:
            b, s, _ = out.shape
            index = (torch.arange(b, device=out.device)[:, None] * s + torch.arange(s, device=out.device)) % bias.numel()
            bias = bias[index].unsqueeze(-1)          # (B, S, 1): one value per code, as the kernel adds it
        return F.leaky_relu(out + bias, 0.2) * math.sqrt(2)


class GroupMapper(nn.Module):
    """The official ``Mapper``: PixelNorm + 4 MapperLinear layers (names ``mapping.0`` .. ``mapping.4``)."""

    def __init__(self, style_dim: int = 512, n_layers: int = 4, bias_layout: str = "channel"):
        super().__init__()
        self.mapping = nn.Sequential(PixelNorm(), *[MapperLinear(style_dim, 0.01, bias_layout) for _ in range(n_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapping(x)


class LevelsMapper(nn.Module):
    """W+ (B, n_latent, D) -> offsets (B, n_latent, D); see the module docstring."""

    def __init__(self, n_latent: int, style_dim: int = 512, coarse: bool = True, medium: bool = True,
                 fine: bool = True, bias_layout: str = "channel"):
        super().__init__()
        if not (coarse or medium or fine):
            raise ValueError("switch on at least one of the coarse, medium and fine mappers")
        self.n_latent, self.style_dim, self.bias_layout = n_latent, style_dim, bias_layout
        self.enabled = {"course_mapping": coarse, "medium_mapping": medium, "fine_mapping": fine}
        for name, on in self.enabled.items():
            if on:
                self.add_module(name, GroupMapper(style_dim, bias_layout=bias_layout))

    @property
    def config(self) -> dict:
        return {"n_latent": self.n_latent, "style_dim": self.style_dim, "coarse": self.enabled["course_mapping"],
                "medium": self.enabled["medium_mapping"], "fine": self.enabled["fine_mapping"],
                "bias_layout": self.bias_layout}

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if w.ndim == 2:
            w = w.unsqueeze(1).repeat(1, self.n_latent, 1)
        if w.shape[1] != self.n_latent:
            raise MapperError(f"this mapper is for {self.n_latent} W+ slots, got {w.shape[1]}")
        parts = []
        for name, start, end in GROUPS:
            x = w[:, start:end]
            parts.append(getattr(self, name)(x) if self.enabled[name] else torch.zeros_like(x))
        return torch.cat(parts, dim=1)

    def edit(self, w: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """``w + strength * 0.1 * mapper(w)`` (W+ in, W+ out)."""
        if w.ndim == 2:
            w = w.unsqueeze(1).repeat(1, self.n_latent, 1)
        return w + (strength * EDIT_SCALE) * self(w)


# --------------------------------------------------------------------------- files
def save_mapper(mapper: LevelsMapper, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """safetensors with the official parameter names and the config + ``meta`` (recipe, generator) as JSON."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in mapper.state_dict().items()}
    header = {"format": MAPPER_FORMAT, "version": MAPPER_VERSION, "config": mapper.config, "meta": meta or {}}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"nada": json.dumps(header)}))


def mapper_file(path: str | os.PathLike) -> Path:
    """A mapper file, or a mapper run folder (its final weights, else its newest snapshot)."""
    path = Path(path)
    if path.is_dir():
        found = RunFolder(path, MAPPER).weights()
        if found is None:
            raise MapperError(f"{path}: no {MAPPER.final} and no snapshots in this folder")
        return found
    if not path.is_file():
        raise MapperError(f"{path}: no such file")
    return path


def mapper_from_state_dict(sd: dict[str, torch.Tensor], n_latent: int, bias_layout: str = "channel") -> LevelsMapper:
    """Build a LevelsMapper from official-layout keys (``course_mapping.mapping.1.weight`` ...)."""
    groups = {name: any(k.startswith(name + ".") for k in sd) for name, _, _ in GROUPS}
    if not any(groups.values()):
        if any(k.startswith("mapping.") for k in sd):
            raise MapperError("this is a SingleMapper checkpoint (one mapper for all slots); only LevelsMapper "
                              "checkpoints (course/medium/fine_mapping) are supported")
        raise MapperError("no course_mapping / medium_mapping / fine_mapping weights found")
    first = next(k for k in sd if k.endswith("mapping.1.weight"))
    m = LevelsMapper(n_latent, sd[first].shape[0], groups["course_mapping"], groups["medium_mapping"],
                     groups["fine_mapping"], bias_layout)
    try:
        m.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise MapperError(f"weights do not fit the levels-mapper layout ({str(e).splitlines()[0][:200]})") from None
    return m


def _official_n_latent(ckpt: dict, sd: dict) -> int | None:
    opts = ckpt.get("opts") if isinstance(ckpt, dict) else None
    size = opts.get("stylegan_size") if isinstance(opts, dict) else None
    if size is None:
        n_rgbs = sum(1 for k in sd if k.startswith("decoder.to_rgbs.") and k.endswith(".bias"))
        size = 2 ** (n_rgbs + 2) if n_rgbs else None
    return 2 * int(math.log2(int(size))) - 2 if size else None


def load_mapper(path: str | os.PathLike, device: str | torch.device = "cpu", n_latent: int | None = None,
                bias_layout: str | None = None) -> tuple[LevelsMapper, dict]:
    """Load a mapper: ours (safetensors, from a file or a run folder) or an official StyleCLIP /
    StyleGAN-NADA checkpoint ``{"state_dict": {"mapper.*": ..., "decoder.*": ...}, "opts": {...}}`` read
    with ``torch.load(weights_only=True)`` (nothing in the file is executed). For official files the W+
    length comes from ``opts.stylegan_size`` or the decoder's layers (else ``n_latent``, else 18); a given
    ``n_latent`` (the generator's) that does not match raises MapperError. ``bias_layout`` picks how the activation bias is applied ("channel" by default, "cuda" for
    checkpoints trained with the official CUDA kernel; see the module docstring).
    Returns (mapper in eval mode, info with ``format``, ``config`` and ``meta``)."""
    path = mapper_file(path)
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            header = safetensors_metadata(read_safetensors_header(path)[0], "nada") or {}
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise MapperError(f"{path}: damaged mapper file ({e})") from None
        if header.get("format") != MAPPER_FORMAT:
            raise MapperError(f"{path}: not a NADA Studio mapper (a generator? pass it as --model instead)")
        cfg = header.get("config")
        if not isinstance(cfg, dict) or type(cfg.get("n_latent")) is not int or not 1 <= cfg["n_latent"] <= 64:
            raise MapperError(f"{path}: damaged mapper file (its config is not a mapper's)")
        cfg = {"bias_layout": "channel", **cfg}
        if bias_layout is not None:
            cfg["bias_layout"] = bias_layout
        m = mapper_from_state_dict(tensors, cfg["n_latent"], cfg["bias_layout"])
        meta = header.get("meta")
        info = {"format": "nada-safetensors", "config": m.config, "meta": meta if isinstance(meta, dict) else {}}
    elif kind == "torch-zip":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling refusal or damage: one clear message
            raise MapperError(f"{path}: not a readable mapper checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
        mapper_sd = {k[len("mapper."):]: v for k, v in sd.items() if k.startswith("mapper.")}
        if not mapper_sd:
            raise MapperError(f"{path}: no 'mapper.*' weights in the checkpoint's state_dict")
        n = _official_n_latent(ckpt, sd) or n_latent or 18
        m = mapper_from_state_dict(mapper_sd, n, bias_layout or "channel")
        opts = ckpt.get("opts") if isinstance(ckpt.get("opts"), dict) else {}
        info = {"format": "styleclip-pt", "config": m.config,
                "meta": {"recipe": {"text": opts.get("description", "")}, "official_opts": opts}}
    else:
        raise MapperError(f"{path}: unrecognised file type for a mapper")
    if n_latent is not None and m.n_latent != n_latent:
        raise MapperError(f"{path}: mapper for {m.n_latent} W+ slots, the generator has {n_latent}")
    return m.to(device).eval().requires_grad_(False), info


# --------------------------------------------------------------------------- training
@dataclass
class MapperRecipe:
    """Everything that defines a mapper run (saved with every checkpoint). Defaults follow the official
    StyleGAN-NADA / StyleCLIP mapper: batch 2, Ranger lr 0.5, CLIP 1.0, latent L2 0.8, embedding norm 0.5,
    identity 0.1, 5,000 training / 1,000 test latents at truncation 0.7. (The official script runs up to
    50,001 steps; we stop at ``iterations``.)"""

    text: str = ""
    iterations: int = 10_000
    batch: int = 2
    lr: float = 0.5
    coarse: bool = True
    medium: bool = True
    fine: bool = True
    bias_layout: str = "channel"
    clip_models: list[str] = field(default_factory=lambda: ["ViT-B-32", "ViT-B-16"])
    clip_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])
    clip_lambda: float = 1.0
    latent_l2_lambda: float = 0.8
    norm_lambda: float = 0.5
    id_lambda: float = 0.1
    train_size: int = 5000
    test_size: int = 1000
    truncation: float = 0.7
    noise: str = "const"            # official: randomize_noise=False
    seed: int = 0
    preview_count: int = 4
    preview_every: int = 100
    snapshot_every: int = 1000

    def validate(self) -> list[str]:
        checks = [
            (isinstance(self.text, str) and bool(self.text.strip()),
             "the text is empty: describe the edit, e.g. 'a face with purple hair'"),
            (not text_problem(self.text, "the text"), text_problem(self.text, "the text")),
            (1 <= self.iterations <= 1_000_000, "iterations must be between 1 and 1000000"),
            (1 <= self.batch <= 64, "batch must be between 1 and 64"),
            (math.isfinite(self.lr) and 0 < self.lr <= 10, "learning rate must be in (0, 10]"),
            (self.coarse or self.medium or self.fine, "switch on at least one of coarse, medium and fine"),
            (self.bias_layout in BIAS_LAYOUTS, f"bias_layout must be one of {', '.join(BIAS_LAYOUTS)}"),
            (self.train_size >= self.batch, "train_size must be at least the batch size"),
            (self.test_size >= 0 and self.preview_count >= 1, "test_size >= 0 and preview_count >= 1"),
            (0 <= self.truncation <= 1, "truncation must be in [0, 1]"),
            (self.noise in ("const", "random", "none"), "noise must be const, random or none"),
            (len(self.clip_models) == len(self.clip_weights) and any(w > 0 for w in self.clip_weights),
             "give one weight per CLIP model, at least one above zero"),
            (all(math.isfinite(v) and v >= 0 for v in (self.clip_lambda, self.latent_l2_lambda, self.norm_lambda,
                                                       self.id_lambda, *self.clip_weights)),
             "loss weights must be finite and not negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return []

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MapperRecipe":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


@torch.no_grad()
def sample_latents(G: Generator, n: int, truncation: float, seed: int, chunk: int = 1000) -> torch.Tensor:
    """(n, D) codes w = w_avg + psi (mapping(z) - w_avg), z ~ N(0, I) from ``seed`` (the official training set)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, G.style_dim, generator=gen)
    device = G.device
    w_avg = G.w_avg()
    return torch.cat([G.truncate(G.mapping(c.to(device)), w_avg, truncation).cpu() for c in z.split(chunk)]) \
        if n else torch.zeros(0, G.style_dim)


class MapperTrainer(Trainer):
    """Trains a LevelsMapper for ``recipe.text`` on generator ``G`` (a base or an adapted model).

    Per step (official coach): w from the training latents (W+), x = G(w) without gradients,
    ``w_hat = w + 0.1 mapper(w)``, x_hat = G(w_hat), loss = clip_lambda * CLIP(x_hat, text)
    + latent_l2_lambda * MSE(w_hat, w) + norm_lambda * MSE(|E_I(x)|, |E_I(x_hat)|) + id_lambda * ID(x_hat, x)."""

    run_kind = MAPPER
    what = "trained mapper"

    def __init__(self, G: Generator, recipe: MapperRecipe, clip: list[ClipMember], device: str | torch.device = "cpu",
                 out_dir: str | Path | None = None, model_name: str = "", id_fn: Callable | None = None,
                 _resuming: bool = False):
        warnings = recipe.validate()
        if not clip:
            raise ValueError("the mapper needs at least one CLIP model")
        super().__init__(recipe, device, out_dir, warnings=warnings)
        self.clip, self.model_name = clip, model_name
        self.G = G.to(self.device).eval().requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            self.mapper = LevelsMapper(G.n_latent, G.style_dim, recipe.coarse, recipe.medium, recipe.fine,
                                       recipe.bias_layout).to(self.device)
        self.opt = Ranger(self.mapper.parameters(), lr=recipe.lr)
        self.rng = torch.Generator().manual_seed(recipe.seed)
        self.id_fn = id_fn
        self.train_w = sample_latents(G, recipe.train_size, recipe.truncation, recipe.seed + 1)
        self.test_w = sample_latents(G, recipe.test_size, recipe.truncation, recipe.seed + 2)
        held = self.test_w if len(self.test_w) else self.train_w
        self.preview_w = held[:recipe.preview_count]
        self._perm, self._pos = torch.randperm(len(self.train_w), generator=self.rng), 0
        self.fingerprint = fingerprint(G)
        if G.n_latent <= 8 and recipe.fine:
            self.warnings.append(f"this generator has {G.n_latent} W+ slots: the fine mapper (slots 8-) edits nothing")
        self._open_folder({"generator": self.generator_info(), "recipe": recipe.to_dict()}, _resuming)

    def generator_info(self) -> dict:
        return {"name": self.model_name, "fingerprint": self.fingerprint, "config": self.G.config}

    # ------------------------------------------------------------ data
    def _next_batch(self) -> torch.Tensor:
        n, b = len(self.train_w), self.recipe.batch
        if self._pos + b > n:  # a new epoch, in a new order (the last partial batch is dropped, as the official)
            self._perm, self._pos = torch.randperm(n, generator=self.rng), 0
        idx = self._perm[self._pos:self._pos + b]
        self._pos += b
        return self.G.to_w_plus(self.train_w[idx].to(self.device))

    def _extra_state(self) -> dict:
        return {"perm": self._perm.clone(), "pos": self._pos}

    def _load_extra_state(self, state: dict) -> None:
        self._perm, self._pos = state["perm"], int(state["pos"])

    # ------------------------------------------------------------ losses and step
    def losses(self, w: torch.Tensor, x: torch.Tensor, w_hat: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(total, named values) for codes and images before (w, x) and after (w_hat, x_hat) the edit."""
        r, out = self.recipe, {}
        total = x_hat.new_zeros(())
        feats_hat = [encode_pooled(m, x_hat) for m in self.clip]
        if r.clip_lambda:
            loss_clip, _ = clip_text_loss(self.clip, x_hat, r.text, feats_hat)
            total = total + r.clip_lambda * loss_clip
            out["clip"] = float(loss_clip.detach())
        if r.latent_l2_lambda:
            l2 = F.mse_loss(w_hat, w)
            total = total + r.latent_l2_lambda * l2
            out["latent_l2"] = float(l2.detach())
        if r.norm_lambda:
            with torch.no_grad():
                f_x = encode_pooled(self.clip[0], x)
            norm = embedding_norm_mse(f_x, feats_hat[0])
            total = total + r.norm_lambda * norm
            out["embedding_norm"] = float(norm.detach())
        if self.id_fn is not None and r.id_lambda:
            ident = self.id_fn(x_hat, x)
            if getattr(self.id_fn, "differentiable", True):
                total = total + r.id_lambda * ident
            out[getattr(self.id_fn, "name", "identity")] = float(ident.detach())
        return total, out

    def _render(self, w: torch.Tensor) -> torch.Tensor:
        return self.G.synthesis(w, noise_mode=self.recipe.noise)

    def train_step(self) -> StepResult:
        phase = Phases(self.device)
        w = self._next_batch()
        with torch.no_grad(), phase("generator"):
            x = self._render(w)
        with phase("generator"):
            w_hat = self.mapper.edit(w)
            x_hat = self._render(w_hat)
        with phase("losses"):
            total, losses = self.losses(w, x, w_hat, x_hat)
        self._check_loss(total)
        with phase("backward"):
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            self._check_gradients()
            self.opt.step()
        losses["total"] = float(total.detach())
        return StepResult(losses, [], phase.seconds)

    @torch.no_grad()
    def evaluate(self, latents: torch.Tensor | None = None, max_batches: int | None = None) -> dict:
        """Mean losses over held-out latents (default: the test set), in batches of ``recipe.batch``."""
        latents = self.test_w if latents is None else latents
        sums, n = {}, 0
        for i, chunk in enumerate(latents.split(self.recipe.batch)):
            if max_batches is not None and i >= max_batches:
                break
            w = self.G.to_w_plus(chunk.to(self.device))
            w_hat = self.mapper.edit(w)
            total, parts = self.losses(w, self._render(w), w_hat, self._render(w_hat))
            for k, v in {**parts, "total": float(total)}.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        return {k: v / max(1, n) for k, v in sums.items()}

    @torch.no_grad()
    def preview(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images of the preview latents, the same latents edited by the mapper) on CPU."""
        w = self.G.to_w_plus(self.preview_w.to(self.device))
        return self._render(w).cpu(), self._render(self.mapper.edit(w)).cpu()

    # ------------------------------------------------------------ saving and resuming
    def meta(self) -> dict:
        return {"generator": self.generator_info(), **super().meta()}

    def save(self, path: str | Path) -> Path:
        return save_mapper(self.mapper, path, self.meta())

    def _load_weights(self, path: Path) -> None:
        m, _ = load_mapper(path, self.device)
        self.mapper.load_state_dict(m.state_dict())

    @classmethod
    def resume(cls, run_dir: str | Path, G: Generator, clip: list[ClipMember], device="cpu",
               id_fn: Callable | None = None) -> "MapperTrainer":
        """Continue a mapper run from its newest snapshot, exactly."""
        run_dir = Path(run_dir)
        saved = RunFolder(run_dir, MAPPER).read_record()
        t = cls(G, MapperRecipe.from_dict(saved["recipe"]), clip, device, run_dir,
                saved.get("generator", {}).get("name", ""), id_fn, _resuming=True)
        was = saved.get("generator", {}).get("fingerprint")
        if was is not None and not fingerprint_matches(was, G):
            raise MapperError(f"{run_dir} was trained on another generator ({saved['generator'].get('name')}); "
                              "resume it with the same model")
        t._restore()
        return t


def check_mapper_fits(mapper: LevelsMapper, info: dict, G: Generator) -> list[str]:
    """Raise MapperError when the mapper cannot drive ``G``; return notes (e.g. trained on other weights)."""
    if mapper.n_latent != G.n_latent or mapper.style_dim != G.style_dim:
        raise MapperError(f"the mapper is for {mapper.n_latent} W+ slots of {mapper.style_dim} dims; the generator "
                          f"has {G.n_latent} of {G.style_dim}")
    gen = (info.get("meta") or {}).get("generator") or {}
    if gen.get("fingerprint") and not fingerprint_matches(gen["fingerprint"], G):
        return [f"the mapper was trained on {gen.get('name') or 'another generator'}, not on these weights; "
                "its edit may transfer (same latent space) but was not tuned for them"]
    return []


# --------------------------------------------------------------------------- text edit by optimisation
def _styleclip_lr(t: float, lr: float, rampdown: float = 0.25, rampup: float = 0.05) -> float:
    ramp = min(1.0, (1 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return lr * ramp * min(1.0, t / rampup)


def optimise_edit(G: Generator, w_plus: torch.Tensor, text: str, clip: list[ClipMember], steps: int = 100,
                  l2_lambda: float = 0.008, id_fn: Callable | None = None,
                  progress: Callable[[int, int, dict], None] | None = None, lr: float = 0.1,
                  id_lambda: float = 0.005, noise_mode: str = "const",
                  on_latent: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """StyleCLIP's latent optimisation ("edit" mode): Adam (lr 0.1, cosine ramp-down over the last quarter,
    ramp-up over the first 5%) on a copy of ``w_plus`` for CLIP loss (the mapper's pooled ``1 - cos`` to
    ``text``, summed over ``clip``) + ``l2_lambda * |w - w_start|^2`` (+ ``id_lambda`` * identity when
    ``id_fn`` is differentiable). ``progress(step, steps, losses)`` is called after each step, and
    ``on_latent(step, w)`` with the current code (detached) for live previews.
    Returns the edited W+ (same shape as ``w_plus``, detached)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if not (text or "").strip():
        raise ValueError("the text is empty: describe the edit")
    if text_problem(text, "the edit text"):
        raise ValueError(text_problem(text, "the edit text"))
    device = G.device
    start = G.to_w_plus(w_plus.to(device)).detach()
    w = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    G.requires_grad_(False)
    with torch.no_grad():
        original = G.synthesis(start, noise_mode=noise_mode) if id_fn is not None else None
    for i in range(steps):
        for g in opt.param_groups:
            g["lr"] = _styleclip_lr(i / steps, lr)
        img = G.synthesis(w, noise_mode=noise_mode)
        c_loss, _ = clip_text_loss(clip, img, text)
        l2 = (w - start).pow(2).sum(dim=tuple(range(1, w.ndim))).mean()
        loss = c_loss + l2_lambda * l2
        parts = {"clip": float(c_loss.detach()), "l2": float(l2.detach())}
        if id_fn is not None:
            ident = id_fn(img, original)
            if getattr(id_fn, "differentiable", True):
                loss = loss + id_lambda * ident
            parts[getattr(id_fn, "name", "identity")] = float(ident.detach())
        if not torch.isfinite(loss):
            raise ValueError(f"the loss became {float(loss.detach())} at step {i + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        parts["total"] = float(loss.detach())
        if progress:
            progress(i + 1, steps, parts)
        if on_latent:
            on_latent(i + 1, w.detach())
    return w.detach()  # W+ even for a (B, D) start: the edit moves the slots independently
