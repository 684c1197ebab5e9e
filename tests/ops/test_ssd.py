"""SSD op: chunked vs naive reference, decode step, gradients, and fla-core's simple-GLA reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mmmamba.ops import ssd, ssd_chunked, ssd_naive, ssd_step, ssd_step_
from mmmamba.ops.ssd_ref import ssd_step_state


def inputs(b=2, l=37, h=3, n=5, p=4, seed=0, dtype=torch.float32, state=True, d=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=g, dtype=dtype) - 1)
    A = -torch.exp(torch.randn(h, generator=g, dtype=dtype) * 0.5)
    B = torch.randn(b, l, h, n, generator=g, dtype=dtype)
    C = torch.randn(b, l, h, n, generator=g, dtype=dtype)
    D = torch.randn(h, generator=g, dtype=dtype) if d else None
    S0 = torch.randn(b, h, n, p, generator=g, dtype=dtype) if state else None
    return x, dt, A, B, C, D, S0


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def loop_reference(x, dt, A, B, C, D, S0):
    """The recurrence written out with plain float64 loops (per step, per head), independent of the package."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    n = B.shape[-1]
    S = [torch.zeros(b, n, p, dtype=torch.float64) if S0 is None else S0[:, hh].double() for hh in range(h)]
    ys = []
    for t in range(l):
        yt = []
        for hh in range(h):
            a = torch.exp(dt[:, t, hh] * A[hh])[:, None, None]
            S[hh] = a * S[hh] + B[:, t, hh, :, None] * (dt[:, t, hh, None] * x[:, t, hh])[:, None, :]
            y = torch.einsum("bn,bnp->bp", C[:, t, hh], S[hh])
            yt.append(y if D is None else y + D[hh].double() * x[:, t, hh])
        ys.append(torch.stack(yt, 1))
    y = torch.stack(ys, 1) if ys else torch.zeros(b, 0, h, p, dtype=torch.float64)
    return y, torch.stack(S, 1)


def test_naive_matches_hand_loop():
    x, dt, A, B, C, D, S0 = inputs(l=11)
    y, S = ssd_naive(x, dt, A, B, C, D, S0)
    y_ref, S_ref = loop_reference(x, dt, A, B, C, D, S0)
    assert rel(y, y_ref) <= 1e-6 and rel(S, S_ref) <= 1e-6


@pytest.mark.parametrize("l,chunk", [(37, 8), (64, 16), (5, 16), (1, 4), (33, 32), (100, 64)])
@pytest.mark.parametrize("with_state,with_d", [(True, True), (False, False), (True, False)])
def test_chunked_matches_naive(l, chunk, with_state, with_d):
    x, dt, A, B, C, D, S0 = inputs(l=l, state=with_state, d=with_d, seed=l)
    y_ref, S_ref = ssd_naive(x, dt, A, B, C, D, S0)
    y, S = ssd_chunked(x, dt, A, B, C, D, S0, chunk_size=chunk)
    assert y.shape == x.shape and S.shape == S_ref.shape
    assert rel(y, y_ref) <= 1e-5
    assert rel(S, S_ref) <= 1e-5


def test_chunked_state_threading_equals_one_pass():
    """Two calls chained through the final state == one call over the concatenation (any split point)."""
    x, dt, A, B, C, D, S0 = inputs(l=45)
    y_all, S_all = ssd_chunked(x, dt, A, B, C, D, S0, chunk_size=8)
    for cut in (1, 7, 8, 20, 44):
        y1, S1 = ssd_chunked(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], D, S0, chunk_size=8)
        y2, S2 = ssd_chunked(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], D, S1, chunk_size=8)
        assert rel(torch.cat([y1, y2], 1), y_all) <= 1e-5
        assert rel(S2, S_all) <= 1e-5


