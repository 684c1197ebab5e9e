"""The authors' released mmMamba-linear / mmMamba-hybrid folders (METHOD.md §1.4 "Released HF keys").

Same InternVL-chat layout as HoVLE (`teachers/hovle.py`), but each layer listed as "mamba2" in
`embedding_config.layers_block_type` / `llm_config.layers_block_type` holds a Mamba-2 mixer with fused
projections; "mha" layers keep HoVLE's `attention.wqkv` / `attention.wo`. Per Mamba-2 layer (under `attention.`):

    wvkqgdt.weight           rows v (kv*d) | k (kv*d) | q (h*d) | g (h*d) | dt (h)  -> v/k/q/g_proj, dt_proj (W_gamma)
    o_proj.weight            -> mixer.o_proj
    conv1d.{weight,bias}     [conv_dim, 1, d_conv] over channels [v | k | q]   -> mixer.conv1d (same order)
    g_norm_swish_gate.weight [head_dim]          -> mixer.g_norm.weight
    dt_bias [h], A_log_bias [h] (A = -exp(A_log_bias)) -> mixer.dt_bias, mixer.A_log

The authors' unfused training names (q_proj, k_proj, v_proj, g_proj, in_proj, g_norm) are accepted too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..models import MMMambaConfig, MMMambaForCausalLM
from ..models.config import ATTENTION, MAMBA2
from .hovle import (
    EMB_LAYER,
    LLM_LAYER,
    KeyReader,
    _generation_config,
    attention_mixer,
    build_model,
    convert_state_dict,
    hovle_config,
    load_hovle,
    read_config,
    read_safetensors,
)

_BLOCK_TYPES = {"mha": ATTENTION, "attention": ATTENTION, "mamba2": MAMBA2, "mamba": MAMBA2}


def split_wvkqgdt(w: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Fused released projection (rows v | k | q | g | dt) -> {"v", "k", "q", "g", "dt"}."""
    sizes = [num_kv_heads * head_dim, num_kv_heads * head_dim, num_heads * head_dim, num_heads * head_dim, num_heads]
    if w.shape[0] != sum(sizes):
        raise ValueError(
            f"wvkqgdt has {w.shape[0]} rows; expected v {sizes[0]} + k {sizes[1]} + q {sizes[2]} + g {sizes[3]} "
            f"+ dt {sizes[4]} = {sum(sizes)}"
        )
    return {n: t.clone() for n, t in zip(("v", "k", "q", "g", "dt"), w.split(sizes, dim=0))}


