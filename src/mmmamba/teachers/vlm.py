"""A HoVLE-style decoder-only VLM built on a text teacher: a vision front (patch embedding, no vision encoder) plus
`new_layers` decoder layers in front of the LLM as the holistic embedding (METHOD.md §1.2), one decoder in all.

Image and text tokens both pass through the new layers and then the LLM's. The new layers start as copies of the
LLM's first layers with their output projections (attention W_O and MLP down) at zero, so at step 0 each is the
identity on the residual stream and the model's text behaviour is exactly the LLM's; the image tokens of the
vision front (`models.vision.VisionFront`) are what training has to learn to place.
"""

from __future__ import annotations

import copy

import torch

from ..models import ATTENTION, MMMambaConfig, MMMambaForCausalLM
from ..models.image_processing import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN


def add_image_tokens(tokenizer) -> int:
    """Add `<img>`, `<IMG_CONTEXT>`, `</img>` as special tokens (if missing); returns the `<IMG_CONTEXT>` id."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMG_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN]},
                                 replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)


def vlm_config(llm: MMMambaConfig, new_layers: int, vocab_size: int, img_context_token_id: int,
               image_size: int = 64, patch_size: int = 8, downsample_ratio: float = 0.5) -> MMMambaConfig:
    """The LLM's config with `new_layers` attention layers in front and a one-tile vision front."""
    if new_layers < 0:
        raise ValueError(f"new_layers must be >= 0, got {new_layers}")
    if image_size % patch_size or (image_size // patch_size * downsample_ratio) % 1:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size} whose grid "
                         f"scales to whole tokens by downsample_ratio {downsample_ratio}")
    cfg = copy.deepcopy(llm)
    cfg.num_hidden_layers = llm.num_hidden_layers + new_layers
    cfg.layer_types = [ATTENTION] * new_layers + list(llm.layer_types)
    if llm.layer_rope_theta is not None:
        cfg.layer_rope_theta = [llm.layer_rope_theta[0]] * new_layers + list(llm.layer_rope_theta)
    cfg.vocab_size = vocab_size
    cfg.img_context_token_id = img_context_token_id
    cfg.vision_config = dict(image_size=image_size, patch_size=patch_size, num_channels=3,
                             downsample_ratio=downsample_ratio, dynamic_image_size=False, use_thumbnail=False,
                             max_tiles=1)
    return cfg


@torch.no_grad()
def build_vlm(llm: MMMambaForCausalLM, tokenizer, new_layers: int = 2, image_size: int = 64, patch_size: int = 8,
              seed: int = 0) -> MMMambaForCausalLM:
    """A VLM around `llm` (an all-attention MMMambaForCausalLM); `tokenizer` gains the image tokens.

    Embedding rows of the new tokens start at the mean of the LLM's rows (with a tied head, their logits then
    start at the average logit, not at random)."""
    n_old = llm.config.vocab_size
    ctx = add_image_tokens(tokenizer)
    vocab = max(len(tokenizer), n_old)
    cfg = vlm_config(llm.config, new_layers, vocab, ctx, image_size, patch_size)
    torch.manual_seed(seed)
    vlm = MMMambaForCausalLM(cfg).to(llm.dtype)
    sd = llm.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            out[f"model.layers.{int(i) + new_layers}.{rest}"] = v
        elif k in ("model.embed_tokens.weight", "lm_head.weight"):
            grown = torch.cat([v, v.mean(0, keepdim=True).expand(vocab - n_old, -1)]) if vocab > n_old else v
            out[k] = grown
        else:
            out[k] = v
    for j in range(new_layers):  # copies of the first LLM layers, as identity maps on the residual stream
        src = j % llm.config.num_hidden_layers
        for k, v in sd.items():
            if k.startswith(f"model.layers.{src}."):
                out[f"model.layers.{j}." + k[len(f"model.layers.{src}."):]] = v.clone()
        for name in ("mixer.o_proj.weight", "mlp.down_proj.weight"):
            key = f"model.layers.{j}.{name}"
            if key in out:
                out[key] = torch.zeros_like(out[key])
    missing, unexpected = vlm.load_state_dict(out, strict=False)
    if unexpected or any(not m.startswith("model.vision.") for m in missing if m != "lm_head.weight"):
        raise ValueError(f"building the VLM: unexpected {unexpected[:4]}, missing {missing[:4]}")
    if cfg.tie_word_embeddings:
        vlm.tie_weights()
    vlm.generation_config = copy.deepcopy(llm.generation_config)
    return vlm
