"""Gated MLP: down(act(gate(x)) * up(x))."""

from __future__ import annotations

from torch import nn
from transformers.activations import ACT2FN

from ..ops.swiglu import silu_mul

SILU = ("silu", "swish")


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = ACT2FN[act]
        self.silu = act in SILU  # SiLU(gate) * up as one kernel each way on CUDA (`ops.swiglu`)

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu_mul(g, u) if self.silu else self.act(g) * u)
