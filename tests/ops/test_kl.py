"""Chunked KL / CE over the vocabulary against the dense reference; memory: no chunk's logits are kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmmamba.ops.kl import chunked_kl_ce, dense_kl_ce


def _case(n=37, h=16, v=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(n, h, generator=g, dtype=torch.float64)
    ws = torch.randn(v, h, generator=g, dtype=torch.float64).requires_grad_(True)
    wt = torch.randn(v, h, generator=g, dtype=torch.float64)
    return hs, ht, ws, wt


def test_hand_computed_two_token_vocab():
    # one position, vocabulary of 2: teacher p = (0.5, 0.5), student q = softmax(0, ln 3) = (0.25, 0.75)
    hs = torch.tensor([[0.0, 1.0]])
    ws = torch.tensor([[0.0, 0.0], [0.0, float(torch.log(torch.tensor(3.0)))]])
    ht = torch.tensor([[1.0, 0.0]])
    wt = torch.zeros(2, 2)
    kl, ce = chunked_kl_ce(hs, ht, ws, wt, targets=torch.tensor([1]))
    expect = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    assert torch.allclose(kl, expect, atol=1e-6)
    assert torch.allclose(ce, -torch.log(torch.tensor(0.75)), atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_dense_values_and_grads(chunk, temperature):
    hs, ht, ws, wt = _case()
    n = hs.shape[0]
    w = (torch.arange(n) % 3 != 0).double()
    tgt = torch.randint(0, ws.shape[0], (n,), generator=torch.Generator().manual_seed(1))
    tgt[::4] = -100
    kl, ce = chunked_kl_ce(hs, ht, ws, wt, temperature=temperature, kl_weights=w, targets=tgt, chunk_size=chunk)
    (kl + 0.3 * ce).backward()
    g_hs, g_ws = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    kl_d, ce_d = dense_kl_ce(hs @ ws.T, ht @ wt.T, temperature=temperature, kl_weights=w, targets=tgt)
    (kl_d + 0.3 * ce_d).backward()
    assert torch.allclose(kl, kl_d, rtol=1e-9)
    assert torch.allclose(ce, ce_d, rtol=1e-9)
    assert torch.allclose(g_hs, hs.grad, rtol=1e-6, atol=1e-9)
    assert torch.allclose(g_ws, ws.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("hidden_grad", [True, False])
def test_bias_and_head_gradients_match_dense(hidden_grad):
    hs, ht, ws, wt = _case(n=23, seed=4)
    hs.requires_grad_(hidden_grad)
    g = torch.Generator().manual_seed(5)
    bs = torch.randn(ws.shape[0], generator=g, dtype=torch.float64, requires_grad=True)
    bt = torch.randn(ws.shape[0], generator=g, dtype=torch.float64)
    tgt = torch.randint(0, ws.shape[0], (23,), generator=g)
    kl, ce = chunked_kl_ce(hs, ht, ws, wt, student_bias=bs, teacher_bias=bt, targets=tgt, chunk_size=7,
                           temperature=1.7)
    (2.0 * kl - 0.5 * ce).backward()
    got = [x.grad.clone() for x in (ws, bs)] + ([hs.grad.clone()] if hidden_grad else [])
    for x in (hs, ws, bs):
        x.grad = None
    kl_d, ce_d = dense_kl_ce(hs @ ws.T + bs, ht @ wt.T + bt, targets=tgt, temperature=1.7)
    (2.0 * kl_d - 0.5 * ce_d).backward()
    want = [ws.grad, bs.grad] + ([hs.grad] if hidden_grad else [])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_temperature_scaling_is_t_squared_kl_of_softened_distributions():
    hs, ht, ws, wt = _case(n=8)
    T = 3.0
    kl, _ = chunked_kl_ce(hs.detach(), ht, ws.detach(), wt, temperature=T)
    s, t = (hs @ ws.T).detach() / T, (ht @ wt.T) / T
    ref = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum() * T * T
    assert torch.allclose(kl.double(), ref, rtol=1e-5)


def test_identical_models_give_zero():
    hs, _, ws, _ = _case(n=10)
    kl, _ = chunked_kl_ce(hs, hs.detach(), ws, ws.detach(), chunk_size=3)
    assert abs(float(kl.detach())) < 1e-6


def test_backward_keeps_no_chunk_logits():
    """The autograd graph keeps only (rows x hidden)-sized gradients, never a chunk's (chunk x V) logits."""
    n, h, v, chunk = 64, 8, 4096, 16
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=g, requires_grad=True)
    ht = torch.randn(n, h, generator=g)
    ws, wt = torch.randn(v, h, generator=g), torch.randn(v, h, generator=g)
    tgt = torch.randint(0, v, (n,), generator=g)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kl, ce = chunked_kl_ce(hs, ht, ws, wt, chunk_size=chunk, targets=tgt)
    assert saved and max(saved) <= n * h, f"a saved tensor holds {max(saved)} elements (> rows x hidden)"
    (kl + ce).backward()
    assert hs.grad is not None and torch.isfinite(hs.grad).all()


def test_bf16_autocast_grads_close_to_fp32():
    """Under bf16 autocast (the trainer's GPU setting) the fused gradients stay within bf16 rounding of fp32."""
    hs, ht, ws, wt = (x.detach().float() for x in _case(n=40, h=32, v=300))
    hs.requires_grad_(True)
    ref_hs = hs.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl, _ = chunked_kl_ce(hs, ht, ws, wt, chunk_size=16)
    kl.backward()
    kl_d, _ = dense_kl_ce(ref_hs @ ws.T, ht @ wt.T)
    kl_d.backward()
    assert hs.grad.dtype == torch.float32
    torch.testing.assert_close(kl, kl_d, rtol=2e-2, atol=1e-3)
    rel = (hs.grad - ref_hs.grad).norm() / ref_hs.grad.norm()
    assert rel < 2e-2, rel


def test_shape_errors():
    hs, ht, ws, wt = _case(n=4)
    with pytest.raises(ValueError, match="rows"):
        chunked_kl_ce(hs, ht[:3], ws, wt)
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_kl_ce(hs, ht, ws, wt[:-1])
