"""Causal depthwise conv1d (the Mamba-2 short convolution) and its decode-time update."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t[c] = bias[c] + sum_j weight[c, j] * x_{t-k+1+j}[c], zero (or `state`) before t = 0.

    x: (b, l, c); weight: (c, k); bias: (c,); state: (b, c, k-1), the k-1 inputs preceding x.
    Returns y (b, l, c) and the new state (b, c, k-1): the last k-1 inputs seen.
    """
    b, l, c = x.shape
    k = weight.shape[-1]
    xt = x.transpose(1, 2)
    if state is None:
        state = xt.new_zeros(b, c, k - 1)
    full = torch.cat([state.to(xt.dtype), xt], dim=-1)
    y = F.conv1d(full, weight.unsqueeze(1).to(xt.dtype), None if bias is None else bias.to(xt.dtype), groups=c)
    return y.transpose(1, 2), full[..., full.shape[-1] - (k - 1) :].contiguous()


def causal_conv1d_step(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of `causal_conv1d`. x: (b, c); state: (b, c, k-1). Returns y (b, c) and the new state."""
    window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y, window[..., 1:].contiguous()
