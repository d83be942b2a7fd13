import json

import pytest
import torch
from torch import nn

from nada_core.__main__ import main
from nada_core.guidance.clip_guide import IMAGENET_TEMPLATES, ClipMember, PromptError
from nada_core.guidance.prompt_check import (
    AMBIGUOUS_CONSISTENCY,
    WEAK_STRENGTH,
    check_prompt,
    source_variants,
    target_variants,
)
from nada_core.models.tiny import tiny_clip


def tiny_member(seed=0, embed_dim=32, name=None):
    model, tok = tiny_clip(seed=seed, embed_dim=embed_dim)
    return ClipMember(name or f"tiny{seed}", model, tok)


def hand_figures(model, tok, source, target):
    """Strength and consistency computed one template at a time, in float64."""
    def unit(text):
        e = model.encode_text(tok([text]))[0].double()
        return e / e.norm()

    with torch.no_grad():
        diffs = torch.stack([unit(t.format(target)) - unit(t.format(source)) for t in IMAGENET_TEMPLATES])
    mean = diffs.mean(0)
    cos = [(d @ mean / (d.norm() * mean.norm())).item() for d in diffs]
    return mean.norm().item(), sum(cos) / len(cos), mean


def test_figures_equal_a_hand_computation_on_the_tiny_clip():
    member = tiny_member()
    report = check_prompt("photo", "sketch", [member], alternatives=False)
    strength, consistency, _ = hand_figures(member.model, member.tokenizer, "photo", "sketch")
    (fig,) = report.members
    assert len(IMAGENET_TEMPLATES) == 79
    assert fig.dim == 32
    assert fig.strength == pytest.approx(strength, abs=1e-5)
    assert fig.consistency == pytest.approx(consistency, abs=1e-5)
    assert 0 < fig.consistency < 1 and fig.strength > 0
    assert len(fig.weakest_templates) == 3 and all("{}" in t for t in fig.weakest_templates)


def test_models_in_one_space_are_compared_by_cosine_others_side_by_side():
    a, same = tiny_member(0, name="a"), tiny_member(0, name="a-copy")
    other, wide = tiny_member(1, name="b"), tiny_member(2, embed_dim=48, name="wide")
    report = check_prompt("photo", "sketch", [a, same, other, wide], alternatives=False)
    pairs = {p.models: p for p in report.pairs}
    assert len(pairs) == 6
    twin = pairs[("a", "a-copy")]
    assert twin.same_space and twin.agreement == pytest.approx(1.0, abs=1e-6)
    # independently initialised models share the width but not the space: no cosine between them
    sep = pairs[("a", "b")]
    assert not sep.same_space and sep.agreement is None
    s_a, _, d_a = hand_figures(a.model, a.tokenizer, "photo", "sketch")
    s_b, _, _ = hand_figures(other.model, other.tokenizer, "photo", "sketch")
    assert sep.strengths == pytest.approx((s_a, s_b), abs=1e-5)
    assert not pairs[("a", "wide")].same_space  # different widths


# ------------------------------------------------------------------ a CLIP-like stub with chosen embeddings
WORDS = ["photo", "human", "face", "close", "far", "vague"]


class StubTokenizer:
    context_length = 77

    def __init__(self):
        self.texts: list[str] = []

    def encode(self, text):
        return text.split()

    def __call__(self, texts):
        ids = []
        for t in texts:
            self.texts.append(t)
            ids.append(len(self.texts) - 1)
        return torch.tensor(ids)


class StubText(nn.Module):
    """Text embedding = word vector + a little per-template variation; 'close' sits next to 'photo',
    'vague' moves away from 'photo' in a random direction per template (the templates disagree)."""

    def __init__(self, tok, dim=16):
        super().__init__()
        self.tok = tok
        self.dummy = nn.Parameter(torch.zeros(1))
        g = torch.Generator().manual_seed(0)
        self.word = {w: torch.randn(dim, generator=g) for w in WORDS}
        self.word["close"] = self.word["photo"] + 0.08 * torch.randn(dim, generator=g)
        self.per_template = torch.randn(len(IMAGENET_TEMPLATES), dim, generator=g)
        self.noise = torch.randn(len(IMAGENET_TEMPLATES), dim, generator=g)
        self.lookup = {t.format(w): (i, w.lower()) for i, t in enumerate(IMAGENET_TEMPLATES)
                       for w in WORDS + ["Photo", "Human", "Face"]}

    def encode_text(self, ids):
        rows = []
        for i in ids.tolist():
            ti, w = self.lookup[self.tok.texts[i]]
            v = self.word[w] + 0.1 * self.per_template[ti]
            if w == "vague":  # next to 'photo', pushed a different random way in every template
                v = self.word["photo"] + 0.1 * self.per_template[ti] + 0.5 * self.noise[ti]
            rows.append(v)
        return torch.stack(rows)


def stub_member():
    tok = StubTokenizer()
    return ClipMember("stub", StubText(tok), tok)


def test_verdicts_flip_for_weak_and_ambiguous_prompts():
    m = stub_member()
    good = check_prompt("photo", "far", [m], alternatives=False)
    assert good.ok and good.verdicts == ["good: a clear and consistent direction"]
    assert good.members[0].strength > WEAK_STRENGTH and good.members[0].consistency > AMBIGUOUS_CONSISTENCY

    weak = check_prompt("photo", "close", [m], alternatives=False)
    assert not weak.ok and weak.members[0].strength < WEAK_STRENGTH
    assert weak.verdicts[0].startswith("weak direction: the target is close to the source")

    vague = check_prompt("photo", "vague", [m], alternatives=False)
    assert not vague.ok and vague.members[0].consistency < AMBIGUOUS_CONSISTENCY
    assert any(v.startswith("templates disagree: the target is ambiguous") for v in vague.verdicts)


