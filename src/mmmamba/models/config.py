"""MMMambaConfig: a decoder whose layers are each softmax attention or a Mamba-2 mixer."""

from __future__ import annotations

from transformers import PretrainedConfig

ATTENTION = "full_attention"
# transformers' standard name for recurrent layers; a mmmamba "linear_attention" layer is a Mamba-2 mixer
MAMBA2 = "linear_attention"
_ALIASES = {
    "attention": ATTENTION, "full_attention": ATTENTION, "mha": ATTENTION,
    "mamba2": MAMBA2, "mamba": MAMBA2, "linear_attention": MAMBA2,
}


def normalize_layer_types(layer_types, num_layers: int) -> list[str]:
    """Map user spellings ("attention", "mha", "mamba2", ...) to transformers' standard names."""
    if layer_types is None:
        return [ATTENTION] * num_layers
    out = []
    for i, t in enumerate(layer_types):
        if t not in _ALIASES:
            raise ValueError(
                f"config field layer_types[{i}] = {t!r} is not a known layer type; "
                "use 'attention' (stored as 'full_attention') or 'mamba2' (stored as 'linear_attention')"
            )
        out.append(_ALIASES[t])
    if len(out) != num_layers:
        raise ValueError(
            f"config field layer_types has {len(out)} entries but num_hidden_layers = {num_layers}; "
            "give one entry per layer"
        )
    return out


class MMMambaConfig(PretrainedConfig):
    """Dims of a Llama-style decoder plus a per-layer `layer_types` list.

    Mamba-2 layers reuse the attention dims: C has `num_attention_heads` heads, B and x have
    `num_key_value_heads` heads (repeated for GQA); state size n = head dim p = `head_dim`.
    `layer_rope_theta` (optional, one per layer) lets stacked modules keep their own RoPE base (HoVLE).
    `vision_config` (optional) adds a HoVLE-style vision front whose tokens replace `img_context_token_id`.
    """

    model_type = "mmmamba"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 688,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        rope_scaling_config: dict | None = None,
        layer_rope_theta: list[float] | None = None,
        max_position_embeddings: int = 8192,
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        layer_types: list[str] | None = None,
        mamba_d_conv: int = 2,
        mamba_gate_norm_eps: float = 1e-5,
        mamba_chunk_size: int = 64,
        vision_config: dict | None = None,
        img_context_token_id: int | None = None,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling_config = rope_scaling_config
        self.layer_rope_theta = layer_rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.qkv_bias = qkv_bias
        self.o_bias = o_bias
        self.mlp_bias = mlp_bias
        self.layer_types = normalize_layer_types(layer_types, num_hidden_layers)
        self.mamba_d_conv = mamba_d_conv
        self.mamba_gate_norm_eps = mamba_gate_norm_eps
        self.mamba_chunk_size = mamba_chunk_size
        self.vision_config = vision_config
        self.img_context_token_id = img_context_token_id
        self.initializer_range = initializer_range
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if layer_rope_theta is not None and len(layer_rope_theta) != num_hidden_layers:
            raise ValueError(f"config field layer_rope_theta needs {num_hidden_layers} entries")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # transformers >= 5.2x rewrites legacy names after init; keep ours canonical either way
        self.layer_types = normalize_layer_types(self.layer_types, num_hidden_layers)

    def rope_theta_for(self, layer_idx: int) -> float:
        return self.layer_rope_theta[layer_idx] if self.layer_rope_theta else self.rope_theta

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of a Mamba-2 layer's short conv, [v | k | q]: 2 * kv * d + h * d."""
        return (2 * self.num_key_value_heads + self.num_attention_heads) * self.head_dim

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == ATTENTION]

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == MAMBA2]
