"""Generation through the hybrid cache: one prefill, then one token per step (O(1) memory per Mamba-2 layer)."""

from __future__ import annotations

import torch

from ..models.cache import HybridCache

_IGNORED = {"use_cache", "pad_token_id", "return_dict_in_generate", "output_scores", "num_beams"}


def sample_next(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (b, V) -> token ids (b,). Greedy, or sampling with temperature / top-k / top-p."""
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None) if gc is not None else None
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
    generation_config=None,
    **kwargs,
) -> torch.Tensor:
    """Returns (b, prompt + new) token ids; rows that hit a stop token are padded with it afterwards.

    Left-padded batches (attention_mask 0 on the left) give the same tokens as one-at-a-time generation.
    `streamer` follows transformers' protocol (`put(ids)` then `end()`, e.g. TextStreamer)."""
    unknown = set(kwargs) - _IGNORED
    if unknown:
        raise TypeError(f"generate() got unsupported arguments {sorted(unknown)}")
    if generation_config is not None:
        max_new_tokens = getattr(generation_config, "max_new_tokens", None) or max_new_tokens
        do_sample = bool(getattr(generation_config, "do_sample", do_sample))
        temperature = getattr(generation_config, "temperature", temperature) or temperature
        top_k = getattr(generation_config, "top_k", top_k) or 0
        top_p = getattr(generation_config, "top_p", top_p) or 1.0
        eos_token_id = eos_token_id if eos_token_id is not None else generation_config.eos_token_id
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    device = model.device
    input_ids = input_ids.to(device)
    b = input_ids.shape[0]
    stops = torch.tensor(_eos_ids(model, eos_token_id), device=device, dtype=torch.long)
    cache = HybridCache(model.config)
    mask = attention_mask.to(device) if attention_mask is not None else None
    if streamer is not None:
        streamer.put(input_ids.cpu())
    out = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, cache=cache,
                use_cache=True, logits_to_keep=1)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tokens = []
    for step in range(max_new_tokens):
        nxt = sample_next(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        if tokens and stops.numel():
            nxt = torch.where(done, tokens[-1], nxt)  # finished rows repeat their stop token
        tokens.append(nxt)
        if streamer is not None:
            streamer.put(nxt.cpu())
        if stops.numel():
            done = done | torch.isin(nxt, stops)
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, cache=cache, use_cache=True)
    if streamer is not None:
        streamer.end()
    new = torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(b, 0)
    return torch.cat([input_ids, new], dim=1)
