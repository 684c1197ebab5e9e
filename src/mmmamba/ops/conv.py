"""Causal depthwise conv1d (the Mamba-2 short convolution) and its decode-time update."""

from __future__ import annotations

import torch


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t[c] = bias[c] + sum_j weight[c, j] * x_{t-k+1+j}[c], zero (or `state`) before t = 0.

    x: (b, l, c); weight: (c, k); bias: (c,); state: (b, c, k-1), the k-1 inputs preceding x.
    Returns y (b, l, c) and the new state (b, c, k-1): the last k-1 inputs seen.
    """
    b, l, c = x.shape
    k = weight.shape[-1]
    if state is None:
        state = x.new_zeros(b, c, k - 1)
    # a sum of k shifted copies in (b, l, c): contiguous in and out, no transposes (a kernel of 2-4 taps makes
    # F.conv1d's depthwise kernel slower than these few elementwise passes)
    full = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)  # (b, k-1+l, c)
    w = weight.to(x.dtype)
    y = x * w[:, k - 1] if bias is None else torch.addcmul(bias.to(x.dtype), x, w[:, k - 1])
    for j in range(k - 1):
        y = torch.addcmul(y, full[:, j : j + l], w[:, j])
    return y, full[:, full.shape[1] - (k - 1) :].transpose(1, 2).contiguous()


def _taps(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y[c] = bias[c] + sum_j weight[c, j] window[c, j] for a window (b, c, k) of the last k inputs."""
    y = (window * weight.to(window.dtype)).sum(-1)
    return y if bias is None else y + bias.to(window.dtype)


def causal_conv1d_step(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of `causal_conv1d`. x: (b, c); state: (b, c, k-1). Returns y (b, c) and the new state."""
    window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)
    return _taps(window, weight, bias), window[..., 1:].contiguous()


def causal_conv1d_step_(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor
                        ) -> torch.Tensor:
    """`causal_conv1d_step` that shifts `state` (b, c, k-1) in place (the decode cache): returns y (b, c)."""
    window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)
    state.copy_(window[..., 1:])
    return _taps(window, weight, bias)
