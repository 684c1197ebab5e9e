"""Rotary embedding of q / k, y = x cos + rotate_half(x) sin (the rotate-half convention of Llama / InternLM2).

`apply_rope_ref` is the torch formula. On CUDA, `apply_rope` runs it as one Triton kernel, for tensors that need no
gradient (a frozen teacher's stream, prefill). The kernel rounds like the formula does: each product to x's
dtype, then their sum. It is used after a one-off check against the formula, and the formula itself under
autograd or torch.compile.
"""

from __future__ import annotations

import functools

import torch

from .checked import cuda_index, passes_check, rel_error

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only installs
    triton = tl = None

CHECK_TOLERANCE = 1e-2  # relative, bf16 (the kernel rounds as the formula does)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, heads, l, d); cos/sin (b, l, d)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(1) + torch.cat([-x2, x1], dim=-1) * sin.unsqueeze(1)


if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, sxb, sxh, sxl, c_ptr, s_ptr, o_ptr, L, HEADS, D2: tl.constexpr, BH: tl.constexpr):
        """One (batch, position) row, a block of heads: o (b, l, heads, d) contiguous."""
        row = tl.program_id(0).to(tl.int64)
        bi, li = row // L, row % L
        rh = tl.program_id(1) * BH + tl.arange(0, BH)
        rd = tl.arange(0, D2)
        m = (rh < HEADS)[:, None]
        xo = x_ptr + bi * sxb + li * sxl + rh[:, None] * sxh + rd[None, :]
        xdt = x_ptr.dtype.element_ty
        x1 = tl.load(xo, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xo + D2, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(c_ptr + row * 2 * D2 + rd).to(tl.float32)[None, :]
        c2 = tl.load(c_ptr + row * 2 * D2 + D2 + rd).to(tl.float32)[None, :]
        s1 = tl.load(s_ptr + row * 2 * D2 + rd).to(tl.float32)[None, :]
        s2 = tl.load(s_ptr + row * 2 * D2 + D2 + rd).to(tl.float32)[None, :]
        y1 = (x1 * c1).to(xdt).to(tl.float32) + (-x2 * s1).to(xdt).to(tl.float32)
        y2 = (x2 * c2).to(xdt).to(tl.float32) + (x1 * s2).to(xdt).to(tl.float32)
        oo = o_ptr + (row * HEADS + rh[:, None]) * 2 * D2 + rd[None, :]
        tl.store(oo, y1.to(xdt), mask=m)
        tl.store(oo + D2, y2.to(xdt), mask=m)


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The kernel alone (no autograd): x (b, heads, l, d) with unit stride in d, cos/sin (b, l, d) contiguous.
    Returns a (b, heads, l, d) view of a (b, l, heads, d) tensor (the layout the projections produce)."""
    b, heads, l, d = x.shape
    out = torch.empty(b, l, heads, d, dtype=x.dtype, device=x.device)
    bh = min(triton.next_power_of_2(heads), max(1, 2048 // d))
    _rope_kernel[(b * l, triton.cdiv(heads, bh))](x, x.stride(0), x.stride(1), x.stride(2), cos, sin, out, l,
                                                  heads, D2=d // 2, BH=bh, num_warps=4)
    return out.transpose(1, 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, heads, l, d); cos/sin (b, l, d). The fused kernel where it may run, else the formula."""
    if _fused(x, cos, sin):
        return fused_rope(x, cos, sin)
    return apply_rope_ref(x, cos, sin)


def _fused(x, cos, sin) -> bool:
    d = x.shape[-1]
    return (x.is_cuda and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()  # the first use's check cannot run in a capture
            and x.dim() == 4 and x.stride(-1) == 1 and d >= 2 and (d // 2) & (d // 2 - 1) == 0
            and cos.dtype == sin.dtype == x.dtype and cos.shape == sin.shape == (x.shape[0], x.shape[2], d)
            and cos.is_contiguous() and sin.is_contiguous() and fused_ok(x.dtype, cuda_index(x.device)))


def fused_errors(dtype: torch.dtype, device, b: int = 2, heads: int = 3, l: int = 5, d: int = 64) -> dict:
    """Relative error of the kernel against the formula, on a (b, heads, l, d) view of a projection's output."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, l, heads * d + 8, device=device, generator=gen).to(dtype)[..., 4:4 + heads * d]
    x = x.view(b, l, heads, d).transpose(1, 2)
    ang = torch.rand(b, l, d // 2, device=device, generator=gen) * 100
    cos, sin = (torch.cat([f(ang)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    got, want = fused_rope(x, cos, sin), apply_rope_ref(x, cos, sin)
    return {"y": rel_error(got, want)}


@functools.cache
def fused_ok(dtype: torch.dtype, device_index: int) -> bool:
    return triton is not None and passes_check(
        "fused RoPE", lambda: fused_errors(dtype, torch.device("cuda", device_index)), CHECK_TOLERANCE,
        "torch ops")
