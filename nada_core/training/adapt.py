"""The StyleGAN-NADA trainer: G_frozen and G_train from one checkpoint, CLIP directional loss,
adaptive layer freezing; a generator of progress events that a CLI or UI can stream.

Only what changes per step is computed per step: text directions are encoded once, G_frozen runs
under no_grad, and frozen layers get no weight gradients.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..guidance.clip_guide import ClipMember, check_prompts, directional_loss, embedding_norm_loss, global_loss
from ..guidance.text_limits import text_problem
from ..models.stylegan2 import Generator, grouped_kernels, seeds_to_z
from ..store.checkpoints import load_generator, save_generator
from ..store.images import resize_and_crop
from ..store.runs import RunFolder
from . import official
from .diagnostics import Diagnostics
from .freezing import PRESETS, layers_for_slots, preset_slots, select_slots, set_trainable, synthesis_layers
from .loop import Event, NonFiniteLoss, Phases, StepResult, Trainer, describe_error, read_diagnostics

__all__ = ["Adapter", "COMPILE_SETTINGS", "Event", "NonFiniteLoss", "Recipe", "compile_enabled", "fit_images",
           "read_diagnostics"]

COMPILE_SETTINGS = ("off", "on")
AMP_SETTINGS = ("off", "bf16")
LEGACY_AUTO = "auto"   # recipes saved before these were plain choices said "auto", which always meant "off"
COMPILE_BACKEND = "inductor"   # what torch.compile lowers to (tests swap in a cheaper one)


def compile_enabled(setting: str, device: str | torch.device) -> bool:
    """Whether a run with ``Recipe.compile == setting`` compiles its generators and CLIP image encoders. Off by
    default: compiling takes minutes and pays for itself only in long runs (bench/results: compile)."""
    del device  # the measured answer is the same on CPU and CUDA
    return setting == "on"


def _is_compile_error(e: BaseException) -> bool:
    """Errors raised while compiling (dynamo, inductor, a missing C++ compiler), not by the model's arithmetic."""
    return any(c.__module__.startswith(("torch._dynamo", "torch._inductor")) for c in type(e).__mro__)


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
    amp: str = "off"                # "bf16": bf16 autocast for the generators and CLIP (saves GPU memory)
    compile: str = "off"            # "on": torch.compile the generators and CLIP encoders (long runs)
    parity: str = "ours"            # which layers train: "ours" (our slot map) | "official" (the official code's)

    def __post_init__(self):
        for name in ("amp", "compile"):   # saved recipes and jobs files from before these were plain choices
            if getattr(self, name) == LEGACY_AUTO:
                setattr(self, name, "off")

    def problems(self, n_latent: int, prompts: bool = True) -> list[str]:
        """Every setting that cannot work, each in its own words (empty when the recipe can run); ``prompts=False``
        leaves out the prompt check (a caller that reports a missing target its own way)."""
        problems = [p for p in (text_problem(self.source, "the source text"), text_problem(self.target, "the target text"))
                    if p]
        checks = [
            (lambda: 1 <= self.iterations <= 100_000, "iterations must be between 1 and 100000"),
            (lambda: 1 <= self.batch <= 64, "batch must be between 1 and 64"),
            (lambda: 0 < self.lr <= 1, "learning rate must be in (0, 1]"),
            (lambda: self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}"),
            (lambda: self.k is None or 1 <= self.k <= n_latent, f"k must be between 1 and {n_latent} (the W+ slots)"),
            (lambda: 0 <= self.mixing <= 1, "mixing probability must be in [0, 1]"),
            (lambda: 0 <= self.truncation <= 1, "truncation must be in [0, 1]"),
            (lambda: self.train_noise in ("random", "const", "none"), "train_noise must be random, const or none"),
            (lambda: self.amp in AMP_SETTINGS, "amp must be off or bf16"),
            (lambda: self.compile in COMPILE_SETTINGS, "compile must be off or on"),
            (lambda: self.parity in official.PARITIES, "parity must be ours or official"),
            (lambda: self.auto_layer_iters >= 0 and self.auto_layer_batch >= 1, "layer-selection settings must be positive"),
            (lambda: len(self.clip_models) == len(self.clip_weights) and any(w > 0 for w in self.clip_weights),
             "give one weight per CLIP model, at least one above zero"),
            (lambda: all(math.isfinite(v) for v in (self.lr, self.lambda_direction, self.lambda_global, self.lambda_norm,
                                                    *self.clip_weights)),
             "losses, CLIP weights and learning rate must be finite numbers"),
        ]
        for test, message in checks:
            try:
                ok = test()
            except TypeError:   # a recipe read from a file may hold anything
                ok, message = False, "the recipe holds a value of the wrong type (a text where a number belongs?)"
            if not ok and message not in problems:
                problems.append(message)
        if not problems and prompts and not self.style_images:
            try:
                check_prompts(self.source, self.target)
            except ValueError as e:
                problems.append(str(e))
        return problems

    def validate(self, n_latent: int) -> list[str]:
        """Raise ValueError naming every setting that cannot work; return warnings for odd ones."""
        problems = self.problems(n_latent)
        if problems:
            raise ValueError("; ".join(problems))
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


