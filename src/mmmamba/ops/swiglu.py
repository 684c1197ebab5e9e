"""The gated MLP's SiLU product, y = SiLU(g) * u (g = W_gate x, u = W_up x), rounded as torch rounds
`F.silu(g) * u` (the SiLU rounded to g's dtype, then the product).

`silu_mul_ref` is that formula. On CUDA `silu_mul` runs one Triton kernel forward, and under autograd `SiluMulFn`
one backward kernel for dg and du, instead of torch's two forward and three backward passes (and without keeping
SiLU(g) for the backward), after a one-off check of both against the formula. Elsewhere, and under torch.compile
(which fuses it itself), the formula. `fused_forward_packed` is the same product of a fused [gate | up] projection
(the inference engine's prefill, after `fused_ok`'s check), read in place by the same forward kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .add_norm import rows_view
from .checked import cuda_index, passes_check, rel_error, switchable

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only installs
    triton = tl = None

BLOCK = 2048
CHECK_TOLERANCE = 1e-2  # relative; bf16 inputs, fp32 arithmetic (the formula rounds the same way)


def silu_mul_ref(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SiLU(g) * u."""
    return F.silu(g) * u


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, sg, su, sy, N, NB, BLOCK: tl.constexpr):
        """Program p: row p // NB (row strides sg, su, sy), column block p % NB of the row's N."""
        pid = tl.program_id(0).to(tl.int64)
        row = pid // NB
        offs = (pid % NB) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        g = tl.load(g_ptr + row * sg + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * su + offs, mask=m, other=0.0).to(tl.float32)
        a = (g * tl.sigmoid(g)).to(g_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row * sy + offs, (a * u).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_bwd_kernel(g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, N, BLOCK: tl.constexpr):
        """du = dy SiLU(g) (SiLU rounded as the forward), dg = dy u SiLU'(g), SiLU'(g) = s (1 + g (1 - s))."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        a = (g * s).to(g_ptr.dtype.element_ty).to(tl.float32)
        tl.store(du_ptr + offs, (dy * a).to(du_ptr.dtype.element_ty), mask=m)
        tl.store(dg_ptr + offs, (dy * u * (s * (1.0 + g * (1.0 - s)))).to(dg_ptr.dtype.element_ty), mask=m)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def fused_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The forward kernel alone (no autograd): SiLU(g) * u, shaped like g, in g's dtype."""
    y = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    _rows_forward(_flat(g)[None], _flat(u)[None], y.view(1, -1), BLOCK, num_warps=8)  # one row: blocks of BLOCK
    return y


def _rows_forward(g2: torch.Tensor, u2: torch.Tensor, y2: torch.Tensor, block: int, num_warps: int) -> None:
    """y2 = SiLU(g2) * u2 row by row; each (rows, N) with unit column stride, rows at any stride."""
    rows, n = g2.shape
    nb = triton.cdiv(n, block)
    _silu_mul_kernel[(rows * nb,)](g2, u2, y2, g2.stride(0), u2.stride(0), y2.stride(0), n, nb, BLOCK=block,
                              num_warps=num_warps)


def fused_forward_packed(gu: torch.Tensor) -> torch.Tensor:
    """The forward kernel alone on gu = [gate | up] (..., 2N), both halves read in place: (..., N)."""
    g2 = rows_view(gu)
    n = g2.shape[1] // 2
    y = torch.empty(*gu.shape[:-1], n, dtype=gu.dtype, device=gu.device)
    _rows_forward(g2[:, :n], g2[:, n:], rows_view(y), min(BLOCK, triton.next_power_of_2(n)), num_warps=4)
    return y


class SiluMulFn(torch.autograd.Function):
    """(g, u) -> SiLU(g) * u: `fused_forward`, and `_silu_mul_bwd_kernel` for dg, du (g, u kept; SiLU(g) recomputed)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return fused_forward(g, u)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        g1, u1, dy1 = _flat(g), _flat(u), _flat(dy)
        dg, du = torch.empty_like(g1), torch.empty_like(u1)
        _silu_mul_bwd_kernel[(triton.cdiv(g1.numel(), BLOCK),)](g1, u1, dy1, dg, du, g1.numel(), BLOCK=BLOCK,
                                                                num_warps=8)
        return dg.view(g.shape), du.view(u.shape)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SiLU(g) * u: on CUDA (g, u of one shape and dtype, outside torch.compile, after the check) the kernels, the
    forward one alone where no gradient is needed; else the formula."""
    if (g.is_cuda and g.shape == u.shape and g.dtype == u.dtype and not torch.compiler.is_compiling()
            and fused_ok(g.dtype, cuda_index(g.device))):
        if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
            return SiluMulFn.apply(g, u)
        return fused_forward(g, u)
    return silu_mul_ref(g, u)


def fused_errors(dtype: torch.dtype, device, n: int = 3 * BLOCK + 37) -> dict[str, float]:
    """Relative errors of `SiluMulFn` (y, dg, du) against autograd through the formula (the last block partial), and
    of `fused_forward_packed` on a [gate | up] projection of 5 rows of 3 blocks + 37 ("packed")."""
    gen = torch.Generator(device=device).manual_seed(3)
    g, u, dy = (torch.randn(n, device=device, generator=gen).mul(3).to(dtype) for _ in range(3))
    gu = torch.randn(5, 2 * (3 * BLOCK + 37), device=device, generator=gen).mul(3).to(dtype)
    packed = rel_error(fused_forward_packed(gu), silu_mul_ref(*gu.chunk(2, dim=-1)))

    def run(fn):
        gs, us = (t.detach().clone().requires_grad_(True) for t in (g, u))
        y = fn(gs, us)
        y.backward(dy)
        return [y.detach(), gs.grad, us.grad]

    errs = dict(zip(("y", "dg", "du"), map(rel_error, run(SiluMulFn.apply), run(silu_mul_ref))))
    return {**errs, "packed": packed}


@switchable("swiglu")
def fused_ok(dtype: torch.dtype, device_index: int) -> bool:
    """Whether `silu_mul` may use the kernels on this CUDA device in `dtype` (checked once)."""
    return triton is not None and passes_check(
        "fused SiLU product", lambda: fused_errors(dtype, torch.device("cuda", device_index)), CHECK_TOLERANCE,
        "torch ops")
