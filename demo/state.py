"""Server-wide state shared by every tab and visitor: the device, cached models and CLIP, the model
library, and the single training slot. Tabs call this and nada_core; nothing here draws UI."""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from nada_core.faces.identity import identity_for
from nada_core.faces.psp import load_psp
from nada_core.faces.selfie import encoder_for, perceptual_for
from nada_core.guidance.clip_guide import DEFAULT_MODELS, load_clip
from nada_core.guidance.prompt_check import check_prompt
from nada_core.latent.editing import Direction, check_compatible, ganspace, load_direction_file
from nada_core.models.stylegan2 import Generator
from nada_core.models.tiny import TINY_GENERATOR, TINY_NAME, is_tiny, tiny_e4e, tiny_psp_sketch
from nada_core.store import weights
from nada_core.store.checkpoints import load_generator
from nada_core.store.library import (
    LibraryEntry,
    UnknownModel,
    default_device,
    empty_trash,
    find_model,
    library_dir,
    list_library,
    load_base,
    remove_abandoned,
    remove_stale_parts,
)
from nada_core.store.runs import MAPPER, MAPPERS, TINY, RunFolder
from nada_core.training.mapper import load_mapper

FACE_DIRECTIONS = ["dir-age", "dir-smile", "dir-pose", "dir-gender", "dir-hair_length", "dir-beard"]
PROMPT_REPORTS = 256      # prompt checks remembered (each is a few text embeddings)
UNSAVED_TTL = 30 * 60      # seconds a trained model whose save failed is kept in memory for a retry
TINY_BANNER = ("**Untrained tiny models** (`--tiny`): a 32 px generator, a random CLIP and random e4e / sketch "
               "encoders, so every feature can be tried offline. The pictures are noise by design; start without "
               "`--tiny` to get real weights.")
TINY_ENCODER_NOTE = "untrained tiny encoder: noise by design"


