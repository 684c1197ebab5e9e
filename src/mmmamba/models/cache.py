"""Hybrid cache: a KV cache for attention layers, conv + SSM state for Mamba-2 layers."""

from __future__ import annotations

import torch

from ..layers.attention import KVState
from ..layers.mamba2 import SSMState
from .config import ATTENTION


class HybridCache:
    """Per-layer states plus the key mask (b, t) of all tokens seen (0 = padding) and each row's next
    position id. Mamba-2 layers hold O(1) memory in the context length; attention layers hold O(t)."""

    def __init__(self, config):
        self.layers = [KVState() if t == ATTENTION else SSMState() for t in config.layer_types]
        self.key_mask: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def select(self, idx: torch.Tensor) -> None:
        """Keep rows `idx` (e.g. after some sequences finished)."""
        for s in self.layers:
            s.select(idx)
        if self.key_mask is not None:
            self.key_mask, self.next_position = self.key_mask[idx], self.next_position[idx]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers)

    def __len__(self) -> int:
        return len(self.layers)
