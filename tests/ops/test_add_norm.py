"""Residual add + RMSNorm (ops/add_norm.py): the formula is the RMSNorm module's, and the fused kernel matches it
(under Triton's interpreter, which truncates fp32 -> bf16 casts where a GPU rounds to nearest: bf16 is held to the
GPU check's 1e-2)."""

from __future__ import annotations

import torch
from conftest import requires_triton, run_interpreted

from mmmamba.layers.norm import RMSNorm
from mmmamba.ops.add_norm import add_rmsnorm, rmsnorm_ref


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
