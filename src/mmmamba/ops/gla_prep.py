"""From the mixer's conv output to fla's simple-GLA inputs: xc (b, l, [v | k | q]) with v, k over kv heads and q over
h heads, and dt (b, l, h) -> q (b, l, h, d), k and v * dt repeated to the h heads (GQA), each contiguous.

`gla_prep_ref` is the torch path (split, `repeat_interleave`, `ssd_ref.dt_x`: v * dt rounded to x's dtype).
On CUDA `gla_prep` runs one Triton kernel forward and, under autograd, one backward kernel that writes dxc (summing
the repeated heads' gradients) and ddt = sum_d(dv * v) in fp32, instead of the repeats, the broadcast product, the
copies and their backward passes; checked once against the reference before first use.
"""

from __future__ import annotations

import torch

from .checked import cuda_index, passes_check, rel_error, switchable
from .ssd_ref import dt_x

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only installs
    triton = tl = None

BT = 16  # tokens per program (32 spills in the backward at head dim 64 and 128 with 4 warps)
CHECK_TOLERANCE = 1e-2  # relative; bf16 inputs, fp32 arithmetic


def split_heads(xc: torch.Tensor, h: int, kv: int, d: int):
    """[v | k | q] (b, l, 2 kv d + h d) -> v, k repeated to h heads, q: each (b, l, h, d) (views where possible)."""
    b, l = xc.shape[:2]
    v, k, q = xc.split([kv * d, kv * d, h * d], dim=-1)
    v = v.reshape(b, l, kv, d).repeat_interleave(h // kv, dim=2)
    k = k.reshape(b, l, kv, d).repeat_interleave(h // kv, dim=2)
    return v, k, q.reshape(b, l, h, d)


def gla_prep_ref(xc: torch.Tensor, dt: torch.Tensor, h: int, kv: int, d: int):
    """(q, k, v * dt) as the torch path forms them, each (b, l, h, d) contiguous in xc's dtype."""
    v, k, q = split_heads(xc, h, kv, d)
    return q.contiguous(), k.contiguous(), dt_x(v, dt).contiguous()


if triton is not None:

    @triton.jit
    def _gla_prep_fwd_kernel(xc_ptr, sx, dt_ptr, sdt, q_ptr, k_ptr, v_ptr, ROWS, H: tl.constexpr, KV: tl.constexpr,
                    D: tl.constexpr, BT: tl.constexpr):
        """Rows [pid0 BT, +BT), head pid1 (kv group pid1 // (H // KV))."""
        rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
        hh = tl.program_id(1)
        j = hh // (H // KV)
        rd = tl.arange(0, D)
        mr = (rows < ROWS)[:, None]
        x = xc_ptr + rows[:, None] * sx + rd[None, :]
        v = tl.load(x + j * D, mask=mr, other=0.0)
        k = tl.load(x + (KV + j) * D, mask=mr, other=0.0)
        q = tl.load(x + (2 * KV + hh) * D, mask=mr, other=0.0)
        dt = tl.load(dt_ptr + rows * sdt + hh, mask=rows < ROWS, other=0.0).to(v.dtype).to(tl.float32)
        out = rows[:, None] * (H * D) + hh * D + rd[None, :]
        tl.store(q_ptr + out, q, mask=mr)
        tl.store(k_ptr + out, k, mask=mr)
        tl.store(v_ptr + out, (v.to(tl.float32) * dt[:, None]).to(v_ptr.dtype.element_ty), mask=mr)

    @triton.jit
    def _gla_prep_bwd_kernel(xc_ptr, sx, dt_ptr, sdt, dq_ptr, dk_ptr, dv_ptr, dxc_ptr, sdx, ddt_ptr, ROWS,
                    H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
        """Rows [pid0 BT, +BT), kv group pid1: dq into the q columns of its heads; the sums over the group's heads of
        dk and dv * dt into the k and v columns; ddt = sum_d(dv * v) per head (fp32)."""
        rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
        j = tl.program_id(1)
        rd = tl.arange(0, D)
        m1 = rows < ROWS
        mr = m1[:, None]
        v = tl.load(xc_ptr + rows[:, None] * sx + j * D + rd[None, :], mask=mr, other=0.0)
        vf = v.to(tl.float32)
        dk_sum = tl.zeros((BT, D), tl.float32)
        dv_sum = tl.zeros((BT, D), tl.float32)
        for r in tl.static_range(H // KV):
            hh = j * (H // KV) + r
            g = rows[:, None] * (H * D) + hh * D + rd[None, :]
            dq = tl.load(dq_ptr + g, mask=mr, other=0.0)
            tl.store(dxc_ptr + rows[:, None] * sdx + (2 * KV + hh) * D + rd[None, :], dq.to(dxc_ptr.dtype.element_ty),
                     mask=mr)
            dk_sum += tl.load(dk_ptr + g, mask=mr, other=0.0).to(tl.float32)
            dv = tl.load(dv_ptr + g, mask=mr, other=0.0).to(tl.float32)
            dt = tl.load(dt_ptr + rows * sdt + hh, mask=m1, other=0.0).to(v.dtype).to(tl.float32)
            dv_sum += dv * dt[:, None]
            tl.store(ddt_ptr + rows * H + hh, tl.sum(dv * vf, axis=1), mask=m1)
        dx = dxc_ptr + rows[:, None] * sdx + rd[None, :]
        tl.store(dx + j * D, dv_sum.to(dxc_ptr.dtype.element_ty), mask=mr)
        tl.store(dx + (KV + j) * D, dk_sum.to(dxc_ptr.dtype.element_ty), mask=mr)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class GLAPrepFn(torch.autograd.Function):
    """(xc, dt, h, kv, d) -> (q, k, v * dt) by `_gla_prep_fwd_kernel`; dxc and ddt (fp32) by `_gla_prep_bwd_kernel`."""

    @staticmethod
    def forward(ctx, xc, dt, h: int, kv: int, d: int):
        b, l = xc.shape[:2]
        x2, dt2 = _rows(xc), _rows(dt)
        rows = x2.shape[0]
        q, k, v = (torch.empty(b, l, h, d, dtype=xc.dtype, device=xc.device) for _ in range(3))
        _gla_prep_fwd_kernel[(triton.cdiv(rows, BT), h)](x2, x2.stride(0), dt2, dt2.stride(0), q, k, v, rows, H=h,
                                                         KV=kv, D=d, BT=BT, num_warps=4)
        ctx.save_for_backward(x2, dt2)
        ctx.dims, ctx.shapes = (h, kv, d), (xc.shape, dt.shape, dt.dtype)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x2, dt2 = ctx.saved_tensors
        h, kv, d = ctx.dims
        xc_shape, dt_shape, dt_dtype = ctx.shapes
        rows = x2.shape[0]
        dq, dk, dv = (t.contiguous() for t in (dq, dk, dv))
        dxc = torch.empty(rows, x2.shape[1], dtype=x2.dtype, device=x2.device)
        ddt = torch.empty(rows, h, dtype=torch.float32, device=x2.device)
        _gla_prep_bwd_kernel[(triton.cdiv(rows, BT), kv)](x2, x2.stride(0), dt2, dt2.stride(0), dq, dk, dv, dxc,
                                                          dxc.stride(0), ddt, rows, H=h, KV=kv, D=d, BT=BT, num_warps=4)
        return dxc.view(xc_shape), ddt.view(dt_shape).to(dt_dtype), None, None, None


def gla_prep(xc: torch.Tensor, dt: torch.Tensor, h: int, kv: int, d: int):
    """(q, k, v * dt), each (b, l, h, d) contiguous: the kernels on CUDA (head dim a power of two, after their check),
    else `gla_prep_ref`."""
    if xc.is_cuda and d & (d - 1) == 0 and fused_ok(d, xc.dtype, cuda_index(xc.device)):
        return GLAPrepFn.apply(xc, dt, h, kv, d)
    return gla_prep_ref(xc, dt, h, kv, d)


def fused_errors(d: int, dtype: torch.dtype, device, h: int = 6, kv: int = 2, b: int = 2, l: int = 45,
                 strided: bool = True) -> dict[str, float]:
    """Relative errors of `GLAPrepFn` (q, k, v, dxc, ddt) against autograd through `gla_prep_ref`; xc a strided
    slice when `strided` (as the masked conv output may be)."""
    gen = torch.Generator(device=device).manual_seed(4)
    C = (2 * kv + h) * d
    z = torch.randn(b, l, C + (8 if strided else 0), device=device, generator=gen).to(dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, device=device, generator=gen) - 1)
    grads = [torch.randn(b, l, h, d, device=device, generator=gen).to(dtype) for _ in range(3)]

    def run(fn):
        zs, dts = z.detach().clone().requires_grad_(True), dt.detach().clone().requires_grad_(True)
        outs = fn(zs[..., :C], dts, h, kv, d)
        torch.autograd.backward(outs, grads)
        return [*(o.detach() for o in outs), zs.grad, dts.grad]

    return dict(zip(("q", "k", "v", "dxc", "ddt"), map(rel_error, run(GLAPrepFn.apply), run(gla_prep_ref))))


@switchable("gla_prep")
def fused_ok(d: int, dtype: torch.dtype, device_index: int) -> bool:
    """Whether `gla_prep` may use the kernels on this CUDA device for head dim d in `dtype` (checked once)."""
    return triton is not None and passes_check(
        "fused SSD input preparation", lambda: fused_errors(d, dtype, torch.device("cuda", device_index)),
        CHECK_TOLERANCE, "torch ops")
