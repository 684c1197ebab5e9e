"""Benchmark configurations: HoVLE-2.6B dims (random weights) and a tiny CPU one, in our decoder and as a
transformers LlamaForCausalLM / mamba_ssm MambaLMHeadModel of the same dims."""

from __future__ import annotations

import torch

from ..models import MMMambaConfig, MMMambaForCausalLM
from ..models.dims import HOVLE_DIMS, TINY_DIMS  # noqa: F401  (bench's dims)
from ..models.placement import parse_placement

# HoVLE's vision front (METHOD.md §1.2): 448-pixel tiles, 14-pixel patches, pixel shuffle 0.5 -> 256 tokens per tile;
# the 8 holistic-embedding layers are the first 8 of HOVLE_DIMS' 32 decoder layers. Tiny: 112-pixel tiles, 16 tokens.
HOVLE_VISION = dict(
    vision_config=dict(image_size=448, patch_size=14, num_channels=3, downsample_ratio=0.5, use_thumbnail=True,
                       dynamic_image_size=True, min_dynamic_patch=1, max_dynamic_patch=12),
    img_context_token_id=92546, template="internlm2-chat",
)
TINY_VISION = dict(
    vision_config={**HOVLE_VISION["vision_config"], "image_size": 112}, img_context_token_id=500,
    template="internlm2-chat",
)

# name -> placement spec (None = no attention layer, "all" = teacher)
VARIANTS = {"teacher": "all", "linear": None, "hybrid": "every:4"}


def attention_layers(spec, num_layers: int) -> list[int]:
    if spec == "all":
        return list(range(num_layers))
    return parse_placement(spec, num_layers)


def make_config(dims: dict, variant: str, placement: str | None = None, vision: dict | None = None) -> MMMambaConfig:
    """`vision` (HOVLE_VISION / TINY_VISION) adds the vision front, its image token id and chat template."""
    spec = placement if (placement is not None and variant == "hybrid") else VARIANTS[variant]
    n = dims["num_hidden_layers"]
    attn = set(attention_layers(spec, n))
    types = ["attention" if i in attn else "mamba2" for i in range(n)]
    return MMMambaConfig(**dims, **(vision or {}), layer_types=types)


@torch.no_grad()
def _random(cls, config: MMMambaConfig, device, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    with torch.device(device):
        module = cls(config)
    return module.to(dtype).eval().requires_grad_(False)


def build_ours(config: MMMambaConfig, device, dtype: torch.dtype, seed: int = 0):
    """Random-weight MMMambaForCausalLM built directly on `device` (fp32 init, then cast)."""
    return _random(MMMambaForCausalLM, config, device, dtype, seed)


def build_vision_front(config: MMMambaConfig, device, dtype: torch.dtype, seed: int = 0):
    """A random-weight `VisionFront` of `config` on its own, for a decoder that has none (transformers' Llama)."""
    from ..models.vision import VisionFront

    return _random(VisionFront, config, device, dtype, seed)


def llama_config(dims: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=dims["vocab_size"], hidden_size=dims["hidden_size"], intermediate_size=dims["intermediate_size"],
        num_hidden_layers=dims["num_hidden_layers"], num_attention_heads=dims["num_attention_heads"],
        num_key_value_heads=dims["num_key_value_heads"], head_dim=dims["head_dim"], rms_norm_eps=dims["rms_norm_eps"],
        rope_theta=dims["rope_theta"], max_position_embeddings=dims["max_position_embeddings"],
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )


@torch.no_grad()
def build_hf_llama(dims: dict, device, dtype: torch.dtype, seed: int = 0):
    """transformers' LlamaForCausalLM with SDPA attention: what a user runs today for the teacher."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(dims)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).eval().requires_grad_(False)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return model


def mamba_ssm_available() -> str | None:
    """mamba_ssm version if it imports (its Mamba-2 path needs only Triton), else None."""
    try:
        import mamba_ssm
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401
    except Exception:
        return None
    return getattr(mamba_ssm, "__version__", "unknown")


@torch.no_grad()
def build_mamba_ssm(dims: dict, device, dtype: torch.dtype, seed: int = 0):
    """mamba_ssm's pure Mamba-2 + gated-MLP LM at the same dims (d_inner = hidden, 16 heads of 128, d_state 128,
    8 groups: 2.53 B parameters at HoVLE dims)."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    heads = dims["num_attention_heads"]
    cfg = MambaConfig(
        d_model=dims["hidden_size"], d_intermediate=dims["intermediate_size"], n_layer=dims["num_hidden_layers"],
        vocab_size=dims["vocab_size"], pad_vocab_size_multiple=1, rms_norm=True, residual_in_fp32=True,
        fused_add_norm=True, tie_embeddings=False,
        ssm_cfg={"layer": "Mamba2", "d_state": dims["head_dim"], "headdim": dims["hidden_size"] // heads,
                 "ngroups": dims["num_key_value_heads"], "expand": 1, "d_conv": max(2, dims["mamba_d_conv"]),
                 "use_mem_eff_path": False, "chunk_size": 256},
    )
    torch.manual_seed(seed)
    return MambaLMHeadModel(cfg, device=device, dtype=dtype).eval().requires_grad_(False)
