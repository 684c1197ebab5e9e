"""Fused causal conv + SiLU (ops/conv_silu.py): Triton forward and backward against the reference, under Triton's
interpreter on the CPU (in a subprocess, so TRITON_INTERPRET stays local); the CPU dispatch is the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import requires_triton, run_interpreted

from mmmamba.ops.conv import causal_conv1d
from mmmamba.ops.conv_silu import conv_silu

CASES = r"""
import torch
from mmmamba.ops.conv_silu import fused_errors
# kernel 2 (mmMamba) and 4 (Mamba-2's default), with / without bias, sequences not a multiple of the 32-token and
# channels not a multiple of the 128-channel blocks, x a strided slice; fp32 (1e-5) and bf16 (2e-2)
for k, dtype, bias, L, C in [(2, torch.float32, True, 77, 200), (4, torch.float32, False, 40, 130),
                             (2, torch.bfloat16, True, 77, 200)]:
    errs = fused_errors(k, dtype, torch.device("cpu"), bias, L, C)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert max(errs.values()) < tol, (k, dtype, bias, errs)
    print("ok", k, dtype, bias, errs)
"""


PREFILL = r"""
import torch
from mmmamba.ops.conv_silu import prefill_errors
# the engine's prefill kernel: carried state, left padding, plain or split into the SSD's (q, k, dt * v) layout
for k, dtype, bias, d in [(2, torch.float32, True, None), (4, torch.float32, False, 16), (2, torch.float32, True, 32)]:
    errs = prefill_errors(k, dtype, torch.device("cpu"), bias, d)
    assert max(errs.values()) < 1e-5, (k, dtype, bias, d, errs)
    print("ok", k, d, errs)
"""


@requires_triton
def test_fused_kernels_match_reference_under_the_interpreter():
    run_interpreted(CASES, expect_ok=3)


@requires_triton
def test_prefill_kernel_matches_reference_under_the_interpreter():
    run_interpreted(PREFILL, expect_ok=3)


def test_prefill_reference_is_the_masked_conv_from_the_state():
    from mmmamba.ops.conv_silu import conv_silu_prefill_ref

    torch.manual_seed(0)
    x, w, b, st = torch.randn(2, 9, 6), torch.randn(6, 3), torch.randn(6), torch.randn(2, 6, 2)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :2] = False
    y, new = conv_silu_prefill_ref(x, w, b, st, mask)
    m = mask[..., None].float()
    ref, ref_state = causal_conv1d(x * m, w, b, st)
    torch.testing.assert_close(y, F.silu(ref) * m, rtol=0, atol=0)
    torch.testing.assert_close(new, ref_state, rtol=0, atol=0)


def test_cpu_dispatch_is_the_reference():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 9, 6), torch.randn(6, 2), torch.randn(6)
    torch.testing.assert_close(conv_silu(x, w, b), F.silu(causal_conv1d(x, w, b)[0]), rtol=0, atol=0)