def test_d_term_is_skip_connection():
    x, dt, A, B, C, D, S0 = inputs(l=19)
    y_d, _ = ssd_chunked(x, dt, A, B, C, D, S0, chunk_size=8)
    y_0, _ = ssd_chunked(x, dt, A, B, C, None, S0, chunk_size=8)
    torch.testing.assert_close(y_d - y_0, x * D.view(1, 1, -1, 1), rtol=1e-5, atol=1e-5)


def test_zero_length_and_initial_state_passthrough():
    x, dt, A, B, C, D, S0 = inputs(l=0)
    y, S = ssd_naive(x, dt, A, B, C, D, S0)
    assert y.shape == (2, 0, 3, 4)
    torch.testing.assert_close(S, S0)


def test_step_chain_equals_naive():
    x, dt, A, B, C, D, S0 = inputs(l=23)
    y_ref, S_ref = ssd_naive(x, dt, A, B, C, D, S0)
    S = S0.clone()
    ys = []
    for t in range(x.shape[1]):
        y, S = ssd_step(S, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    assert rel(torch.stack(ys, 1), y_ref) <= 1e-6
    assert rel(S, S_ref) <= 1e-6
    assert S.dtype == torch.float32


@pytest.mark.parametrize("groups", [6, 3, 1])
def test_inplace_grouped_step_equals_step(groups):
    """ssd_step_ on x, B with `groups` heads (each shared by 6 / groups query heads) = ssd_step on them repeated."""
    x, dt, A, B, C, _, S0 = inputs(l=3, h=6, seed=5)
    xg, Bg = x[:, :, :groups], B[:, :, :groups]
    rep = 6 // groups
    S_ref, S = S0.clone(), S0.clone()
    for t in range(3):
        y_ref, S_ref = ssd_step(S_ref, xg[:, t].repeat_interleave(rep, 1), dt[:, t], A,
                                Bg[:, t].repeat_interleave(rep, 1), C[:, t])
        y = ssd_step_(S, xg[:, t], dt[:, t], A, Bg[:, t], C[:, t])
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=0)


def test_inplace_step_refuses_a_low_precision_state():
    x, dt, A, B, C, _, S0 = inputs(l=1)
    with pytest.raises(ValueError, match="fp32 state"):
        ssd_step_(S0.bfloat16(), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])


def test_step_state_formula():
    x, dt, A, B, C, D, S0 = inputs(l=1)
    S = ssd_step_state(S0, x[:, 0], dt[:, 0], A, B[:, 0])
    expected = torch.exp(dt[:, 0] * A)[..., None, None] * S0 + torch.einsum("bhn,bhp->bhnp", B[:, 0],
                                                                            dt[:, 0, :, None] * x[:, 0])
    torch.testing.assert_close(S, expected)


def test_dispatch_backends():
    x, dt, A, B, C, D, S0 = inputs(l=21)
    y_n, S_n = ssd(x, dt, A, B, C, D, S0, backend="naive")
    y_t, S_t = ssd(x, dt, A, B, C, D, S0, backend="torch", chunk_size=8)
    y_a, S_a = ssd(x, dt, A, B, C, D, S0, chunk_size=8)  # auto on CPU -> torch
    assert torch.equal(y_a, y_t) and torch.equal(S_a, S_t)
    assert rel(y_t, y_n) <= 1e-5
    with pytest.raises(ValueError, match="unknown SSD backend"):
        ssd(x, dt, A, B, C, D, S0, backend="cuda-magic")


def test_bf16_inputs_accumulate_in_fp32():
    x, dt, A, B, C, D, S0 = inputs(l=40)
    y32, S32 = ssd_chunked(x, dt, A, B, C, D, S0, chunk_size=16)
    y16, S16 = ssd_chunked(*(t.bfloat16() for t in (x, dt, A, B, C, D)), S0, chunk_size=16)
    assert y16.dtype == torch.bfloat16 and S16.dtype == torch.float32
    assert rel(y16.float(), y32) <= 5e-2


