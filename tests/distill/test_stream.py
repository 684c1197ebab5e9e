"""The layer-wise stages' teacher stream: the unpacked layer equals the decoder layer, and the fused residual add +
RMSNorm (CUDA) matches the torch ops (checked here under Triton's interpreter, which truncates fp32 -> bf16 casts
where a GPU rounds to nearest: bf16 is held to the GPU check's 1e-2)."""

from __future__ import annotations

import torch
from conftest import requires_triton, run_interpreted

from mmmamba.distill import stream
from mmmamba.models.decoder import StepContext


def test_stream_layer_equals_the_decoder_layer(tiny_teacher):
    h = torch.randn(2, 9, tiny_teacher.config.hidden_size)
    model = tiny_teacher.model
    ctx, _ = model.context(2, 9, h.device, h.dtype, None, None, None)
    assert isinstance(ctx, StepContext)
    for layer in model.layers:
        cos, sin = ctx.rope[layer.rope_index]
        with torch.no_grad():
            r, y, o, out = stream.stream_layer(layer, h, cos, sin, ctx.attn_mask)
            torch.testing.assert_close(r, layer.input_layernorm(h), rtol=0, atol=0)
            torch.testing.assert_close(o, layer.mixer(r, cos, sin, ctx.attn_mask), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out, layer(h, ctx), rtol=1e-6, atol=1e-6)
        h = out


def test_add_norm_takes_the_fused_kernel_only_where_it_may(monkeypatch):
    """The fused kernel (no autograd) only without grad, for a weight of the stream's dtype; torch ops elsewhere."""
    from mmmamba.inference import triton_kernels as tk
    from mmmamba.layers.norm import RMSNorm

    calls = []
    monkeypatch.setattr(tk, "add_rmsnorm", lambda h, w, eps, d: calls.append(d is None) or (h, h))
    monkeypatch.setattr(stream, "fused_norm_ok", lambda dtype, index: True)
    monkeypatch.setattr(stream, "cuda_index", lambda device: 0)
    norm, h = RMSNorm(8), torch.randn(3, 8)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        stream.add_norm(h, None, norm)
        stream.add_norm(h, h, norm)
        stream.add_norm(h.bfloat16(), None, norm)  # fp32 weight, bf16 stream: the torch ops' dtype promotion
    stream.add_norm(h, None, norm)  # grad enabled
    assert calls == [True, False]


@requires_triton
def test_fused_norm_check_passes_under_the_interpreter():
    run_interpreted(
        "import torch\n"
        "from mmmamba.distill.stream import fused_norm_errors\n"
        "for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):\n"
        "    e = fused_norm_errors(dt, 'cpu')\n"
        "    assert max(e.values()) < tol, (dt, e)\n"
        "    print('ok', dt, e)\n",
        expect_ok=2,
    )
