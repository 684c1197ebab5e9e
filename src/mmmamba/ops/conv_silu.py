"""Causal depthwise conv + SiLU of a whole sequence from a zero state (the Mamba-2 mixer in training):

    y_t[c] = SiLU(b[c] + sum_j w[c, j] * x_{t-k+1+j}[c]),  x_{<0} = 0.

x: (B, L, C) with unit channel stride (a strided slice of the input projection is fine); w: (C, k); b: (C,) or
None. `conv_silu_ref` is `ops.conv.causal_conv1d` followed by SiLU. On CUDA `conv_silu` runs one Triton kernel
forward and one backward (dx, and per-program partial sums of dw, db; the pre-activation is recomputed rather than
stored) instead of the concatenation, k multiply-adds, SiLU and their autograd passes, after a one-off check of
both against the reference.

Prefill of the inference engine (no gradient, a chunk at a time): `fused_prefill` also takes the carried state
(the k - 1 inputs before the chunk) and a padding mask, rounds as the model's torch ops round (weights, the sum
and the SiLU in the model dtype; `conv_silu_prefill_ref`), and can write its output straight into the SSD's
simple-GLA inputs (q, the group-repeated k, dt * v; `ops.gla_prep.gla_prep_ref`). One kernel
(`_conv_silu_prefill_kernel`), checked once per device, dtype and layout (`prefill_ok`, asked through
`ops.kernel_report(..., inference=True)`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .checked import cuda_index, passes_check, rel_error
from .conv import causal_conv1d
from .gla_prep import gla_prep_ref

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
    def _conv_silu_fwd_kernel(x_ptr, sxb, sxl, w_ptr, b_ptr, o_ptr, sob, sol, L, C,
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
    def _conv_silu_bwd_kernel(x_ptr, sxb, sxl, w_ptr, b_ptr, dy_ptr, sdb, sdl, dx_ptr, sdxb, sdxl, dw_ptr, db_ptr, L, C,
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

    @triton.jit
    def _conv_silu_prefill_kernel(
        z_ptr, stride_zb, stride_zt, st_ptr, w_ptr, b_ptr, m_ptr, o_ptr, L, C,
        q_ptr, k_ptr, v_ptr, dt_ptr, KVD, H,
        KC: tl.constexpr, HAS_STATE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
        BT: tl.constexpr, BC: tl.constexpr, SPLIT: tl.constexpr, D: tl.constexpr, REP: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        c = tl.program_id(2) * BC + tl.arange(0, BC)
        XDT = z_ptr.dtype.element_ty
        cm = c < C
        tm = t < L
        acc = tl.zeros((BT, BC), tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + c, mask=cm, other=0.0).to(XDT).to(tl.float32)[None, :]
        for j in tl.static_range(KC):
            src = t - (KC - 1) + j
            inside = (src >= 0) & tm
            x = tl.load(z_ptr + b * stride_zb + src[:, None] * stride_zt + c[None, :],
                        mask=inside[:, None] & cm[None, :], other=0.0).to(tl.float32)
            if HAS_MASK:
                x = x * tl.load(m_ptr + b * L + src, mask=inside, other=0.0).to(tl.float32)[:, None]
            if HAS_STATE:  # taps before the chunk come from the carried state (the last KC-1 inputs)
                before = (src < 0) & tm
                sidx = src + (KC - 1)
                xs = tl.load(st_ptr + (b * C + c[None, :]) * (KC - 1) + sidx[:, None],
                             mask=before[:, None] & cm[None, :], other=0.0).to(tl.float32)
                x = x + xs
            acc += x * tl.load(w_ptr + c * KC + j, mask=cm, other=0.0).to(XDT).to(tl.float32)[None, :]
        acc = acc.to(XDT).to(tl.float32)
        y = (acc * tl.sigmoid(acc)).to(XDT).to(tl.float32)
        if HAS_MASK:
            y = y * tl.load(m_ptr + b * L + t, mask=tm, other=0.0).to(tl.float32)[:, None]
        om = tm[:, None] & cm[None, :]
        if SPLIT:  # straight into the SSD's layout: q (b, L, H, D), k and dt * v repeated over each group's heads
            c0 = tl.program_id(2) * BC  # a column block lies inside one head (BC divides D): scalar routing
            row = (b * L + t) * H
            if c0 >= 2 * KVD:
                hq = (c0 - 2 * KVD) // D
                dq = (c0 - 2 * KVD) % D + tl.arange(0, BC)
                tl.store(q_ptr + (row[:, None] + hq) * D + dq[None, :], y.to(XDT), mask=om)
            else:
                is_v = c0 < KVD
                cc = tl.where(is_v, c0, c0 - KVD)
                dd = cc % D + tl.arange(0, BC)
                for r in tl.static_range(REP):
                    head = (cc // D) * REP + r
                    off = (row[:, None] + head) * D + dd[None, :]
                    if is_v:
                        dtv = tl.load(dt_ptr + row + head, mask=tm, other=0.0).to(XDT).to(tl.float32)
                        tl.store(v_ptr + off, (y * dtv[:, None]).to(XDT), mask=om)
                    else:
                        tl.store(k_ptr + off, y.to(XDT), mask=om)
        else:
            tl.store(o_ptr + (b * L + t[:, None]) * C + c[None, :], y.to(XDT), mask=om)


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
        _conv_silu_fwd_kernel[_grid(x)](x, x.stride(0), x.stride(1), wc, b if b is not None else wc, out, out.stride(0),
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
        _conv_silu_bwd_kernel[grid](x, x.stride(0), x.stride(1), w, b if b is not None else w, dy, dy.stride(0),
                                    dy.stride(1), dx, dx.stride(0), dx.stride(1), dw, db, L, C, KC=k,
                                    HAS_B=b is not None, BT=bt, BC=BC, num_warps=4)
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


def split_ok(head_dim: int) -> bool:
    """Whether `fused_prefill(split=...)` handles this head dim (column blocks inside one head)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def fused_prefill(xBC, weight, bias, state, mask, split=None):
    """SiLU(causal depthwise conv(x)) with masked (padding) inputs and outputs zeroed, taps before the chunk from
    `state` (b, C, k-1) (None: zeros). xBC (b, l, C) may be a strided view of the fused projection. Returns the
    output (b, l, C) contiguous and the new state (the last k-1 masked inputs).

    `split=(dt, heads, kv_heads, head_dim)`, C = [v | k | q] = 2 kv d + h d, dt (b, l, h) fp32: the output goes
    straight into the SSD's simple-GLA inputs instead, each (b, l, h, d) contiguous: (q, k, dt * v) with k and v
    repeated over the heads of their group, rounded as `ops.ssd_fla.gla_inputs` rounds them (dt to the model dtype
    first); the output slot of the return value is then that triple. Saves the split's copies and the dt * v pass."""
    b, L, C = xBC.shape
    kc = weight.shape[1]
    assert xBC.stride(2) == 1
    mk = None if mask is None else mask.to(xBC.dtype).contiguous()
    if split is None:
        out = torch.empty(b, L, C, dtype=xBC.dtype, device=xBC.device)
        q = k = v = dt = out
        kvd, h, d, rep = 0, 1, 1, 1
    else:
        dt, h, kv, d = split
        assert C == (2 * kv + h) * d and dt.shape == (b, L, h) and dt.is_contiguous()
        q, k, v = (torch.empty(b, L, h, d, dtype=xBC.dtype, device=xBC.device) for _ in range(3))
        out, kvd, rep = q, kv * d, h // kv
    assert split is None or split_ok(d), f"split: head dim {d} is not a power of two >= 16"
    BT, BC = 16, 128 if split is None else min(128, d)
    _conv_silu_prefill_kernel[(b, triton.cdiv(L, BT), triton.cdiv(C, BC))](
        xBC, xBC.stride(0), xBC.stride(1), state if state is not None else weight, weight,
        bias if bias is not None else weight, mk if mk is not None else weight, out, L, C,
        q, k, v, dt, kvd, h,
        KC=kc, HAS_STATE=state is not None, HAS_MASK=mk is not None, HAS_BIAS=bias is not None,
        BT=BT, BC=BC, SPLIT=split is not None, D=d, REP=rep, num_warps=4,
    )
    if split is not None:
        out = (q, k, v)
    tail = xBC[:, max(0, L - (kc - 1)):]
    if mk is not None:
        tail = tail * mk[:, max(0, L - (kc - 1)):, None]
    prev = state if state is not None else xBC.new_zeros(b, C, kc - 1)
    new_state = torch.cat([prev.to(xBC.dtype), tail.transpose(1, 2)], dim=-1)[..., -(kc - 1):].contiguous()
    return out, new_state


