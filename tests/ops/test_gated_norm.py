"""Fused gated RMSNorm (ops/gated_norm.py): the Triton forward and backward against the torch reference, run by
Triton's interpreter on the CPU in a subprocess (so TRITON_INTERPRET stays local), and the module's CPU path."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_triton, run_interpreted

from mmmamba.layers.norm import GatedRMSNorm
from mmmamba.ops.gated_norm import gated_rmsnorm_mse, gated_rmsnorm_ref
from mmmamba.ops.mse import masked_mse

CASES = r"""
import torch
from mmmamba.ops import gated_norm
from mmmamba.ops.gated_norm import fused_errors
gated_norm.MULTI_ROW_MIN = 64  # the 16-rows-per-program backward at a size the interpreter runs quickly
for head_dim, heads, rows, dtype in [(16, 3, 37, torch.float32), (1024, 3, 5, torch.float32),
                                     (8, 2, 70, torch.float32), (16, 3, 37, torch.bfloat16)]:
    errs = fused_errors(head_dim, dtype, torch.device("cpu"), heads=heads, rows=rows)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert max(errs.values()) < tol, (head_dim, heads, rows, dtype, errs)
    print("ok", head_dim, heads, rows, dtype, errs)
"""


@requires_triton
def test_fused_kernels_match_reference_under_the_interpreter():
    """Head blocks (1024-wide heads: 2 programs per row), 16 rows per backward program (70 rows: the last program
    partly masked), a strided g, fp32 (1e-5) and bf16 (1e-2)."""
    run_interpreted(CASES, expect_ok=4)

MSE_CASES = r"""
import torch
from mmmamba.ops import gated_norm
from mmmamba.ops.gated_norm import fused_mse_errors
gated_norm.MULTI_ROW_MIN = 16  # 16 rows per backward program from 16 rows on (the last program partly masked)
for head_dim, heads, b, l, dtype, masked in [(16, 3, 2, 19, torch.float32, True), (16, 3, 2, 19, torch.float32, False),
                                             (8, 2, 1, 5, torch.float32, True), (1024, 3, 1, 3, torch.float32, True),
                                             (16, 3, 2, 19, torch.bfloat16, True)]:
    errs = fused_mse_errors(head_dim, dtype, torch.device("cpu"), heads=heads, b=b, l=l, masked=masked)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert max(errs.values()) < tol, (head_dim, heads, b, l, dtype, masked, errs)
    print("ok", head_dim, heads, b, l, dtype, masked, errs)
"""


@requires_triton
def test_fused_norm_mse_matches_reference_under_the_interpreter():
    """The stage-1 loss fused into the gated norm (loss, dx, dg, dw): a target laid out as SDPA gives it, a strided g,
    padded rows masked or not, one and 16 rows per backward program, 1024-wide heads (two head blocks, the second
    partly masked), fp32 (1e-5) and bf16 (1e-2)."""
    run_interpreted(MSE_CASES, expect_ok=5)


def test_norm_mse_on_cpu_is_norm_then_masked_mse():
    torch.manual_seed(0)
    m = GatedRMSNorm(8, eps=1e-5)
    x, g, t = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8), torch.randn(2, 3, 5, 8).transpose(1, 2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    for mk in (mask, None):
        assert torch.equal(m.mse(x, g, t, mk), masked_mse(m(x, g), t, mk))
    with pytest.raises(ValueError, match="shape"):
        gated_rmsnorm_mse(x, g, m.weight, 1e-5, t[:, :4])


def test_module_on_cpu_is_the_reference():
    torch.manual_seed(0)
    m = GatedRMSNorm(8, eps=1e-5)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    x, g = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8)
    xf = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * m.weight
    torch.testing.assert_close(m(x, g), xf * torch.nn.functional.silu(g), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gated_rmsnorm_ref(x.reshape(2, 5, 24), g.reshape(2, 5, 24), m.weight, 1e-5, 8),
                               m(x, g).reshape(2, 5, 24))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_norm_mse_on_the_gpu(dtype):
    """The compiled kernels at SmolLM2 (9 x 64) and HoVLE (16 x 128) head shapes, 16 rows per backward program."""
    from mmmamba.ops.gated_norm import fused_mse_errors

    for d, h in ((64, 9), (128, 16)):
        errs = fused_mse_errors(d, dtype, torch.device("cuda"), heads=h, b=2, l=2100)
        assert max(errs.values()) < (1e-5 if dtype == torch.float32 else 1e-2), (d, h, errs)
