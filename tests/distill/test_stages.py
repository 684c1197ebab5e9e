"""Stages: exact trainable sets, the layer-wise pass (teacher inputs, SDPA targets, teacher stream carried on),
padding, the end-to-end KL and stage-3 placement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmmamba.distill.seed import seed_student
from mmmamba.distill.stages import (
    EndToEndDistill,
    LayerwiseDistill,
    apply_placement,
    check_shared_weights,
    enable_checkpointing,
    right_padded,
    set_checkpointing,
    set_trainable,
    trainable_parameter_names,
)
from mmmamba.ops.mse import masked_mse

MIXER = "model.layers.{}.mixer."
S1 = ["A_log", "conv1d.bias", "conv1d.weight", "dt_bias", "dt_proj.weight", "g_norm.weight", "g_proj.weight"]
QKV = ["k_proj.weight", "q_proj.weight", "v_proj.weight"]
S3 = ["conv1d.bias", "conv1d.weight", "dt_proj.weight", "g_norm.weight", "g_proj.weight"] + QKV



def _names(layers, parts):
    return sorted(MIXER.format(i) + p for i in layers for p in parts)


@pytest.fixture
def hybrid(tiny_teacher):
    """Student with layer 1 kept as attention, layers 0, 2, 3 Mamba-2."""
    return seed_student(tiny_teacher, [1])


def test_trainable_names_per_stage(hybrid):
    m = [0, 2, 3]
    assert sorted(trainable_parameter_names(hybrid, 1)) == _names(m, S1)
    assert sorted(trainable_parameter_names(hybrid, 2)) == _names(m, S1 + QKV)
    assert sorted(trainable_parameter_names(hybrid, 3)) == _names(m, S3)
    assert sorted(trainable_parameter_names(hybrid, 3, train_a=True)) == _names(m, S3 + ["A_log", "dt_bias"])
    assert sorted(trainable_parameter_names(hybrid, 2, override=["g_proj", "o_proj"])) == _names(
        m, ["g_proj.weight", "o_proj.weight"])
    with pytest.raises(ValueError, match="unknown"):
        trainable_parameter_names(hybrid, 2, override=["mlp"])


def test_set_trainable_freezes_everything_else(hybrid):
    names = set(set_trainable(hybrid, 2))
    got = {n for n, p in hybrid.named_parameters() if p.requires_grad}
    assert got == names == set(_names([0, 2, 3], S1 + QKV))
    # never o_proj, MLPs, norms, embeddings, head or the attention layer
    assert not any(".o_proj." in n or ".mlp." in n or "layernorm" in n or "embed" in n for n in got)
    assert not any(n.startswith("model.layers.1.") for n in got)


def test_trainable_names_include_qkv_biases_when_present(make_model):
    teacher = make_model(layer_types=["attention"] * 4, seed=3, qkv_bias=True)
    student = seed_student(teacher, None)
    names = trainable_parameter_names(student, 2)
    assert MIXER.format(0) + "q_proj.bias" in names and MIXER.format(3) + "v_proj.bias" in names
    assert MIXER.format(0) + "q_proj.bias" not in trainable_parameter_names(student, 1)


def _ids(b=2, l=19, seed=0, vocab=97):
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


def _teacher_capture(teacher, ids, mask=None):
    """The teacher's own per-layer normed inputs and per-head attention outputs in an ordinary forward."""
    r_in, y_out, hooks = {}, {}, []
    for i, layer in enumerate(teacher.model.layers):
        hooks.append(layer.input_layernorm.register_forward_hook(lambda m, a, o, i=i: r_in.__setitem__(i, o)))
        orig = layer.mixer.heads

        def heads(*a, _orig=orig, _i=i, **k):
            y = _orig(*a, **k)
            y_out[_i] = y
            return y

        layer.mixer.heads = heads
    with torch.no_grad():
        teacher(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    for layer in teacher.model.layers:
        del layer.mixer.heads
    return r_in, y_out


def test_layerwise_feeds_teacher_inputs_and_sdpa_targets(tiny_teacher):
    student = seed_student(tiny_teacher, None)
    module = LayerwiseDistill(student, tiny_teacher)
    ids = _ids()
    seen_r, seen_y = {}, {}
    for i, layer in enumerate(student.model.layers):
        mixer = layer.mixer
        orig = mixer.ssm_heads  # what the stage-1 loss (`heads_mse`) and `heads` both run on the mixer input

        def ssm_heads(u, mask=None, state=None, _orig=orig, _i=i):
            seen_r[_i] = u
            return _orig(u, mask, state)

        mixer.ssm_heads = ssm_heads
    t_layers = module.teacher.model.layers
    r_ref, y_ref = _teacher_capture(tiny_teacher, ids)  # also captures what the module's teacher path gives
    for i in range(4):
        t_orig = t_layers[i].mixer.heads

        def t_heads(*a, _orig=t_orig, _i=i, **k):
            seen_y[_i] = _orig(*a, **k)
            return seen_y[_i]

        t_layers[i].mixer.heads = t_heads
    module(ids)
    for layer in t_layers:
        del layer.mixer.heads
    for i in range(4):  # every Mamba-2 layer gets exactly the teacher's input for that layer
        assert torch.allclose(seen_r[i], r_ref[i], atol=1e-6, rtol=1e-5), i
        assert torch.allclose(seen_y[i], y_ref[i], atol=1e-6, rtol=1e-5), i


@pytest.mark.parametrize("target", ["heads", "output"])
def test_stage1_loss_is_zero_when_mixer_reproduces_target(tiny_teacher, target):
    student = seed_student(tiny_teacher, None)
    module = LayerwiseDistill(student, tiny_teacher, target=target)
    ids = _ids(l=11)
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    cos, sin = student.model.rotary[0](pos, torch.float32)
    for i, layer in enumerate(student.model.layers):  # the mixer's per-head output becomes the teacher's
        attn = module.teacher.model.layers[i].mixer
        layer.mixer.heads = lambda u, mask=None, state=None, a=attn: a.heads(u, cos, sin, None)
        layer.mixer.heads_mse = lambda u, t, mask=None, loss_mask=None, mx=layer.mixer: masked_mse(mx.heads(u), t,
                                                                                                    loss_mask)
    loss, m = module(ids)
    assert loss.item() == 0.0 and torch.equal(m["layer_mse"], torch.zeros(4))


def test_layerwise_loss_value_by_hand(tiny_teacher):
    """1000 x mean over layers of the per-head MSE, recomputed from the captured outputs."""
    student = seed_student(tiny_teacher, None)
    module = LayerwiseDistill(student, tiny_teacher)
    ids = _ids(l=9)
    r_ref, y_ref = _teacher_capture(tiny_teacher, ids)
    with torch.no_grad():
        loss, m = module(ids)
        mse = [F.mse_loss(student.model.layers[i].mixer.heads(r_ref[i]), y_ref[i]) for i in range(4)]
    assert torch.allclose(m["layer_mse"], torch.stack(mse), rtol=1e-5)
    assert loss.item() == pytest.approx(1000 * torch.stack(mse).mean().item(), rel=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_layerwise_padding_never_counts(tiny_teacher, side):
    student = seed_student(tiny_teacher, None)
    module = LayerwiseDistill(student, tiny_teacher)
    a, b = _ids(1, 12, seed=1), _ids(1, 7, seed=2)
    pad = torch.full((1, 5), 3)
    bb = torch.cat([b, pad], 1) if side == "right" else torch.cat([pad, b], 1)
    mb = torch.ones(1, 12, dtype=torch.long)
    if side == "right":
        mb[:, 7:] = 0
    else:
        mb[:, :5] = 0
    ids, mask = torch.cat([a, bb]), torch.cat([torch.ones(1, 12, dtype=torch.long), mb])
    with torch.no_grad():
        _, m_batch = module(ids, mask)
        _, m_a = module(a)
        _, m_b = module(b)
        ids2 = ids.clone()
        ids2[mask == 0] = 50  # other pad ids: same loss
        _, m_batch2 = module(ids2, mask)
    expect = (12 * m_a["layer_mse"] + 7 * m_b["layer_mse"]) / 19  # token-weighted: padding never counts
    assert torch.allclose(m_batch["layer_mse"], expect, rtol=1e-4, atol=1e-7)
    assert torch.allclose(m_batch2["layer_mse"], m_batch["layer_mse"], rtol=1e-5, atol=1e-8)


def test_stage2_teacher_path_stays_frozen(tiny_teacher):
    student = seed_student(tiny_teacher, None)
    set_trainable(student, 2)
    module = LayerwiseDistill(student, tiny_teacher)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    q_before = student.model.layers[0].mixer.q_proj.weight.clone()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        "student." + n for n in trainable_parameter_names(student, 2)}
    loss, _ = module(_ids())
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in module.teacher.state_dict().items())
    assert not torch.equal(q_before, student.model.layers[0].mixer.q_proj.weight)
    # the student's W_Q is its own tensor, not the teacher's
    s_w, t_w = student.model.layers[0].mixer.q_proj.weight, tiny_teacher.model.layers[0].mixer.q_proj.weight
    assert s_w.data_ptr() != t_w.data_ptr()


