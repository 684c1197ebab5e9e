"""Mamba2Mixer: hand-written reference of METHOD.md §2.3, recurrent decoding, padding, seeding (§2.2), GQA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmmamba.layers.attention import Attention
from mmmamba.layers.mamba2 import SEED_MODES, Mamba2Mixer, SSMState
from mmmamba.ops.mse import masked_mse


def make_pair(make_config, randomize, heads=6, kv=2, d=8, hidden=48, seed=0, **kw):
    cfg = make_config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=d, **kw)
    torch.manual_seed(seed)
    attn, mixer = Attention(cfg, 0), Mamba2Mixer(cfg, 0)
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            lin.weight.normal_(0, 0.2)
    mixer.init_from_attention(attn, mode="mimic", generator=torch.Generator().manual_seed(seed))
    randomize(mixer, seed)
    return cfg, attn, mixer.eval()


@torch.no_grad()
def reference_mixer(m: Mamba2Mixer, u: torch.Tensor) -> torch.Tensor:
    """METHOD.md §2.3 written out step by step with explicit loops (float64)."""
    u = u.double()
    b, l, _ = u.shape
    h, kv, d = m.num_heads, m.num_kv_heads, m.head_dim
    rep = h // kv
    W = {n: getattr(m, n).weight.double() for n in ("q_proj", "k_proj", "v_proj", "o_proj", "dt_proj", "g_proj")}
    q, k, v = u @ W["q_proj"].T, u @ W["k_proj"].T, u @ W["v_proj"].T
    xbc = torch.cat([v, k, q], -1)  # channel order [v | k | q]
    w, cb = m.conv1d.weight[:, 0].double(), m.conv1d.bias.double()
    K = w.shape[-1]
    conv = torch.zeros_like(xbc)
    for t in range(l):
        acc = cb.clone().expand(b, -1).clone()
        for j in range(K):
            src = t - (K - 1) + j
            if src >= 0:
                acc = acc + w[:, j] * xbc[:, src]
        conv[:, t] = acc
    conv = F.silu(conv)
    v, k, q = conv.split([kv * d, kv * d, h * d], -1)
    v, k, q = v.view(b, l, kv, d), k.view(b, l, kv, d), q.view(b, l, h, d)
    dt = F.softplus(u @ W["dt_proj"].T + m.dt_bias.double())  # (b, l, h)
    A = -torch.exp(m.A_log.double())
    g = (u @ W["g_proj"].T).view(b, l, h, d)
    out = torch.zeros(b, l, h, d, dtype=torch.float64)
    for hh in range(h):
        j = hh // rep  # GQA: query head hh reads key/value head hh // rep (transformers' repeat_kv order)
        S = torch.zeros(b, d, d, dtype=torch.float64)  # (n, p)
        for t in range(l):
            S = torch.exp(dt[:, t, hh] * A[hh])[:, None, None] * S + torch.einsum(
                "bn,bp->bnp", k[:, t, j], dt[:, t, hh, None] * v[:, t, j]
            )
            y = torch.einsum("bn,bnp->bp", q[:, t, hh], S)
            y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + m.g_norm.eps) * m.g_norm.weight.double()
            out[:, t, hh] = y * F.silu(g[:, t, hh])
    return out.reshape(b, l, h * d) @ W["o_proj"].T


@pytest.mark.parametrize("heads,kv", [(6, 2), (9, 3), (4, 4)])
def test_mixer_matches_method_reference(make_config, randomize, heads, kv):
    _, _, m = make_pair(make_config, randomize, heads=heads, kv=kv, hidden=heads * 8)
    u = torch.randn(2, 19, heads * 8)
    with torch.no_grad():
        y = m(u)
    ref = reference_mixer(m, u)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_full_sequence_equals_token_by_token(make_config, randomize):
    _, _, m = make_pair(make_config, randomize)
    u = torch.randn(2, 21, 48)
    with torch.no_grad():
        full = m(u)
        st = SSMState()
        steps = torch.cat([m(u[:, t : t + 1], state=st) for t in range(u.shape[1])], 1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)
    assert st.conv.shape == (2, m.conv_dim, 1) and st.ssm.shape == (2, 6, 8, 8) and st.ssm.dtype == torch.float32


@pytest.mark.parametrize("cuts", [(5,), (8, 13), (1, 2, 17)])
def test_chunked_prefill_then_steps(make_config, randomize, cuts):
    _, _, m = make_pair(make_config, randomize)
    u = torch.randn(2, 20, 48)
    with torch.no_grad():
        full = m(u)
        st = SSMState()
        outs, start = [], 0
        for c in cuts:
            outs.append(m(u[:, start:c], state=st))
            start = c
        outs += [m(u[:, t : t + 1], state=st) for t in range(start, 20)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


def test_left_padding_mask_rows_equal_unpadded(make_config, randomize):
    _, _, m = make_pair(make_config, randomize)
    u = torch.randn(1, 9, 48)
    pad = 4
    u_pad = torch.cat([torch.randn(1, pad, 48) * 5, u], 1)
    mask = torch.tensor([[0] * pad + [1] * 9], dtype=torch.bool)
    with torch.no_grad():
        ref = m(u)
        st = SSMState()
        got = m(u_pad, mask=mask, state=st)[:, pad:]
        st_ref = SSMState()
        m(u, state=st_ref)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.ssm, st_ref.ssm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.conv, st_ref.conv)


def test_state_select_and_nbytes():
    st = SSMState()
    assert st.nbytes() == 0
    st.conv, st.ssm = torch.arange(3.0)[:, None, None].expand(3, 4, 1), torch.zeros(3, 2, 5, 5)
    st.select(torch.tensor([2, 0]))
    assert st.conv[:, 0, 0].tolist() == [2.0, 0.0] and st.ssm.shape[0] == 2
    assert st.nbytes() == st.conv.nbytes + st.ssm.nbytes


def test_gradients_reach_every_parameter(make_config):
    """Even at mimic init (W_gamma = 0, identity conv) every parameter gets a gradient."""
    cfg = make_config()
    torch.manual_seed(0)
    attn, m = Attention(cfg, 0), Mamba2Mixer(cfg, 0)
    m.init_from_attention(attn)
    m(torch.randn(2, 11, cfg.hidden_size)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_heads_mse_is_the_masked_mse_of_heads(make_config, randomize):
    """The stage 1-2 loss path (`heads_mse`: SSD output and gate into the norm's fused loss on CUDA) gives, on the
    CPU, exactly masked_mse(heads(u)) and the same gradients."""
    _, _, m = make_pair(make_config, randomize)
    u = torch.randn(2, 9, 48)
    target = torch.randn(2, 6, 9, 8).transpose(1, 2)  # as SDPA lays it out
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    grads = []
    for fn in (lambda: m.heads_mse(u, target, mask, mask), lambda: masked_mse(m.heads(u, mask), target, mask)):
        m.zero_grad()
        loss = fn()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    assert torch.equal(grads[0][0], grads[1][0]) and len(grads[0][1]) == len(grads[1][1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


# -- seeding (METHOD.md §2.2) ------------------------------------------------------------------------------------
def _seeded(make_config, mode, heads=9, kv=3, d=8, seed=0):
    cfg = make_config(hidden_size=72, num_attention_heads=heads, num_key_value_heads=kv, head_dim=d)
    torch.manual_seed(123)
    attn = Attention(cfg, 0)
    torch.manual_seed(456)  # a different stream, so a fresh student never equals the teacher by accident
    m = Mamba2Mixer(cfg, 0)
    m.init_from_attention(attn, mode=mode, generator=torch.Generator().manual_seed(seed))
    return cfg, attn, m


def _xavier_bound(w, gain):
    fan_out, fan_in = w.shape
    return gain * math.sqrt(6.0 / (fan_in + fan_out))


def test_mimic_seed_values(make_config):
    cfg, attn, m = _seeded(make_config, "mimic")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(m, name).weight, getattr(attn, name).weight), name
    # identity conv: only the current token's tap (last index) is 1, bias 0
    w = m.conv1d.weight
    assert w.shape == (m.conv_dim, 1, cfg.mamba_d_conv) and m.conv_dim == 2 * 3 * 8 + 9 * 8
    assert torch.equal(w[:, 0, -1], torch.ones(m.conv_dim))
    assert torch.equal(w[:, 0, :-1], torch.zeros(m.conv_dim, cfg.mamba_d_conv - 1))
    assert torch.equal(m.conv1d.bias, torch.zeros(m.conv_dim))
    assert torch.equal(m.dt_proj.weight, torch.zeros(9, 72))
    dt = F.softplus(m.dt_bias.double())
    assert bool(((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all()), dt
    assert torch.equal(m.A_log, torch.ones(9))
    assert torch.allclose(-torch.exp(m.A_log), torch.full((9,), -math.e))
    assert torch.equal(m.g_norm.weight, torch.ones(8)) and m.g_norm.eps == 1e-5
    gw = m.g_proj.weight
    bound = _xavier_bound(gw, 2**-2.5)
    assert gw.abs().max() <= bound and gw.abs().max() > 0.9 * bound
    assert abs(gw.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    assert m.dt_proj.bias is None and m.g_proj.bias is None


def test_mimic_dt_bias_is_log_uniform_over_many_heads(make_config):
    cfg = make_config(hidden_size=64, num_attention_heads=512, num_key_value_heads=512, head_dim=2)
    attn, m = Attention(cfg, 0), Mamba2Mixer(cfg, 0)
    m.init_from_attention(attn, generator=torch.Generator().manual_seed(0))
    log_dt = torch.log10(F.softplus(m.dt_bias.double()))
    assert log_dt.min() >= -3 - 1e-6 and log_dt.max() <= -1 + 1e-6
    assert abs(log_dt.mean().item() + 2) < 0.1  # uniform in log10 over [-3, -1]
    assert (log_dt < -2.5).any() and (log_dt > -1.5).any()


def test_mimic_decay_close_to_one(make_config):
    """At mimic init the per-step decay exp(-e * dt) lies in [0.76, 0.997] (METHOD.md §2.2)."""
    cfg, attn, m = _seeded(make_config, "mimic")
    decay = torch.exp(F.softplus(m.dt_bias) * -torch.exp(m.A_log))
    assert bool(((decay >= 0.76) & (decay <= 0.9973)).all())


def test_inherit_mode(make_config):
    cfg, attn, m = _seeded(make_config, "inherit")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(m, name).weight, getattr(attn, name).weight), name
    w = m.conv1d.weight
    assert not torch.equal(w[:, 0, :-1], torch.zeros_like(w[:, 0, :-1]))  # PyTorch default, not identity
    assert w.abs().max() <= 1 / math.sqrt(cfg.mamba_d_conv)
    assert m.dt_proj.weight.abs().max() > 0 and m.dt_proj.weight.abs().max() <= 1 / math.sqrt(72)
    assert torch.equal(m.dt_bias, torch.zeros(9))
    A = torch.exp(m.A_log)
    assert bool(((A >= 1 - 1e-5) & (A <= 16 + 1e-4)).all()) and A.std() > 0  # log U(1, 16)
    assert torch.equal(m.g_norm.weight, torch.ones(8))
    assert m.g_proj.weight.abs().max() <= _xavier_bound(m.g_proj.weight, 2**-2.5)


def test_scratch_mode(make_config):
    cfg, attn, m = _seeded(make_config, "scratch")
    assert torch.equal(m.o_proj.weight, attn.o_proj.weight)  # W_O is inherited in every mode
    for name in ("q_proj", "k_proj", "v_proj"):
        w = getattr(m, name).weight
        assert not torch.equal(w, getattr(attn, name).weight), name
        assert w.abs().max() <= 1 / math.sqrt(72) and w.std() > 0
    assert torch.equal(m.dt_bias, torch.zeros(9))
    assert not torch.equal(m.conv1d.weight[:, 0, :-1], torch.zeros(m.conv_dim, 1))


def test_modes_reproducible_from_generator(make_config):
    for mode in SEED_MODES:
        _, _, a = _seeded(make_config, mode, seed=3)
        _, _, b = _seeded(make_config, mode, seed=3)
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), (mode, n)
    _, _, c = _seeded(make_config, "mimic", seed=4)
    _, _, d = _seeded(make_config, "mimic", seed=3)
    assert not torch.equal(c.dt_bias, d.dt_bias)


def test_unknown_mode_and_shape_mismatch(make_config):
    cfg, attn, m = _seeded(make_config, "mimic")
    with pytest.raises(ValueError, match="seed mode 'mimick' unknown"):
        m.init_from_attention(attn, mode="mimick")
    other = Attention(make_config(hidden_size=72, num_attention_heads=9, num_key_value_heads=9, head_dim=8), 0)
    with pytest.raises(ValueError, match="k_proj"):
        m.init_from_attention(other)


def test_gqa_9q_3kv_student_runs_and_decodes(make_config, randomize):
    _, _, m = make_pair(make_config, randomize, heads=9, kv=3, hidden=72)
    u = torch.randn(3, 13, 72)
    with torch.no_grad():
        full = m(u)
        st = SSMState()
        m(u[:, :6], state=st)
        rest = torch.cat([m(u[:, t : t + 1], state=st) for t in range(6, 13)], 1)
    assert full.shape == (3, 13, 72)
    torch.testing.assert_close(rest, full[:, 6:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_in_proj_matches_separate_projections_and_skips_frozen_weights(make_config, qkv_bias):
    """The fused input matmul (one, or two when only W_G / W_gamma train) equals the five projections, with an
    odd total width (8 + 8 + 40 + 40 + 5 = 101 rows, padded for alignment); frozen weights get no gradient."""
    cfg = make_config(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=8, qkv_bias=qkv_bias)
    torch.manual_seed(0)
    m = Mamba2Mixer(cfg, 0)
    u = torch.randn(2, 7, 40)
    for frozen in ((), ("q_proj", "k_proj", "v_proj")):
        for name, p in m.named_parameters():
            p.requires_grad_(name.split(".")[0] not in frozen)
            p.grad = None
        xBC, g, dt = m.in_proj(u)
        want = (torch.cat([m.v_proj(u), m.k_proj(u), m.q_proj(u)], -1), m.g_proj(u), m.dt_proj(u))
        for got, ref in zip((xBC, g, dt), want):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        (xBC.sum() + (g * g).sum() + dt.sum()).backward()
        for name in ("q_proj", "k_proj", "v_proj"):
            assert (getattr(m, name).weight.grad is None) == (name in frozen)
        torch.testing.assert_close(m.g_proj.weight.grad, 2 * (g.detach().reshape(-1, 40).T @ u.reshape(-1, 40)))
        torch.testing.assert_close(m.dt_proj.weight.grad, torch.ones(14, 5).T @ u.reshape(-1, 40))


@pytest.mark.parametrize("kv", [6, 2, 1])
def test_inplace_step_equals_step(make_config, randomize, kv):
    """The decode cache's in-place step (k, v read per KV group) = the functional step, exactly, masks included."""
    _, _, m = make_pair(make_config, randomize, kv=kv)
    g = torch.Generator().manual_seed(1)
    conv, ssm = torch.randn(2, m.conv_dim, 1, generator=g), torch.randn(2, 6, 8, 8, generator=g)
    conv_i, ssm_i = conv.clone(), ssm.clone()
    with torch.no_grad():
        for mask in [None, torch.tensor([False, True]), None]:
            xBC, _, dt_raw = m.in_proj(torch.randn(2, 48, generator=g))
            dt, A = m.discretize(dt_raw)
            y, conv, ssm = m.step(xBC, dt, A, conv, ssm, mask)
            y_i, c_i, s_i = m.step(xBC, dt, A, conv_i, ssm_i, mask, inplace=True)
            assert c_i is conv_i and s_i is ssm_i
            torch.testing.assert_close(y_i, y, rtol=0, atol=0)
            torch.testing.assert_close(ssm_i, ssm, rtol=0, atol=0)
            torch.testing.assert_close(conv_i, conv, rtol=0, atol=0)
