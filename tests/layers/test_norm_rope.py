"""GatedRMSNorm / RMSNorm formulas and RoPE vs transformers' Llama rotary embedding."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from mmmamba.layers.norm import GatedRMSNorm, RMSNorm
from mmmamba.layers.rope import RotaryEmbedding, apply_rope, rope_inv_freq


def test_gated_rmsnorm_formula():
    torch.manual_seed(0)
    norm = GatedRMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x, g = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight * (g * torch.sigmoid(g))
    torch.testing.assert_close(norm(x, g), expected, rtol=1e-5, atol=1e-6)
    # per head: the statistics are over head_dim only, so scaling one head leaves the others unchanged
    x2 = x.clone()
    x2[..., 0, :] *= 10
    torch.testing.assert_close(norm(x2, g)[..., 1:, :], norm(x, g)[..., 1:, :])


def test_gated_rmsnorm_keeps_dtype():
    norm = GatedRMSNorm(8)
    x, g = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16)
    assert norm(x, g).dtype == torch.bfloat16


def test_rmsnorm_matches_llama():
    torch.manual_seed(0)
    ours, ref = RMSNorm(16, eps=1e-6), LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        w = torch.randn(16)
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


ROPE_CASES = [
    ({"rope_type": "default", "rope_theta": 10000.0}, None),
    ({"rope_type": "default", "rope_theta": 100000.0}, None),
    ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
    (
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
    ),
]


@pytest.mark.parametrize("params,scaling", ROPE_CASES)
def test_rope_matches_llama_rotary(params, scaling):
    head_dim = 16
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=4096,
                      rope_parameters=params)
    ref = LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding(head_dim, params["rope_theta"], scaling)
    assert torch.equal(ours.inv_freq, ref.inv_freq)  # bit-exact, so converted teachers match
    pos = torch.tensor([[0, 1, 2, 3, 50, 1000, 3000], [5, 6, 7, 8, 9, 10, 11]])
    q, k = torch.randn(2, 4, 7, head_dim), torch.randn(2, 2, 7, head_dim)
    cos, sin = ours(pos, torch.float32)
    cos_r, sin_r = ref(q, pos)
    assert torch.equal(cos, cos_r) and torch.equal(sin, sin_r)
    q_r, k_r = apply_rotary_pos_emb(q, k, cos_r, sin_r)
    torch.testing.assert_close(apply_rope(q, cos, sin), q_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_r, rtol=1e-5, atol=1e-5)


def test_rope_relative_property():
    """<R_m q, R_n k> depends only on m - n."""
    rope = RotaryEmbedding(8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def dot(m, n):
        cq, sq = rope(torch.tensor([[m]]), torch.float32)
        ck, sk = rope(torch.tensor([[n]]), torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(dot(7, 3), dot(104, 100), rtol=1e-4, atol=1e-5)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="yarn"):
        rope_inv_freq(8, 10000.0, {"rope_type": "yarn", "factor": 2.0})


def test_rope_keeps_fp32_frequencies_after_cast():
    """model.to(bfloat16) casts buffers; the angles must still come from fp32 frequencies."""
    pos = torch.arange(0, 4000, 37)[None]
    ref = RotaryEmbedding(16, 10000.0)(pos, torch.bfloat16)
    cast = RotaryEmbedding(16, 10000.0).to(torch.bfloat16)
    assert cast.inv_freq.dtype == torch.bfloat16
    got = cast(pos, torch.bfloat16)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_rope_of_a_bf16_model_keeps_fp32_frequencies_without_host_copies(monkeypatch):
    """model.to(bf16) casts the frequency buffer; the angles must still come from fp32 frequencies, rebuilt once
    and kept (a step that copied them from the host again could not be captured in a CUDA graph)."""
    from mmmamba.layers import rope as rope_mod

    r32 = RotaryEmbedding(16, 10000.0)
    r16 = RotaryEmbedding(16, 10000.0).to(torch.bfloat16)
    assert r16.inv_freq.dtype == torch.bfloat16
    pos = torch.arange(4000)[None]
    cos32, sin32 = r32(pos, torch.float32)
    cos16, sin16 = r16(pos, torch.float32)
    torch.testing.assert_close(cos16, cos32, rtol=0, atol=0)  # bf16 frequencies would be off by ~1 rad here
    torch.testing.assert_close(sin16, sin32, rtol=0, atol=0)
    built = []
    monkeypatch.setattr(rope_mod, "rope_inv_freq", lambda *a: built.append(a) or torch.zeros(8))
    r16(pos, torch.float32)
    assert built == []
