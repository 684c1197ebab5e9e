"""The gated MLP's SiLU product (ops/swiglu.py): the Triton kernels against autograd through the formula, under
Triton's interpreter on the CPU (in a subprocess, so TRITON_INTERPRET stays local; the interpreter truncates
fp32 -> bf16 casts where a GPU rounds to nearest, so bf16 is held to the GPU check's 1e-2), and the CPU path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_triton, run_interpreted

from mmmamba.layers.mlp import GatedMLP
from mmmamba.ops.swiglu import silu_mul, silu_mul_ref


@requires_triton
def test_kernels_match_the_formula_under_the_interpreter():
    run_interpreted(
        "import torch\n"
        "from mmmamba.ops.swiglu import fused_errors\n"
        "for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):\n"
        "    e = fused_errors(dt, 'cpu')\n"
        "    assert max(e.values()) < tol, (dt, e)\n"
        "    print('ok', dt, e)\n",
        expect_ok=2,
    )


def test_cpu_path_is_the_formula_and_the_mlp_uses_it():
    g, u = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    assert torch.equal(silu_mul(g, u), F.silu(g) * u) and torch.equal(silu_mul_ref(g, u), F.silu(g) * u)
    torch.manual_seed(0)
    mlp = GatedMLP(8, 16)
    x = torch.randn(3, 8)
    assert mlp.silu and torch.equal(mlp(x), mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    gelu = GatedMLP(8, 16, act="gelu")  # other activations keep the module's own product
    assert not gelu.silu and torch.equal(gelu(x), gelu.down_proj(gelu.act(gelu.gate_proj(x)) * gelu.up_proj(x)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_on_the_gpu(dtype):
    from mmmamba.ops.swiglu import fused_errors

    e = fused_errors(dtype, torch.device("cuda"), n=8 * 2048 * 1536 + 5)  # a stage-3 micro-batch at SmolLM2 dims
    assert max(e.values()) < (1e-5 if dtype == torch.float32 else 1e-2), e