def fit_images(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Images of any sizes ((1, 3, H, W) or (3, H, W) each, in [-1, 1]) -> one (N, 3, size, size) batch:
    the short side is resized to ``size`` (bicubic, antialiased) and the centre cropped, as CLIP crops."""
    out = []
    for im in images:
        x = im.float().unsqueeze(0) if im.ndim == 3 else im.float()
        out.append(resize_and_crop(x, size, antialias=True))
    return torch.cat(out)


class Adapter(Trainer):
    """Holds G_frozen and G_train (sharing one frozen mapping network) and trains G_train.
    The run loop, events, snapshots, resume and saving come from ``training.Trainer``."""

    what = "trained model"

    def __init__(self, base: Generator, recipe: Recipe, clip: list[ClipMember], device: str | torch.device = "cpu",
                 out_dir: str | Path | None = None, base_name: str = "", style_images: list[torch.Tensor] | None = None,
                 source_images: list[torch.Tensor] | None = None, observers: list | None = None,
                 _resuming: bool = False):
        warnings = recipe.validate(base.n_latent)
        if recipe.style_images and not style_images:
            raise ValueError(f"this run is image-guided ({len(recipe.style_images)} style image(s) in its recipe): "
                             "give the style images themselves")
        if clip and not recipe.style_images:  # truncation warnings need a tokenizer
            warnings += check_prompts(recipe.source, recipe.target, clip[0].tokenizer)
        super().__init__(recipe, device, out_dir, observers, warnings)
        self.clip, self.base_name = clip, base_name
        self.G_frozen = base.to(self.device).eval().requires_grad_(False)
        # copy the synthesis network only: the memo makes the copy share the (frozen) mapping network,
        # without touching ``base``, which other threads may be sampling from
        self.G_train = copy.deepcopy(base, memo={id(base.style): base.style})
        self.L = base.n_latent
        self.k = recipe.k or self.L
        params = [p for n, p in self.G_train.named_parameters() if not n.startswith("style.")]
        self.opt = torch.optim.Adam(params, lr=recipe.lr * 4 / 5, betas=(0.0, 0.99 ** (4 / 5)))
        self.rng = torch.Generator().manual_seed(recipe.seed)
        self._fixed_slots = preset_slots(recipe.preset, self.L)
        if recipe.parity == "official":
            set_trainable(self.G_train, official.fixed_layers(self.G_train, recipe.preset, recipe.auto_layer_iters))
        elif recipe.preset == "all":
            set_trainable(self.G_train, synthesis_layers(self.G_train))
        else:
            set_trainable(self.G_train, layers_for_slots(self.G_train, self._fixed_slots))
        with torch.no_grad():
            self.w_avg = self.G_frozen.w_avg()
            self.preview_z = seeds_to_z(recipe.preview_seeds, base.style_dim, self.device)
            self.directions = self._target_directions(style_images, source_images)
            self.global_targets = self._global_targets(style_images) if recipe.lambda_global else []
            self.selection_targets = self._global_targets(style_images, "{}") if self._auto else []
        self._setup_compile()
        self._open_folder({"base": base_name, "config": base.config, "recipe": recipe.to_dict()}, _resuming)

    # ------------------------------------------------------------ torch.compile
    def _setup_compile(self) -> None:
        """The functions a step calls: compiled (``Recipe.compile``, see ``compile_enabled``) or plain.
        G_train is compiled only when its trained layers stay fixed: adaptive layer selection changes them
        every step, and each new set would compile again. Compiling happens during the first step."""
        self.compiled: list[str] = []
        self.compile_error: str | None = None
        self._frozen_synthesis, self._train_synthesis = self.G_frozen.synthesis, self.G_train.synthesis
        self._encoders = [m.encode_images for m in self.clip]
        if not compile_enabled(self.recipe.compile, self.device):
            return

        def compiled(fn):
            return torch.compile(fn, backend=COMPILE_BACKEND, dynamic=False)

        self._frozen_synthesis = compiled(self.G_frozen.synthesis)
        self._encoders = [compiled(m.encode_images) for m in self.clip]
        self.compiled = ["G_frozen", *(f"CLIP {m.name}" for m in self.clip)]
        if not self._auto:
            self._train_synthesis = compiled(self.G_train.synthesis)
            self.compiled.insert(0, "G_train")

    def _drop_compiled(self, e: BaseException) -> None:
        inner = getattr(e, "inner_exception", None) or e.__cause__
        while inner is not None and inner is not e:  # dynamo wraps what the compiler raised: report that
            e, inner = inner, getattr(inner, "inner_exception", None) or inner.__cause__
        self.compile_error = describe_error(e)
        self.step_warnings.append(f"torch.compile failed ({self.compile_error}); training goes on without it")
        self.compiled = []
        self._frozen_synthesis, self._train_synthesis = self.G_frozen.synthesis, self.G_train.synthesis
        self._encoders = [m.encode_images for m in self.clip]

    def _synthesize(self, fn, G: Generator, ws: torch.Tensor) -> torch.Tensor:
        """``fn(ws)`` with the recipe's training noise. A compiled ``fn`` gets its random noise drawn outside the
        graph (``random_noises``, in W+'s float32: the numbers an uncompiled float32 run draws), so compiled and
        uncompiled float32 runs see the same noise."""
        mode = self.recipe.train_noise
        if mode != "random" or fn == G.synthesis:
            return fn(ws, noise_mode=mode)
        return fn(ws, noises=G.random_noises(ws.shape[0], ws.device, ws.dtype))

    # ------------------------------------------------------------ set-up
    @property
    def _auto(self) -> bool:
        return self.recipe.preset == "auto" and self.k < self.L and self.recipe.auto_layer_iters > 0

    def _target_directions(self, style_images, source_images) -> list[torch.Tensor]:
        r = self.recipe
        if not style_images:
            return [m.text_direction(r.source, r.target).to(self.device) for m in self.clip]
        size = self.G_frozen.size  # photos come in any size: one size makes one batch
        style = fit_images(style_images, size).to(self.device)
        if source_images:
            source = fit_images(source_images, size).to(self.device)
        else:
            z = torch.randn(16, self.G_frozen.style_dim, generator=torch.Generator().manual_seed(r.seed + 1))
            source = torch.cat([self.G_frozen(c.to(self.device)) for c in z.split(4)])
        return [m.image_direction(style, source) for m in self.clip]

    def _global_targets(self, style_images, template: str = "a {}") -> list[torch.Tensor]:
        """What a global loss pulls towards, per CLIP model: the target text in ``template`` ('a {target}' for
        ``lambda_global``, the bare target for layer selection, as the official code), or for an image-guided
        run the mean unit image embedding of the style images."""
        if not style_images:
            return [m.global_text(self.recipe.target, template) for m in self.clip]
        style = fit_images(style_images, self.G_frozen.size).to(self.device)
        return [F.normalize(m.encode_images(style), dim=-1).mean(0) for m in self.clip]

    def _sample_ws(self, n: int, mixing: bool = True) -> torch.Tensor:
        z = torch.randn(n, self.G_frozen.style_dim, generator=self.rng).to(self.device)
        with torch.no_grad():
            w = self.G_frozen.to_w_plus(self.G_frozen.mapping(z))
            if mixing and self.recipe.mixing > 0 and torch.rand((), generator=self.rng).item() < self.recipe.mixing:
                z2 = torch.randn(n, self.G_frozen.style_dim, generator=self.rng).to(self.device)
                crossover = int(torch.randint(1, self.L, (), generator=self.rng))
                w = self.G_frozen.mix(w, self.G_frozen.mapping(z2), crossover)
        return w

    def _global_loss(self, images: torch.Tensor) -> torch.Tensor:
        """The layer-selection objective: weighted global CLIP loss towards ``selection_targets``."""
        return sum(m.weight * global_loss(m.encode_images(images), t) for m, t in zip(self.clip, self.selection_targets))

    # ------------------------------------------------------------ one iteration
    def train_step(self) -> StepResult:
        """One optimiser step. Returns (losses per CLIP model, chosen slots, seconds per phase).

        G_frozen and G_train draw their own per-layer noise (as the official code does), from a
        seed taken from the run's generator, so runs are reproducible and other threads' RNG is untouched.
        If compiling fails (in the first step), the step runs again uncompiled, from the same sampler state.
        """
        rng_state = self.rng.get_state()
        try:
            return self._seeded_step()
        except Exception as e:  # noqa: BLE001 - compile errors come in many types; the others are re-raised
            if not self.compiled or not _is_compile_error(e):
                raise
            self._drop_compiled(e)  # the step had not reached the optimiser
            self.rng.set_state(rng_state)
            return self._seeded_step()

    def _seeded_step(self) -> StepResult:
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
        """bf16 autocast for both generators and CLIP when ``Recipe.amp == "bf16"``: the frozen and trained
        images go through the same precision, so their CLIP-space difference carries no rounding bias. Off by
        default: float32 was as fast on a GPU and much faster on a CPU (bench/results: amp)."""
        if self.recipe.amp != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _losses(self, img_train: torch.Tensor, feats_frozen: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Weighted sum over CLIP models of the directional (+ optional global and norm) losses."""
        r = self.recipe
        total, losses = 0.0, {}
        for i, (m, encode, f0, d) in enumerate(zip(self.clip, self._encoders, feats_frozen, self.directions)):
            f1 = encode(img_train)
            if torch.allclose(f1, f0, rtol=0, atol=1e-6):  # identical generators (step 0): dI would be 0/0
                f1 = encode(img_train + 1e-6)
            loss = r.lambda_direction * directional_loss(f0, f1, d)
            if r.lambda_global:
                loss = loss + r.lambda_global * global_loss(f1, self.global_targets[i])
            if r.lambda_norm:
                loss = loss + r.lambda_norm * embedding_norm_loss(f0, f1)
            losses[m.name] = float(loss.detach())
            total = total + m.weight * loss
        return total, losses

    def _train_step(self) -> StepResult:
        r, phase = self.recipe, Phases(self.device)
        slots = self._fixed_slots
        if self._auto:
            with phase("selection"):
                # the official code scores slots on unmixed W (determine_opt_layers)
                w_sel = self._sample_ws(r.auto_layer_batch, mixing=r.parity != "official")
                slots = select_slots(self.G_train, w_sel, self._global_loss, self.k, r.auto_layer_iters,
                                     noise_mode=r.train_noise)
                layers = official.slot_layers if r.parity == "official" else layers_for_slots
                set_trainable(self.G_train, layers(self.G_train, slots))
        ws = self._sample_ws(r.batch)
        with torch.no_grad():
            with phase("frozen_forward"):
                img_frozen = self._synthesize(self._frozen_synthesis, self.G_frozen, ws)
            with phase("clip"):
                feats_frozen = [encode(img_frozen) for encode in self._encoders]
        with phase("train_forward_backward"):
            img_train = self._synthesize(self._train_synthesis, self.G_train, ws)
        with phase("clip"):
            total, losses = self._losses(img_train, feats_frozen)
        self._check_loss(total)
        with phase("train_forward_backward"):
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            self._check_gradients()
            self.opt.step()
        losses["total"] = float(total.detach())
        return StepResult(losses, list(slots), phase.seconds)

    @torch.no_grad()
    def preview(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed preview seeds at the recipe's truncation: (source images, adapted images) on CPU."""
        w = self.G_frozen.truncate(self.G_frozen.mapping(self.preview_z), self.w_avg, self.recipe.truncation)
        return self.G_frozen.synthesis(w).cpu(), self.G_train.synthesis(w).cpu()

    # ------------------------------------------------------------ diagnostics
    def diagnostics_observer(self, identity: bool | str | None = "auto"):
        """A ``diagnostics.Diagnostics`` observer measuring this run's previews against its own target
        (the text or image direction of each CLIP model). ``identity``: "auto" (measured when the first
        source preview shows a face), True or False. Attach it with ``add_observer``."""
        return Diagnostics.for_adapter(self, identity=identity)

    # ------------------------------------------------------------ saving and resuming
    def meta(self) -> dict:
        return {"source_model": self.base_name, **super().meta()}

    def save(self, path: str | Path) -> Path:
        return save_generator(self.G_train, path, self.meta())

    def _load_weights(self, path: Path) -> None:
        G_snap, _ = load_generator(path, self.device)
        synth = {k: v for k, v in G_snap.state_dict().items() if not k.startswith("style.")}
        self.G_train.load_state_dict(synth, strict=False)

    @classmethod
    def resume(cls, run_dir: str | Path, base: Generator, clip: list[ClipMember], device="cpu",
               compile: str | None = None, **kw) -> "Adapter":
        """Continue a run from its last snapshot: same weights, optimiser moments and sampler state
        (stale ``.part`` files of a run killed while saving are removed). ``compile`` overrides the saved
        ``Recipe.compile`` (a speed setting: what the run learns does not depend on it)."""
        recipe, base_name = cls.saved_recipe(run_dir)
        if compile is not None:
            recipe.compile = compile
        ad = cls(base, recipe, clip, device, Path(run_dir), base_name, _resuming=True, **kw)
        ad._restore()
        return ad

    @classmethod
    def saved_recipe(cls, run_dir: str | Path) -> tuple[Recipe, str]:
        """(recipe, base name) of the run in ``run_dir``, as written when it started (or last continued)."""
        record = RunFolder(run_dir, cls.run_kind).read_record()
        try:
            return Recipe.from_dict(record["recipe"]), str(record.get("base", ""))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{Path(run_dir).name}: its recipe is not readable ({describe_error(e)})") from None
