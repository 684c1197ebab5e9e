"""Masked mean squared error, the layer-wise distillation loss (stages 1-2). Padding never counts (the authors
average over padding too; METHOD.md §8 item 2)."""

from __future__ import annotations

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the tokens where `mask` is true and all their features, in fp32.

    pred, target: (b, l, ...) (per-head outputs (b, l, h, d) or layer outputs (b, l, H)); mask: (b, l) bool/0-1,
    None = every token. A batch with no unmasked token gives 0 (and a zero gradient), never NaN."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    sq = (pred.float() - target.float()).pow(2)
    per_token = sq.flatten(2).sum(-1) if sq.dim() > 2 else sq  # (b, l)
    feats = sq[0, 0].numel() if sq.dim() > 2 else 1
    if mask is None:
        return per_token.sum() / (per_token.numel() * feats)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / (m.sum().clamp(min=1.0) * feats)
