"""HoVLE checkpoints (InternVL-chat layout, METHOD.md §1) -> one MMMambaForCausalLM.

HoVLE = holistic embedding (text table + patch embedding + pixel shuffle MLP, then E InternLM2 layers) feeding an
InternLM2 LLM (L layers) through `inputs_embeds`, with no connector in between. Both layer groups have the same
width, so they become one stack of E + L layers (8 + 24 for HoVLE-2.6B): embedding layer i is layer i, LLM layer j
is layer E + j, each group keeping its own RoPE base (`config.layer_rope_theta`).

Key mapping (per layer; prefix `embedding_model.encoder.{i}.` or `language_model.model.layers.{j}.`):

    attention.wqkv        -> mixer.q_proj / k_proj / v_proj   (grouped rows, see `split_wqkv`)
    attention.wo          -> mixer.o_proj
    feed_forward.w1/w3/w2 -> mlp.gate_proj / up_proj / down_proj
    attention_norm        -> input_layernorm,  ffn_norm -> post_attention_layernorm

and `embedding_model.llm_text_embeddings` (+ `special_text_embeddings` rows) -> model.embed_tokens,
`embedding_model.vision_embeddings.{patch_embedding, position_embedding}` -> model.vision.*,
`embedding_model.pixel_shuffle_proj.{0,2}` -> model.vision.mlp.{0,2}, `language_model.model.norm` -> model.norm,
`language_model.output` -> lm_head. The CLS embedding and the LLM's own `tok_embeddings` are unused by HoVLE's
forward and are dropped.

The authors' released mmMamba-linear / -hybrid folders share this layout with Mamba-2 layers in place of some
attention layers: `mmmamba_hf.py` reads them and tells the two kinds of folder apart.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..io import check_model_folder
from ..models import MMMambaConfig, MMMambaForCausalLM
from ..models.chat_prompt import INTERNLM2_IM_END_ID

logger = logging.getLogger(__name__)

EMB_LAYER = "embedding_model.encoder.{}."
LLM_LAYER = "language_model.model.layers.{}."
# present in HoVLE checkpoints but unused by its forward pass (CLS token off; LLM fed through inputs_embeds)
IGNORED = ("embedding_model.vision_embeddings.class_embedding", "language_model.model.tok_embeddings.weight")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

# -- files --------------------------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> dict:
    """config.json of an InternVL-chat folder, checked for the two sub-configs."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    for field in ("embedding_config", "llm_config"):
        if not isinstance(raw.get(field), dict):
            raise ValueError(
                f"{path / 'config.json'}: field {field!r} missing; a HoVLE / mmMamba config has "
                "embedding_config and llm_config sub-dicts"
            )
    return raw


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in `path` (files are checked first: clear errors on damage)."""
    path = check_model_folder(path)
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                sd[k] = fh.get_tensor(k)
    return sd


class KeyReader:
    """Hands out checkpoint tensors by name and remembers which were used, so leftovers can be reported."""

    def __init__(self, sd: dict[str, torch.Tensor], source: str):
        self.sd, self.source, self.used = sd, source, set()

    def __contains__(self, key: str) -> bool:
        return key in self.sd

    def get(self, key: str, required: bool = True) -> torch.Tensor | None:
        if key not in self.sd:
            if required:
                raise ValueError(f"{self.source}: tensor {key!r} is missing from the checkpoint")
            return None
        self.used.add(key)
        return self.sd[key]

    def leftovers(self) -> list[str]:
        return sorted(
            k for k in self.sd if k not in self.used and k not in IGNORED and not k.endswith(IGNORED_SUFFIXES)
        )


# -- config ----------------------------------------------------------------------------------------------------
def _layer_count(keys, template: str) -> int:
    pat = re.compile(re.escape(template.split("{}")[0]) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def _rope_scaling(sub: dict, name: str) -> dict | None:
    rs = sub.get("rope_scaling")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "dynamic":
        # InternLM2's dynamic NTK only changes the base beyond max_position_embeddings: exact below it
        logger.warning(
            "%s.rope_scaling is dynamic NTK; mmmamba uses the plain RoPE base, which is identical up to "
            "max_position_embeddings = %s tokens", name, sub.get("max_position_embeddings")
        )
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(rs["factor"])}
    raise ValueError(f"config field {name}.rope_scaling = {rs!r}: only 'linear' and 'dynamic' are supported")


def _need(sub: dict, name: str, field: str):
    if sub.get(field) is None:
        raise ValueError(f"config field {name}.{field} is missing")
    return sub[field]


def _same(field: str, a, b):
    if a != b:
        raise ValueError(
            f"embedding_config.{field} = {a!r} but llm_config.{field} = {b!r}; mmmamba stacks both groups as one "
            "decoder and needs them equal"
        )
    return a


def hovle_config(raw: dict, sd: dict[str, torch.Tensor], layer_types: list[str] | None = None) -> MMMambaConfig:
    """MMMambaConfig of the stacked model from HoVLE's config.json (+ tensor shapes for vocab / biases)."""
    emb, llm = raw["embedding_config"], raw["llm_config"]
    for key in ("embedding_model.llm_text_embeddings.weight", "language_model.output.weight"):
        if key not in sd:
            raise ValueError(f"tensor {key!r} is missing from the checkpoint: not a HoVLE / InternVL-chat layout")
    n_emb = int(emb.get("num_hidden_layers", 0))
    n_llm = int(_need(llm, "llm_config", "num_hidden_layers"))
    for name, n, tpl in (("embedding_config", n_emb, EMB_LAYER), ("llm_config", n_llm, LLM_LAYER)):
        if _layer_count(sd, tpl) != n:
            raise ValueError(
                f"config field {name}.num_hidden_layers = {n} but the checkpoint has {_layer_count(sd, tpl)} "
                f"layers under {tpl.format('N')!r}"
            )
    E, Lc = "embedding_config", "llm_config"
    H = _same("hidden_size", _need(emb, E, "hidden_size"), _need(llm, Lc, "hidden_size"))
    if emb.get("llm_hidden_size", H) != H:
        raise ValueError(f"embedding_config.llm_hidden_size = {emb['llm_hidden_size']} != hidden_size {H}")
    heads = _same(
        "num_attention_heads", _need(emb, E, "num_attention_heads"), _need(llm, Lc, "num_attention_heads")
    )
    kv = _same(
        "num_key_value_heads", emb.get("num_key_value_heads") or heads, llm.get("num_key_value_heads") or heads
    )
    inter = _same("intermediate_size", _need(emb, E, "intermediate_size"), _need(llm, Lc, "intermediate_size"))
    act = _same("hidden_act", emb.get("hidden_act", "silu"), llm.get("hidden_act", "silu"))
    eps = _same("rms_norm_eps", float(emb.get("rms_norm_eps", 1e-5)), float(llm.get("rms_norm_eps", 1e-6)))
    scaling = _same(
        "rope_scaling", _rope_scaling(emb, "embedding_config"), _rope_scaling(llm, "llm_config")
    )
    if emb.get("pixel_shuffle_loc", "pre") != "pre":
        raise ValueError(
            "embedding_config.pixel_shuffle_loc = 'post' (HoVLE-HD) is not supported: it needs separate "
            "high-resolution input ids; use the 'pre' variant (METHOD.md §1.2)"
        )
    if not emb.get("use_pixel_shuffle_proj", True):
        raise ValueError("embedding_config.use_pixel_shuffle_proj = false is not supported (no pixel-shuffle MLP)")
    if raw.get("normalize_encoder_output"):
        raise ValueError("config field normalize_encoder_output = true is not supported")

    text = sd["embedding_model.llm_text_embeddings.weight"]
    special = sd.get("embedding_model.special_text_embeddings.weight")
    n_in = text.shape[0] + (0 if special is None else special.shape[0])
    n_out = sd["language_model.output.weight"].shape[0]
    tile = int(raw.get("force_image_size") or emb.get("image_size", 448))
    vision = {
        "image_size": tile,
        "patch_size": int(emb.get("patch_size", 14)),
        "num_channels": int(emb.get("num_channels", 3)),
        "downsample_ratio": float(emb.get("downsample_ratio", raw.get("downsample_ratio", 0.5))),
        "use_thumbnail": bool(raw.get("use_thumbnail", True)),
        "dynamic_image_size": bool(raw.get("dynamic_image_size", True)),
        "min_dynamic_patch": int(raw.get("min_dynamic_patch", 1)),
        "max_dynamic_patch": int(raw.get("max_dynamic_patch", 12)),
    }
    n = n_emb + n_llm
    return MMMambaConfig(
        vocab_size=max(n_in, n_out),
        hidden_size=H,
        intermediate_size=inter,
        num_hidden_layers=n,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=H // heads,
        hidden_act=act,
        rms_norm_eps=eps,
        rope_theta=float(llm.get("rope_theta", 10000.0)),
        rope_scaling_config=scaling,
        layer_rope_theta=[float(emb.get("rope_theta", 10000.0))] * n_emb
        + [float(llm.get("rope_theta", 10000.0))] * n_llm,
        max_position_embeddings=int(llm.get("max_position_embeddings", 2048)),
        qkv_bias=any(k.endswith("attention.wqkv.bias") for k in sd),
        o_bias=any(k.endswith(("attention.wo.bias", "attention.o_proj.bias")) for k in sd),
        mlp_bias=any(k.endswith("feed_forward.w1.bias") for k in sd),
        layer_types=layer_types or ["attention"] * n,
        vision_config=vision,
        img_context_token_id=int(emb.get("img_context_token_id", 92546)),
        tie_word_embeddings=False,
        bos_token_id=llm.get("bos_token_id"),
        eos_token_id=llm.get("eos_token_id"),
        pad_token_id=llm.get("pad_token_id"),
        template=raw.get("template"),
    )


