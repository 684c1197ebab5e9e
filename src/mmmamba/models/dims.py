"""Named decoder dims for benchmarks with random weights: HoVLE-2.6B's language model, SmolLM2-135M and a tiny CPU
one. `dims_config(name)` is the all-attention teacher config of a name."""

from __future__ import annotations

from .config import MMMambaConfig

# HoVLE-2.6B: 8 embedding + 24 InternLM2 layers = 32 decoder layers (METHOD.md §1)
HOVLE_DIMS = dict(
    vocab_size=92553, hidden_size=2048, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1_000_000.0,
    max_position_embeddings=1 << 19, mamba_d_conv=2, mamba_chunk_size=64,
)
# SmolLM2-135M-Instruct (its config.json; tied embeddings), the teacher of the repo's CPU distillations
SMOLLM2_DIMS = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100_000.0, max_position_embeddings=8192,
    mamba_d_conv=2, mamba_chunk_size=64, tie_word_embeddings=True,
)
TINY_DIMS = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=1 << 14, mamba_d_conv=2, mamba_chunk_size=16,
)
NAMED_DIMS = {"hovle-2.6b": HOVLE_DIMS, "smollm2": SMOLLM2_DIMS, "tiny": TINY_DIMS}


def dims_config(name: str) -> MMMambaConfig:
    """The all-attention (teacher) config of the dims called `name` (a key of NAMED_DIMS)."""
    if name not in NAMED_DIMS:
        raise ValueError(f"dims {name!r} unknown; use one of {', '.join(NAMED_DIMS)}")
    dims = NAMED_DIMS[name]
    return MMMambaConfig(**dims, layer_types=["attention"] * dims["num_hidden_layers"])
