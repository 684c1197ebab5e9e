"""Per-head gated RMSNorm of the Mamba-2 output, y = x / sqrt(mean_d(x^2) + eps) * w * SiLU(g), computed in fp32
and returned in x's dtype. x, g: (rows, h*d) views with unit stride inside a row (g may be a strided slice);
w: (d,).

`gated_rmsnorm_ref` is the torch reference (what `layers.norm.GatedRMSNorm` computes on the CPU). On CUDA,
`gated_rmsnorm` runs one Triton kernel forward and one backward (dx, dg and per-program partial sums of dw) instead
of the ~20 fp32 elementwise passes autograd makes of the reference, after a one-off check of both against it.
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

MULTI_ROW_MIN = 4096  # from this many rows on, each backward program takes 16 rows
CHECK_TOLERANCE = 1e-2  # relative, bf16 inputs (the kernels compute in fp32 like the reference)


def gated_rmsnorm_ref(x, g, w, eps: float, head_dim: int):
    """The reference: per-head RMSNorm(x) * w * SiLU(g) in fp32, cast to x.dtype. x, g (..., h*d)."""
    shape = x.shape
    xf = x.float().reshape(*shape[:-1], -1, head_dim)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    gf = g.float().reshape(*shape[:-1], -1, head_dim)
    return (xf * torch.nn.functional.silu(gf)).reshape(shape).to(x.dtype)


if triton is not None:

    @triton.jit
    def _fwd_kernel(x_ptr, sx, g_ptr, sg, w_ptr, o_ptr, so, H, eps, D: tl.constexpr, BH: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        rh = tl.program_id(1) * BH + tl.arange(0, BH)
        rd = tl.arange(0, D)
        m = (rh < H)[:, None]
        off = rh[:, None] * D + rd[None, :]
        x = tl.load(x_ptr + row * sx + off, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * sg + off, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rd).to(tl.float32)
        n = x * tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        tl.store(o_ptr + row * so + off, (n * w[None, :] * (g * tl.sigmoid(g))).to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bwd_kernel(x_ptr, sx, g_ptr, sg, w_ptr, dy_ptr, sdy, dx_ptr, sdx, dg_ptr, sdg, dw_ptr, ROWS, H, eps,
                    D: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr):
        """Rows [pid0 * BR, (pid0 + 1) * BR), heads of block pid1: dx, dg, and this program's sum of dw."""
        p = tl.program_id(0)
        hb = tl.program_id(1)
        rh = hb * BH + tl.arange(0, BH)
        rd = tl.arange(0, D)
        m = (rh < H)[:, None]
        off = rh[:, None] * D + rd[None, :]
        w = tl.load(w_ptr + rd).to(tl.float32)
        dw = tl.zeros((BH, D), tl.float32)
        for i in range(BR):
            row = (p * BR + i).to(tl.int64)
            mr = m & (row < ROWS)
            x = tl.load(x_ptr + row * sx + off, mask=mr, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row * sg + off, mask=mr, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * sdy + off, mask=mr, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
            n = x * r[:, None]
            sgm = tl.sigmoid(g)
            a = g * sgm
            dg = dy * n * w[None, :] * (sgm * (1.0 + g * (1.0 - sgm)))
            u = dy * w[None, :] * a  # d loss / d n
            dx = r[:, None] * (u - n * (tl.sum(u * n, axis=1) / D)[:, None])
            tl.store(dx_ptr + row * sdx + off, dx.to(dx_ptr.dtype.element_ty), mask=mr)
            tl.store(dg_ptr + row * sdg + off, dg.to(dg_ptr.dtype.element_ty), mask=mr)
            dw += dy * n * a
        tl.store(dw_ptr + ((p * tl.num_programs(1) + hb) * D) + rd, tl.sum(dw, axis=0))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (rows, N) view with unit stride inside a row (a copy only when no such view exists)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _blocks(H: int, D: int) -> int:
    return min(triton.next_power_of_2(H), max(1, 2048 // D))


def fused_forward(x, g, w, eps: float, head_dim: int) -> torch.Tensor:
    """The forward kernel alone (no autograd): a new tensor shaped like x. x, g (..., h*d)."""
    return _forward_rows(_rows(x), _rows(g), w, eps, head_dim, x.shape)


def _forward_rows(x2, g2, w, eps: float, head_dim: int, shape) -> torch.Tensor:
    H = x2.shape[1] // head_dim
    out = torch.empty(shape, dtype=x2.dtype, device=x2.device)
    o2 = out.view(-1, out.shape[-1])
    bh = _blocks(H, head_dim)
    _fwd_kernel[(x2.shape[0], triton.cdiv(H, bh))](x2, x2.stride(0), g2, g2.stride(0), w, o2, o2.stride(0), H,
                                                   float(eps), D=head_dim, BH=bh, num_warps=4)
    return out


class GatedRMSNormFn(torch.autograd.Function):
    """x, g (..., h*d), w (d,) -> (..., h*d): `fused_forward`, and `_bwd_kernel` for dx, dg, dw."""

    @staticmethod
    def forward(ctx, x, g, w, eps: float, head_dim: int):
        x2, g2 = _rows(x), _rows(g)
        out = _forward_rows(x2, g2, w, eps, head_dim, x.shape)
        ctx.save_for_backward(x2, g2, w)
        ctx.eps, ctx.head_dim, ctx.shapes = float(eps), head_dim, (x.shape, g.shape, g.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        x2, g2, w = ctx.saved_tensors
        x_shape, g_shape, g_dtype = ctx.shapes
        D = ctx.head_dim
        rows, H = x2.shape[0], x2.shape[1] // D
        dy2 = _rows(dy)
        dx = torch.empty(rows, x2.shape[1], dtype=x2.dtype, device=x2.device)
        dg = torch.empty(rows, g2.shape[1], dtype=g_dtype, device=g2.device)
        bh = _blocks(H, D)
        br = 16 if rows >= MULTI_ROW_MIN else 1  # rows per program: fewer partial sums of dw on long inputs
        grid = (triton.cdiv(rows, br), triton.cdiv(H, bh))
        dw = torch.empty(grid[0] * grid[1], D, dtype=torch.float32, device=x2.device)
        _bwd_kernel[grid](x2, x2.stride(0), g2, g2.stride(0), w, dy2, dy2.stride(0), dx, dx.stride(0), dg,
                          dg.stride(0), dw, rows, H, ctx.eps, D=D, BH=bh, BR=br, num_warps=4)
        return dx.view(x_shape), dg.view(g_shape), dw.sum(0).to(w.dtype), None, None


@torch.compiler.disable  # its own Triton kernels (and one-off check) stay outside compiled graphs
def gated_rmsnorm(x, g, w, eps: float, head_dim: int):
    """Dispatch: the fused Triton kernels on CUDA (after their check passed), else the reference."""
    if x.is_cuda and _fused_ok(head_dim, x.dtype, cuda_index(x.device)):
        return GatedRMSNormFn.apply(x, g, w, eps, head_dim)
    return gated_rmsnorm_ref(x, g, w, eps, head_dim)


def fused_errors(head_dim: int, dtype: torch.dtype, device, heads: int = 3, rows: int = 37) -> dict[str, float]:
    """Relative errors of the fused forward and gradients against the reference (g a strided slice, as in the
    mixer)."""
    gen = torch.Generator(device=device).manual_seed(0)
    hd = heads * head_dim
    x = torch.randn(rows, hd, device=device, generator=gen).to(dtype)
    z = torch.randn(rows, hd + 8, device=device, generator=gen).to(dtype)
    w = torch.rand(head_dim, device=device, generator=gen) + 0.5
    dy = torch.randn(rows, hd, device=device, generator=gen).to(dtype)

    def run(fn):
        xs, zs, ws = (t.detach().clone().requires_grad_(True) for t in (x, z, w))
        y = fn(xs, zs[:, 4:4 + hd], ws, 1e-5, head_dim)
        y.backward(dy)
        return [y.detach(), xs.grad, zs.grad, ws.grad]

    got, want = run(GatedRMSNormFn.apply), run(gated_rmsnorm_ref)
    return dict(zip(("y", "dx", "dg", "dw"), map(rel_error, got, want)))


@functools.cache
def _fused_ok(head_dim: int, dtype: torch.dtype, device_index: int) -> bool:
    return triton is not None and passes_check(
        "fused gated RMSNorm", lambda: fused_errors(head_dim, dtype, torch.device("cuda", device_index)),
        CHECK_TOLERANCE, "torch ops")
