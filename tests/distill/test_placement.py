"""Hybrid placement: every spec of parse_placement, and auto:N from per-layer KL sensitivity."""

from __future__ import annotations

import pytest
import torch

from mmmamba.distill.seed import seed_student
from mmmamba.distill.sensitivity import (
    auto_placement,
    candidate_layers,
    format_sensitivity,
    layer_sensitivity,
    resolve_placement,
    reverted_layer,
)
from mmmamba.models.placement import auto_count, layer_types_for, parse_placement


# ---------------------------------------------------------------------------------------------- static specs
@pytest.mark.parametrize(
    "spec, n, want",
    [
        ("every:4", 32, [0, 4, 8, 12, 16, 20, 24, 28]),  # the paper's mmMamba-hybrid (METHOD.md 4)
        ("head-interleaved:4", 30, [0, 4, 8, 12, 16, 20, 24, 28]),
        ("tail-interleaved:4", 32, [3, 7, 11, 15, 19, 23, 27, 31]),
        ("tail-interleaved:4", 30, [3, 7, 11, 15, 19, 23, 27, 29]),
        ("head-stacked:8", 32, list(range(8))),
        ("tail-stacked:8", 32, list(range(24, 32))),
        ("head-stacked:40", 32, list(range(32))),
        ("every:1", 4, [0, 1, 2, 3]),
        ("0,4, 8", 32, [0, 4, 8]),
        ("8,0,8", 32, [0, 8]),
        ([5, 1], 8, [1, 5]),
        ((2,), 8, [2]),
        ("none", 8, []),
        ("linear", 8, []),
        ("", 8, []),
        (None, 8, []),
    ],
)
def test_parse_placement(spec, n, want):
    assert parse_placement(spec, n) == want


@pytest.mark.parametrize(
    "spec, match",
    [("every:0", "positive"), ("every:x", "not an integer"), ("sideways:2", "unknown"), ("0,a", "list of layer"),
     ("0,9", "out of range"), ([-1], "out of range"), ("auto:2", "resolve_placement"), ("auto:x", "not an integer")],
)
def test_parse_placement_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_placement(spec, 8)


def test_auto_count_and_layer_types():
    assert auto_count("auto:3") == 3 and auto_count(" AUTO:0") == 0
    assert auto_count("every:4") is None and auto_count([1, 2]) is None and auto_count(None) is None
    with pytest.raises(ValueError):
        auto_count("auto:-1")
    assert layer_types_for([0, 2], 4) == ["attention", "mamba2", "attention", "mamba2"]
    assert resolve_placement("tail-stacked:2", 6) == ([4, 5], None)
    with pytest.raises(ValueError, match="needs the stage-2 student"):
        resolve_placement("auto:1", 4)


