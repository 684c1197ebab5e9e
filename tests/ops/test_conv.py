"""Causal depthwise conv1d and its decode-time state update vs a hand loop."""

from __future__ import annotations

import pytest
import torch

from mmmamba.ops import causal_conv1d, causal_conv1d_step, causal_conv1d_step_


def hand_conv(x, w, bias, state):
    """y_t[c] = bias[c] + sum_j w[c, j] * x_{t-k+1+j}[c]; inputs before t = 0 come from `state` (or are 0)."""
    b, l, c = x.shape
    k = w.shape[-1]
    prev = torch.zeros(b, c, k - 1) if state is None else state
    seq = torch.cat([prev.transpose(1, 2), x], dim=1)  # (b, k-1+l, c)
    y = torch.zeros(b, l, c)
    for t in range(l):
        for j in range(k):
            y[:, t] += w[:, j] * seq[:, t + j]
        if bias is not None:
            y[:, t] += bias
    return y, seq[:, seq.shape[1] - (k - 1) :].transpose(1, 2)


def data(b=2, l=13, c=5, k=2, seed=0, state=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, c, generator=g)
    w = torch.randn(c, k, generator=g)
    bias = torch.randn(c, generator=g)
    s = torch.randn(b, c, k - 1, generator=g) if state else None
    return x, w, bias, s


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_matches_hand_loop(k, with_state, with_bias):
    x, w, bias, s = data(k=k, state=with_state, seed=k)
    bias = bias if with_bias else None
    y, new = causal_conv1d(x, w, bias, s)
    y_ref, new_ref = hand_conv(x, w, bias, s)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new, new_ref)
    assert new.shape == (x.shape[0], x.shape[2], k - 1)


@pytest.mark.parametrize("k", [2, 4])
def test_conv_short_input_keeps_older_state(k):
    """With fewer new tokens than k-1, the new state still holds the last k-1 inputs, partly from the old state."""
    x, w, bias, s = data(l=1, k=k, seed=7)
    y, new = causal_conv1d(x, w, bias, s)
    y_ref, new_ref = hand_conv(x, w, bias, s)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new, new_ref)


@pytest.mark.parametrize("k", [2, 4])
def test_step_chain_equals_full(k):
    x, w, bias, s = data(l=9, k=k, seed=3)
    y_full, s_full = causal_conv1d(x, w, bias, s)
    state = s
    ys = []
    for t in range(x.shape[1]):
        y, state = causal_conv1d_step(x[:, t], w, bias, state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), y_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, s_full)


def test_inplace_step_shifts_the_state_it_is_given():
    x, w, bias, s = data(l=2, k=4, seed=6)
    state = s.clone()
    for t in range(2):
        y_ref, s_ref = causal_conv1d_step(x[:, t], w, bias, state.clone())
        y = causal_conv1d_step_(x[:, t], w, bias, state)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        torch.testing.assert_close(state, s_ref, rtol=0, atol=0)


def test_split_prefill_equals_full():
    x, w, bias, _ = data(l=20, k=3, seed=4)
    y_full, s_full = causal_conv1d(x, w, bias)
    y1, s1 = causal_conv1d(x[:, :11], w, bias)
    y2, s2 = causal_conv1d(x[:, 11:], w, bias, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full)
    torch.testing.assert_close(s2, s_full)


def test_matches_torch_conv1d_module():
    """Same as a causally left-padded nn.Conv1d(groups=channels), the layer that stores the weights."""
    x, _, _, _ = data(l=10, c=6, k=2, seed=5)
    conv = torch.nn.Conv1d(6, 6, 2, groups=6, padding=1)
    y_ref = conv(x.transpose(1, 2))[..., :10].transpose(1, 2)
    y, _ = causal_conv1d(x, conv.weight[:, 0], conv.bias)
    torch.testing.assert_close(y, y_ref)
