"""Residual add + RMSNorm: (h, y) = (x + delta, RMSNorm(x + delta)), rounded as `layers.norm.RMSNorm` rounds
(y = w * (x / sqrt(mean(x^2) + eps)) with the normalised row rounded to x's dtype, the sum in fp32; the residual
add rounded to x's dtype).

`rmsnorm_ref` is the torch formula. `add_rmsnorm(..., fused=True)` runs one Triton kernel per row instead, for
tensors that need no gradient: a frozen teacher's stream, the engine's prefill. Callers decide when it may run;
`fused_ok` checks the kernel once against the formula.

`rmsnorm` is the module's forward: on CUDA the same kernel, and under autograd `RMSNormFn` (that kernel forward, one
backward kernel for dx and per-program partial sums of dw) instead of the ~15 elementwise passes autograd makes of
the formula, after a one-off check of the gradients too; the formula elsewhere and under torch.compile (which fuses
it itself).
"""

from __future__ import annotations

import functools

import torch

from .checked import cuda_index, passes_check, rel_error, switchable, with_long_rows

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only installs
    triton = tl = None

CHECK_TOLERANCE = 1e-2  # relative; bf16 inputs, fp32 sums (the formula rounds the same way)
MULTI_ROW_MIN = 4096  # from this many rows on, each backward program takes 16 rows (fewer dw partial sums)


