"""fla-core path of the SSD on CUDA. Mamba-2's recurrence is fla's simple GLA with q = C, k = B, v = dt * x,
g = dt * A and scale 1.

Backward, chosen once per (device, state sizes) by `backward_mode`:
- "native": fla's own autograd;
- "bk32" / "bk128": on Hopper with Triton in [3.4, 3.7.1) fla refuses its gated dq/dk/dg kernel (fla #640: Triton
  miscompiles it with 64-wide K/V tiles; the issue's tile sweep found 32- and 128-wide tiles correct). There the same
  fla kernels run, with that one kernel launched on 32- or 128-wide tiles: each width is checked once against the
  torch reference on random inputs, and of those that pass the faster one at the model's head shape is kept (at
  head dim 64 a 128-wide tile is half padding);
- "torch": fla's forward and a backward that recomputes the chunked torch algorithm (when no width passes).
A mode can be forced with the SSD's `backward` argument (the trainer passes `MMMAMBA_SSD_BACKWARD=native|bk32|bk128|
torch` there, see `ops.kernel_report`).
"""

from __future__ import annotations

import functools

import torch

from .checked import cuda_index, passes_check, rel_error
from .ssd_ref import dt_x, ssd_chunked

TILES = {"bk32": 32, "bk128": 128}  # the dq/dk/dg tile widths fla #640 found correct on Hopper
MODE_NOTES = {
    "native": "fla-core's own",
    **{m: f"fla-core's kernels, dq/dk/dg on {t}-wide tiles (fla #640 workaround, checked against torch, the faster "
          "width that passed)" for m, t in TILES.items()},
    "torch": "recomputed with the chunked torch implementation",
}
TILE_TOLERANCE = 2e-2  # bf16 gradients vs the fp32 reference; the #640 miscompile gives errors of ~0.5


@functools.lru_cache(maxsize=1)
def simple_gla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # fla-core missing or its Triton build unusable here
        return None
    return chunk_simple_gla


def fla_available() -> bool:
    return torch.cuda.is_available() and simple_gla() is not None


@functools.lru_cache(maxsize=1)
def fla_backward_ok() -> bool:
    """Mirror fla-core's refusal of its gated backward (Hopper, Triton in [3.4, 3.7.1), no tilelang)."""
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except Exception:
        return True
    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return True
    try:
        import tilelang  # noqa: F401
    except Exception:
        return False
    return True


def _dqkwg_tiles(q, k, v, do, h, dh, g, scale: float, chunk_size: int, bk: int):
    """fla's `chunk_bwd_kernel_dqkwg` on bk-wide K and V tiles (masked where K or V < bk)."""
    import triton
    from fla.ops.common.chunk_o import chunk_bwd_kernel_dqkwg

    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    BK = BV = bk
    NK, NT = triton.cdiv(K, BK), triton.cdiv(T, chunk_size)
    dq, dk = q.new_empty(B, T, HV, K), k.new_empty(B, T, HV, K)
    dg = torch.empty(NK, *g.shape, dtype=torch.float32, device=g.device)
    chunk_bwd_kernel_dqkwg[(NK * NT, B * HV)](
        q=q, k=k, v=v, g=g, g_gamma=None, h=h, do=do, dh=dh, dq=dq, dk=dk, dw=None, dv=None, dg=dg,
        cu_seqlens=None, chunk_indices=None, scale=scale, B=B, T=T, H=H, HV=HV, K=K, V=V,
        BT=chunk_size, BK=BK, BV=BV, STATE_V_FIRST=False,
    )
    return dq, dk, dg.sum(0)


def _backward_tiles(q, k, v, g, S0, do, dS, bk: int, chunk_size: int = 64):
    """fla's simple-GLA backward (fla/ops/simple_gla/chunk.py) with `_dqkwg_tiles` for the dq/dk/dg kernel."""
    from fla.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
    from fla.ops.common.chunk_o import chunk_bwd_dv
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    gc = chunk_local_cumsum(g, chunk_size=chunk_size, scale=RCP_LN2)  # fla's kernels work in base 2
    h, _ = chunk_fwd_h(k=k, v=v, g=gc, h0=S0, output_final_state=False, chunk_size=chunk_size,
                       states_in_fp32=True)
    dh, dS0 = chunk_bwd_dh(q=q, k=k, v=v, do=do, h0=S0, dht=dS, scale=1.0, g=gc, chunk_size=chunk_size,
                           states_in_fp32=True)
    dq, dk, dg = _dqkwg_tiles(q, k, v, do, h, dh, gc, 1.0, chunk_size, bk)
    dv = chunk_bwd_dv(q=q, k=k, do=do, dh=dh, g=gc, scale=1.0, chunk_size=chunk_size)
    dg = chunk_local_cumsum(dg, chunk_size=chunk_size, reverse=True)
    return dq, dk, dv, dg, dS0