def test_suggestion_comes_from_measured_alternatives():
    m = stub_member()
    weak = check_prompt("photo", "close", [m])
    pairs = {(a.source, a.target) for a in weak.alternatives}
    assert {("photo", "close"), ("Human", "close"), ("Face", "close")} <= pairs
    assert ("Photo", "close") not in pairs  # same as the given source up to case
    best = max(weak.alternatives, key=lambda a: a.score)
    assert weak.suggestion is not None and (weak.suggestion.source, weak.suggestion.target) == (best.source, best.target)
    assert weak.suggestion.source in ("Human", "Face") and weak.suggestion.score > 1.15 * weak.alternatives[0].score
    assert "suggestion: try" in weak.table()
    good = check_prompt("photo", "far", [m])  # no rewording measures clearly better than a good prompt
    assert good.suggestion is None or good.suggestion.score >= 1.15 * good.alternatives[0].score


def test_rewordings_and_refusals():
    assert target_variants("a painting of Mona Lisa") == ["a painting of Mona Lisa", "painting of Mona Lisa",
                                                          "painting", "Mona Lisa painting"]
    assert target_variants("Sketch") == ["Sketch"]
    assert source_variants("photo") == ["photo", "Human", "Face"]
    with pytest.raises(PromptError, match="no direction"):
        check_prompt("Dog", "dog", [tiny_member()])


def test_cli_prints_a_table_or_json(capsys):
    assert main(["check-prompt", "--source", "photo", "--target", "sketch", "--clip", "tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    member = tiny_member()
    strength, consistency, _ = hand_figures(member.model, member.tokenizer, "photo", "sketch")
    assert data["members"][0]["strength"] == pytest.approx(strength, abs=1e-5)
    assert data["members"][0]["consistency"] == pytest.approx(consistency, abs=1e-5)
    assert {"verdicts", "ok", "alternatives", "suggestion", "pairs"} <= set(data)
    assert main(["check-prompt", "--target", "sketch", "--clip", "tiny", "--no-alternatives"]) == 0
    out = capsys.readouterr().out
    assert "strength" in out and "consistency" in out and "verdict:" in out


def test_gallery_entries_are_usable_prompts_with_sane_settings():
    from nada_core.guidance.clip_guide import DEFAULT_MODELS, check_prompts
    from nada_core.guidance.gallery import EXTERNAL_BASES, GALLERY, PRESETS, get
    from nada_core.store import weights
    from nada_core.training.adapt import Recipe

    manifest = weights.load_manifest()
    bases = {n for n, a in manifest.items() if a.kind == "generator"} | {"ffhq"} | set(EXTERNAL_BASES)
    tok = tiny_member().tokenizer  # the real BPE tokenizer: no prompt is truncated
    assert len(GALLERY) >= 20 and len({g.name.lower() for g in GALLERY}) == len(GALLERY)
    for g in GALLERY:
        assert check_prompts(g.source, g.target, tok) == [], g.name
        assert g.base in bases, g.name
        assert 50 <= g.iterations <= 1000 and g.preset in PRESETS, g.name
        assert len(g.clip_models) == len(g.clip_weights) and all(w > 0 for w in g.clip_weights), g.name
        assert set(g.clip_models) <= set(DEFAULT_MODELS), g.name
        if g.ready_model:
            assert manifest[g.ready_model].kind == "style" and manifest[g.ready_model].extra["base"] == "ffhq-1024"
        Recipe(**g.recipe_fields(18)).validate(18)  # every entry makes a valid training recipe
    shape = get("werewolf").recipe_fields(18)
    assert shape["k"] == 12 and shape["mixing"] == 0.9
    assert get("Sketch").recipe_fields(14)["k"] is None
    names = {g.name for g in GALLERY}
    for must in ["Sketch", "Pixar", "Werewolf", "Joker", "Mona Lisa", "Zombie", "Tolkien elf", "Modigliani",
                 "Ukiyo-e", "Cubism", "Disney princess", "Nicolas Cage", "Super Saiyan", "White Walker",
                 "Dog to cat", "Dog to pig", "Dog to Nicolas Cage"]:
        assert must in names
    assert any(g.base == "lsun-church" for g in GALLERY)


def test_the_adapt_tab_offers_the_suggestion_as_a_button_that_fills_the_form(monkeypatch):
    from demo import adapt_tab
    from demo.state import Studio

    studio = Studio(device="cpu", tiny=True)
    m = stub_member()
    monkeypatch.setattr(studio, "prompt_report", lambda s, t, names: check_prompt(s, t, [m]))
    text, button, pair = adapt_tab.check(studio, "photo", "close", ["tiny"], None)
    assert "Try **" in text and button["visible"] is True and pair is not None
    assert pair[0] in ("Human", "Face") and pair[1] == "close" and button["value"] == f"Use {pair[0]} -> close"
    assert adapt_tab.use_suggestion(pair) == pair          # the click fills source and target
    text, button, pair = adapt_tab.check(studio, "photo", "far", ["tiny"], None)  # a good prompt: no button
    assert "good" in text and button["visible"] is False and pair is None
    assert adapt_tab.check(studio, "", "far", ["tiny"], None) == ("", {"__type__": "update", "visible": False}, None)