def mamba_mixer(reader: KeyReader, pre: str, config: MMMambaConfig) -> dict[str, torch.Tensor]:
    """One released Mamba-2 block (`pre` + attention.*) -> our mixer.* tensors."""
    a = pre + "attention."
    if a + "D" in reader:
        raise ValueError(f"{reader.source}: {a}D present: the D skip (use_D) is not supported by mmmamba's mixer")
    out = {}
    if a + "wvkqgdt.weight" in reader:
        parts = split_wvkqgdt(
            reader.get(a + "wvkqgdt.weight"), config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
        for src, dst in (("v", "v_proj"), ("k", "k_proj"), ("q", "q_proj"), ("g", "g_proj"), ("dt", "dt_proj")):
            out[f"mixer.{dst}.weight"] = parts[src]
    else:  # unfused names of the authors' training checkpoints
        for src, dst in (("v_proj", "v_proj"), ("k_proj", "k_proj"), ("q_proj", "q_proj"), ("g_proj", "g_proj"),
                         ("in_proj", "dt_proj")):
            out[f"mixer.{dst}.weight"] = reader.get(f"{a}{src}.weight")
    out["mixer.o_proj.weight"] = reader.get(a + "o_proj.weight")
    o_bias = reader.get(a + "o_proj.bias", required=False)
    if o_bias is not None:
        out["mixer.o_proj.bias"] = o_bias
    out["mixer.conv1d.weight"] = reader.get(a + "conv1d.weight")
    out["mixer.conv1d.bias"] = reader.get(a + "conv1d.bias")
    gn = a + "g_norm_swish_gate.weight"
    out["mixer.g_norm.weight"] = reader.get(gn if gn in reader else a + "g_norm.weight")
    out["mixer.dt_bias"] = reader.get(a + "dt_bias")
    out["mixer.A_log"] = reader.get(a + "A_log_bias")
    return out


def _is_mamba_block(keys, pre: str) -> bool:
    a = pre + "attention."
    return (a + "wvkqgdt.weight") in keys or (a + "q_proj.weight") in keys


def released_layer_types(raw: dict, sd) -> list[str]:
    """Per stacked layer: ATTENTION or MAMBA2, from `layers_block_type` (8 + 24 entries for mmMamba), else from the
    tensor names; a declared type that disagrees with the tensors is an error."""
    types = []
    for name, tpl in (("embedding_config", EMB_LAYER), ("llm_config", LLM_LAYER)):
        sub = raw[name]
        n = int(sub.get("num_hidden_layers", 0))
        declared = sub.get("layers_block_type")
        if declared is not None and len(declared) != n:
            raise ValueError(f"config field {name}.layers_block_type has {len(declared)} entries, expected {n}")
        for i in range(n):
            from_keys = MAMBA2 if _is_mamba_block(sd, tpl.format(i)) else ATTENTION
            if declared is not None:
                if declared[i] not in _BLOCK_TYPES:
                    raise ValueError(
                        f"config field {name}.layers_block_type[{i}] = {declared[i]!r}; expected 'mamba2' or 'mha'"
                    )
                if _BLOCK_TYPES[declared[i]] != from_keys:
                    raise ValueError(
                        f"config field {name}.layers_block_type[{i}] = {declared[i]!r} but the checkpoint holds "
                        f"{'Mamba-2' if from_keys == MAMBA2 else 'attention'} tensors under {tpl.format(i)!r}"
                    )
            types.append(from_keys)
    return types


def load_mmmamba_hf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, _raw: dict | None = None, _sd: dict | None = None
) -> MMMambaForCausalLM:
    """A released mmMamba-linear / -hybrid folder -> MMMambaForCausalLM with its layer types ("mha" layers stay
    attention). `_raw` / `_sd`: config and tensors already read by `load_internvl_chat`."""
    path = Path(path)
    raw = _raw if _raw is not None else read_config(path)
    sd = _sd if _sd is not None else read_safetensors(path)
    types = released_layer_types(raw, sd)
    config = hovle_config(raw, sd, layer_types=types)
    convs = [t for k, t in sd.items() if k.endswith("attention.conv1d.weight")]
    if convs:
        config.mamba_d_conv = int(convs[0].shape[-1])
    reader = KeyReader(sd, str(path))
    n_emb = int(raw["embedding_config"].get("num_hidden_layers", 0))
    mixers = [mamba_mixer if t == MAMBA2 else attention_mixer for t in types]
    new = convert_state_dict(reader, config, n_emb, mixers)
    return _generation_config(build_model(config, new, reader, dtype), path)


def is_released_mmmamba(raw: dict, keys) -> bool:
    """True for the authors' converted mmMamba folders (fused `wvkqgdt` Mamba-2 layers / `layers_block_type`)."""
    if raw.get("model_type") == "mmMamba_chat":
        return True
    if any("layers_block_type" in raw.get(s, {}) for s in ("embedding_config", "llm_config")):
        return True
    return any(".attention.wvkqgdt." in k for k in keys)


def load_internvl_chat(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MMMambaForCausalLM:
    """An InternVL-chat folder -> MMMambaForCausalLM: a released mmMamba folder (`is_released_mmmamba`) with its
    layer types, else a HoVLE folder with every layer attention. The files are read once."""
    path = Path(path)
    raw, sd = read_config(path), read_safetensors(path)
    if is_released_mmmamba(raw, sd):
        return load_mmmamba_hf(path, dtype=dtype, _raw=raw, _sd=sd)
    return load_hovle(path, dtype=dtype, _raw=raw, _sd=sd)
