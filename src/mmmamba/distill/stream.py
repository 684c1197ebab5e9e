"""The teacher's residual stream of the layer-wise stages (1-2), one decoder layer at a time, without autograd.

`stream_layer` unpacks a teacher layer into what the stages need. On CUDA the residual add and the RMSNorms run as
one fused kernel each (`inference.triton_kernels.add_rmsnorm`, the engine's prefill kernel, with the reference's
rounding), after a one-off check against the torch ops; under torch.compile the torch ops are traced instead.
"""

from __future__ import annotations

import functools

import torch

from ..ops.checked import cuda_index, passes_check, rel_error

CHECK_TOLERANCE = 1e-2  # relative; bf16 inputs, fp32 sums (the reference rounds the same way)


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
    if _fused(h, delta, norm):
        from ..inference import triton_kernels as tk

        return tk.add_rmsnorm(h, norm.weight, norm.eps, delta)
    if delta is not None:
        h = h + delta
    return h, norm(h)


def _fused(h, delta, norm) -> bool:
    rows_ok = h.stride(-1) == 1 and (delta is None or (delta.stride(-1) == 1 and delta.dtype == h.dtype))
    return (h.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and rows_ok
            and norm.weight.dtype == h.dtype and fused_norm_ok(h.dtype, cuda_index(h.device)))


def fused_norm_errors(dtype: torch.dtype, device, rows: int = 37, n: int = 300) -> dict[str, float]:
    """Relative errors of the fused residual add + RMSNorm against the torch ops (n not a power of two)."""
    from ..inference import triton_kernels as tk
    from ..layers.norm import RMSNorm

    gen = torch.Generator(device=device).manual_seed(0)
    x, d = (torch.randn(rows, n, device=device, generator=gen).to(dtype) for _ in range(2))
    norm = RMSNorm(n, 1e-5).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(n, device=device, generator=gen) + 0.5)
        got = tk.add_rmsnorm(x, norm.weight, norm.eps, d) + tk.add_rmsnorm(x, norm.weight, norm.eps)[1:]
        h = x + d
        want = (h, norm(h), norm(x))
    return dict(zip(("h", "y", "y_no_delta"), map(rel_error, got, want)))


@functools.cache
def fused_norm_ok(dtype: torch.dtype, device_index: int) -> bool:
    from ..inference import triton_kernels as tk

    return tk.available() and passes_check(
        "fused residual add + RMSNorm", lambda: fused_norm_errors(dtype, torch.device("cuda", device_index)),
        CHECK_TOLERANCE, "torch ops")
