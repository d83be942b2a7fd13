"""Server-wide state shared by every tab and visitor: the device, cached models and CLIP, the model
library, and the single training slot. Tabs call this and nada_core; nothing here draws UI."""
from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from nada_core import weights
from nada_core.checkpoints import load_generator
from nada_core.clip_guide import DEFAULT_MODELS, load_clip
from nada_core.editing import Direction, check_compatible, ganspace, load_direction_file
from nada_core.library import LibraryEntry, default_device, library_dir, list_library, load_base
from nada_core.stylegan2 import Generator

FACE_DIRECTIONS = ["dir-age", "dir-smile", "dir-pose", "dir-gender", "dir-hair_length", "dir-beard"]
TINY_BANNER = ("**Untrained tiny models.** This server runs with `--tiny`: a 32 px generator and a CLIP with "
               "random weights, so every feature can be tried offline. The pictures are noise by design and mean "
               "nothing; download the real weights (`python -m nada_core weights download ffhq-256 ...`) for real results.")


class Studio:
    def __init__(self, device: str | None = None, tiny: bool = False):
        self.device = device or default_device()
        self.tiny = tiny
        self._lock = threading.RLock()
        self._bases: dict[str, Generator] = {}
        self._models: OrderedDict[tuple, Generator] = OrderedDict()
        self._clip: dict[str, object] = {}
        self._directions: dict[str, list[Direction]] = {}
        self.training: dict | None = None          # {"run_id", "adapter", "session"} of the running job
        self.seconds_per_step: dict[tuple, float] = {}
        self.unsaved: dict[str, object] = {}        # session -> trained adapter whose save failed

    # ------------------------------------------------------------------ models
    @property
    def library_root(self) -> Path:
        """Tiny-model runs live apart from real ones, so untrained output never mixes with real models."""
        return library_dir() / "_tiny" if self.tiny else library_dir()

    def base_names(self) -> list[str]:
        if self.tiny:
            return ["tiny"]
        return [n for n, a in weights.load_manifest().items() if a.kind == "generator"]

    def base_label(self, name: str) -> str:
        if name == "tiny":
            return "tiny (untrained test model, 32 px)"
        a = weights.get_asset(name)
        return f"{a.label}" + ("" if a.present else "  [not downloaded]")

    def default_base(self) -> str:
        if self.tiny:
            return "tiny"
        manifest = weights.load_manifest()
        want = "ffhq-1024" if self.device.startswith("cuda") else "ffhq-256"
        return want if manifest[want].present or not any(
            manifest[n].present for n in self.base_names()) else next(n for n in self.base_names() if manifest[n].present)

    def base(self, name: str) -> Generator:
        with self._lock:
            if name not in self._bases:
                self._bases[name] = load_base(name, self.device)[0].eval().requires_grad_(False)
            return self._bases[name]

    def model(self, path: str | Path) -> Generator:
        """An adapted generator from the library (small LRU cache keyed by path and modification time)."""
        path = Path(path)
        key = (str(path), path.stat().st_mtime)
        with self._lock:
            if key not in self._models:
                G, _ = load_generator(path, self.device)
                self._models[key] = G.requires_grad_(False)
                while len(self._models) > 6:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]

    def clip(self, names: list[str], model_weights: list[float]) -> list:
        members = []
        with self._lock:
            for name, w in zip(names, model_weights):
                if w <= 0:
                    continue
                if name not in self._clip:
                    self._clip[name] = load_clip(name, self.device)
                m = self._clip[name]
                members.append(type(m)(m.name, m.model, m.tokenizer, w, m._text_cache))
        return members

    def perceptual(self) -> tuple[dict, str]:
        """Reconstruction loss for selfie inversion (LPIPS when downloaded), loaded once."""
        from nada_core.selfie import perceptual_for

        with self._lock:
            if not hasattr(self, "_perceptual"):
                self._perceptual = perceptual_for(self.device)
            return self._perceptual

    def clip_names(self) -> list[str]:
        return ["tiny"] if self.tiny else list(DEFAULT_MODELS)

    def model_names(self) -> dict[str, str]:
        """Library path -> model name, from one scan of the library (for labelling a render)."""
        return {str(e.path): e.name for e in self.library()}

    def library(self):
        """Trained runs, plus the ready StyleGAN-NADA styles that are downloaded."""
        entries = list_library(self.library_root)
        if not self.tiny:
            for a in weights.load_manifest().values():
                if a.kind == "style" and a.present:
                    entries.append(LibraryEntry(a.name, a.path, a.extra.get("base", "ffhq-1024"),
                                                {"source": "photo", "target": a.label}, None, True))
        return entries

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
    def start_training(self, adapter, session: str) -> str:
        run_id = uuid.uuid4().hex[:8]
        with self._lock:
            self.training = {"run_id": run_id, "adapter": adapter, "session": session}
        return run_id

    def finish_training(self, run_id: str) -> None:
        with self._lock:
            if self.training and self.training["run_id"] == run_id:
                self.training = None

    def cancel_training(self, session: str) -> bool:
        """Stop the run this browser session started (not somebody else's)."""
        with self._lock:
            if self.training and self.training["session"] == session:
                self.training["adapter"].cancel()
                return True
        return False
