"""Rotary position embedding (rotate-half convention of Llama / InternLM2)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.rope import apply_rope  # noqa: F401  (the layers' entry point: fused on CUDA without grad)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/d), optionally rescaled ("linear" or "llama3" rope_type)."""
    # fp32, exactly as transformers / InternLM2 compute it, so converted teachers match bit for bit
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / scaling["factor"]).float()
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return torch.where(is_mid, mid, scaled).float()
    raise ValueError(
        f"unsupported rope_type {kind!r}: mmmamba implements 'default', 'linear' and 'llama3'; "
        "convert the teacher without position-dependent (dynamic / yarn) scaling"
    )


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling  # to rebuild the buffer (reset_inv_freq)
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        self._fp32_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def reset_inv_freq(self) -> None:
        """Recompute the non-persistent buffer; `from_pretrained` leaves it uninitialised (built on the meta device)."""
        self.inv_freq.copy_(rope_inv_freq(self.head_dim, self.theta, self.scaling))
        self._fp32_cache.clear()

    def _fp32_inv_freq(self, device: torch.device) -> torch.Tensor:
        """The frequencies in fp32 on `device`. model.to(bf16) casts the buffer too; the fp32 values are then
        rebuilt once per device and kept, so a step copies nothing from the host (a CUDA graph could not)."""
        inv = self.inv_freq
        if inv.dtype == torch.float32 and inv.device == device:
            return inv
        key = str(device)
        if key not in self._fp32_cache:
            self._fp32_cache[key] = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
        return self._fp32_cache[key]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (b, l) -> cos, sin (b, l, head_dim)."""
        freqs = position_ids.float().unsqueeze(-1) * self._fp32_inv_freq(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)
