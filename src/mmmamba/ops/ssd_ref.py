"""Torch references of the Mamba-2 SSD (state-space duality), per head h:

    S_t = exp(dt_t * A_h) * S_{t-1} + B_t^T (dt_t * x_t)        S in R^{n x p}
    y_t = C_t S_t  (+ D_h * x_t)

Shapes: x (b, l, h, p); dt (b, l, h), already softplus'd (Delta); A (h,), negative; B, C (b, l, h, n);
state (b, h, n, p). Every implementation returns (y (b, l, h, p), final_state (b, h, n, p)).

`ssd_naive` is the sequential reference; `ssd_chunked` the O(L * chunk) algorithm (the CPU path and the reference of
the fla kernels, `ops.ssd_fla`); `ssd_step` one decode step (`ssd_step_` the same in place, on grouped heads); `dt_x`
the rounding of v = dt * x shared by every path.
"""

from __future__ import annotations

import torch


def finish(y, x, D):
    """y + D * x (the skip term), or y when D is None."""
    return y if D is None else y + x * D.view(1, 1, -1, 1).to(y.dtype)


def ssd_naive(x, dt, A, B, C, D=None, initial_state=None):
    """Token-by-token recurrence in fp32 (reference)."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    S = x.new_zeros(b, h, n, p, dtype=torch.float32) if initial_state is None else initial_state.float()
    xf, dtf, Bf, Cf, Af = x.float(), dt.float(), B.float(), C.float(), A.float()
    ys = []
    for t in range(l):
        S = ssd_step_state(S, xf[:, t], dtf[:, t], Af, Bf[:, t])
        ys.append(torch.einsum("bhn,bhnp->bhp", Cf[:, t], S))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)
    return finish(y, xf, D).to(x.dtype), S


def ssd_step_state(S, x, dt, A, B):
    """S' = exp(dt A) S + B^T (dt x). S (b, h, n, p); x (b, h, p); dt (b, h); B (b, h, n)."""
    decay = torch.exp(dt * A)[..., None, None]
    return decay * S + B.unsqueeze(-1) * (dt.unsqueeze(-1) * x).unsqueeze(-2)


def ssd_step(state, x, dt, A, B, C, D=None):
    """One decode step. x (b, h, p); dt (b, h); B, C (b, h, n); state (b, h, n, p), fp32.

    Returns y (b, h, p) in x's dtype and the new state (same dtype as `state`)."""
    S = ssd_step_state(state.float(), x.float(), dt.float(), A.float(), B.float())
    y = torch.einsum("bhn,bhnp->bhp", C.float(), S)
    if D is not None:
        y = y + x.float() * D.view(1, -1, 1).float()
    return y.to(x.dtype), S.to(state.dtype)


def ssd_step_(state, x, dt, A, B, C):
    """`ssd_step` (D = None) that updates `state` (b, h, n, p) fp32 in place, as the decode cache wants. x (b, g, p)
    and B (b, g, n) may have g heads dividing h (head i reads group i // (h / g), as GQA), so they need no repeat;
    dt (b, h); C (b, h, n). Same fp32 operations as `ssd_step_state`. Returns y (b, h, p) in x's dtype."""
    if state.dtype != torch.float32:
        raise ValueError(f"ssd_step_ updates an fp32 state in place; got {state.dtype} (use ssd_step instead)")
    b, h, n, p = state.shape
    g = x.shape[1]
    S = state.view(b, g, h // g, n, p)
    dtf = dt.float().view(b, g, -1, 1, 1)
    S.mul_(torch.exp(dtf * A.float().view(1, g, -1, 1, 1)))
    S.add_(B.float().view(b, g, 1, n, 1) * (dtf * x.float().view(b, g, 1, 1, p)))
    y = torch.einsum("bgrn,bgrnp->bgrp", C.float().view(b, g, -1, n), S)
    return y.reshape(b, h, p).to(x.dtype)


def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, chunk_size: int = 64):
    """Chunked SSD in fp32: quadratic (masked) form inside chunks of `chunk_size`, state carried between
    chunks. O(l * chunk_size) time and memory."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    Q = chunk_size
    pad = (-l) % Q
    xf, dtf, Bf, Cf = x.float(), dt.float(), B.float(), C.float()
    if pad:  # dt = 0 on padding: decay 1 and no input, so the final state is unchanged
        xf, Bf, Cf = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf, Bf, Cf))
        dtf = torch.nn.functional.pad(dtf, (0, 0, 0, pad))
    c = (l + pad) // Q
    xdt = (xf * dtf.unsqueeze(-1)).view(b, c, Q, h, p)
    Bc, Cc = Bf.view(b, c, Q, h, n), Cf.view(b, c, Q, h, n)
    a = (dtf * A.float()).view(b, c, Q, h).permute(0, 3, 1, 2)  # (b, h, c, Q) log-decays
    acs = torch.cumsum(a, dim=-1)
    # intra-chunk: y_i += sum_{j<=i} exp(acs_i - acs_j) (C_i . B_j) xdt_j
    seg = acs.unsqueeze(-1) - acs.unsqueeze(-2)  # (b, h, c, Q, Q): [i, j]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    Lmat = torch.exp(seg.masked_fill(~causal, float("-inf")))
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * Lmat
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
    # state contributed by each chunk on its own, at the chunk's end
    decay_to_end = torch.exp(acs[..., -1:] - acs)  # (b, h, c, Q)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchnp", Bc, decay_to_end, xdt)
    chunk_decay = torch.exp(acs[..., -1])  # (b, h, c)
    S = x.new_zeros(b, h, n, p, dtype=torch.float32) if initial_state is None else initial_state.float()
    prev = []
    for i in range(c):
        prev.append(S)
        S = chunk_decay[:, :, i, None, None] * S + chunk_states[:, i]
    prev_states = torch.stack(prev, dim=1)  # (b, c, h, n, p): state entering each chunk
    y = y + torch.einsum("bclhn,bchnp,bhcl->bclhp", Cc, prev_states, torch.exp(acs))
    y = y.reshape(b, c * Q, h, p)[:, :l]
    return finish(y, x.float(), D).to(x.dtype), S


def dt_x(x, dt):
    """v = dt * x (x (b, l, h, p), dt (b, l, h)), dt rounded to x's dtype first, the product in x's dtype."""
    return (x * dt.unsqueeze(-1).to(x.dtype)).to(x.dtype)