# -- weights ---------------------------------------------------------------------------------------------------
def split_wqkv(w: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """InternLM2's fused wqkv -> (W_Q, W_K, W_V).

    Rows come in kv-head blocks of (groups + 2) * head_dim, groups = num_heads / num_kv_heads:
    [q(h*groups + 0) .. q(h*groups + groups-1), k(h), v(h)] for h = 0 .. kv-1. Works for weights (rows, in)
    and biases (rows,)."""
    g = num_heads // num_kv_heads
    if w.shape[0] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(
            f"wqkv has {w.shape[0]} rows; expected (heads {num_heads} + 2 * kv heads {num_kv_heads}) * head_dim "
            f"{head_dim} = {(num_heads + 2 * num_kv_heads) * head_dim}"
        )
    blocks = w.reshape(num_kv_heads, g + 2, head_dim, *w.shape[1:])
    q = blocks[:, :g].reshape(num_heads * head_dim, *w.shape[1:])
    k = blocks[:, g].reshape(num_kv_heads * head_dim, *w.shape[1:])
    v = blocks[:, g + 1].reshape(num_kv_heads * head_dim, *w.shape[1:])
    return q.clone(), k.clone(), v.clone()


def attention_mixer(reader: KeyReader, pre: str, config: MMMambaConfig) -> dict[str, torch.Tensor]:
    """One InternLM2 attention block (`pre` + attention.wqkv / attention.wo) -> our mixer.* tensors."""
    h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    out = {}
    for kind in ("weight", "bias"):
        w = reader.get(f"{pre}attention.wqkv.{kind}", required=kind == "weight")
        if w is not None:
            out[f"mixer.q_proj.{kind}"], out[f"mixer.k_proj.{kind}"], out[f"mixer.v_proj.{kind}"] = split_wqkv(
                w, h, kv, d
            )
        o = reader.get(f"{pre}attention.wo.{kind}", required=kind == "weight")
        if o is not None:
            out[f"mixer.o_proj.{kind}"] = o
    return out


MixerFn = Callable[[KeyReader, str, MMMambaConfig], dict]


def fit_position_table(pos: torch.Tensor, side: int) -> torch.Tensor:
    """(1, 1 + s^2, C) table -> (1, 1 + side^2, C). HoVLE resizes its table bicubically to the patch grid on every
    forward; doing it once here for the tile grid gives the same values for every full tile."""
    s = int(round((pos.shape[1] - 1) ** 0.5))
    if s * s != pos.shape[1] - 1:
        raise ValueError(f"position_embedding has {pos.shape[1]} rows; expected 1 + a square number")
    if s == side:
        return pos
    grid = pos[:, 1:].float().reshape(1, s, s, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    grid = grid.reshape(1, -1, side * side).permute(0, 2, 1).to(pos.dtype)
    return torch.cat([pos[:, :1], grid], dim=1)


def convert_state_dict(
    reader: KeyReader, config: MMMambaConfig, n_emb: int, mixers: list[MixerFn]
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> MMMambaForCausalLM state dict; `mixers[i]` converts layer i's mixer."""
    out: dict[str, torch.Tensor] = {}
    # token table: HoVLE looks ids >= llm_vocab_size up in special_text_embeddings[id - llm_vocab_size]
    rows = [reader.get("embedding_model.llm_text_embeddings.weight")]
    special = reader.get("embedding_model.special_text_embeddings.weight", required=False)
    if special is not None:
        rows.append(special)
    head = reader.get("language_model.output.weight")
    V = config.vocab_size
    emb = torch.cat(rows)
    if emb.shape[0] < V:  # ids only the head produces: never looked up by HoVLE, zero rows are harmless
        emb = torch.cat([emb, emb.new_zeros(V - emb.shape[0], emb.shape[1])])
    if head.shape[0] < V:
        logger.warning(
            "language_model.output has %d rows but the input vocabulary has %d; the extra (input-only special) "
            "tokens get logit 0", head.shape[0], V
        )
        head = torch.cat([head, head.new_zeros(V - head.shape[0], head.shape[1])])
    out["model.embed_tokens.weight"], out["lm_head.weight"] = emb, head
    out["model.norm.weight"] = reader.get("language_model.model.norm.weight")

    ve = "embedding_model.vision_embeddings."
    side = config.vision_config["image_size"] // config.vision_config["patch_size"]
    out["model.vision.patch_embedding.weight"] = reader.get(ve + "patch_embedding.weight")
    out["model.vision.patch_embedding.bias"] = reader.get(ve + "patch_embedding.bias")
    out["model.vision.position_embedding"] = fit_position_table(reader.get(ve + "position_embedding"), side)
    for i in (0, 2):
        for kind in ("weight", "bias"):
            out[f"model.vision.mlp.{i}.{kind}"] = reader.get(f"embedding_model.pixel_shuffle_proj.{i}.{kind}")

    for i in range(config.num_hidden_layers):
        pre = EMB_LAYER.format(i) if i < n_emb else LLM_LAYER.format(i - n_emb)
        dst = f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = reader.get(pre + "attention_norm.weight")
        out[dst + "post_attention_layernorm.weight"] = reader.get(pre + "ffn_norm.weight")
        for src, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            for kind in ("weight", "bias"):
                t = reader.get(f"{pre}feed_forward.{src}.{kind}", required=kind == "weight")
                if t is not None:
                    out[f"{dst}mlp.{name}.{kind}"] = t
        out.update({dst + k: v for k, v in mixers[i](reader, pre, config).items()})
    return out


def build_model(
    config: MMMambaConfig, sd: dict[str, torch.Tensor], reader: KeyReader, dtype: torch.dtype | None
) -> MMMambaForCausalLM:
    """Instantiate (without random init), load `sd` strictly, check that no checkpoint tensor was left unused."""
    leftovers = reader.leftovers()
    if leftovers:
        raise ValueError(f"{reader.source}: unexpected tensors {leftovers[:8]} (layout not recognised)")
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = MMMambaForCausalLM(config)
    expected = model.state_dict()
    for k, t in expected.items():  # a projection bias absent in some layers (config-wide flag): zero
        if k not in sd and k.endswith("_proj.bias"):
            sd[k] = torch.zeros(t.shape, dtype=t.dtype)
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"{reader.source}: conversion produced missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(f"{reader.source}: {k} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _generation_config(model, path: Path):
    """The folder's generation_config.json if usable; else, for the internlm2-chat template, stop on `<|im_end|>`
    too (HoVLE's `chat()` stops on the template separator, METHOD.md §1.5)."""
    if (path / "generation_config.json").exists():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path))
            return model
        except Exception as e:  # a foreign generation config must not block loading the weights
            logger.warning("ignoring %s: %s", path / "generation_config.json", e)
    c = model.config
    if getattr(c, "template", None) == "internlm2-chat" and c.vocab_size > INTERNLM2_IM_END_ID:
        eos = [i for i in (c.eos_token_id, INTERNLM2_IM_END_ID) if i is not None]
        model.generation_config.eos_token_id = list(dict.fromkeys(eos))
    return model


def load_hovle(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, _raw: dict | None = None, _sd: dict | None = None
) -> MMMambaForCausalLM:
    """A HoVLE folder (config.json with embedding_config + llm_config, safetensors) -> MMMambaForCausalLM with
    every layer attention. Released mmMamba-linear / -hybrid folders (same layout with Mamba-2 layers) load with
    `mmmamba_hf.load_internvl_chat`, which tells the two apart. `_raw` / `_sd`: config and tensors already read."""
    path = Path(path)
    check_model_folder(path)
    raw = _raw if _raw is not None else read_config(path)
    sd = _sd if _sd is not None else read_safetensors(path)
    config = hovle_config(raw, sd)
    reader = KeyReader(sd, str(path))
    n_emb = int(raw["embedding_config"].get("num_hidden_layers", 0))
    new = convert_state_dict(reader, config, n_emb, [attention_mixer] * config.num_hidden_layers)
    return _generation_config(build_model(config, new, reader, dtype), path)