def conv_silu_prefill_ref(xBC, weight, bias, state, mask, split=None):
    """The torch ops `fused_prefill` stands for: masked inputs, `causal_conv1d` from `state`, SiLU, masked
    outputs; with `split=(dt, h, kv, d)` the SSD's simple-GLA inputs of that output (`gla_prep_ref`)."""
    m = None if mask is None else mask[..., None].to(xBC.dtype)
    x = xBC if m is None else xBC * m
    y, new_state = causal_conv1d(x, weight, bias, state)
    y = F.silu(y)
    if m is not None:
        y = y * m
    if split is not None:
        dt, h, kv, d = split
        return gla_prep_ref(y, dt, h, kv, d), new_state
    return y.contiguous(), new_state


def prefill_errors(k: int, dtype: torch.dtype, device, has_bias: bool = True, head_dim: int | None = None,
                   L: int = 37) -> dict[str, float]:
    """Relative errors of `fused_prefill` against `conv_silu_prefill_ref` on random inputs: a strided slice of a
    projection, a carried state, left padding on one row; with `head_dim`, the split layout (4 heads in 2 groups)."""
    gen = torch.Generator(device=device).manual_seed(1)
    h, kv, d = 4, 2, head_dim or 16
    C = (2 * kv + h) * d
    z = torch.randn(2, L, C + 16, device=device, generator=gen).to(dtype)
    x = z[:, :, 8:8 + C]
    w = (torch.randn(C, k, device=device, generator=gen) * 0.5).to(dtype)
    b = (torch.randn(C, device=device, generator=gen) * 0.1).to(dtype) if has_bias else None
    state = torch.randn(2, C, k - 1, device=device, generator=gen).to(dtype)
    mask = torch.ones(2, L, dtype=torch.bool, device=device)
    mask[1, :5] = False
    split = None
    if head_dim is not None:
        split = (torch.nn.functional.softplus(torch.randn(2, L, h, device=device, generator=gen)), h, kv, d)
    got, got_state = fused_prefill(x, w, b, state, mask, split)
    want, want_state = conv_silu_prefill_ref(x, w, b, state, mask, split)
    outs = zip(("q", "k", "v"), got, want) if split is not None else [("y", got, want)]
    return {**{n: rel_error(a, r) for n, a, r in outs}, "state": rel_error(got_state, want_state)}


@functools.cache
def prefill_ok(k: int, dtype: torch.dtype, has_bias: bool, head_dim: int | None, device_index: int) -> bool:
    """Whether `fused_prefill` may run on this CUDA device (checked once per layout; `head_dim`: the split one)."""
    return triton is not None and passes_check(
        "fused prefill conv+SiLU",
        lambda: prefill_errors(k, dtype, torch.device("cuda", device_index), has_bias, head_dim), CHECK_TOLERANCE,
        "torch ops")