class Studio:
    def __init__(self, device: str | None = None, tiny: bool = False):
        self.device = device or default_device()
        self.tiny = tiny
        self._lock = threading.RLock()
        # generators cached up to a memory budget (bytes of parameters and buffers), least recently used out first
        self.cache_budget = int(float(os.environ.get("NADA_CACHE_MB", 3072)) * 2 ** 20)
        self._bases: OrderedDict[str, Generator] = OrderedDict()
        self._models: OrderedDict[tuple, Generator] = OrderedDict()
        self._clip: dict[str, object] = {}
        self._directions: dict[str, list[Direction]] = {}
        self.training: dict | None = None          # {"run", "session"} of the running job (see active_run)
        self.seconds_per_step: dict[tuple, float] = {}
        self._prompt_reports: OrderedDict[tuple, object] = OrderedDict()
        self.cancel_flags: dict[str, threading.Event] = {}   # session -> its running selfie's Cancel
        self.unsaved: dict[str, tuple[float, object]] = {}  # session -> (time, trained adapter whose save failed)
        self.library_root.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(self.library_root)   # half-written files of a killed process
        empty_trash(self.library_root)          # short stopped runs nobody kept
        remove_abandoned(self.library_root)     # runs killed before their first snapshot: a recipe, nothing trained

    # ------------------------------------------------------------------ models
    @property
    def library_root(self) -> Path:
        """Tiny-model runs live apart from real ones, so untrained output never mixes with real models."""
        return library_dir() / TINY if self.tiny else library_dir()

    def base_names(self) -> list[str]:
        if self.tiny:
            return [TINY_NAME]
        return [n for n, a in weights.load_manifest().items() if a.kind == "generator"]

    def base_label(self, name: str) -> str:
        if is_tiny(name):
            return f"{TINY_NAME} (untrained test model, {TINY_GENERATOR['size']} px)"
        a = weights.get_asset(name)
        return f"{a.label}" + ("" if a.present else "  [not downloaded]")

    def n_latent(self, name: str) -> int:
        """W+ slots of a base, from its size (known without loading it)."""
        if is_tiny(name):
            size = TINY_GENERATOR["size"]
        else:
            size = int(weights.get_asset(name).extra.get("resolution", 1024)) if name in self.base_names() else 1024
        return 2 * size.bit_length() - 4

    def default_base(self) -> str:
        if self.tiny:
            return TINY_NAME
        manifest = weights.load_manifest()
        want = "ffhq-1024" if self.device.startswith("cuda") else "ffhq-256"
        return want if manifest[want].present or not any(
            manifest[n].present for n in self.base_names()) else next(n for n in self.base_names() if manifest[n].present)

    def base(self, name: object) -> Generator:
        """A base generator chosen by name among :meth:`base_names` (never a path)."""
        if not isinstance(name, str) or name not in self.base_names():
            raise UnknownModel(name)
        with self._lock:
            if name not in self._bases:
                self._bases[name] = load_base(name, self.device)[0].eval().requires_grad_(False)
                self._trim_cache()
            self._bases.move_to_end(name)
            return self._bases[name]

    def entry(self, model_id: object) -> LibraryEntry:
        """The library model a client named by id; anything else is 'unknown model'."""
        return find_model(model_id, self.library())

    def model(self, model_id: object) -> Generator:
        """An adapted generator from the library, by id (LRU cache keyed by file and modification time)."""
        path = self.entry(model_id).path
        key = (str(path), path.stat().st_mtime)
        with self._lock:
            if key not in self._models:
                G, _ = load_generator(path, self.device, display_name=str(model_id))
                self._models[key] = G.requires_grad_(False)
                self._trim_cache()
            self._models.move_to_end(key)
            return self._models[key]

    def _trim_cache(self) -> None:
        """Drop least recently used generators until the cache fits its memory budget (the newest stays)."""
        def nbytes(m):
            return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))

        while True:
            caches = [c for c in (self._models, self._bases) if c]
            total = sum(nbytes(G) for c in caches for G in c.values())
            if total <= self.cache_budget or sum(len(c) for c in caches) <= 1:
                return
            victim = self._models if len(self._models) > 1 or not self._bases else self._bases
            victim.popitem(last=False)

    def clip(self, names: list[str], model_weights: list[float]) -> list:
        members = []
        with self._lock:
            for name, w in zip(names, model_weights):
                if w <= 0:
                    continue
                if name not in self._clip:
                    self._clip[name] = load_clip(name, self.device)
                members.append(self._clip[name].with_weight(w))
        return members

    def prompt_report(self, source: str, target: str, names: tuple[str, ...]):
        """The prompt check of a wording, remembered (every visitor opening the page asks for the default's)."""
        key = (source, target, tuple(names))
        with self._lock:
            if key in self._prompt_reports:
                self._prompt_reports.move_to_end(key)
                return self._prompt_reports[key]
        report = check_prompt(source, target, self.clip(list(names), [1.0] * len(names)))
        with self._lock:
            self._prompt_reports[key] = report
            while len(self._prompt_reports) > PROMPT_REPORTS:
                self._prompt_reports.popitem(last=False)
        return report

    def perceptual(self) -> tuple[dict, str]:
        """Reconstruction loss for selfie inversion (LPIPS when downloaded), loaded once."""
        with self._lock:
            if not hasattr(self, "_perceptual"):
                self._perceptual = perceptual_for(self.device)
            return self._perceptual

    def clip_names(self) -> list[str]:
        return [TINY_NAME] if self.tiny else list(DEFAULT_MODELS)

    def library(self):
        """Trained runs, plus the ready StyleGAN-NADA styles that are downloaded."""
        entries = list_library(self.library_root)
        if not self.tiny:
            for a in weights.load_manifest().values():
                if a.kind == "style" and a.present:
                    entries.append(LibraryEntry(a.name, a.path, a.extra.get("base", "ffhq-1024"),
                                                {"source": "photo", "target": a.label}, None, True, "style",
                                                a.path.stat().st_mtime, a.path.stat().st_size))
        return entries

    # ------------------------------------------------------------------ latent mappers
    @property
    def mapper_root(self) -> Path:
        return self.library_root / MAPPERS

    def mappers(self, generator: str | None = None) -> list[dict]:
        """Finished mapper runs: {'id', 'text', 'generator' (library id or base name), 'path'}, newest first;
        with ``generator``, those trained on it or on its base (one latent space)."""
        out = []
        for rec in sorted(self.mapper_root.glob(f"*/{MAPPER.recipe}"), key=lambda p: p.stat().st_mtime, reverse=True):
            final = rec.parent / MAPPER.final
            if not final.is_file():
                continue
            try:
                saved = RunFolder(rec.parent, MAPPER).read_record()   # bounded in size and depth
            except ValueError:
                continue
            made_on = saved.get("generator")
            out.append({"id": rec.parent.name, "text": str(saved.get("recipe", {}).get("text", "")),
                        "generator": str(made_on.get("name", "")) if isinstance(made_on, dict) else "",
                        "path": final})
        if generator is None:
            return out
        family = {generator}
        try:
            family.add(self.entry(generator).base)
        except UnknownModel:
            family |= {e.id for e in self.library() if e.base == generator}
        return [m for m in out if m["generator"] in family]

    def mapper(self, mapper_id: object, n_latent: int):
        """A trained latent mapper by id (never a path), checked against the generator's W+ length."""
        match = [m for m in self.mappers() if m["id"] == mapper_id]
        if not isinstance(mapper_id, str) or not match:
            raise UnknownModel(mapper_id)
        path = match[0]["path"]
        key = ("mapper", str(path), path.stat().st_mtime)
        with self._lock:
            if key not in self._models:
                self._models[key] = load_mapper(path, self.device, n_latent=n_latent)[0]
            self._models.move_to_end(key)
            return self._models[key]

    def identity_term(self, base_name: str):
        """(identity term or None, note) for a mapper or text edit on this base (off on the tiny models)."""
        return identity_for("auto", None, TINY_NAME if self.tiny else base_name, self.device)

    def encoder_fits(self, base_name: str) -> bool:
        """Whether :meth:`e4e` has an encoder for this base: FFHQ 1024 with the e4e file, or the tiny base."""
        if self.tiny:
            return is_tiny(base_name)
        return base_name == "ffhq-1024" and not self.missing(("encoder",))

    def sketch_fits(self, base_name: str) -> bool:
        """Whether :meth:`psp` ("psp-sketch") draws into this base's latent space: FFHQ 1024, or the tiny base."""
        return is_tiny(base_name) if self.tiny else base_name == "ffhq-1024"

    def e4e(self, base_name: str):
        """(the e4e encoder, None) where it fits the base and is downloaded, loaded once; else (None, why).
        On the tiny models: the untrained tiny e4e (``models.tiny``), built, never downloaded."""
        with self._lock:
            key = ("e4e", base_name)
            if key not in self._models:
                if self.tiny:
                    enc, why = (tiny_e4e().to(self.device), None) if is_tiny(base_name) else \
                        (None, f"the tiny e4e fits the {TINY_NAME} base only; using optimisation")
                else:
                    enc, why = encoder_for(base_name, self.base(base_name), self.device)
                if enc is None:
                    return None, why
                self._models[key] = enc
                self._trim_cache()
            self._models.move_to_end(key)
            return self._models[key], None

    def psp(self, name: str):
        """A pSp conditional encoder (psp-sketch / psp-seg) from the weights folder, loaded once. On the tiny
        models: the untrained tiny sketch encoder (``models.tiny``; there is no tiny segmentation one)."""
        if self.tiny and name != "psp-sketch":
            raise weights.WeightsError(f"only the sketch encoder has a tiny stand-in, not {name}")
        with self._lock:
            key = ("psp", name)
            if key not in self._models:
                self._models[key] = tiny_psp_sketch().to(self.device) if self.tiny else \
                    load_psp(weights.require(name), self.device)
            self._models.move_to_end(key)
            return self._models[key]

    # ------------------------------------------------------------------ what is missing
    def missing(self, kinds: tuple[str, ...]) -> list:
        if self.tiny:
            return []
        return [a for a in weights.load_manifest().values() if a.kind in kinds and not a.present]

    # ------------------------------------------------------------------ latent directions
    def directions(self, base_name: str) -> list[Direction]:
        """GANSpace axes computed from this base (always), plus the InterFaceGAN face directions
        when they are downloaded and fit this base's latent space."""
        with self._lock:
            if base_name not in self._directions:
                G = self.base(base_name)
                dirs = ganspace(G, n_components=6, n_samples=10_000)
                for name in FACE_DIRECTIONS:
                    asset = weights.get_asset(name)
                    if asset.present and base_name in ("ffhq-1024",):
                        (d,) = load_direction_file(asset.path, asset.label, value_range=tuple(asset.extra.get("range", (-3, 3))))
                        check_compatible(G, d)
                        if d.space == "W+" and d.vector.shape[0] != G.n_latent:
                            continue
                        dirs.append(d)
                self._directions[base_name] = dirs
            return self._directions[base_name]

    def z_directions(self, base_name: str) -> list[Direction]:
        """InterFaceGAN++ attribute boundaries (Z space of the FFHQ 1024 model) that are downloaded."""
        if base_name != "ffhq-1024":
            return []
        out = []
        for a in weights.load_manifest().values():
            if a.kind == "direction" and a.extra.get("space") == "Z" and a.present:
                out += load_direction_file(a.path, a.label, space="Z", value_range=tuple(a.extra.get("range", (-3, 3))))
        return out

    # ------------------------------------------------------------------ the training slot
    def start_training(self, run, session: str) -> None:
        """``run`` (a ``nada_core.training.run.Run``) holds the device for the visitor ``session``."""
        with self._lock:
            self.training = {"run": run, "session": session}
            self.unsaved.pop(session, None)  # a new run frees the model kept for a retry

    def start_job(self, job, session: str) -> None:
        """Another device job (a video; anything with ``ended``, ``view()`` and ``stop()``) in the same slot, so
        the other tabs' visitors are told it is busy; unlike a run it frees no model kept for a retry."""
        with self._lock:
            self.training = {"run": job, "session": session}

    def active_run(self):
        """(run, session) of the run in progress, or None (a run that has ended holds nothing)."""
        with self._lock:
            if self.training and not self.training["run"].ended:
                return self.training["run"], self.training["session"]
            return None

    def is_training(self, session: str) -> bool:
        active = self.active_run()
        return bool(active) and active[1] == session

    def training_status(self) -> str | None:
        """'step x/y' of the run in progress ('frame x/y' of a video), or None."""
        active = self.active_run()
        if not active:
            return None
        view = active[0].view()
        return f"{getattr(view, 'unit', 'step')} {view.step}/{view.total}"

    def keep_unsaved(self, session: str, adapter) -> None:
        with self._lock:
            self._expire_unsaved()
            self.unsaved[session] = (time.time(), adapter)

    def take_unsaved(self, session: str):
        with self._lock:
            self._expire_unsaved()
            item = self.unsaved.get(session)
            return item[1] if item else None

    def _expire_unsaved(self) -> None:
        now = time.time()
        for k in [k for k, (t, _) in self.unsaved.items() if now - t > UNSAVED_TTL]:
            del self.unsaved[k]

    def finish_training(self, run) -> None:
        with self._lock:
            if self.training and self.training["run"] is run:
                self.training = None

    def cancel_training(self, session: str) -> bool:
        """Stop the run this browser session started (not somebody else's)."""
        active = self.active_run()
        return bool(active) and active[1] == session and active[0].stop()
