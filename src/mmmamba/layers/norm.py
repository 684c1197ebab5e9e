"""RMSNorm and the per-head gated RMSNorm of the Mamba-2 output."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.add_norm import rmsnorm
from ..ops.gated_norm import gated_rmsnorm, gated_rmsnorm_mse


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 (Llama convention); fused on CUDA (`ops.add_norm`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Per-head y = RMSNorm(x) * w * SiLU(g) (fla's FusedRMSNormSwishGate). x, g: (..., head_dim)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """x, g (..., h, d) -> (..., h, d); fused kernels on CUDA (`ops.gated_norm`), the reference elsewhere."""
        d = x.shape[-1]
        if x.dim() < 2:
            return gated_rmsnorm(x, g, self.weight, self.eps, d)
        flat = (*x.shape[:-2], x.shape[-2] * d)  # heads side by side in a row: one program covers several
        return gated_rmsnorm(x.reshape(flat), g.reshape(flat), self.weight, self.eps, d).view(x.shape)

    def mse(self, x: torch.Tensor, g: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None):
        """masked_mse(self(x, g), target, mask) (`ops.mse`), fused on CUDA. x, g, target (b, l, h, d); mask (b, l)."""
        return gated_rmsnorm_mse(x, g, self.weight, self.eps, target, mask)
