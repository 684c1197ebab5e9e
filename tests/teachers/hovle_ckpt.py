"""Test helper: write tiny random checkpoints in HoVLE's layout (METHOD.md §1.4) and in the authors' released
mmMamba layout (fused `wvkqgdt`), with exactly those tensor names and shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def hovle_raw_config(
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 48,
    n_emb: int = 8,
    n_llm: int = 24,
    vocab: int = 100,
    n_special: int = 0,
    out_vocab: int | None = None,
    image_size: int = 28,
    table_image_size: int | None = None,
    patch: int = 7,
    emb_theta: float = 10000.0,
    llm_theta: float = 1e6,
    eps: float = 1e-6,
    img_context_token_id: int = 97,
    layers_block_type: tuple[list[str], list[str]] | None = None,
) -> dict:
    """config.json of an InternVL-chat (HoVLE) folder; with `layers_block_type` (embedding list, LLM list) the
    released mmMamba variant (model types rewritten as the authors' convert_weight.py does)."""
    emb = {
        "model_type": "holistic_embedding",
        "num_hidden_layers": n_emb,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": inter,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": emb_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "max_position_embeddings": 512,
        "image_size": table_image_size or image_size,
        "patch_size": patch,
        "num_channels": 3,
        "llm_vocab_size": vocab,
        "llm_hidden_size": hidden,
        "img_context_token_id": img_context_token_id,
        "special_token_maps": {f"<special_{i}>": vocab + i for i in range(n_special)},
        "downsample_ratio": 0.5,
        "pixel_shuffle_loc": "pre",
        "use_pixel_shuffle_proj": True,
    }
    llm = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "vocab_size": out_vocab or vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": n_llm,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": llm_theta,
        "rope_scaling": None,
        "bias": False,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    raw = {
        "model_type": "internvl_chat",
        "architectures": ["InternVLChatModel"],
        "template": "internlm2-chat",
        "force_image_size": image_size,
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "ps_version": "v2",
        "normalize_encoder_output": False,
        "embedding_config": emb,
        "llm_config": llm,
    }
    if layers_block_type is not None:
        raw["model_type"] = "mmMamba_chat"
        raw["architectures"] = "mmMambaChatModel"
        emb["model_type"], llm["model_type"] = "mmMamba_embedding", "mmMamba"
        emb["layers_block_type"], llm["layers_block_type"] = list(layers_block_type[0]), list(layers_block_type[1])
    return raw


def _lin(g, out_f, in_f):
    return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)


def random_hovle_tensors(raw: dict, seed: int = 0, mamba_layers: set[int] = frozenset()) -> dict[str, torch.Tensor]:
    """Random tensors with HoVLE's names and shapes. Global layer indices in `mamba_layers` (0 .. E-1 embedding,
    E .. E+L-1 LLM) get the released Mamba-2 tensors (attention.wvkqgdt, o_proj, conv1d, g_norm_swish_gate,
    dt_bias, A_log_bias) instead of attention.wqkv / attention.wo."""
    g = torch.Generator().manual_seed(seed)
    emb, llm = raw["embedding_config"], raw["llm_config"]
    H, h, kv = emb["hidden_size"], emb["num_attention_heads"], emb["num_key_value_heads"]
    inter = emb["intermediate_size"]
    d = H // h
    p, side = emb["patch_size"], emb["image_size"] // emb["patch_size"]
    t = {
        "embedding_model.vision_embeddings.class_embedding": torch.randn(1, 1, H, generator=g),
        "embedding_model.vision_embeddings.position_embedding": torch.randn(1, 1 + side * side, H, generator=g) * 0.5,
        "embedding_model.vision_embeddings.patch_embedding.weight": torch.randn(H, 3, p, p, generator=g) / (3**0.5 * p),
        "embedding_model.vision_embeddings.patch_embedding.bias": torch.randn(H, generator=g) * 0.1,
        "embedding_model.llm_text_embeddings.weight": torch.randn(emb["llm_vocab_size"], H, generator=g),
        "embedding_model.pixel_shuffle_proj.0.weight": _lin(g, H, 4 * H),
        "embedding_model.pixel_shuffle_proj.0.bias": torch.randn(H, generator=g) * 0.1,
        "embedding_model.pixel_shuffle_proj.2.weight": _lin(g, H, H),
        "embedding_model.pixel_shuffle_proj.2.bias": torch.randn(H, generator=g) * 0.1,
        "language_model.model.tok_embeddings.weight": torch.randn(llm["vocab_size"], H, generator=g),
        "language_model.model.norm.weight": 1 + 0.1 * torch.randn(H, generator=g),
        "language_model.output.weight": _lin(g, llm["vocab_size"], H),
    }
    if emb["special_token_maps"]:
        t["embedding_model.special_text_embeddings.weight"] = torch.randn(
            len(emb["special_token_maps"]), H, generator=g
        )
    n_emb = emb["num_hidden_layers"]
    for i in range(n_emb + llm["num_hidden_layers"]):
        pre = f"embedding_model.encoder.{i}." if i < n_emb else f"language_model.model.layers.{i - n_emb}."
        t[pre + "attention_norm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        t[pre + "ffn_norm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        t[pre + "feed_forward.w1.weight"] = _lin(g, inter, H)
        t[pre + "feed_forward.w3.weight"] = _lin(g, inter, H)
        t[pre + "feed_forward.w2.weight"] = _lin(g, H, inter)
        if i in mamba_layers:
            conv_dim = 2 * kv * d + h * d
            t[pre + "attention.wvkqgdt.weight"] = _lin(g, 2 * kv * d + 2 * h * d + h, H)
            t[pre + "attention.o_proj.weight"] = _lin(g, H, h * d)
            t[pre + "attention.conv1d.weight"] = torch.randn(conv_dim, 1, 2, generator=g) * 0.5
            t[pre + "attention.conv1d.bias"] = torch.randn(conv_dim, generator=g) * 0.1
            t[pre + "attention.g_norm_swish_gate.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
            t[pre + "attention.dt_bias"] = torch.randn(h, generator=g) - 1.0
            t[pre + "attention.A_log_bias"] = torch.randn(h, generator=g) * 0.5
        else:
            t[pre + "attention.wqkv.weight"] = _lin(g, (h + 2 * kv) * d, H)
            t[pre + "attention.wo.weight"] = _lin(g, H, h * d)
    return t


def write_checkpoint(out: str | Path, raw: dict, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """config.json + safetensors (optionally split over several files, as large checkpoints are)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False))
    keys = sorted(tensors)
    for s in range(shards):
        part = {k: tensors[k].contiguous() for k in keys[s::shards]}
        name = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(out / name), metadata={"format": "pt"})
    return out


def write_hovle(out, seed: int = 0, mamba_layers: set[int] = frozenset(), shards: int = 1, **config_kw):
    """Build + write in one call; returns (folder, raw config, tensors)."""
    raw = hovle_raw_config(**config_kw)
    tensors = random_hovle_tensors(raw, seed, mamba_layers)
    return write_checkpoint(out, raw, tensors, shards), raw, tensors
