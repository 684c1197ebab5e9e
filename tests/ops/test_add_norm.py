"""Residual add + RMSNorm (ops/add_norm.py): the formula is the RMSNorm module's, and the fused kernel matches it
(under Triton's interpreter, which truncates fp32 -> bf16 casts where a GPU rounds to nearest: bf16 is held to the
GPU check's 1e-2)."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_triton, run_interpreted

from mmmamba.layers.norm import RMSNorm
from mmmamba.ops.add_norm import add_rmsnorm, rmsnorm, rmsnorm_ref


def test_formula_is_the_module_and_adds_the_residual():
    norm = RMSNorm(12, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(12) + 0.5)
    x, d = torch.randn(3, 5, 12, dtype=torch.bfloat16), torch.randn(3, 5, 12, dtype=torch.bfloat16)
    w = norm.weight.bfloat16()
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(rmsnorm_ref(x, w, 1e-5), want)
    assert torch.equal(norm.bfloat16()(x), want)
    h, y = add_rmsnorm(x, d, w, 1e-5)
    assert torch.equal(h, x + d) and torch.equal(y, rmsnorm_ref(x + d, w, 1e-5))
    h, y = add_rmsnorm(x, None, w, 1e-5)
    assert h is x and torch.equal(y, want)


@requires_triton
def test_fused_kernel_matches_the_formula_under_the_interpreter():
    run_interpreted(
        "import torch\n"
        "from mmmamba.ops.add_norm import fused_errors\n"
        "for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):\n"
        "    e = fused_errors(dt, 'cpu')\n"
        "    assert max(e.values()) < tol, (dt, e)\n"
        "    print('ok', dt, e)\n",
        expect_ok=2,
    )


@requires_triton
def test_rmsnorm_backward_kernel_matches_autograd_of_the_formula_under_the_interpreter():
    """`RMSNormFn` (y, dx, dw) against autograd through `rmsnorm_ref`: one row per backward program and 16 (the last
    program partly masked), a width that is and one that is not a power of two, fp32 (1e-5) and bf16 (1e-2)."""
    run_interpreted(
        "import torch\n"
        "from mmmamba.ops import add_norm\n"
        "add_norm.MULTI_ROW_MIN = 16\n"
        "for rows, n, dt, tol in ((5, 300, torch.float32, 1e-5), (37, 300, torch.float32, 1e-5),\n"
        "                         (40, 64, torch.float32, 1e-5), (37, 300, torch.bfloat16, 1e-2)):\n"
        "    e = add_norm.rmsnorm_errors(dt, 'cpu', rows=rows, n=n)\n"
        "    assert max(e.values()) < tol, (rows, n, dt, e)\n"
        "    print('ok', rows, n, dt, e)\n",
        expect_ok=4,
    )


def test_rmsnorm_dispatch_is_the_formula_on_the_cpu():
    x = torch.randn(2, 3, 12, requires_grad=True)
    w = torch.rand(12) + 0.5
    assert torch.equal(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rmsnorm_on_the_gpu_matches_the_formula(dtype):
    """The module's CUDA path (forward kernel alone without autograd, `RMSNormFn` with it) against the formula, at
    SmolLM2's width and a training-sized row count (16 rows per backward program)."""
    from mmmamba.ops.add_norm import rmsnorm_errors

    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for rows in (37, 8 * 2048):
        e = rmsnorm_errors(dtype, torch.device("cuda"), rows=rows, n=576)
        assert max(e.values()) < tol, (rows, e)
    x = torch.randn(4, 7, 576, device="cuda", dtype=dtype)
    w = torch.rand(576, device="cuda", dtype=dtype) + 0.5
    with torch.no_grad():
        assert (rmsnorm(x, w, 1e-5).float() - rmsnorm_ref(x, w, 1e-5).float()).norm() <= tol * rmsnorm_ref(
            x, w, 1e-5).float().norm()
