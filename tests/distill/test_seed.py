"""seed_student: layer placement, weights carried over from the teacher, seeding mode and reproducibility."""

from __future__ import annotations

import pytest
import torch

from mmmamba import ATTENTION, MAMBA2
from mmmamba.distill.seed import seed_student
from mmmamba.layers.attention import Attention
from mmmamba.layers.mamba2 import Mamba2Mixer


@pytest.mark.parametrize(
    "spec,attn",
    [(None, []), ("none", []), ("every:2", [0, 2]), ("every:4", [0]), ([1, 3], [1, 3]), ("0,3", [0, 3]),
     ("tail-interleaved:2", [1, 3]), ("head-stacked:1", [0]), ("tail-stacked:2", [2, 3])],
)
def test_placement(tiny_teacher, spec, attn):
    s = seed_student(tiny_teacher, spec)
    assert s.config.attention_layers == attn
    assert s.config.layer_types == [ATTENTION if i in attn else MAMBA2 for i in range(4)]
    for i, layer in enumerate(s.model.layers):
        assert isinstance(layer.mixer, Attention if i in attn else Mamba2Mixer)


def test_bad_placement(tiny_teacher):
    with pytest.raises(ValueError, match="out of range"):
        seed_student(tiny_teacher, [0, 4])
    with pytest.raises(ValueError, match="unknown"):
        seed_student(tiny_teacher, "sometimes:2")


def test_teacher_weights_carried_over(tiny_teacher):
    before = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    s = seed_student(tiny_teacher, [0, 3])
    sd = s.state_dict()
    for k, v in before.items():
        assert torch.equal(sd[k], v), k  # embeddings, norms, MLPs, attention layers, and q/k/v/o of Mamba layers
    for k, v in tiny_teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher modified: {k}"
    new = set(sd) - set(before)
    assert all(".mixer." in k and k.split(".")[2] in ("1", "2") for k in new)
    assert {k.split(".mixer.")[1] for k in new} == {"conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_bias",
                                                    "A_log", "g_proj.weight", "g_norm.weight"}
    assert s.config.layer_types != tiny_teacher.config.layer_types
    assert tiny_teacher.config.layer_types == [ATTENTION] * 4


def test_hybrid_attention_layers_match_teacher_outputs(tiny_teacher):
    """Kept attention layers are the teacher's: an all-attention placement reproduces the teacher exactly."""
    s = seed_student(tiny_teacher, [0, 1, 2, 3])
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(s(ids).logits, tiny_teacher(ids).logits)


@pytest.mark.parametrize("mode", ["mimic", "inherit", "scratch"])
def test_modes(tiny_teacher, mode):
    s = seed_student(tiny_teacher, None, mode=mode)
    for t_layer, s_layer in zip(tiny_teacher.model.layers, s.model.layers):
        same = [torch.equal(getattr(s_layer.mixer, n).weight, getattr(t_layer.mixer, n).weight)
                for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        assert same == ([True] * 4 if mode != "scratch" else [False, False, False, True])
        m = s_layer.mixer
        identity = torch.equal(m.conv1d.weight[:, 0, 0], torch.zeros(m.conv_dim))
        assert identity == (mode == "mimic")
        assert torch.equal(m.A_log, torch.ones_like(m.A_log)) == (mode == "mimic")


def test_mimic_values_in_every_layer(tiny_teacher):
    s = seed_student(tiny_teacher, "every:4")
    for i in s.config.mamba_layers:
        m = s.model.layers[i].mixer
        assert torch.equal(m.conv1d.weight[:, 0, -1], torch.ones(m.conv_dim))
        assert torch.equal(m.dt_proj.weight, torch.zeros_like(m.dt_proj.weight))
        dt = torch.nn.functional.softplus(m.dt_bias)
        assert bool(((dt > 0.999e-3) & (dt < 0.1001)).all())
        assert torch.equal(m.A_log, torch.ones_like(m.A_log))
        assert torch.equal(m.g_norm.weight, torch.ones_like(m.g_norm.weight))


def test_seed_is_reproducible(tiny_teacher):
    a, b = seed_student(tiny_teacher, None, seed=0), seed_student(tiny_teacher, None, seed=0)
    c = seed_student(tiny_teacher, None, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.1.mixer.g_proj.weight"], sc["model.layers.1.mixer.g_proj.weight"])
    # different layers get different draws
    assert not torch.equal(sa["model.layers.1.mixer.dt_bias"], sa["model.layers.2.mixer.dt_bias"])


def test_student_is_finite_and_differs_from_teacher(tiny_teacher):
    s = seed_student(tiny_teacher, "every:2")
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        out = s(ids).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, tiny_teacher(ids).logits)


def test_reseeding_a_student(tiny_teacher):
    """A student can be re-seeded with more Mamba layers; existing Mamba layers cannot become attention."""
    hybrid = seed_student(tiny_teacher, [0, 2])
    linear = seed_student(hybrid, None)
    assert linear.config.attention_layers == []
    for i in (1, 3):  # the Mamba-2 layers carried over unchanged
        for k, v in hybrid.model.layers[i].state_dict().items():
            assert torch.equal(linear.model.layers[i].state_dict()[k], v)
    with pytest.raises(ValueError, match="already Mamba-2"):
        seed_student(hybrid, [1])


def test_dtype_and_generation_config(tiny_teacher):
    tiny_teacher.generation_config.eos_token_id = 5
    s = seed_student(tiny_teacher.to(torch.bfloat16), None)
    assert s.dtype == torch.bfloat16 and s.generation_config.eos_token_id == 5
