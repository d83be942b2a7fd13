"""Live training diagnostics, measured on the fixed preview images the trainer already renders
(source row from G_frozen, adapted row from G_train, same latents, images in [-1, 1]):

* CLIP directional score: mean over pairs of cos(norm(E_I(adapted)) - norm(E_I(source)), dT), the
  quantity the directional loss drives up (1 - loss on the preview latents).
* diversity: mean pairwise CLIP-image distance (1 - cos) among the adapted previews divided by the
  same among the source previews; under ``COLLAPSE_RATIO`` the adapted images are becoming alike
  (mode collapse), a known failure of long or aggressive runs.
* identity (face domains): ``faces.identity.identity_distance``, the distance between dlib's 128-d
  face descriptors of each source face and its adapted version (under 0.6: the same person); None
  where no face is found in the source image.

Pure functions for each, a :class:`Diagnostics` observer for the trainer's events
(``trainer.add_observer(adapter.diagnostics_observer())``), :func:`read_diagnostics` for the figures a run
folder keeps per step, and :func:`best_snapshot` / :func:`best_snapshot_of_run` to suggest a step worth keeping.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..faces.identity import face_landmarks, identity_distance, to_uint8
from ..guidance.clip_guide import ClipMember
from ..store.runs import RunFolder
from .loop import read_diagnostics

__all__ = ["COLLAPSE_RATIO", "Diagnostics", "SnapshotAdvice", "best_snapshot", "best_snapshot_of_run", "clip_score",
           "directional_score", "diversity", "read_diagnostics"]

COLLAPSE_RATIO = 0.5        # adapted diversity below half the source's: mode collapse alarm
SCORE_TOLERANCE = 0.02      # best_snapshot takes the earliest step within this of the best score


# ------------------------------------------------------------------ CLIP measures
def _unit_feats(member: ClipMember, images: torch.Tensor) -> torch.Tensor:
    device = next(member.model.parameters()).device
    return F.normalize(member.encode_images(images.to(device)).float(), dim=-1)


@torch.no_grad()
def directional_score(member: ClipMember, source: torch.Tensor, adapted: torch.Tensor, direction: torch.Tensor) -> float:
    """Mean over pairs of cos(norm(E_I(adapted)) - norm(E_I(source)), dT) for one CLIP model.
    An unchanged pair scores 0."""
    if source.shape[0] != adapted.shape[0]:
        raise ValueError(f"{source.shape[0]} source images but {adapted.shape[0]} adapted ones: give pairs")
    d_img = _unit_feats(member, adapted) - _unit_feats(member, source)
    d_txt = direction.to(d_img).flatten().expand_as(d_img)
    return float(F.cosine_similarity(d_img, d_txt, dim=-1).mean())


def clip_score(members: list[ClipMember], directions: list[torch.Tensor], source: torch.Tensor,
               adapted: torch.Tensor) -> float:
    """The directional score averaged over CLIP models with their ensemble weights."""
    total = sum(m.weight for m in members)
    return sum(m.weight * directional_score(m, source, adapted, d) for m, d in zip(members, directions)) / total


def mean_pairwise_distance(feats: torch.Tensor) -> float | None:
    """Mean of 1 - cos over all distinct pairs of rows; None with fewer than two rows."""
    n = feats.shape[0]
    if n < 2:
        return None
    u = F.normalize(feats.double(), dim=-1)
    sim = u @ u.T
    off = ~torch.eye(n, dtype=torch.bool, device=u.device)
    return float((1 - sim[off]).clamp_min(0).mean())


@torch.no_grad()
def diversity(members: list[ClipMember], source: torch.Tensor, adapted: torch.Tensor) -> float | None:
    """Adapted diversity relative to the source's (1.0 = as varied as the source previews), averaged
    over CLIP models with their weights; None when it cannot be measured (one image, or identical sources)."""
    ratios, weights = [], []
    for m in members:
        d_src = mean_pairwise_distance(_unit_feats(m, source))
        d_ada = mean_pairwise_distance(_unit_feats(m, adapted))
        if d_src is None or d_ada is None or d_src <= 1e-8:
            continue
        ratios.append(d_ada / d_src)
        weights.append(m.weight)
    if not ratios:
        return None
    return sum(r * w for r, w in zip(ratios, weights)) / sum(weights)


# ------------------------------------------------------------------ the observer
@dataclass
class SnapshotAdvice:
    step: int
    clip_score: float
    diversity: float | None
    reason: str


def best_snapshot(history: list[dict], available_steps=None, tolerance: float = SCORE_TOLERANCE) -> SnapshotAdvice | None:
    """A step worth keeping: among the measurements before the first mode-collapse alarm, the
    earliest whose directional score is within ``tolerance`` of the best (later steps gain little
    and lose diversity). ``available_steps`` limits the choice to steps that have snapshots.
    None when nothing qualifies (no measurement, or no progress towards the target)."""
    entries = [h for h in history if h.get("clip_score") is not None and h.get("step") is not None]
    entries.sort(key=lambda h: h["step"])
    collapse_step = next((h["step"] for h in entries if h.get("collapse")), None)
    before = [h for h in entries if collapse_step is None or h["step"] < collapse_step]
    if available_steps is not None:
        allowed = set(available_steps)
        before = [h for h in before if h["step"] in allowed]
    if not before:
        return None
    top = max(h["clip_score"] for h in before)
    if top <= 0:
        return None
    pick = next(h for h in before if h["clip_score"] >= top - tolerance)
    why = (f"directional score {pick['clip_score']:.3f} (best {top:.3f})"
           + (f", before diversity fell below {COLLAPSE_RATIO:g}x the source's at step {collapse_step}"
              if collapse_step is not None else ", diversity held up"))
    return SnapshotAdvice(int(pick["step"]), float(pick["clip_score"]), pick.get("diversity"), why)


def best_snapshot_of_run(run_dir: str | Path, tolerance: float = SCORE_TOLERANCE) -> SnapshotAdvice | None:
    """``best_snapshot`` over a run folder: the figures of ``diagnostics.json``, choosing among the snapshots
    still on disk (pruning keeps the figures of every step)."""
    history = [{"step": step, **figures} for step, figures in read_diagnostics(run_dir).items()]
    return best_snapshot(history, RunFolder(Path(run_dir)).snapshot_steps(), tolerance)


class Diagnostics:
    """Observer for the trainer's events: ``observe(event)`` measures ``event.preview`` (source row,
    adapted row) and returns ``{"step", "clip_score", "diversity", "identity", "collapse"}``, or None
    for events without previews. Measurements accumulate in ``history``.

    ``identity``: True to measure face identity, False never, None or "auto" to decide on the first
    preview (measured when a face is found in a source preview)."""

    def __init__(self, members: list[ClipMember], directions: list[torch.Tensor], identity: bool | str | None = None,
                 collapse_ratio: float = COLLAPSE_RATIO):
        if len(members) != len(directions):
            raise ValueError("give one target direction per CLIP model")
        if identity not in (True, False, None, "auto"):
            raise ValueError(f"identity must be True, False or 'auto', not {identity!r}")
        self.members, self.directions = list(members), [d.detach() for d in directions]
        self.identity = None if identity == "auto" else identity
        self.collapse_ratio = collapse_ratio
        self.history: list[dict] = []

    @classmethod
    def for_prompts(cls, members: list[ClipMember], source: str, target: str, **kwargs) -> "Diagnostics":
        return cls(members, [m.text_direction(source, target) for m in members], **kwargs)

    @classmethod
    def for_adapter(cls, adapter, identity: bool | str | None = "auto", **kwargs) -> "Diagnostics":
        """Measure an ``Adapter``'s previews with its own CLIP models (and their weights) against its own
        target directions: the text direction, or the image direction of an image-guided run."""
        return cls(adapter.clip, adapter.directions, identity=identity, **kwargs)

    @torch.no_grad()
    def measure(self, source: torch.Tensor, adapted: torch.Tensor, step: int | None = None) -> dict:
        if self.identity is None:
            self.identity = any(face_landmarks(img) is not None for img in to_uint8(source))
        div = diversity(self.members, source, adapted)
        result = {
            "step": step,
            "clip_score": clip_score(self.members, self.directions, source, adapted),
            "diversity": div,
            "identity": identity_distance(source, adapted) if self.identity else None,
            "collapse": div is not None and div < self.collapse_ratio,
        }
        self.history.append(result)
        return result

    def observe(self, event) -> dict | None:
        preview = getattr(event, "preview", None)
        if preview is None:
            return None
        source, adapted = preview
        return self.measure(source, adapted, getattr(event, "step", None))

    def best_snapshot(self, available_steps=None) -> SnapshotAdvice | None:
        return best_snapshot(self.history, available_steps)

