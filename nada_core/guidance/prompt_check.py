"""Prompt checker: how well a source -> target text pair can guide StyleGAN-NADA, measured on the
CLIP models that will train it, before any training step is spent.

For each CLIP model, with e_t(x) the unit text embedding of ``x`` in template t (the 79 ImageNet
templates training averages over) and d_t = e_t(target) - e_t(source):

* strength    = |mean_t d_t|, the length of the text direction before it is normalised. Small means
                CLIP hardly tells the target from the source ("weak direction").
* consistency = mean_t cos(d_t, mean_t d_t): do the templates agree on where the target lies? Low
                means the wording is read differently per template ("ambiguous target").

Two models whose text embeddings live in one space (same width and, measured, nearly the same
embeddings of the same prompts) are compared by the cosine between their directions; models with
separate spaces (OpenAI's ViT-B/32 and ViT-B/16 were trained independently, so the cosine between
their vectors means nothing) are shown side by side.

Suggestions come from measuring rewordings (source "Photo" / "Human" / "Face", the target with and
without "a ... of"); one is suggested only when it measures clearly better.

The thresholds are named constants below. They are first estimates, not yet calibrated against
finished training runs with the real OpenAI weights.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .clip_guide import IMAGENET_TEMPLATES, ClipMember, PromptError, check_prompts

WEAK_STRENGTH = 0.15            # strength below this: the target is too close to the source
AMBIGUOUS_CONSISTENCY = 0.60    # mean template agreement below this: the target is ambiguous
MODELS_DISAGREE = 0.50          # cosine between two same-space models' directions below this
SAME_SPACE_MIN_COS = 0.90       # mean cosine between two models' embeddings of the same prompts
CLEARLY_BETTER = 1.15           # a rewording must score this many times the original to be suggested
CONSISTENCY_SLACK = 0.05        # ... without losing more than this much consistency

SOURCE_ALTERNATIVES = ("Photo", "Human", "Face")


@dataclass
class MemberFigures:
    """One CLIP model's reading of a prompt pair."""

    model: str
    dim: int
    strength: float
    consistency: float
    weakest_templates: list[str] = field(default_factory=list)   # the templates that agree least

    @property
    def score(self) -> float:
        return self.strength * self.consistency


@dataclass
class PairFigures:
    """Two CLIP models side by side; ``agreement`` only when they share an embedding space."""

    models: tuple[str, str]
    same_space: bool
    agreement: float | None
    strengths: tuple[float, float]


@dataclass
class Alternative:
    source: str
    target: str
    strength: float          # mean over models
    consistency: float       # mean over models
    score: float             # mean over models of strength * consistency


@dataclass
class PromptReport:
    source: str
    target: str
    members: list[MemberFigures]
    pairs: list[PairFigures]
    verdicts: list[str]
    ok: bool
    alternatives: list[Alternative] = field(default_factory=list)
    suggestion: Alternative | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """Plain-text report for terminals."""
        lines = [f"'{self.source}' -> '{self.target}'", "",
                 f"{'CLIP model':14} {'dim':>4} {'strength':>9} {'consistency':>12}"]
        for m in self.members:
            lines.append(f"{m.model:14} {m.dim:>4} {m.strength:9.3f} {m.consistency:12.3f}")
        lines.append(f"(weak below strength {WEAK_STRENGTH}; ambiguous below consistency {AMBIGUOUS_CONSISTENCY})")
        for p in self.pairs:
            a, b = p.models
            if p.same_space:
                lines.append(f"{a} vs {b}: same embedding space, directions agree at cosine {p.agreement:.3f}")
            else:
                lines.append(f"{a} vs {b}: separate embedding spaces; strengths {p.strengths[0]:.3f} vs {p.strengths[1]:.3f}")
        lines.append("")
        lines += [f"verdict: {v}" for v in self.verdicts]
        lines += [f"warning: {w}" for w in self.warnings]
        if len(self.alternatives) > 1:
            lines += ["", "measured alternatives (mean over models):",
                      f"  {'source':18} {'target':28} {'strength':>9} {'consistency':>12}"]
            for alt in self.alternatives:
                lines.append(f"  {alt.source[:18]:18} {alt.target[:28]:28} {alt.strength:9.3f} {alt.consistency:12.3f}")
        if self.suggestion is not None:
            s = self.suggestion
            lines.append(f"suggestion: try '{s.source}' -> '{s.target}' (strength {s.strength:.3f}, "
                         f"consistency {s.consistency:.3f})")
        return "\n".join(lines)


# ------------------------------------------------------------------ the figures
def direction_figures(member: ClipMember, source: str, target: str, templates=IMAGENET_TEMPLATES) -> MemberFigures:
    """Strength and consistency of one model's text direction (see the module docstring)."""
    src = member.text_features(source, templates)
    tgt = member.text_features(target, templates)
    diffs = (tgt - src).double()                                   # (T, D) per-template directions
    mean = diffs.mean(0)
    cos = F.cosine_similarity(diffs, mean.expand_as(diffs), dim=-1)
    worst = torch.argsort(cos)[:3].tolist()
    return MemberFigures(member.name, int(src.shape[-1]), float(mean.norm()), float(cos.mean()),
                         [list(templates)[i] for i in worst])


def raw_direction(member: ClipMember, source: str, target: str, templates=IMAGENET_TEMPLATES) -> torch.Tensor:
    """mean_t(e_t(target) - e_t(source)) before normalisation (its norm is the strength)."""
    return (member.text_features(target, templates) - member.text_features(source, templates)).double().mean(0)


