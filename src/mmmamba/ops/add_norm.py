"""Residual add + RMSNorm: (h, y) = (x + delta, RMSNorm(x + delta)), rounded as `layers.norm.RMSNorm` rounds
(y = w * (x / sqrt(mean(x^2) + eps)) with the normalised row rounded to x's dtype, the sum in fp32; the residual
add rounded to x's dtype).

`rmsnorm_ref` is the torch formula (the module's forward). `add_rmsnorm(..., fused=True)` runs one Triton kernel
per row instead, for tensors that need no gradient: a frozen teacher's stream, the engine's prefill. Callers decide
when it may run; `fused_ok` checks the kernel once against the formula.
"""

from __future__ import annotations

import functools

import torch

from .checked import passes_check, rel_error

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only installs
    triton = tl = None

CHECK_TOLERANCE = 1e-2  # relative; bf16 inputs, fp32 sums (the formula rounds the same way)


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
