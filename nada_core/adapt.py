"""The StyleGAN-NADA trainer: G_frozen and G_train from one checkpoint, CLIP directional loss,
adaptive layer freezing; a generator of progress events that a CLI or UI can stream.

Only what changes per step is computed per step: text directions are encoded once, G_frozen runs
under no_grad, and frozen layers get no weight gradients.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .checkpoints import atomic_write, save_generator
from .clip_guide import ClipMember, check_prompts, directional_loss, embedding_norm_loss, global_loss
from .freezing import PRESETS, layers_for_slots, preset_slots, select_slots, set_trainable, synthesis_layers
from .stylegan2 import Generator, grouped_kernels, seeds_to_z


@dataclass
class Recipe:
    """Everything that defines an adaptation run (saved with every checkpoint). Defaults follow the
    official StyleGAN-NADA code: Adam lr 0.002 x 4/5, betas (0, 0.99^0.8), batch 2, ViT-B/32 + B/16."""

    source: str = "photo"
    target: str = "sketch"
    style_images: list[str] = field(default_factory=list)   # image-guided target instead of text
    source_images: list[str] = field(default_factory=list)  # optional, else 16 samples of G_frozen
    iterations: int = 300
    batch: int = 2
    lr: float = 0.002
    preset: str = "auto"            # auto (adaptive freezing) | all | texture | shape
    k: int | None = None            # slots trained per step with 'auto'; None = all
    auto_layer_iters: int = 1
    auto_layer_batch: int = 8
    clip_models: list[str] = field(default_factory=lambda: ["ViT-B-32", "ViT-B-16"])
    clip_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])
    lambda_direction: float = 1.0
    lambda_global: float = 0.0
    lambda_norm: float = 0.0
    mixing: float = 0.0
    seed: int = 0
    preview_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    preview_every: int = 50
    snapshot_every: int = 50
    truncation: float = 0.7
    train_noise: str = "random"     # per-layer noise while training; "random" as the official code
    amp: str = "auto"               # bf16 autocast: "auto" = on CUDA only, "bf16" = always, "off"

    def validate(self, n_latent: int) -> list[str]:
        """Raise ValueError for settings that cannot work; return warnings for odd ones."""
        checks = [
            (1 <= self.iterations <= 100_000, "iterations must be between 1 and 100000"),
            (1 <= self.batch <= 64, "batch must be between 1 and 64"),
            (0 < self.lr <= 1, "learning rate must be in (0, 1]"),
            (self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}"),
            (self.k is None or 1 <= self.k <= n_latent, f"k must be between 1 and {n_latent} (the W+ slots)"),
            (0 <= self.mixing <= 1, "mixing probability must be in [0, 1]"),
            (0 <= self.truncation <= 1, "truncation must be in [0, 1]"),
            (self.train_noise in ("random", "const", "none"), "train_noise must be random, const or none"),
            (self.amp in ("auto", "bf16", "off"), "amp must be auto, bf16 or off"),
            (self.auto_layer_iters >= 0 and self.auto_layer_batch >= 1, "layer-selection settings must be positive"),
            (len(self.clip_models) == len(self.clip_weights) and any(w > 0 for w in self.clip_weights),
             "give one weight per CLIP model, at least one above zero"),
            (all(math.isfinite(v) for v in (self.lr, self.lambda_direction, self.lambda_global, self.lambda_norm)),
             "losses and learning rate must be finite numbers"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        warnings = [] if self.style_images else check_prompts(self.source, self.target)
        if self.lr > 0.02:
            warnings.append(f"learning rate {self.lr} is 10x the paper's 0.002; training may diverge")
        return warnings

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Event:
    """One report from the trainer. ``kind``: step | done | cancelled | error | warning."""

    kind: str
    step: int
    total: int
    loss: float | None = None
    losses: dict = field(default_factory=dict)
    slots: list[int] = field(default_factory=list)
    sec_per_step: float | None = None
    eta: float | None = None
    timings: dict = field(default_factory=dict)
    preview: tuple[torch.Tensor, torch.Tensor] | None = None   # (source row, adapted row) in [-1, 1]
    checkpoint: str | None = None
    message: str = ""


class NonFiniteLoss(RuntimeError):
    pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Adapter:
    """Holds G_frozen and G_train (sharing one frozen mapping network) and trains G_train."""

    def __init__(self, base: Generator, recipe: Recipe, clip: list[ClipMember], device: str | torch.device = "cpu",
                 out_dir: str | Path | None = None, base_name: str = "", style_images: list[torch.Tensor] | None = None,
                 source_images: list[torch.Tensor] | None = None):
        self.device = torch.device(device)
        self.recipe, self.clip, self.base_name = recipe, clip, base_name
        self.warnings = recipe.validate(base.n_latent)
        if clip and not recipe.style_images:  # truncation warnings need a tokenizer
            self.warnings += check_prompts(recipe.source, recipe.target, clip[0].tokenizer)
        self.out_dir = Path(out_dir) if out_dir else None
        self.G_frozen = base.to(self.device).eval().requires_grad_(False)
        # copy the synthesis network only: the memo makes the copy share the (frozen) mapping network,
        # without touching ``base``, which other threads may be sampling from
        self.G_train = copy.deepcopy(base, memo={id(base.style): base.style})
        self.L = base.n_latent
        self.k = recipe.k or self.L
        params = [p for n, p in self.G_train.named_parameters() if not n.startswith("style.")]
        self.opt = torch.optim.Adam(params, lr=recipe.lr * 4 / 5, betas=(0.0, 0.99 ** (4 / 5)))
        self.rng = torch.Generator().manual_seed(recipe.seed)
        self.step, self.history = 0, []
        self._cancel = False
        self._fixed_slots = preset_slots(recipe.preset, self.L)
        if recipe.preset == "all":
            set_trainable(self.G_train, synthesis_layers(self.G_train))
        else:
            set_trainable(self.G_train, layers_for_slots(self.G_train, self._fixed_slots))
        with torch.no_grad():
            self.w_avg = self.G_frozen.w_avg()
            self.preview_z = seeds_to_z(recipe.preview_seeds, base.style_dim, self.device)
            self.directions = self._target_directions(style_images, source_images)
            self.global_texts = [m.global_text(recipe.target) for m in clip] if recipe.lambda_global or self._auto else []
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out_dir / "recipe.json", lambda t: Path(t).write_text(
                json.dumps({"base": base_name, "config": base.config, "recipe": recipe.to_dict()}, indent=2)))

    # ------------------------------------------------------------ set-up
    @property
    def _auto(self) -> bool:
        return self.recipe.preset == "auto" and self.k < self.L and self.recipe.auto_layer_iters > 0

    def _target_directions(self, style_images, source_images) -> list[torch.Tensor]:
        r = self.recipe
        if not style_images:
            return [m.text_direction(r.source, r.target).to(self.device) for m in self.clip]
        style = torch.cat(style_images).to(self.device)
        if source_images:
            source = torch.cat(source_images).to(self.device)
        else:
            z = torch.randn(16, self.G_frozen.style_dim, generator=torch.Generator().manual_seed(r.seed + 1))
            source = torch.cat([self.G_frozen(c.to(self.device)) for c in z.split(4)])
        return [m.image_direction(style, source) for m in self.clip]

    def _sample_ws(self, n: int) -> torch.Tensor:
        z = torch.randn(n, self.G_frozen.style_dim, generator=self.rng).to(self.device)
        with torch.no_grad():
            w = self.G_frozen.to_w_plus(self.G_frozen.mapping(z))
            if self.recipe.mixing > 0 and torch.rand((), generator=self.rng).item() < self.recipe.mixing:
                z2 = torch.randn(n, self.G_frozen.style_dim, generator=self.rng).to(self.device)
                crossover = int(torch.randint(1, self.L, (), generator=self.rng))
                w = self.G_frozen.mix(w, self.G_frozen.mapping(z2), crossover)
        return w

    def _global_loss(self, images: torch.Tensor) -> torch.Tensor:
        return sum(m.weight * global_loss(m.encode_images(images), t) for m, t in zip(self.clip, self.global_texts))

    # ------------------------------------------------------------ one iteration
    def train_step(self) -> tuple[dict, list[int], dict]:
        """One optimiser step. Returns (losses per CLIP model, chosen slots, seconds per phase).

        G_frozen and G_train draw their own per-layer noise (as the official code does), from a
        seed taken from the run's generator, so runs are reproducible and other threads' RNG is untouched.
        """
        seed = int(torch.randint(0, 2 ** 62, (), generator=self.rng))
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # Under bf16 autocast G_frozen (no grad) must compute exactly as G_train does, or their image
        # difference, which drives the loss, would pick up bf16 rounding differences between the two
        # formulations; in float32 those differences (~1e-6) are far below the signal and the faster
        # inference path is kept.
        autocast = self._autocast()
        same_path = grouped_kernels() if not isinstance(autocast, contextlib.nullcontext) else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices), autocast, same_path:
            torch.manual_seed(seed)
            return self._train_step()

    def _autocast(self):
        """bf16 autocast for both generators and CLIP (on CUDA by default): the frozen and trained images
        go through the same precision, so their CLIP-space difference carries no rounding bias."""
        mode = self.recipe.amp
        if mode == "auto":
            mode = "bf16" if self.device.type == "cuda" else "off"
        if mode == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _train_step(self) -> tuple[dict, list[int], dict]:
        r, t = self.recipe, {}
        clock = time.perf_counter
        slots = self._fixed_slots
        if self._auto:
            t0 = clock()
            w_sel = self._sample_ws(r.auto_layer_batch)
            slots = select_slots(self.G_train, w_sel, self._global_loss, self.k, r.auto_layer_iters,
                                 noise_mode=r.train_noise)
            set_trainable(self.G_train, layers_for_slots(self.G_train, slots))
            _sync(self.device)
            t["selection"] = clock() - t0
        ws = self._sample_ws(r.batch)
        t0 = clock()
        with torch.no_grad():
            img_frozen = self.G_frozen.synthesis(ws, noise_mode=r.train_noise)
            _sync(self.device)
            t["frozen_forward"] = clock() - t0
            t0 = clock()
            feats_frozen = [m.encode_images(img_frozen) for m in self.clip]
        t_clip = clock() - t0
        t0 = clock()
        img_train = self.G_train.synthesis(ws, noise_mode=r.train_noise)
        t_train = clock() - t0
        t0 = clock()
        total, losses = 0.0, {}
        for m, f0, d in zip(self.clip, feats_frozen, self.directions):
            f1 = m.encode_images(img_train)
            if torch.allclose(f1, f0, rtol=0, atol=1e-6):  # identical generators (step 0): dI would be 0/0
                f1 = m.encode_images(img_train + 1e-6)
            loss = r.lambda_direction * directional_loss(f0, f1, d)
            if r.lambda_global:
                loss = loss + r.lambda_global * global_loss(f1, self.global_texts[self.clip.index(m)])
            if r.lambda_norm:
                loss = loss + r.lambda_norm * embedding_norm_loss(f0, f1)
            losses[m.name] = float(loss.detach())
            total = total + m.weight * loss
        t_clip += clock() - t0
        if not torch.isfinite(total):
            raise NonFiniteLoss(f"the loss became {float(total.detach())} at step {self.step + 1}")
        t0 = clock()
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        grads = [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        if not all(torch.isfinite(g).all() for g in grads):
            raise NonFiniteLoss(f"gradients became non-finite at step {self.step + 1}")
        self.opt.step()
        _sync(self.device)
        t["train_forward_backward"] = t_train + clock() - t0
        t["clip"] = t_clip
        losses["total"] = float(total.detach())
        return losses, list(slots), t

    @torch.no_grad()
    def preview(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed preview seeds at the recipe's truncation: (source images, adapted images) on CPU."""
        w = self.G_frozen.truncate(self.G_frozen.mapping(self.preview_z), self.w_avg, self.recipe.truncation)
        return self.G_frozen.synthesis(w).cpu(), self.G_train.synthesis(w).cpu()

    def cancel(self) -> None:
        """Stop before the next step; the weights of the last finished step are saved and kept."""
        self._cancel = True

    # ------------------------------------------------------------ the loop
    def run(self) -> Iterator[Event]:
        """Train, yielding a 'step' event per iteration and one final 'done', 'cancelled' or 'error' event.
        Every ending saves the weights of the last finished step (when the run has an output folder)."""
        total = self.recipe.iterations
        for w in self.warnings:
            yield Event("warning", self.step, total, message=w)
        sec = None
        while self.step < total:
            if self._cancel:
                yield self._finish("cancelled", f"stopped after {self.step} of {total} steps")
                return
            t0 = time.perf_counter()
            try:
                losses, slots, timings = self.train_step()
            except NonFiniteLoss as e:
                yield self._finish("error", f"{e}; training stopped and the last good weights (step {self.step}) "
                                            "were kept. Try a lower learning rate or different prompts")
                return
            except (RuntimeError, MemoryError) as e:  # e.g. out of memory: keep what was learned so far
                yield self._finish("error", f"training failed at step {self.step + 1} ({type(e).__name__}: "
                                            f"{str(e).splitlines()[0][:200]}); the weights of step {self.step} were kept")
                return
            self.step += 1
            dt = time.perf_counter() - t0
            sec = dt if sec is None else 0.8 * sec + 0.2 * dt
            self.history.append(losses["total"])
            ev = Event("step", self.step, total, loss=losses["total"], losses=losses, slots=slots,
                       sec_per_step=sec, eta=sec * (total - self.step), timings=timings)
            if self.step == 1 or self.step % max(1, self.recipe.preview_every) == 0 or self.step == total:
                ev.preview = self.preview()
            if self.out_dir and self.recipe.snapshot_every and self.step % self.recipe.snapshot_every == 0:
                try:
                    ev.checkpoint = str(self.save_snapshot())
                except OSError as e:
                    yield Event("warning", self.step, total, message=f"could not save snapshot ({e}); training goes on")
            yield ev
        yield self._finish("done", f"finished {total} steps")

    def _finish(self, kind: str, message: str) -> Event:
        if self.step == 0:  # the base weights under a new name would pass for a trained model
            return Event(kind, 0, self.recipe.iterations, preview=self.preview(),
                         message=message + "; nothing was trained, so nothing was saved")
        path = self._save_final_or_none()
        if self.out_dir and path is None:
            message += f"; but saving failed ({self.save_error}), the model is only in memory: free disk space and save again"
        return Event(kind, self.step, self.recipe.iterations, loss=self.history[-1] if self.history else None,
                     checkpoint=path, preview=self.preview(), message=message)

    # ------------------------------------------------------------ saving and resuming
    def meta(self) -> dict:
        return {"source_model": self.base_name, "recipe": self.recipe.to_dict(), "step": self.step,
                "loss": self.history[-1] if self.history else None}

    def save(self, path: str | Path) -> Path:
        return save_generator(self.G_train, path, self.meta())

    def save_snapshot(self) -> Path:
        """Weights at this step plus the optimiser and sampler state, so a run can resume exactly."""
        path = self.save(self.out_dir / "snapshots" / f"step_{self.step:05d}.safetensors")
        state = {"step": self.step, "optimizer": self.opt.state_dict(), "rng": self.rng.get_state(),
                 "history": self.history, "snapshot": path.name}
        atomic_write(self.out_dir / "state.pt", lambda t: torch.save(state, t))
        return path

    def _save_final_or_none(self) -> str | None:
        self.save_error = None
        if not self.out_dir or self.step == 0:
            return None
        try:
            return str(self.save(self.out_dir / "final.safetensors"))
        except OSError as e:
            self.save_error = str(e)
            return None

    def snapshots(self) -> list[Path]:
        return sorted((self.out_dir / "snapshots").glob("step_*.safetensors")) if self.out_dir else []

    @classmethod
    def resume(cls, run_dir: str | Path, base: Generator, clip: list[ClipMember], device="cpu", **kw) -> "Adapter":
        """Continue a run from its last snapshot: same weights, optimiser moments and sampler state."""
        from .checkpoints import load_generator

        run_dir = Path(run_dir)
        saved = json.loads((run_dir / "recipe.json").read_text())
        state = torch.load(run_dir / "state.pt", weights_only=True)
        ad = cls(base, Recipe.from_dict(saved["recipe"]), clip, device, run_dir, saved.get("base", ""), **kw)
        G_snap, _ = load_generator(run_dir / "snapshots" / state["snapshot"], device)
        synth = {k: v for k, v in G_snap.state_dict().items() if not k.startswith("style.")}
        ad.G_train.load_state_dict(synth, strict=False)
        ad.opt.load_state_dict(state["optimizer"])
        ad.rng.set_state(state["rng"])
        ad.step, ad.history = state["step"], list(state["history"])
        return ad
