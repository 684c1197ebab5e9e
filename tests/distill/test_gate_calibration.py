"""distill.gate_calibration: the calibrated output gate of seeded Mamba-2 mixers."""

import pytest
import torch
import torch.nn.functional as F

from mmmamba.distill.gate_calibration import calibrate_gates, capture_attention
from mmmamba.distill.seed import seed_student


def _mse(student, acts):
    return {i: F.mse_loss(student.model.layers[i].mixer.heads(u), t).item() for i, (u, t) in acts.items()}


def test_calibrated_gate_lowers_the_stage1_error(tiny_teacher):
    """(Whether the outputs also turn towards attention depends on a real teacher: measured on SmolLM2 in
    docs/results/quality/.)"""
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_teacher.config.vocab_size, (3, 24))
    acts = capture_attention(tiny_teacher.eval(), [ids[:2], ids[2:]])
    assert sorted(acts) == list(range(tiny_teacher.config.num_hidden_layers))
    u, t = acts[0]
    assert u.shape == (3, 24, tiny_teacher.config.hidden_size)
    assert t.shape == (3, 24, tiny_teacher.config.num_attention_heads, tiny_teacher.config.head_dim)
    student = seed_student(tiny_teacher, None, mode="mimic").eval()
    before = _mse(student, acts)
    assert calibrate_gates(student, acts) == sorted(acts)
    after = _mse(student, acts)
    for i in acts:
        assert after[i] < before[i]


@pytest.mark.slow
def test_calibrated_gate_turns_smollm2_mixers_towards_attention(smollm2_dir, smollm2_tokenizer):
    """On the real teacher the SSM core resembles attention, and with the calibrated gate so does the mixer."""
    from pydoc_data.topics import topics

    from mmmamba.teachers.hf import load_teacher

    teacher = load_teacher(smollm2_dir).eval()
    text = topics["for"] + topics["while"]
    ids = smollm2_tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :256]
    acts = capture_attention(teacher, [ids])
    acts = {i: acts[i] for i in (2, 10, 20)}
    student = seed_student(teacher, None, mode="mimic").eval()

    def cosine():
        return {i: F.cosine_similarity(student.model.layers[i].mixer.heads(u), t, dim=-1).mean().item()
                for i, (u, t) in acts.items()}

    before = cosine()
    calibrate_gates(student, acts)
    after = cosine()
    assert max(abs(c) for c in before.values()) < 0.1  # the paper's random gate: little resemblance
    assert min(after.values()) > 0.2


def test_calibrated_norm_weight_is_the_least_squares_fit(tiny_teacher):
    """The gated norm is linear in its weight, so the fitted weight zeroes the MSE's gradient."""
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_teacher.config.vocab_size, (2, 16))
    acts = capture_attention(tiny_teacher.eval(), [ids])
    student = seed_student(tiny_teacher, "0", mode="mimic").eval()
    assert calibrate_gates(student, acts) == [i for i in sorted(acts) if i != 0]
    mixer = student.model.layers[1].mixer
    u, t = acts[1]
    w = mixer.g_norm.weight
    w.requires_grad_(True)
    with torch.enable_grad():
        loss = F.mse_loss(mixer.heads(u), t, reduction="sum")
        (grad,) = torch.autograd.grad(loss, w)
    assert grad.abs().max() < 1e-4 * max(1.0, float(loss))
