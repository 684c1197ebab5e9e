"""Mamba-2 SSD (state-space duality) recurrence, per head h:

    S_t = exp(dt_t * A_h) * S_{t-1} + B_t^T (dt_t * x_t)        S in R^{n x p}
    y_t = C_t S_t  (+ D_h * x_t)

Shapes: x (b, l, h, p); dt (b, l, h), already softplus'd (Delta); A (h,), negative; B, C (b, l, h, n);
state (b, h, n, p). Every implementation returns (y (b, l, h, p), final_state (b, h, n, p)).

The torch references (`ssd_naive`, the sequential recurrence; `ssd_chunked`, the O(L * chunk) algorithm used on
CPU; `ssd_step`, one decode step) live in `ops.ssd_ref`. `ssd` dispatches to fla-core's simple-GLA kernel on CUDA
(q=C, k=B, v=dt*x, g=dt*A, scale=1, `ops.ssd_fla`), which computes exactly this recurrence.
"""

from __future__ import annotations

import torch

from . import ssd_fla as _fla
from .gla_prep import gla_prep, split_heads
from .ssd_fla import fla_available, fla_backward_ok  # noqa: F401  (re-exported)
from .ssd_ref import finish, ssd_chunked, ssd_naive


class _FlaForwardTorchBackward(torch.autograd.Function):
    """fla-core forward; backward by recomputing the chunked torch algorithm."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, S0):
        ctx.save_for_backward(x, dt, A, B, C, S0)
        with torch.no_grad():
            return _fla.forward(x, dt, A, B, C, S0)

    @staticmethod
    def backward(ctx, gy, gS):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in saved]
        with torch.enable_grad():
            y, S = ssd_chunked(*inputs[:5], initial_state=inputs[5])
            outs, grads_out = [y], [gy]
            if gS is not None:
                outs.append(S)
                grads_out.append(gS)
            wrt = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(outs, wrt, grads_out, allow_unused=True))
        return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)


@torch.compiler.disable  # fla's kernels and autograd Functions stay outside compiled graphs
def ssd_fla(x, dt, A, B, C, D=None, initial_state=None, backward: str | None = None):
    """fla-core `chunk_simple_gla` with q=C, k=B, v=dt*x, g=dt*A, scale=1 (CUDA only); the backward `backward`
    (`ssd_fla.MODE_NOTES`), None: `ssd_fla.backward_mode`'s choice."""
    S0 = None if initial_state is None else initial_state.float()
    mode = _fla_mode((x, dt, A, B, C, initial_state), B.shape[-1], x.shape[-1], x.device, x.shape[2], backward)
    if mode == "torch":
        y, S = _FlaForwardTorchBackward.apply(x, dt, A, B, C, S0)
    else:
        y, S = _fla.run_gla(*_fla.gla_inputs(x, dt, A, B, C), S0, mode)
    return finish(y, x, D).to(x.dtype), S


def _fla_mode(inputs, K: int, V: int, device, heads: int, backward: str | None) -> str:
    """`backward` (or, None, `ssd_fla.backward_mode`) where any input needs a gradient, else "native" (fla's forward
    alone)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if not needs_grad:
        return "native"
    return backward if backward is not None else _fla.backward_mode(K, V, device, heads)


def ssd_gla(q, k, v, g, initial_state=None):
    """The SSD's forward on inputs already in fla's simple-GLA form (`ops.ssd_fla.gla_inputs`: q = C, k = B,
    v = dt * x, each (b, l, h, n) contiguous; g = dt * A (b, l, h) fp32), no gradient: (y (b, l, h, n), state)."""
    S0 = None if initial_state is None else initial_state.float()
    y, S = _fla.forward_gla(q, k, v, g, S0)
    return y.to(v.dtype), S


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"auto" -> "fla" on CUDA when fla-core imports, else "torch"; other names as given."""
    if backend == "auto":
        return "fla" if x.is_cuda and _fla.fla_available() else "torch"
    return backend


def ssd(x, dt, A, B, C, D=None, initial_state=None, backend: str = "auto", chunk_size: int = 64,
        backward: str | None = None):
    """Dispatch: "fla" on CUDA when fla-core imports (its backward `backward`, see `ssd_fla`), else the chunked torch
    implementation."""
    backend = resolve_backend(backend, x)
    if backend == "fla":
        return ssd_fla(x, dt, A, B, C, D, initial_state, backward)
    if backend == "torch":
        return ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size=chunk_size)
    if backend == "naive":
        return ssd_naive(x, dt, A, B, C, D, initial_state)
    raise ValueError(f"unknown SSD backend {backend!r}; use 'auto', 'fla', 'torch' or 'naive'")


def ssd_packed(xc, dt, A, h: int, kv: int, d: int, initial_state=None, backend: str = "auto", chunk_size: int = 64,
               backward: str | None = None):
    """The SSD of the mixer's conv output xc (b, l, [x | B | C]) with x, B over kv heads (repeated to the h heads)
    and C over h heads, head size d. On CUDA with fla and a kernel backward, the inputs go to fla in its own form
    straight from xc (`ops.gla_prep`: no split, repeat or product tensors of the torch path); otherwise `ssd` on
    the split. Returns (y (b, l, h, d), final state)."""
    if resolve_backend(backend, xc) == "fla":
        out = _ssd_packed_fla(xc, dt, A, h, kv, d, initial_state, backward)
        if out is not None:
            return out
    x, B, C = split_heads(xc, h, kv, d)
    return ssd(x, dt, A, B, C, initial_state=initial_state, backend=backend, chunk_size=chunk_size, backward=backward)


@torch.compiler.disable  # fla's kernels and ours stay outside compiled graphs
def _ssd_packed_fla(xc, dt, A, h, kv, d, initial_state, backward):
    """fla's simple GLA on `gla_prep`'s inputs, with the backward of `ssd_fla.backward_mode`; None for its "torch"
    mode (the torch backward recomputes from the split inputs)."""
    mode = _fla_mode((xc, dt, A, initial_state), d, d, xc.device, h, backward)
    if mode == "torch":
        return None
    S0 = None if initial_state is None else initial_state.float()
    y, S = _fla.run_gla(*gla_prep(xc, dt, h, kv, d), dt.float() * A.float(), S0, mode)
    return y.to(xc.dtype), S