@pytest.mark.parametrize("stage", [1, 2])
def test_layerwise_gradient_checkpointing_same_loss_and_grads(tiny_teacher, monkeypatch, stage):
    """Same loss and gradients, and the mixers really run again in the backward (checkpointing is not a no-op)."""
    from mmmamba.layers.mamba2 import Mamba2Mixer

    calls = []
    heads_mse = Mamba2Mixer.heads_mse
    monkeypatch.setattr(Mamba2Mixer, "heads_mse", lambda self, *a, **k: calls.append(1) or heads_mse(self, *a, **k))
    ids = _ids()
    grads = []
    for ckpt in (False, True):
        student = seed_student(tiny_teacher, None)
        set_trainable(student, stage)
        module = LayerwiseDistill(student, tiny_teacher, gradient_checkpointing=ckpt).train()
        calls.clear()
        loss, _ = module(ids)
        loss.backward()
        assert len(calls) == 4 * (2 if ckpt else 1)  # 4 Mamba-2 layers, recomputed once each under checkpointing
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters() if p.requires_grad]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(grads[0][1], grads[1][1]))


def test_end_to_end_kl_matches_dense(tiny_teacher):
    student = seed_student(tiny_teacher, [0])
    module = EndToEndDistill(student, tiny_teacher, temperature=2.0, positions="assistant", chunk_size=5)
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    loss, m = module(ids, mask, labels)
    with torch.no_grad():
        s = student(ids, attention_mask=mask).logits / 2
        t = tiny_teacher(ids, attention_mask=mask).logits / 2
    sel = torch.zeros_like(mask, dtype=torch.bool)
    sel[:, :-1] = labels[:, 1:] != -100
    kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1) * 4
    assert loss.item() == pytest.approx(kl[sel].mean().item(), rel=1e-4)
    assert int(m["kl_tokens"]) == int(sel.sum())


