"""RoPE: the fused kernel (Triton's interpreter here) against the torch formula, and where the dispatcher uses it.
The interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest), so bf16 is held to the GPU check's 1e-2."""

from __future__ import annotations

import torch
from conftest import requires_triton, run_interpreted

from mmmamba.ops import rope


@requires_triton
def test_fused_rope_matches_the_formula_under_the_interpreter():
    run_interpreted(
        "import torch\n"
        "from mmmamba.ops.rope import fused_errors\n"
        "for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):\n"
        "    for shape in (dict(), dict(b=1, heads=9, l=3, d=128)):\n"
        "        e = fused_errors(dt, 'cpu', **shape)\n"
        "        assert e['y'] < tol, (dt, shape, e)\n"
        "        print('ok', dt, shape, e)\n",
        expect_ok=4,
    )


def test_dispatch_uses_the_kernel_only_without_grad(monkeypatch):
    calls = []
    monkeypatch.setattr(rope, "fused_rope", lambda x, c, s: calls.append(x.shape) or x)
    monkeypatch.setattr(rope, "fused_ok", lambda dtype, index: True)
    monkeypatch.setattr(rope, "cuda_index", lambda device: 0)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    x = torch.randn(2, 3, 5, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    rope.apply_rope(x, cos, sin)  # no grad needed: fused
    rope.apply_rope(x.requires_grad_(True), cos, sin)  # autograd: the formula
    with torch.no_grad():
        rope.apply_rope(x, cos, sin)  # fused
        rope.apply_rope(x.detach(), cos.double(), sin.double())  # dtype mismatch: formula
        rope.apply_rope(torch.randn(2, 3, 5, 6), torch.randn(2, 5, 6), torch.randn(2, 5, 6))  # d/2 not a power of 2
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    rope.apply_rope(x.detach(), cos, sin)  # inside a CUDA graph capture: formula
    assert calls == [x.shape, x.shape]
