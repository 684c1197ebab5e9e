"""One decoder for teacher, hybrid and student: each layer is attention or Mamba-2 per `layer_types`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from ..layers.attention import Attention
from ..layers.mamba2 import Mamba2Mixer
from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm
from ..layers.rope import RotaryEmbedding
from .cache import HybridCache
from .config import ATTENTION, MMMambaConfig
from .generate import generate as reference_generate
from .outputs import CausalLMOutput, DecoderOutput
from .vision import VisionFront


@dataclass
class StepContext:
    """What every layer of one forward call shares."""

    rope: dict  # rope index -> (cos, sin)
    attn_mask: torch.Tensor | None  # (b, 1, l, t) bool, or None for plain causal
    pad_mask: torch.Tensor | None  # (b, l) bool for the new tokens, None if no padding
    cache: HybridCache | None


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MMMambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = (Attention if self.layer_type == ATTENTION else Mamba2Mixer)(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.rope_index = 0

    def mix(self, r: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        state = None if ctx.cache is None else ctx.cache.layers[self.layer_idx]
        if self.layer_type == ATTENTION:
            cos, sin = ctx.rope[self.rope_index]
            return self.mixer(r, cos, sin, ctx.attn_mask, state)
        return self.mixer(r, ctx.pad_mask, state)

    def forward(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        h = h + self.mix(self.input_layernorm(h), ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class MMMambaPreTrainedModel(PreTrainedModel):
    config_class = MMMambaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, Mamba2Mixer):
            module.reset_ssm_parameters(mimic=True)
        elif isinstance(module, VisionFront):
            module.position_embedding.normal_(0.0, std)
        elif isinstance(module, RotaryEmbedding):  # non-persistent buffer: not in checkpoints, rebuilt on load
            module.reset_inv_freq()
        elif hasattr(module, "weight") and isinstance(module, (RMSNorm,)):
            module.weight.fill_(1.0)


class MMMambaModel(MMMambaPreTrainedModel):
    def __init__(self, config: MMMambaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision = VisionFront(config) if config.vision_config is not None else None
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        thetas = sorted({config.rope_theta_for(i) for i in range(config.num_hidden_layers)})
        self.rotary = nn.ModuleList(
            RotaryEmbedding(config.head_dim, t, config.rope_scaling_config) for t in thetas
        )
        for i, layer in enumerate(self.layers):
            layer.rope_index = thetas.index(config.rope_theta_for(i))
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings, with image tokens written at the `img_context_token_id` positions."""
        emb = self.embed_tokens(input_ids)
        if pixel_values is None:
            return emb
        if self.vision is None:
            raise ValueError("pixel_values given but this model has no vision front (config.vision_config is None)")
        img = self.vision(pixel_values).reshape(-1, emb.shape[-1]).to(emb.dtype)
        slots = input_ids == self.config.img_context_token_id
        if int(slots.sum()) != img.shape[0]:
            raise ValueError(
                f"{int(slots.sum())} <IMG_CONTEXT> tokens (id {self.config.img_context_token_id}) in input_ids but "
                f"{img.shape[0]} image tokens from {pixel_values.shape[0]} tiles; build the prompt with "
                "mmmamba.models.image_processing.expand_image_tokens"
            )
        emb = emb.clone()
        emb[slots] = img
        return emb

    def context(self, b, l, device, dtype, attention_mask, position_ids, cache) -> tuple[StepContext, torch.Tensor]:
        past = 0 if cache is None else cache.get_seq_length()
        new_mask = torch.ones(b, l, dtype=torch.bool, device=device)
        if attention_mask is not None:
            new_mask = attention_mask[:, -l:].to(device=device, dtype=torch.bool)
        full_mask = new_mask if not past else torch.cat([cache.key_mask, new_mask], dim=1)
        if position_ids is None:
            base = cache.next_position if past else torch.zeros(b, dtype=torch.long, device=device)
            position_ids = (base[:, None] + new_mask.long().cumsum(1) - 1).clamp(min=0)
        if cache is not None:
            prev = cache.next_position if past else torch.zeros(b, dtype=torch.long, device=device)
            cache.key_mask, cache.next_position = full_mask, prev + new_mask.long().sum(1)
        # without a mask there is no padding to find: no host sync, so a training step can be a CUDA graph
        masked = attention_mask is not None or past > 0  # the cache may hold earlier padding
        padded = masked and not bool(full_mask.all())
        attn_mask = None
        if padded or (past and l > 1):
            t = past + l
            qpos = torch.arange(past, t, device=device)[:, None]
            kpos = torch.arange(t, device=device)[None, :]
            allowed = (kpos <= qpos)[None] & full_mask[:, None, :]
            attn_mask = (allowed | (kpos == qpos)[None])[:, None]  # a pad query still sees itself: no NaN
        rope = {i: r(position_ids, dtype) for i, r in enumerate(self.rotary)}
        pad_mask = new_mask if attention_mask is not None and not bool(new_mask.all()) else None
        return StepContext(rope, attn_mask, pad_mask, cache), position_ids

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        pixel_values=None,
        output_hidden_states=False,
        **kwargs,
    ) -> DecoderOutput:
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed(input_ids, pixel_values) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = HybridCache(self.config)
        b, l, _ = h.shape
        ctx, _ = self.context(b, l, h.device, h.dtype, attention_mask, position_ids, cache)
        hidden = [h] if output_hidden_states else None
        for layer in self.layers:
            h = layer(h, ctx)
            if hidden is not None:
                hidden.append(h)
        h = self.norm(h)
        return DecoderOutput(last_hidden_state=h, cache=cache, hidden_states=tuple(hidden) if hidden else None)


class MMMambaForCausalLM(MMMambaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MMMambaConfig):
        super().__init__(config)
        self.model = MMMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        pixel_values=None,
        logits_to_keep: int = 0,
        output_hidden_states=False,
        **kwargs,
    ) -> CausalLMOutput:
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
            pixel_values=pixel_values, output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    def generate(self, input_ids=None, **kwargs):
        """Prefill + recurrent decode through the hybrid cache; see `mmmamba.models.generate`."""
        return reference_generate(self, input_ids, **kwargs)