def test_end_to_end_teacher_is_not_a_parameter(tiny_teacher):
    student = seed_student(tiny_teacher, None)
    module = EndToEndDistill(student, tiny_teacher)
    assert {id(p) for p in module.parameters()} == {id(p) for p in student.parameters()}
    assert not any(k.startswith("teacher") for k in module.state_dict())


def test_apply_placement(tiny_teacher):
    student = seed_student(tiny_teacher, None)
    with torch.no_grad():
        student.model.layers[1].mixer.dt_bias.add_(1.0)
    hybrid = apply_placement(student, tiny_teacher, [0, 2])
    assert hybrid.config.attention_layers == [0, 2] and hybrid.config.mamba_layers == [1, 3]
    tsd, hsd, ssd = tiny_teacher.state_dict(), hybrid.state_dict(), student.state_dict()
    for k, v in hsd.items():
        ref = tsd[k] if k.startswith(("model.layers.0.mixer.", "model.layers.2.mixer.")) else ssd[k]
        assert torch.equal(v, ref), k
    assert apply_placement(student, tiny_teacher, []) is student
    with pytest.raises(ValueError, match="out of range"):
        apply_placement(student, tiny_teacher, [9])


def test_check_shared_weights(tiny_teacher, make_model):
    student = seed_student(tiny_teacher, None)
    check_shared_weights(student, tiny_teacher)
    other = make_model(layer_types=["attention"] * 4, seed=7)
    with pytest.raises(ValueError, match="not seeded from this teacher"):
        check_shared_weights(student, other)


def test_right_padded():
    assert right_padded(None)
    assert right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert not right_padded(torch.tensor([[0, 1, 1]]))
    assert not right_padded(torch.tensor([[1, 0, 1]]))


def test_end_to_end_gradient_checkpointing_same_grads(tiny_teacher):
    """Same loss and gradients; every student layer runs again in the backward; set_checkpointing(False) undoes it."""
    ids = _ids()
    out = []
    for ckpt in (False, True, "undone"):
        student = seed_student(tiny_teacher, [0])
        set_trainable(student, 3)
        if ckpt:
            enable_checkpointing(student)
        if ckpt == "undone":
            set_checkpointing(student, False)
        calls = []
        for i in student.config.mamba_layers:  # 1, 2, 3 (the recomputation stops early, after their mixers)
            student.model.layers[i].mixer.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        module = EndToEndDistill(student, tiny_teacher, positions="all").train()
        loss, _ = module(ids)
        loss.backward()
        assert len(calls) == 3 * (2 if ckpt is True else 1)
        out.append((loss.detach(), [p.grad.clone() for p in student.parameters() if p.requires_grad]))
    for other in out[1:]:
        assert torch.allclose(out[0][0], other[0], rtol=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(out[0][1], other[1]))