def rmsnorm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N), w (N,): w * (x / sqrt(mean(x^2) + eps)), computed in fp32 and rounded to x's dtype first."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def add_rmsnorm(x, delta, w, eps: float, fused: bool = False):
    """(x + delta, RMSNorm(x + delta)); delta None: (x, RMSNorm(x)). `fused`: the Triton kernel (no autograd)."""
    if fused:
        return fused_add_rmsnorm(x, w, eps, delta)
    if delta is not None:
        x = x + delta
    return x, rmsnorm_ref(x, w, eps)


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """(..., N) -> a 2-D (rows, N) view; the rows must be evenly strided and the last dim contiguous."""
    assert x.stride(-1) == 1
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(
        x_ptr, stride_x, d_ptr, stride_d, h_ptr, stride_h, w_ptr, y_ptr, stride_y, N, eps,
        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        XDT = x_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_DELTA:  # h = h + delta, rounded like the reference residual add
            x = (x + tl.load(d_ptr + row * stride_d + cols, mask=m, other=0.0).to(tl.float32)).to(XDT).to(tl.float32)
            tl.store(h_ptr + row * stride_h + cols, x.to(XDT), mask=m)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        y = (x * r).to(XDT).to(tl.float32) * w
        tl.store(y_ptr + row * stride_y + cols, y.to(XDT), mask=m)

    @triton.jit
    def _rmsnorm_bwd_kernel(x_ptr, sx, w_ptr, dy_ptr, sdy, dx_ptr, sdx, dw_ptr, ROWS, N, eps,
                            BLOCK: tl.constexpr, BR: tl.constexpr):
        """Rows [pid * BR, (pid + 1) * BR): dx = r (dn - n mean(dn n)) with n = x r, dn = dy w; and this program's
        sum of dw = dy n (n rounded to x's dtype, as the forward multiplies it)."""
        p = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), tl.float32)
        for i in range(BR):
            row = (p * BR + i).to(tl.int64)
            mr = m & (row < ROWS)
            x = tl.load(x_ptr + row * sx + cols, mask=mr, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * sdy + cols, mask=mr, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
            n = x * r
            dn = dy * w
            dx = r * (dn - n * (tl.sum(dn * n, axis=0) / N))
            tl.store(dx_ptr + row * sdx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mr)
            dw += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(dw_ptr + p * N + cols, dw, mask=m)


def fused_add_rmsnorm(x, w, eps: float, delta=None):
    """The kernel alone: returns (h, y) as `add_rmsnorm`, each of x's shape and dtype (w in x's dtype)."""
    shape = x.shape
    x2 = rows_view(x)
    N = x2.shape[1]
    y = torch.empty(shape, dtype=x.dtype, device=x.device)
    h = torch.empty(shape, dtype=x.dtype, device=x.device) if delta is not None else x
    d2 = rows_view(delta) if delta is not None else x2
    h2 = rows_view(h)
    _add_rmsnorm_kernel[(x2.shape[0],)](x2, x2.stride(0), d2, d2.stride(0), h2, h2.stride(0), w, rows_view(y),
                                        N, N, float(eps), HAS_DELTA=delta is not None,
                                        BLOCK=triton.next_power_of_2(N),
                                        num_warps=4 if N <= 4096 else 8)
    return h, y


class RMSNormFn(torch.autograd.Function):
    """x (..., N), w (N,) in x's dtype -> RMSNorm(x) as `rmsnorm_ref`: the forward kernel; `_rmsnorm_bwd_kernel`."""

    @staticmethod
    def forward(ctx, x, w, eps: float):
        _, y = fused_add_rmsnorm(x, w, eps)
        ctx.save_for_backward(x, w)
        ctx.eps = float(eps)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        x2 = rows_view(x if x.stride(-1) == 1 else x.contiguous())
        dy2 = rows_view(dy if dy.stride(-1) == 1 else dy.contiguous())
        rows, N = x2.shape
        br = 16 if rows >= MULTI_ROW_MIN else 1
        grid = (triton.cdiv(rows, br),)
        dx = torch.empty(rows, N, dtype=x.dtype, device=x.device)
        dw = torch.empty(grid[0], N, dtype=torch.float32, device=x.device)
        _rmsnorm_bwd_kernel[grid](x2, x2.stride(0), w, dy2, dy2.stride(0), dx, dx.stride(0), dw, rows, N, ctx.eps,
                                  BLOCK=triton.next_power_of_2(N), BR=br, num_warps=4 if N <= 4096 else 8)
        return dx.view(x.shape), dw.sum(0).to(w.dtype), None


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """`rmsnorm_ref` (the module's forward). On CUDA, w in x's dtype, outside torch.compile and after their check:
    the forward kernel alone where no gradient is needed, else `RMSNormFn`."""
    if (x.is_cuda and x.dtype == w.dtype and x.stride(-1) == 1 and not torch.compiler.is_compiling()
            and rmsnorm_ok(x.dtype, cuda_index(x.device))):
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return RMSNormFn.apply(x, w, eps)
        return fused_add_rmsnorm(x, w, eps)[1]
    return rmsnorm_ref(x, w, eps)


def rmsnorm_errors(dtype: torch.dtype, device, rows: int = 37, n: int = 300) -> dict[str, float]:
    """Relative errors of `RMSNormFn` (y, dx, dw) against the formula under autograd (n not a power of two)."""
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(rows, n, device=device, generator=gen).to(dtype)
    w = (torch.rand(n, device=device, generator=gen) + 0.5).to(dtype)
    dy = torch.randn(rows, n, device=device, generator=gen).to(dtype)

    def run(fn):
        xs, ws = (t.detach().clone().requires_grad_(True) for t in (x, w))
        y = fn(xs, ws, 1e-5)
        y.backward(dy)
        return [y.detach(), xs.grad, ws.grad]

    return dict(zip(("y", "dx", "dw"), map(rel_error, run(RMSNormFn.apply), run(rmsnorm_ref))))


@switchable("rmsnorm")
def rmsnorm_ok(dtype: torch.dtype, device_index: int) -> bool:
    """Whether `rmsnorm` may use the kernels on this CUDA device in `dtype` (both checked once)."""
    dev = torch.device("cuda", device_index)

    def errors():
        return with_long_rows(rmsnorm_errors(dtype, dev), rmsnorm_errors(dtype, dev, rows=MULTI_ROW_MIN + 37))

    return fused_ok(dtype, device_index) and passes_check("fused RMSNorm backward", errors, CHECK_TOLERANCE,
                                                          "torch ops")


def fused_errors(dtype: torch.dtype, device, rows: int = 37, n: int = 300) -> dict[str, float]:
    """Relative errors of the kernel against the formula (n not a power of two), with and without delta."""
    gen = torch.Generator(device=device).manual_seed(0)
    x, d = (torch.randn(rows, n, device=device, generator=gen).to(dtype) for _ in range(2))
    w = (torch.rand(n, device=device, generator=gen) + 0.5).to(dtype)
    with torch.no_grad():
        got = fused_add_rmsnorm(x, w, 1e-5, d) + fused_add_rmsnorm(x, w, 1e-5)[1:]
        want = add_rmsnorm(x, d, w, 1e-5) + (rmsnorm_ref(x, w, 1e-5),)
    return dict(zip(("h", "y", "y_no_delta"), map(rel_error, got, want)))


@functools.cache
def fused_ok(dtype: torch.dtype, device_index: int) -> bool:
    """Whether the kernel may run on this CUDA device in `dtype` (checked once, logged by `passes_check`)."""
    return triton is not None and passes_check(
        "fused residual add + RMSNorm", lambda: fused_errors(dtype, torch.device("cuda", device_index)),
        CHECK_TOLERANCE, "torch ops")