def same_space(a: ClipMember, b: ClipMember, texts, templates=IMAGENET_TEMPLATES) -> bool:
    """Measured: equal width, and both models embed the same prompts at nearly the same unit vectors."""
    ea, eb = a.text_features(texts[0], templates), b.text_features(texts[0], templates)
    if ea.shape[-1] != eb.shape[-1]:
        return False
    cos = [F.cosine_similarity(a.text_features(t, templates).to(eb.device), b.text_features(t, templates), dim=-1).mean()
           for t in texts]
    return float(torch.stack(cos).mean()) >= SAME_SPACE_MIN_COS


def pair_figures(a: ClipMember, b: ClipMember, fa: MemberFigures, fb: MemberFigures, source: str, target: str,
                 templates=IMAGENET_TEMPLATES) -> PairFigures:
    shared = same_space(a, b, (source, target), templates)
    agreement = None
    if shared:
        da, db = raw_direction(a, source, target, templates), raw_direction(b, source, target, templates)
        agreement = float(F.cosine_similarity(da.to(db.device), db, dim=0))
    return PairFigures((a.name, b.name), shared, agreement, (fa.strength, fb.strength))


# ------------------------------------------------------------------ verdicts and rewordings
def verdicts_for(members: list[MemberFigures], pairs: list[PairFigures]) -> list[str]:
    out = []
    weak = [m for m in members if m.strength < WEAK_STRENGTH]
    if weak:
        names = ", ".join(f"{m.model} {m.strength:.3f}" for m in weak)
        out.append(f"weak direction: the target is close to the source (strength {names} < {WEAK_STRENGTH}); "
                   "describe a bigger change or a more distinct target")
    vague = [m for m in members if m.consistency < AMBIGUOUS_CONSISTENCY]
    if vague:
        names = ", ".join(f"{m.model} {m.consistency:.3f}" for m in vague)
        out.append(f"templates disagree: the target is ambiguous (consistency {names} < {AMBIGUOUS_CONSISTENCY}); "
                   "use a more specific, concrete description")
    for p in pairs:
        if p.same_space and p.agreement is not None and p.agreement < MODELS_DISAGREE:
            out.append(f"models disagree: {p.models[0]} and {p.models[1]} point different ways "
                       f"(cosine {p.agreement:.3f} < {MODELS_DISAGREE}); the ensemble will pull in two directions")
    if not out:
        out.append("good: a clear and consistent direction")
    return out


def _article_free(text: str) -> str:
    return re.sub(r"^(?:an?|the)\s+", "", text.strip(), flags=re.IGNORECASE)


def target_variants(target: str) -> list[str]:
    """The target as given, without a leading article, and '<a> X of Y' read as 'X' and 'Y X'."""
    target = target.strip()
    out = [target, _article_free(target)]
    m = re.match(r"^(?:an?\s+|the\s+)?(.+?)\s+of\s+(?:an?\s+|the\s+)?(.+)$", target, flags=re.IGNORECASE)
    if m:
        out += [m.group(1), f"{m.group(2)} {m.group(1)}"]
    return _unique(out)


def source_variants(source: str) -> list[str]:
    return _unique([source.strip(), *SOURCE_ALTERNATIVES])


def _unique(texts) -> list[str]:
    seen, out = set(), []
    for t in texts:
        if t and t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    return out


def measure(members: list[ClipMember], source: str, target: str, templates=IMAGENET_TEMPLATES) -> Alternative:
    figs = [direction_figures(m, source, target, templates) for m in members]
    n = len(figs)
    return Alternative(source, target, sum(f.strength for f in figs) / n, sum(f.consistency for f in figs) / n,
                       sum(f.score for f in figs) / n)


def best_alternative(original: Alternative, alternatives: list[Alternative]) -> Alternative | None:
    """The best-scoring rewording when it is clearly better than ``original``, else None."""
    better = [a for a in alternatives if (a.source, a.target) != (original.source, original.target)
              and a.score >= CLEARLY_BETTER * original.score
              and a.consistency >= original.consistency - CONSISTENCY_SLACK]
    return max(better, key=lambda a: a.score, default=None)


# ------------------------------------------------------------------ the public entry point
@torch.no_grad()
def check_prompt(source: str, target: str, clip_members: list[ClipMember], alternatives: bool = True,
                 templates=IMAGENET_TEMPLATES) -> PromptReport:
    """Measure a source -> target prompt pair on each CLIP model and judge it in plain language.

    Raises :class:`PromptError` for unusable prompts (empty, identical), like training would."""
    if not clip_members:
        raise ValueError("give at least one CLIP model to check the prompt with")
    warnings = check_prompts(source, target, clip_members[0].tokenizer)
    source, target = source.strip(), target.strip()
    figs = [direction_figures(m, source, target, templates) for m in clip_members]
    pairs = [pair_figures(clip_members[i], clip_members[j], figs[i], figs[j], source, target, templates)
             for i in range(len(clip_members)) for j in range(i + 1, len(clip_members))]
    verdicts = verdicts_for(figs, pairs)
    ok = verdicts[0].startswith("good")
    report = PromptReport(source, target, figs, pairs, verdicts, ok, warnings=warnings)
    if alternatives:
        n = len(figs)
        original = Alternative(source, target, sum(f.strength for f in figs) / n,
                               sum(f.consistency for f in figs) / n, sum(f.score for f in figs) / n)
        measured = [original]
        for s in source_variants(source):
            for t in target_variants(target):
                if (s, t) == (source, target) or s.lower() == t.lower():
                    continue
                try:
                    check_prompts(s, t)
                except PromptError:
                    continue
                measured.append(measure(clip_members, s, t, templates))
        report.alternatives = measured
        report.suggestion = best_alternative(original, measured)
    return report
