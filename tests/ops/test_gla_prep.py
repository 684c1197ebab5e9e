"""fla's simple-GLA inputs straight from the mixer's conv output (ops/gla_prep.py): the Triton kernels against
autograd through the torch path under Triton's interpreter (in a subprocess, so TRITON_INTERPRET stays local), and
`ssd_packed`'s fla route with fla's Function replaced by a sequential torch GLA (fla needs CUDA)."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import TorchGLA, requires_triton, run_interpreted

from mmmamba.ops import ssd_fla
from mmmamba.ops.gla_prep import gla_prep_ref, split_heads
from mmmamba.ops.ssd import ssd_packed
from mmmamba.ops.ssd_ref import ssd_chunked

ssd_mod = importlib.import_module("mmmamba.ops.ssd")  # the module (`mmmamba.ops.ssd` is also the function's name)

CASES = r"""
import torch
from mmmamba.ops.gla_prep import fused_errors
for d, h, kv, dtype, strided in [(8, 6, 2, torch.float32, True), (8, 6, 6, torch.float32, False),
                                 (16, 9, 3, torch.float32, True), (8, 6, 2, torch.bfloat16, True)]:
    errs = fused_errors(d, dtype, torch.device("cpu"), h=h, kv=kv, strided=strided)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert max(errs.values()) < tol, (d, h, kv, dtype, errs)
    print("ok", d, h, kv, dtype, errs)
"""


@requires_triton
def test_kernels_match_the_torch_path_under_the_interpreter():
    """GQA groups of 3 and 1 (no repeat), SmolLM2's 9 heads over 3, a strided conv output, 45 tokens (the last block
    of 16 partly masked), fp32 (1e-5) and bf16 (1e-2)."""
    run_interpreted(CASES, expect_ok=4)


def test_split_heads_and_the_reference():
    b, l, h, kv, d = 2, 5, 6, 2, 4
    xc = torch.randn(b, l, (2 * kv + h) * d)
    dt = torch.rand(b, l, h)
    v, k, q = split_heads(xc, h, kv, d)
    assert v.shape == k.shape == q.shape == (b, l, h, d)
    assert torch.equal(v[:, :, 4], xc[..., d:2 * d]) and torch.equal(k[:, :, 1], xc[..., 2 * d:3 * d])
    assert torch.equal(q[:, :, 5], xc[..., (2 * kv + 5) * d:])
    q2, k2, vdt = gla_prep_ref(xc, dt, h, kv, d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(vdt, v * dt[..., None])


@pytest.mark.parametrize("mode", ["native", "bk32"])
def test_ssd_packed_fla_route_is_the_ssd_of_the_split(monkeypatch, mode):
    """The fla route (q = C, k = B, v = dt x, g = dt A from `gla_prep`) gives the chunked SSD of the split inputs:
    outputs, final state and the gradients of xc, dt, A and the initial state, in fp32."""
    monkeypatch.setattr(ssd_mod, "resolve_backend", lambda backend, x: "fla")
    monkeypatch.setattr(ssd_fla, "backward_mode", lambda K, V, dev, h: mode)
    monkeypatch.setattr(ssd_fla, "forward_gla", TorchGLA.apply)
    monkeypatch.setattr(ssd_fla, "SimpleGLATiles", TorchGLA)
    g = torch.Generator().manual_seed(0)
    b, l, h, kv, d = 2, 11, 6, 2, 4
    inputs = [torch.randn(b, l, (2 * kv + h) * d, generator=g), torch.rand(b, l, h, generator=g) * 0.5,
              -torch.rand(h, generator=g) - 0.5, torch.randn(b, h, d, d, generator=g) * 0.1]
    gy, gS = torch.randn(b, l, h, d, generator=g), torch.randn(b, h, d, d, generator=g)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        y, S = fn(*leaves)
        ((y * gy).sum() + (S * gS).sum()).backward()
        return [y.detach(), S.detach(), *(t.grad for t in leaves)]

    def packed(xc, dt, A, S0):
        return ssd_packed(xc, dt, A, h, kv, d, initial_state=S0)

    def reference(xc, dt, A, S0):
        x, B, C = split_heads(xc, h, kv, d)
        return ssd_chunked(x, dt, A, B, C, initial_state=S0, chunk_size=4)

    for got, want in zip(run(packed), run(reference)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fla_route_declines_the_torch_backward(monkeypatch):
    """Where the fla backward is not usable ("torch" mode), the route returns None: the caller recomputes from the
    split inputs."""
    monkeypatch.setattr(ssd_fla, "backward_mode", lambda K, V, dev, h: "torch")
    xc = torch.randn(1, 3, 16, requires_grad=True)
    assert ssd_mod._ssd_packed_fla(xc, torch.rand(1, 3, 2), -torch.ones(2), 2, 1, 4, None, None) is None
    monkeypatch.setattr(ssd_fla, "backward_mode", lambda K, V, dev, h: pytest.fail("the argument decides"))
    assert ssd_mod._ssd_packed_fla(xc, torch.rand(1, 3, 2), -torch.ones(2), 2, 1, 4, None, "torch") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_on_the_gpu(dtype):
    from mmmamba.ops.gla_prep import fused_errors

    for d, h, kv in ((64, 9, 3), (128, 16, 8)):
        errs = fused_errors(d, dtype, torch.device("cuda"), h=h, kv=kv, b=2, l=2100)
        assert max(errs.values()) < (1e-5 if dtype == torch.float32 else 1e-2), (d, errs)
