"""Loss values against hand-computed numbers on small tensors; padding never counts."""

from __future__ import annotations

import math

import pytest
import torch

from mmmamba.distill.losses import kl_ce_loss, kl_positions, layerwise_loss, masked_mse


def test_masked_mse_hand_computed():
    # (b=1, l=3, h=1, d=2); the last token is padding
    pred = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]], [[9.0, 9.0]]]])
    target = torch.tensor([[[[0.0, 0.0]], [[1.0, 1.0]], [[0.0, 0.0]]]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: 1 + 4 = 5; token 1: 1 + 1 = 2 -> (5 + 2) / (2 tokens x 2 features) = 1.75
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.75)
    # no mask: (5 + 2 + 162) / 6
    assert masked_mse(pred, target).item() == pytest.approx(169 / 6)


def test_masked_mse_padding_values_do_not_matter():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    a = masked_mse(pred, target, mask)
    pred2 = pred.clone()
    pred2[1, 2:] = 1e6
    assert torch.equal(a, masked_mse(pred2, target, mask))
    # equals the mean over the 7 real tokens
    real = torch.cat([pred[0] - target[0], pred[1, :2] - target[1, :2]]).pow(2).mean()
    assert a.item() == pytest.approx(real.item(), rel=1e-5)


def test_masked_mse_empty_mask_is_zero_not_nan():
    x = torch.randn(1, 3, 2, requires_grad=True)
    loss = masked_mse(x, torch.zeros(1, 3, 2), torch.zeros(1, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_masked_mse_layer_outputs_and_shape_check():
    pred, target = torch.ones(1, 2, 4), torch.zeros(1, 2, 4)
    assert masked_mse(pred, target, torch.tensor([[1, 0]])).item() == 1.0
    with pytest.raises(ValueError, match="shape"):
        masked_mse(pred, target[:, :1])


def test_layerwise_loss_is_factor_times_mean():
    assert layerwise_loss([torch.tensor(0.5), torch.tensor(1.5)], factor=1000).item() == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="Mamba-2"):
        layerwise_loss([])


def test_kl_positions():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    # assistant: position t counts when labels[t+1] is a target
    assert kl_positions(mask, labels, "assistant").tolist() == [[False, True, True, False, False],
                                                                [True, False, False, False, False]]
    assert kl_positions(mask, labels, "all").tolist() == mask.bool().tolist()
    with pytest.raises(ValueError, match="labels"):
        kl_positions(mask, None, "assistant")
    with pytest.raises(ValueError, match="unknown"):
        kl_positions(mask, labels, "some")


def test_kl_ce_loss_hand_computed():
    """b=1, l=3, H=2, V=2. Teacher logits (0, 0) everywhere; student logits (0, ln 3) at every position. The hand
    values are exact (float64 math); the loss runs in fp32, so they agree to fp32 rounding (1e-5)."""
    ln3 = math.log(3.0)
    s_head, t_head = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        s_head.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, ln3]]))
        t_head.weight.zero_()
    hs = torch.tensor([[[0.0, 1.0]] * 3])
    ht = torch.zeros(1, 3, 2)
    labels = torch.tensor([[-100, 1, 0]])
    select = kl_positions(torch.ones(1, 3), labels, "assistant")  # positions 0 and 1
    kl_one = 0.5 * math.log(2.0) + 0.5 * math.log(2 / 3)
    loss, m = kl_ce_loss(hs, ht, s_head, t_head, select, labels)
    assert loss.item() == pytest.approx(kl_one, rel=1e-5)
    assert m["kl_tokens"].item() == 2
    # CE: position 0 -> target 1 (q = 0.75), position 1 -> target 0 (q = 0.25)
    ce = -(math.log(0.75) + math.log(0.25)) / 2
    loss, m = kl_ce_loss(hs, ht, s_head, t_head, select, labels, ce_weight=0.5)
    assert m["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(kl_one + 0.5 * ce, rel=1e-5)
    # temperature 2: T^2 x KL of the softened distributions, q = softmax(0, ln3 / 2)
    q1 = 1 / (1 + math.sqrt(3.0))
    kl_t = 4 * (0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1)))
    loss, _ = kl_ce_loss(hs, ht, s_head, t_head, select, labels, temperature=2.0)
    assert loss.item() == pytest.approx(kl_t, rel=1e-5)


@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_kl_ce_loss_by_weights_equals_gathered_rows(ce_weight):
    """gather=False (every row through the heads, unselected ones weighted 0: no host sync, for CUDA graphs)
    gives the gathered loss, metrics and gradients."""
    torch.manual_seed(0)
    b, l, H, V = 2, 7, 8, 11
    s_head, t_head = torch.nn.Linear(H, V), torch.nn.Linear(H, V)
    ht = torch.randn(b, l, H)
    labels = torch.randint(0, V, (b, l))
    labels[0, :3] = -100
    labels[1, 5:] = -100
    mask = torch.ones(b, l, dtype=torch.long)
    mask[1, -1] = 0
    select = kl_positions(mask, labels, "assistant")
    out = []
    for gather in (True, False):
        hs = torch.randn(b, l, H, generator=torch.Generator().manual_seed(1)).requires_grad_()
        s_head.zero_grad()
        loss, m = kl_ce_loss(hs, ht, s_head, t_head, select, labels, ce_weight=ce_weight, chunk_size=4,
                             gather=gather)
        loss.backward()
        out.append((loss.detach(), m, hs.grad, s_head.weight.grad.clone()))
    (l1, m1, g1, w1), (l2, m2, g2, w2) = out
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=0)
    assert m1.keys() == m2.keys() and all(torch.allclose(m1[k].float(), m2[k].float(), rtol=1e-6) for k in m1)
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(w2, w1, rtol=1e-5, atol=1e-8)