def _grads(fn, tensors, weight):
    ts = [t.detach().clone().requires_grad_(True) for t in tensors]
    y, S = fn(*ts)
    loss = (y * weight[0]).sum() + (S * weight[1]).sum()
    loss.backward()
    return [t.grad for t in ts]


def test_backward_chunked_matches_naive():
    x, dt, A, B, C, D, S0 = inputs(l=29, seed=3)
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(x.shape, generator=g), torch.randn(S0.shape, generator=g))
    names = ["x", "dt", "A", "B", "C", "D", "S0"]
    g_ref = _grads(lambda *t: ssd_naive(*t), (x, dt, A, B, C, D, S0), w)
    g_chk = _grads(lambda *t: ssd_chunked(*t, chunk_size=8), (x, dt, A, B, C, D, S0), w)
    for name, a, b in zip(names, g_chk, g_ref):
        assert a is not None and b is not None, name
        assert rel(a, b) <= 1e-4, name


def test_backward_naive_gradcheck_float64():
    """Chunked fp32 gradients agree with the float64 hand loop, itself verified by finite differences."""
    x, dt, A, B, C, D, S0 = inputs(b=1, l=6, h=2, n=3, p=2, seed=5, dtype=torch.float64)

    def f(x, dt, A, B, C, D, S0):
        y, S = loop_reference(x, dt, A, B, C, D, S0)
        return y.sum() + (S * S).sum()

    ts = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, D, S0)]
    assert torch.autograd.gradcheck(lambda *t: f(*t), ts)
    f(*ts).backward()
    ref = [t.grad for t in ts]
    ts32 = [t.detach().float().requires_grad_(True) for t in (x, dt, A, B, C, D, S0)]
    y, S = ssd_chunked(*ts32, chunk_size=4)
    (y.sum() + (S * S).sum()).backward()
    for a, b in zip([t.grad for t in ts32], ref):
        assert rel(a, b) <= 1e-4


# -- fla-core's CPU-runnable naive simple-GLA reference --------------------------------------------------------
def _fla_naive():
    """fla.ops.simple_gla.naive, loaded by file path: `import fla.ops` needs Triton, this file only torch/einops."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        f = Path(root) / "ops" / "simple_gla" / "naive.py"
        if f.exists():
            mod_spec = importlib.util.spec_from_file_location("_fla_simple_gla_naive", f)
            mod = importlib.util.module_from_spec(mod_spec)
            try:
                mod_spec.loader.exec_module(mod)
            except Exception:
                return None
            return mod
    return None


@pytest.mark.parametrize("l", [1, 37, 64])
def test_naive_matches_fla_simple_gla_reference(l):
    fla = _fla_naive()
    if fla is None:
        pytest.skip("fla-core not installed (pip install fla-core)")
    x, dt, A, B, C, D, S0 = inputs(l=l, d=False, seed=11)
    y, S = ssd_naive(x, dt, A, B, C, None, S0)
    q, k, v, g = C, B, x * dt.unsqueeze(-1), dt * A  # the mapping used on CUDA (ops/ssd.py:ssd_fla)
    y_rec, S_rec = fla.naive_recurrent_simple_gla(q, k, v, g, scale=1.0, initial_state=S0.clone(),
                                                  output_final_state=True)
    assert rel(y, y_rec) <= 1e-5 and rel(S, S_rec) <= 1e-5
    y_chk, S_chk = fla.naive_chunk_simple_gla(q, k, v, g, initial_state=S0.clone(), output_final_state=True,
                                              chunk_size=16, scale=1.0)
    assert rel(y, y_chk) <= 1e-5 and rel(S, S_chk) <= 1e-5


def test_cpu_benchmark_script_runs(capsys):
    from mmmamba.bench.ssd_cpu import main

    threads = torch.get_num_threads()
    try:
        res = main(["--lengths", "64", "256", "--heads", "2", "--dim", "8", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "ratio L=256 / L=64" in out and "ssd_naive" in out
    assert res["ratio"] > 0 and res["naive_s"] > 0
