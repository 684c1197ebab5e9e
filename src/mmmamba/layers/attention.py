"""GQA softmax attention with RoPE (SDPA) and a growing KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope


class Attention(nn.Module):
    """o = W_O softmax(q k^T / sqrt(d) + mask) v over heads; q: h heads, k/v: kv heads (GQA)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        H, h, kv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = layer_idx, h, kv, d
        self.q_proj = nn.Linear(H, h * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(H, kv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(H, kv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(h * d, H, bias=config.o_bias)

    def heads(self, u, cos, sin, mask=None, state=None, q_proj=None, k_proj=None, v_proj=None):
        """Per-head attention output before W_O: (b, l, h, d). `*_proj` override the projections
        (distillation feeds frozen teacher copies)."""
        b, l, _ = u.shape
        q = (q_proj or self.q_proj)(u).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
        k = (k_proj or self.k_proj)(u).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = (v_proj or self.v_proj)(u).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None:
            k, v = state.update(k, v)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=l > 1, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return o.transpose(1, 2)

    def forward(self, u, cos, sin, mask=None, state=None):
        y = self.heads(u, cos, sin, mask, state)
        return self.o_proj(y.reshape(*u.shape[:2], -1))


class KVState:
    """KV cache of one attention layer: k, v (b, kv, t, d)."""

    def __init__(self):
        self.k = self.v = None

    def update(self, k, v):
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v

    def select(self, idx):
        if self.k is not None:
            self.k, self.v = self.k[idx], self.v[idx]

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes
