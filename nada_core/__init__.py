"""NADA Studio's engine: StyleGAN2 in plain PyTorch and CLIP-guided domain adaptation (StyleGAN-NADA).

The compact core is three modules: ``models.stylegan2`` (the generator), ``guidance.clip_guide`` (CLIP losses)
and ``training.freezing`` (adaptive layer selection), driven by ``training.adapt``. Around it: ``store`` (files,
weights, the library, runs), ``faces`` (alignment, inversion), ``latent`` (editing, sampling) and the rest of
``training``. Each folder imports only from the ones listed before it. No UI imports; the CLI is
``python -m nada_core``. The names below are the public API (imported on first use, so ``import nada_core``
stays cheap)."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Generator": "models.stylegan2",
    "tiny_generator": "models.tiny",
    "export_onnx": "models.export",
    "load_generator": "store.checkpoints",
    "save_generator": "store.checkpoints",
    "load_base": "store.library",
    "load_model": "store.library",
    "list_library": "store.library",
    "ClipMember": "guidance.clip_guide",
    "load_clip": "guidance.clip_guide",
    "load_ensemble": "guidance.clip_guide",
    "Recipe": "training.adapt",
    "Adapter": "training.adapt",
    "Run": "training.run",
    "RunFolder": "store.runs",
    "thumbnail": "latent.sampling",
    "keep_colours": "faces.colour",
    "latents_for_seeds": "latent.sampling",
    "render": "latent.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nada_core' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
