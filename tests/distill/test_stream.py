"""The layer-wise stages' teacher stream: the unpacked layer equals the decoder layer; the fused residual add +
RMSNorm (tests/ops/test_add_norm.py) is taken only where it may run."""

from __future__ import annotations

import torch

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
    from mmmamba.layers.norm import RMSNorm

    calls = []
    monkeypatch.setattr(stream, "add_rmsnorm", lambda h, d, w, eps, fused: calls.append((d is None, fused)) or (h, h))
    monkeypatch.setattr(stream, "fused_ok", lambda dtype, index: True)
    monkeypatch.setattr(stream, "cuda_index", lambda device: 0)
    norm, h = RMSNorm(8), torch.randn(3, 8)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        stream.add_norm(h, None, norm)
        stream.add_norm(h, h, norm)
        stream.add_norm(h.bfloat16(), None, norm)  # fp32 weight, bf16 stream: the torch ops' dtype promotion
    stream.add_norm(h, None, norm)  # grad enabled
    assert calls == [(True, True), (False, True), (True, False), (True, False)]