# ---------------------------------------------------------------------------------------------- auto:N
def make_batches(vocab, n=2, b=3, l=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (b, l), generator=g)
        am = torch.ones_like(ids)
        am[1, l - 7:] = 0  # right padding in one row
        out.append({"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100)})
    return out


@pytest.fixture
def pair(tiny_teacher):
    """(teacher, stage-2-like student) where student layer 2's Mamba-2 mixer is badly off."""
    student = seed_student(tiny_teacher).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        mixer = student.model.layers[2].mixer
        mixer.o_proj.weight.copy_(torch.randn(mixer.o_proj.weight.shape, generator=g))  # ~50x the init scale
        mixer.g_proj.weight.mul_(10)
    return tiny_teacher, student


def test_auto_placement_picks_the_layer_that_matters(pair, capsys):
    teacher, student = pair
    batches = make_batches(teacher.config.vocab_size)
    layers, scores = auto_placement(student, teacher, batches, 1)
    assert layers == [2]
    assert sorted(scores) == [0, 1, 2, 3]  # every layer's sensitivity
    others = max(v for i, v in scores.items() if i != 2)
    assert scores[2] > 5 * max(others, 1e-9)
    two, _ = auto_placement(student, teacher, batches, 2)
    assert 2 in two and len(two) == 2 and two == sorted(two)

    chosen, sc = resolve_placement("auto:1", 4, student=student, teacher=teacher, batches=batches)
    assert chosen == [2] and sc == pytest.approx(scores)
    table = capsys.readouterr().out
    assert "chosen attention layers: [2]" in table
    rows = [ln.split() for ln in table.splitlines() if ln.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3] and rows[2][-1] == "yes" and rows[2][-2] == "1"


def test_sensitivity_equals_a_real_hybrid(pair):
    """Reverting layer i in place gives exactly the KL of a student built with layer i as attention."""
    teacher, student = pair
    batches = make_batches(teacher.config.vocab_size, seed=1)
    sens = layer_sensitivity(student, teacher, batches)
    for i in range(4):
        hybrid = seed_student(teacher, attention_layers=[i]).eval()
        sd = {k: v for k, v in student.state_dict().items() if not k.startswith(f"model.layers.{i}.mixer.")}
        missing, unexpected = hybrid.load_state_dict(sd, strict=False)
        assert not unexpected
        ref = layer_sensitivity(hybrid, teacher, batches, layers=[])
        assert sens.kl[i] == pytest.approx(ref.base_kl, rel=1e-5, abs=1e-9)
    # the base KL is the usual per-token KL over real (non-pad) positions
    with torch.no_grad():
        kl_sum, n = 0.0, 0
        for b in batches:
            lt = torch.log_softmax(teacher(**b).logits, -1)
            ls = torch.log_softmax(student(**b).logits, -1)
            m = b["attention_mask"].bool()
            kl_sum += (lt.exp() * (lt - ls)).sum(-1)[m].sum().item()
            n += int(m.sum())
    assert sens.base_kl == pytest.approx(kl_sum / n, rel=1e-5)
    assert sens.tokens == n


def test_student_restored_and_modes(pair):
    teacher, student = pair
    batches = make_batches(teacher.config.vocab_size)
    before = student(**batches[0]).logits
    mixers = [layer.mixer for layer in student.model.layers]
    student.train()
    auto_placement(student, teacher, batches, 2)
    assert student.training and not teacher.training
    assert [layer.mixer for layer in student.model.layers] == mixers
    assert [layer.layer_type for layer in student.model.layers] == student.config.layer_types
    student.eval()
    assert torch.equal(student(**batches[0]).logits, before)
    with reverted_layer(student, teacher, 1):
        assert student.model.layers[1].mixer is teacher.model.layers[1].mixer
    assert student.model.layers[1].mixer is mixers[1]


def test_auto_options_and_errors(pair):
    teacher, student = pair
    batches = make_batches(teacher.config.vocab_size)
    a = layer_sensitivity(student, teacher, batches, tokens="assistant", temperature=2.0, chunk=5, max_batches=1)
    assert a.tokens == sum(int((batches[0]["labels"][:, 1:] != -100).sum()) for _ in [0])
    assert auto_placement(student, teacher, batches, 0) == ([], {})
    with pytest.raises(ValueError, match="only 4 layers"):
        auto_placement(student, teacher, batches, 5)
    with pytest.raises(ValueError, match="tokens must be"):
        layer_sensitivity(student, teacher, batches, tokens="some")
    # layers already attention in the student are not candidates
    hybrid = seed_student(teacher, attention_layers=[0, 3])
    assert candidate_layers(hybrid, teacher) == [1, 2]
    with pytest.raises(ValueError, match="cannot be reverted"):
        layer_sensitivity(hybrid, teacher, batches, layers=[0])
    layers, scores = auto_placement(hybrid, teacher, batches, 1)
    assert sorted(scores) == [1, 2] and len(layers) == 1
    text = format_sensitivity(scores, layers)
    assert "chosen attention layers" in text and "KL reverted" not in text


def test_auto_placement_on_real_heldout_batches(smollm2_tokenizer, make_model):
    """auto:N on batches from build_dataloader (pydoc held-out split), vocabulary of the real tokenizer."""
    from mmmamba.distill.data import build_dataloader

    vocab = len(smollm2_tokenizer)
    teacher = make_model(layer_types=["attention"] * 4, seed=2, vocab_size=vocab)
    student = seed_student(teacher).eval()
    with torch.no_grad():
        student.model.layers[1].mixer.v_proj.weight.mul_(40)
    loader = build_dataloader({"sources": ["pydoc"], "max_length": 32}, smollm2_tokenizer, teacher.config, 2, 0,
                              split="heldout")
    layers, scores = auto_placement(student, teacher, loader, 1, max_batches=1, chunk=32)
    assert layers == [1] and len(scores) == 4
