"""Causal depthwise conv + SiLU of a whole sequence from a zero state (the Mamba-2 mixer in training):

    y_t[c] = SiLU(b[c] + sum_j w[c, j] * x_{t-k+1+j}[c]),  x_{<0} = 0.

x: (B, L, C) with unit channel stride (a strided slice of the input projection is fine); w: (C, k); b: (C,) or
None. `conv_silu_ref` is `ops.conv.causal_conv1d` followed by SiLU. On CUDA `conv_silu` runs one Triton kernel
forward and one backward (dx, and per-program partial sums of dw, db; the pre-activation is recomputed rather than
stored) instead of the concatenation, k multiply-adds, SiLU and their autograd passes, after a one-off check of
both against the reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .checked import cuda_index, passes_check, rel_error
from .conv import causal_conv1d

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only installs
    triton = tl = None

BT, BC = 32, 128  # tokens x channels per program
CHECK_TOLERANCE = 2e-2  # relative; the reference rounds every bf16 multiply-add, the kernels only the result


def conv_silu_ref(x, w, b):
    return F.silu(causal_conv1d(x, w, b)[0])


if triton is not None:

    @triton.jit
    def _pre(x_ptr, sxl, rt, rc, cm, L, w_ptr, b_ptr, KC: tl.constexpr, HAS_B: tl.constexpr, SHIFT: tl.constexpr,
             BT: tl.constexpr, BC: tl.constexpr):
        """Pre-activation at positions rt + SHIFT (fp32, (BT, BC))."""
        acc = tl.zeros((BT, BC), tl.float32)
        if HAS_B:
            acc += tl.load(b_ptr + rc, mask=cm, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(KC):
            src = rt + SHIFT - (KC - 1) + j
            xv = tl.load(x_ptr + src[:, None] * sxl + rc[None, :], mask=((src >= 0) & (src < L))[:, None] & cm[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.load(w_ptr + rc * KC + j, mask=cm, other=0.0).to(tl.float32)[None, :] * xv
        return acc

    @triton.jit
    def _fwd_kernel(x_ptr, sxb, sxl, w_ptr, b_ptr, o_ptr, sob, sol, L, C,
                    KC: tl.constexpr, HAS_B: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        seq = tl.program_id(0).to(tl.int64)
        rt = tl.program_id(1) * BT + tl.arange(0, BT)
        rc = tl.program_id(2) * BC + tl.arange(0, BC)
        cm = rc < C
        pre = _pre(x_ptr + seq * sxb, sxl, rt, rc, cm, L, w_ptr, b_ptr, KC, HAS_B, 0, BT, BC)
        y = pre * tl.sigmoid(pre)
        tl.store(o_ptr + seq * sob + rt[:, None] * sol + rc[None, :], y.to(o_ptr.dtype.element_ty),
                 mask=(rt < L)[:, None] & cm[None, :])

    @triton.jit
    def _bwd_kernel(x_ptr, sxb, sxl, w_ptr, b_ptr, dy_ptr, sdb, sdl, dx_ptr, sdxb, sdxl, dw_ptr, db_ptr, L, C,
                    KC: tl.constexpr, HAS_B: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        """dx_t = sum_s w[:, k-1-s] * dpre_{t+s}; this program's sums over its tokens of dpre_t * x_{t-k+1+j} (dw)
        and dpre_t (db), written to row (seq, token block) of the partial buffers."""
        seq = tl.program_id(0).to(tl.int64)
        tb = tl.program_id(1)
        rt = tb * BT + tl.arange(0, BT)
        rc = tl.program_id(2) * BC + tl.arange(0, BC)
        cm = rc < C
        xb = x_ptr + seq * sxb
        dyb = dy_ptr + seq * sdb
        dx = tl.zeros((BT, BC), tl.float32)
        prow = (seq * tl.num_programs(1) + tb) * C
        for s in tl.static_range(KC):
            pos = rt + s
            pm = (pos < L)[:, None] & cm[None, :]
            pre = _pre(xb, sxl, rt, rc, cm, L, w_ptr, b_ptr, KC, HAS_B, s, BT, BC)
            sg = tl.sigmoid(pre)
            dy = tl.load(dyb + pos[:, None] * sdl + rc[None, :], mask=pm, other=0.0).to(tl.float32)
            dpre = tl.where(pm, dy * sg * (1.0 + pre * (1.0 - sg)), 0.0)
            dx += tl.load(w_ptr + rc * KC + (KC - 1 - s), mask=cm, other=0.0).to(tl.float32)[None, :] * dpre
            if s == 0:  # the block's own positions: weight and bias gradients
                if HAS_B:
                    tl.store(db_ptr + prow + rc, tl.sum(dpre, axis=0), mask=cm)
                for j in tl.static_range(KC):
                    src = rt - (KC - 1) + j
                    xv = tl.load(xb + src[:, None] * sxl + rc[None, :],
                                 mask=((src >= 0) & (src < L))[:, None] & cm[None, :], other=0.0).to(tl.float32)
                    tl.store(dw_ptr + (prow + rc) * KC + j, tl.sum(dpre * xv, axis=0), mask=cm)
        tl.store(dx_ptr + seq * sdxb + rt[:, None] * sdxl + rc[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=(rt < L)[:, None] & cm[None, :])


def _grid(x, bt: int = BT):
    B, L, C = x.shape
    return (B, triton.cdiv(L, bt), triton.cdiv(C, BC))


def _bwd_bt(k: int) -> int:
    """Tokens per backward program: fewer for wider kernels (k^2 recomputed taps; 32 tokens spill at k = 4)."""
    return BT if k <= 2 else 16


class ConvSiLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        B, L, C = x.shape
        out = torch.empty(B, L, C, dtype=x.dtype, device=x.device)
        wc = w.contiguous()
        _fwd_kernel[_grid(x)](x, x.stride(0), x.stride(1), wc, b if b is not None else wc, out, out.stride(0),
                              out.stride(1), L, C, KC=w.shape[1], HAS_B=b is not None, BT=BT, BC=BC, num_warps=4)
        ctx.save_for_backward(x, wc, b)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w, b = ctx.saved_tensors
        B, L, C = x.shape
        k = w.shape[1]
        bt = _bwd_bt(k)
        grid = _grid(x, bt)
        dx = torch.empty(B, L, C, dtype=x.dtype, device=x.device)
        dw = torch.empty(B * grid[1], C, k, dtype=torch.float32, device=x.device)
        db = torch.empty(B * grid[1], C, dtype=torch.float32, device=x.device)
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        _bwd_kernel[grid](x, x.stride(0), x.stride(1), w, b if b is not None else w, dy, dy.stride(0), dy.stride(1),
                          dx, dx.stride(0), dx.stride(1), dw, db, L, C, KC=k, HAS_B=b is not None, BT=bt, BC=BC,
                          num_warps=4)
        return dx, dw.sum(0).to(w.dtype), None if b is None else db.sum(0).to(b.dtype)


@torch.compiler.disable  # its own Triton kernels (and one-off check) stay outside compiled graphs
def conv_silu(x, w, b):
    """Dispatch: the fused Triton kernels on CUDA (after their check passed), else the reference."""
    if x.is_cuda and x.stride(-1) == 1 and _fused_ok(w.shape[1], x.dtype, b is not None, cuda_index(x.device)):
        return ConvSiLUFn.apply(x, w, b)
    return conv_silu_ref(x, w, b)


def fused_errors(k: int, dtype: torch.dtype, device, has_bias: bool = True, L: int = 77, C: int = 200):
    """Relative errors of the fused forward and gradients against the reference, x a strided slice."""
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(2, L, C + 16, device=device, generator=gen).to(dtype)
    w = torch.randn(C, k, device=device, generator=gen) * 0.5
    b = torch.randn(C, device=device, generator=gen) * 0.1 if has_bias else None
    dy = torch.randn(2, L, C, device=device, generator=gen).to(dtype)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (z, w, b)]
        y = fn(leaves[0][:, :, 8:8 + C], leaves[1], leaves[2])
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves if t is not None]

    got, want = run(ConvSiLUFn.apply), run(conv_silu_ref)
    return dict(zip(("y", "dx", "dw", "db"), map(rel_error, got, want)))


@functools.cache
def _fused_ok(k: int, dtype: torch.dtype, has_bias: bool, device_index: int) -> bool:
    return triton is not None and passes_check(
        "fused conv+SiLU", lambda: fused_errors(k, dtype, torch.device("cuda", device_index), has_bias),
        CHECK_TOLERANCE, "torch ops")
