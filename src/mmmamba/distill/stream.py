"""The teacher's residual stream of the layer-wise stages (1-2), one decoder layer at a time, without autograd.

`stream_layer` unpacks a teacher layer into what the stages need. On CUDA the residual add and the RMSNorms run as
one fused kernel each (`ops.add_norm`, the engine's prefill kernel, with the reference's rounding), after a
one-off check against the torch ops; under torch.compile the torch ops are traced instead.
"""

from __future__ import annotations

import torch

from ..ops.add_norm import add_rmsnorm, fused_ok
from ..ops.checked import cuda_index


def stream_layer(layer, h, cos, sin, attn_mask):
    """One teacher decoder layer: returns r = norm1(h) (the mixer input), y (b, l, heads, d) the per-head attention
    output before W_O, o = W_O y, and the layer's output h + o + MLP(norm2(h + o))."""
    _, r = add_norm(h, None, layer.input_layernorm)
    y = layer.mixer.heads(r, cos, sin, attn_mask)
    o = layer.mixer.o_proj(y.reshape(*h.shape[:2], -1))
    h, n = add_norm(h, o, layer.post_attention_layernorm)
    return r, y, o, h + layer.mlp(n)


def add_norm(h, delta, norm):
    """(h + delta, norm(h + delta)) for an `RMSNorm` module; delta None: (h, norm(h)). No autograd on the fused
    path: it is for tensors that need no gradient (the frozen teacher's stream)."""
    return add_rmsnorm(h, delta, norm.weight, norm.eps, fused=_fused(h, delta, norm))


def _fused(h, delta, norm) -> bool:
    rows_ok = h.stride(-1) == 1 and (delta is None or (delta.stride(-1) == 1 and delta.dtype == h.dtype))
    return (h.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and rows_ok
            and norm.weight.dtype == h.dtype and fused_ok(h.dtype, cuda_index(h.device)))
