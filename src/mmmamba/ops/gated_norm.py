"""Per-head gated RMSNorm of the Mamba-2 output, y = x / sqrt(mean_d(x^2) + eps) * w * SiLU(g), computed in fp32
and returned in x's dtype. x, g: (rows, h*d) views with unit stride inside a row (g may be a strided slice);
w: (d,).

`gated_rmsnorm_ref` is the torch reference (what `layers.norm.GatedRMSNorm` computes on the CPU). On CUDA,
`gated_rmsnorm` runs one Triton kernel forward and one backward (dx, dg and per-program partial sums of dw) instead
of the ~20 fp32 elementwise passes autograd makes of the reference, after a one-off check of both against it.

`gated_rmsnorm_mse` is the stage 1-2 loss on the norm's output, masked_mse(y, t, mask) (`ops.mse`): on CUDA its
forward kernel keeps only per-row sums of (y - t)^2 and its backward kernel forms dy = 2 (y - t) mask / denom itself,
so neither y, its gradient nor the fp32 passes of the MSE exist in memory (checked once against the reference too).
"""

from __future__ import annotations

import functools

import torch

from .checked import cuda_index, passes_check, rel_error, switchable, with_long_rows
from .mse import masked_mse

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
    def _gated(x_ptr, sx, g_ptr, sg, w_ptr, row, off, m, eps, D: tl.constexpr):
        """y = RMSNorm(x) * w * SiLU(g) in fp32 for one row's block of heads (offsets off, mask m)."""
        x = tl.load(x_ptr + row * sx + off, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * sg + off, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + tl.arange(0, D)).to(tl.float32)
        n = x * tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        return n * w[None, :] * (g * tl.sigmoid(g))

    @triton.jit
    def _gated_norm_fwd_kernel(x_ptr, sx, g_ptr, sg, w_ptr, o_ptr, so, H, eps, D: tl.constexpr, BH: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        rh = tl.program_id(1) * BH + tl.arange(0, BH)
        m = (rh < H)[:, None]
        off = rh[:, None] * D + tl.arange(0, D)[None, :]
        y = _gated(x_ptr, sx, g_ptr, sg, w_ptr, row, off, m, eps, D)
        tl.store(o_ptr + row * so + off, y.to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _target(t_ptr, row, rh, rd, m, stb, stl, sth, L):
        """Rows of the target (b, l, h, d) (any strides over b, l, h) for flat row b * L + l, in fp32."""
        off = (row // L) * stb + (row % L) * stl + rh[:, None] * sth + rd[None, :]
        return tl.load(t_ptr + off, mask=m, other=0.0).to(tl.float32)

    @triton.jit
    def _fwd_mse_kernel(x_ptr, sx, g_ptr, sg, w_ptr, t_ptr, stb, stl, sth, L, rw_ptr, part_ptr, H, eps,
                        D: tl.constexpr, BH: tl.constexpr, HAS_RW: tl.constexpr):
        """Row pid0, heads of block pid1: rw[row] x the sum of (y - t)^2, y = the gated norm rounded to x's dtype
        (as the module's output is), into part[row, pid1]. y itself is never stored."""
        row = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        rh = hb * BH + tl.arange(0, BH)
        rd = tl.arange(0, D)
        m = (rh < H)[:, None]
        off = rh[:, None] * D + rd[None, :]
        y = _gated(x_ptr, sx, g_ptr, sg, w_ptr, row, off, m, eps, D).to(x_ptr.dtype.element_ty).to(tl.float32)
        e = tl.where(m, y - _target(t_ptr, row, rh, rd, m, stb, stl, sth, L), 0.0)
        s = tl.sum(tl.sum(e * e, axis=1), axis=0)
        if HAS_RW:
            s = s * tl.load(rw_ptr + row)
        tl.store(part_ptr + row * tl.num_programs(1) + hb, s)

    @triton.jit
    def _gated_norm_bwd_kernel(x_ptr, sx, g_ptr, sg, w_ptr, dy_ptr, sdy, dx_ptr, sdx, dg_ptr, sdg, dw_ptr, ROWS, H, eps,
                    t_ptr, stb, stl, sth, L, rw_ptr, coef_ptr,
                    D: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, LOSS: tl.constexpr, HAS_RW: tl.constexpr):
        """Rows [pid0 * BR, (pid0 + 1) * BR), heads of block pid1: dx, dg, and this program's sum of dw. LOSS: dy is
        not read but formed here, dy = coef x rw[row] x (y - t) (the masked MSE's gradient, coef = 2 dL / denom)."""
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
            r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
            n = x * r[:, None]
            sgm = tl.sigmoid(g)
            a = g * sgm
            if LOSS:
                y = (n * w[None, :] * a).to(x_ptr.dtype.element_ty).to(tl.float32)
                dy = tl.load(coef_ptr) * (y - _target(t_ptr, row, rh, rd, mr, stb, stl, sth, L))
                if HAS_RW:
                    dy = dy * tl.load(rw_ptr + row, mask=row < ROWS, other=0.0)
                dy = tl.where(mr, dy, 0.0)
            else:
                dy = tl.load(dy_ptr + row * sdy + off, mask=mr, other=0.0).to(tl.float32)
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
    _gated_norm_fwd_kernel[(x2.shape[0], triton.cdiv(H, bh))](x2, x2.stride(0), g2, g2.stride(0), w, o2, o2.stride(0),
                                                              H, float(eps), D=head_dim, BH=bh, num_warps=4)
    return out


def _backward_rows(x2, g2, w, eps: float, D: int, g_dtype, dy2=None, loss=None):
    """dx, dg (rows, h*d) and dw (d,) in fp32 by `_gated_norm_bwd_kernel`: from dy2, or (loss = (t, rw, coef)) from
    the masked MSE's gradient formed in the kernel."""
    rows, H = x2.shape[0], x2.shape[1] // D
    dx = torch.empty(rows, x2.shape[1], dtype=x2.dtype, device=x2.device)
    dg = torch.empty(rows, g2.shape[1], dtype=g_dtype, device=g2.device)
    bh = _blocks(H, D)
    br = 16 if rows >= MULTI_ROW_MIN else 1  # rows per program: fewer partial sums of dw on long inputs
    grid = (triton.cdiv(rows, br), triton.cdiv(H, bh))
    dw = torch.empty(grid[0] * grid[1], D, dtype=torch.float32, device=x2.device)
    if loss is None:
        t, rw, coef, L, t_strides, sdy = dy2, None, dy2, 1, (0, 0, 0), dy2.stride(0)
    else:
        (t, rw, coef), dy2, sdy = loss, x2, 0
        L, t_strides = t.shape[1], t.stride()[:3]
    _gated_norm_bwd_kernel[grid](x2, x2.stride(0), g2, g2.stride(0), w, dy2, sdy, dx, dx.stride(0), dg, dg.stride(0),
                                 dw, rows, H, float(eps), t, *t_strides, L, coef if rw is None else rw, coef, D=D,
                                 BH=bh, BR=br, LOSS=loss is not None, HAS_RW=rw is not None, num_warps=4)
    return dx, dg, dw.sum(0)


class GatedRMSNormFn(torch.autograd.Function):
    """x, g (..., h*d), w (d,) -> (..., h*d): `fused_forward`, and `_gated_norm_bwd_kernel` for dx, dg, dw."""

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
        dx, dg, dw = _backward_rows(x2, g2, w, ctx.eps, ctx.head_dim, g_dtype, dy2=_rows(dy))
        return dx.view(x_shape), dg.view(g_shape), dw.to(w.dtype), None, None


class GatedRMSNormMSEFn(torch.autograd.Function):
    """masked_mse(gated norm of x, g; t, mask) without storing the norm's output or its gradient: x, g, t (b, l, h, d)
    (g and t may be strided over b, l, h), w (d,), rw (b*l,) fp32 row weights (the mask) or None -> fp32 scalar.

    Forward: one kernel of per-(row, head block) sums of rw (y - t)^2; backward: `_gated_norm_bwd_kernel` forms
    dy = 2 dL rw (y - t) / denom itself, denom = max(sum rw, 1) * h * d (rows * h * d without a mask)."""

    @staticmethod
    def forward(ctx, x, g, w, t, rw, eps: float):
        b, l, H, D = x.shape
        x2, g2 = _head_rows(x), _head_rows(g)
        t = t if t.stride(-1) == 1 else t.contiguous()
        bh = _blocks(H, D)
        part = torch.empty(b * l, triton.cdiv(H, bh), dtype=torch.float32, device=x.device)
        _fwd_mse_kernel[part.shape](x2, x2.stride(0), g2, g2.stride(0), w, t, *t.stride()[:3], l,
                                    part if rw is None else rw, part, H, float(eps), D=D, BH=bh,
                                    HAS_RW=rw is not None, num_warps=4)
        denom = x.new_full((), float(b * l), dtype=torch.float32) if rw is None else rw.sum().clamp(min=1.0)
        scale = 1.0 / (denom * (H * D))
        ctx.save_for_backward(x2, g2, w, t, rw, scale)
        ctx.eps, ctx.shapes = float(eps), (x.shape, g.shape, g.dtype)
        return part.sum() * scale

    @staticmethod
    def backward(ctx, dloss):
        x2, g2, w, t, rw, scale = ctx.saved_tensors
        x_shape, g_shape, g_dtype = ctx.shapes
        coef = (2.0 * dloss.float() * scale).reshape(1)  # stays on the device: no host sync (CUDA graphs)
        dx, dg, dw = _backward_rows(x2, g2, w, ctx.eps, x_shape[-1], g_dtype, loss=(t, rw, coef))
        return dx.view(x_shape), dg.view(g_shape), dw.to(w.dtype), None, None, None


def _head_rows(t: torch.Tensor) -> torch.Tensor:
    """(b, l, h, d) -> (b * l, h * d) with unit stride inside a row (a view where one exists)."""
    return _rows(t.reshape(*t.shape[:-2], t.shape[-2] * t.shape[-1]))


@torch.compiler.disable  # its own Triton kernels (and one-off check) stay outside compiled graphs
def gated_rmsnorm(x, g, w, eps: float, head_dim: int):
    """Dispatch: the fused Triton kernels on CUDA (after their check passed), else the reference."""
    if x.is_cuda and _fused_ok(head_dim, x.dtype, cuda_index(x.device)):
        return GatedRMSNormFn.apply(x, g, w, eps, head_dim)
    return gated_rmsnorm_ref(x, g, w, eps, head_dim)


@torch.compiler.disable  # its own Triton kernels (and one-off check) stay outside compiled graphs
def gated_rmsnorm_mse(x, g, w, eps: float, target, mask=None) -> torch.Tensor:
    """masked_mse(per-head gated RMSNorm of x, g; target, mask): x, g, target (b, l, h, d), mask (b, l) or None.
    On CUDA (after its check passed) `GatedRMSNormMSEFn`: the norm's output and its gradient never exist in memory.
    Elsewhere (or for a target that needs a gradient) the norm's dispatch, then `masked_mse`."""
    if x.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(x.shape)} != target shape {tuple(target.shape)}")
    d = x.shape[-1]
    if x.is_cuda and not target.requires_grad and _fused_mse_ok(d, x.dtype, cuda_index(x.device)):
        rw = None if mask is None else mask.reshape(-1).to(torch.float32)
        return GatedRMSNormMSEFn.apply(x, g, w, target, rw, eps)
    flat = (*x.shape[:-2], x.shape[-2] * d)
    return masked_mse(gated_rmsnorm(x.reshape(flat), g.reshape(flat), w, eps, d).view(x.shape), target, mask)


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


def fused_mse_errors(head_dim: int, dtype: torch.dtype, device, heads: int = 3, b: int = 2, l: int = 19,
                     masked: bool = True) -> dict[str, float]:
    """Relative errors of `GatedRMSNormMSEFn` (loss, dx, dg, dw) against the torch reference (`gated_rmsnorm_ref`,
    then `masked_mse`): g a strided slice (as in the mixer), the target laid out as SDPA gives it (b, h, l, d)
    transposed, a mask with padded rows."""
    gen = torch.Generator(device=device).manual_seed(1)
    hd = heads * head_dim
    x = torch.randn(b, l, heads, head_dim, device=device, generator=gen).to(dtype)
    z = torch.randn(b, l, hd + 8, device=device, generator=gen).to(dtype)
    w = torch.rand(head_dim, device=device, generator=gen) + 0.5
    t = torch.randn(b, heads, l, head_dim, device=device, generator=gen).to(dtype).transpose(1, 2)
    mask = torch.ones(b, l, dtype=torch.bool, device=device)
    mask[0, :3] = mask[-1, -5:] = False

    def run(fn):
        xs, zs, ws = (v.detach().clone().requires_grad_(True) for v in (x, z, w))
        loss = fn(xs, zs[..., 4:4 + hd].reshape(b, l, heads, head_dim), ws, t, mask if masked else None)
        (3.0 * loss).backward()
        return [loss.detach(), xs.grad, zs.grad, ws.grad]

    def fused(xs, gs, ws, t, m):
        return GatedRMSNormMSEFn.apply(xs, gs, ws, t, None if m is None else m.reshape(-1).float(), 1e-5)

    def ref(xs, gs, ws, t, m):
        y = gated_rmsnorm_ref(xs.reshape(b, l, hd), gs.reshape(b, l, hd), ws, 1e-5, head_dim)
        return masked_mse(y.view(xs.shape), t, m)

    return dict(zip(("loss", "dx", "dg", "dw"), map(rel_error, run(fused), run(ref))))


@switchable("norm_mse")
def _fused_mse_ok(head_dim: int, dtype: torch.dtype, device_index: int) -> bool:
    dev = torch.device("cuda", device_index)

    def errors():
        return with_long_rows(fused_mse_errors(head_dim, dtype, dev),
                              fused_mse_errors(head_dim, dtype, dev, l=MULTI_ROW_MIN // 2 + 19))

    return triton is not None and passes_check("fused gated RMSNorm + MSE", errors, CHECK_TOLERANCE,
                                               "the gated RMSNorm, then the torch MSE")