class SimpleGLATiles(torch.autograd.Function):
    """(q, k, v, g, S0, bk) -> (o, final state) by fla's forward; backward by `_backward_tiles` on bk-wide tiles."""

    @staticmethod
    def forward(ctx, q, k, v, g, S0, bk: int):
        q, k, v, g = (t.contiguous() for t in (q, k, v, g))
        S0 = None if S0 is None else S0.contiguous()
        with torch.no_grad():
            o, S = simple_gla()(q=q, k=k, v=v, g=g, scale=1.0, initial_state=S0, output_final_state=True)
        ctx.save_for_backward(q, k, v, g, S0)
        ctx.bk = bk
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, g, S0 = ctx.saved_tensors
        with torch.cuda.device(q.device):
            dq, dk, dv, dg, dS0 = _backward_tiles(q, k, v, g, S0, do.contiguous(), dS.contiguous(), ctx.bk)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dS0, None


def gla_inputs(x, dt, A, B, C):
    """The simple-GLA view of the SSD: q = C, k = B, v = dt * x, g = dt * A (fp32)."""
    return C.to(x.dtype), B.to(x.dtype), dt_x(x, dt), dt.float() * A.float()


def forward(x, dt, A, B, C, S0):
    """fla's forward of the SSD (its own autograd when inputs require grad): (y, final state)."""
    return forward_gla(*gla_inputs(x, dt, A, B, C), S0)


def forward_gla(q, k, v, g, S0):
    """fla's simple GLA with scale 1 on inputs in its own form: (o, final state)."""
    return simple_gla()(q=q, k=k, v=v, g=g, scale=1.0, initial_state=S0, output_final_state=True)


def run_gla(q, k, v, g, S0, mode: str):
    """fla's simple GLA on inputs in its own form, with the backward of `mode`: "native" (fla's autograd) or a tile
    width of `TILES`."""
    if mode in TILES:
        return SimpleGLATiles.apply(q, k, v, g, S0, TILES[mode])
    return forward_gla(q, k, v, g, S0)


def tile_errors(K: int, V: int, device, T: int = 200, heads: int = 2, bk: int = 128) -> dict[str, float]:
    """Relative errors of the gradients with dq/dk/dg on bk-wide tiles (bf16 inputs) against the torch chunked
    reference in fp32."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, T, heads, V, device=device, generator=gen).bfloat16()
    dt = torch.nn.functional.softplus(torch.randn(2, T, heads, device=device, generator=gen) - 2)
    A = -torch.exp(torch.rand(heads, device=device, generator=gen))
    B, C = ((torch.randn(2, T, heads, K, device=device, generator=gen) / K**0.5).bfloat16() for _ in range(2))
    S0 = torch.randn(2, heads, K, V, device=device, generator=gen) * 0.1
    gy, gS = torch.randn(x.shape, device=device, generator=gen), torch.randn(S0.shape, device=device, generator=gen)

    def grads(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
        y, S = fn(*leaves)
        ((y.float() * gy).sum() + (S.float() * gS).sum()).backward()
        return [t.grad for t in leaves if t is not None]

    def fast(x, dt, B, C, S0):
        return SimpleGLATiles.apply(*gla_inputs(x, dt, A, B, C), S0, bk)

    def ref(x, dt, B, C, S0):
        return ssd_chunked(x.float(), dt, A, B.float(), C.float(), initial_state=S0)

    errs = {}
    for init, names in ((None, ("dx", "ddt", "dB", "dC")), (S0, ("dx|S0", "ddt|S0", "dB|S0", "dC|S0", "dS0"))):
        got, want = grads(fast, x, dt, B, C, init), grads(ref, x, dt, B, C, init)  # training: no initial state
        errs.update({n: rel_error(a, b) for n, a, b in zip(names, got, want)})
    return errs


def tile_ms(K: int, V: int, device, heads: int, bk: int, b: int = 2, T: int = 4096) -> float:
    """Milliseconds of the whole simple-GLA backward with dq/dk/dg on bk-wide tiles, bf16, (b, T, heads) tokens."""
    from triton.testing import do_bench

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(b, T, heads, n, device=device, generator=gen).bfloat16() for n in (K, K, V, V))
    g = -torch.rand(b, T, heads, device=device, generator=gen) * 0.1  # log decays
    dS = torch.zeros(b, heads, K, V, device=device)
    with torch.cuda.device(device):
        return do_bench(lambda: _backward_tiles(q, k, v, g, None, do, dS, bk), warmup=5, rep=25)


@functools.cache
def _tile_mode(K: int, V: int, device_index: int, heads: int = 2) -> str:
    """"bk32" or "bk128" (of the widths whose check passes, the faster at this shape) or "torch"."""
    dev = torch.device("cuda", device_index)
    ok = [m for m, t in TILES.items()
          if passes_check(f"fla {t}-tile SSD backward", lambda t=t: tile_errors(K, V, dev, heads=heads, bk=t),
                          TILE_TOLERANCE, "another tile width or the recomputed torch backward")]
    if len(ok) < 2:
        return ok[0] if ok else "torch"
    return min(ok, key=lambda m: tile_ms(K, V, dev, heads, TILES[m]))


def backward_mode(K: int, V: int, device: torch.device, heads: int = 2) -> str:
    """"native", "bk32", "bk128" or "torch" for SSD gradients on this CUDA device (see the module docstring). `heads`:
    the model's head count, so that the check and the timing use the shapes training uses."""
    if fla_backward_ok():
        return "native"
    return _tile_mode(K, V, cuda_index(device), heads)
