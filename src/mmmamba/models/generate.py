"""The reference generation loop through the hybrid cache: one prefill, then one token per step (O(1) memory per
Mamba-2 layer).

The arguments follow transformers' `generate`; the logits pass through transformers' own logits processors
(repetition penalty, minimum length, temperature / top-k / top-p), so greedy and seeded sampling give the tokens and
scores transformers would. `decode_loop` is shared with `mmmamba.inference.engine.Engine`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache import HybridCache

# accepted and without effect here: the cache is always used (same tokens as without it)
_NO_EFFECT = {"use_cache"}


@dataclass
class GenOptions:
    """Resolved generation arguments: explicit keyword > `generation_config` argument > the model's
    generation_config (stop / pad tokens only) > mmmamba's defaults (greedy, 32 new tokens, no top-k)."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    min_length: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def processors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> LogitsProcessorList:
        """transformers' processors, in the order transformers' `generate` builds them."""
        ps = LogitsProcessorList()
        dev = input_ids.device
        if self.repetition_penalty != 1.0:
            pad_len = (attention_mask != 0).int().argmax(1).to(dev) if attention_mask is not None else None
            ps.append(RepetitionPenaltyLogitsProcessor(float(self.repetition_penalty), prompt_ignore_length=pad_len))
        eos = torch.tensor(self.eos_token_id, device=dev, dtype=torch.long)
        if self.min_length > 0 and eos.numel():
            ps.append(MinLengthLogitsProcessor(self.min_length, eos, device=dev))
        if self.min_new_tokens > 0 and eos.numel():
            ps.append(MinNewTokensLengthLogitsProcessor(input_ids.shape[1], self.min_new_tokens, eos, device=dev))
        if not self.greedy:
            ps.extend(warpers(self.temperature, self.top_k, self.top_p))
        return ps


def warpers(temperature: float, top_k: int, top_p: float) -> list:
    """Sampling warpers as transformers adds them (temperature, then top-k, then top-p)."""
    ws = []
    if temperature != 1.0:
        ws.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        ws.append(TopKLogitsWarper(int(top_k)))
    if top_p < 1.0:
        ws.append(TopPLogitsWarper(float(top_p)))
    return ws


def sample_next(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (b, V) -> token ids (b,). Greedy, or sampling with temperature / top-k / top-p (transformers'
    warpers; top-p keeps the smallest set of tokens whose probability reaches p)."""
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    scores = logits.float()
    for w in warpers(temperature, top_k, top_p):
        scores = w(None, scores)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def eos_ids(model, eos_token_id) -> list[int]:
    """Stop token ids: `eos_token_id` (an id or a list) or, if None, the model's generation_config's."""
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None) if gc is not None else None
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    return _as_list(eos_token_id)


def resolve_options(model, generation_config, kwargs: dict, prompt_len: int) -> GenOptions:
    """Merge keyword arguments and a GenerationConfig into `GenOptions`; unknown or unsupported arguments raise."""
    names = set(GenOptions.__dataclass_fields__) | {"max_length"}
    unknown = set(kwargs) - names - _NO_EFFECT
    if unknown:
        raise TypeError(f"generate() got unsupported arguments {sorted(unknown)}; supported: "
                        f"{sorted(names | {'attention_mask', 'pixel_values', 'streamer', 'generator'})}")
    vals = {}
    for name in names:
        v = kwargs.get(name)
        if v is None and generation_config is not None:
            v = getattr(generation_config, name, None)
        if v is not None:
            vals[name] = v
    max_length = vals.pop("max_length", None)
    if "max_new_tokens" not in vals and max_length is not None:
        vals["max_new_tokens"] = max(0, max_length - prompt_len)
    if "eos_token_id" not in vals:
        vals["eos_token_id"] = eos_ids(model, None)
    vals["eos_token_id"] = _as_list(vals["eos_token_id"])
    if "pad_token_id" not in vals:
        gc = getattr(model, "generation_config", None)
        pad = getattr(gc, "pad_token_id", None) if gc is not None else None
        vals["pad_token_id"] = pad if pad is not None else getattr(model.config, "pad_token_id", None)
    opts = GenOptions(**vals)
    if opts.num_beams != 1:
        raise NotImplementedError(f"num_beams={opts.num_beams}: beam search is not implemented in mmmamba; use "
                                  "num_beams=1 (greedy, or do_sample=True for sampling)")
    if opts.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {opts.repetition_penalty}")
    if opts.pad_token_id is None and opts.eos_token_id:
        opts.pad_token_id = opts.eos_token_id[0]  # as transformers: finished rows are padded with the first stop
    return opts


def decode_loop(opts: GenOptions, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                first_logits: torch.Tensor, step, streamer=None, generator: torch.Generator | None = None,
                greedy_next=None):
    """The token loop of transformers' greedy / sampling search over any logits source.

    `first_logits` (b, V): the prompt's last position; `step(tokens (b,)) -> logits (b, V)` feeds one token per
    row; `greedy_next()` (optional) returns the argmax of the logits `step` last produced, computed on the device
    (used when no processor changes the logits). Finished rows are padded with `pad_token_id`, as transformers
    does. Returns (b, prompt + new) ids, or a `GenerateDecoderOnlyOutput` with `.sequences`, `.scores` (processed,
    fp32) and `.logits` (raw, fp32) when `return_dict_in_generate`."""
    dev = input_ids.device
    b = input_ids.shape[0]
    procs = opts.processors(input_ids, attention_mask)
    stops = torch.tensor(opts.eos_token_id, device=dev, dtype=torch.long)
    unfinished = torch.ones(b, dtype=torch.bool, device=dev)
    ids, scores, raw = input_ids, [], []
    logits = first_logits
    for i in range(opts.max_new_tokens):
        if logits is None:  # the engine's greedy fast path: the step already picked the token on the device
            nxt = greedy_next().clone()
        else:
            lf = logits.to(dtype=torch.float32, copy=True)
            sc = procs(ids, lf) if len(procs) else lf
            if opts.output_scores:
                scores.append(sc)
            if opts.output_logits:
                raw.append(lf)
            nxt = sc.argmax(-1) if opts.greedy else torch.multinomial(sc.softmax(-1), 1, generator=generator)[:, 0]
        if stops.numel():
            nxt = torch.where(unfinished, nxt, opts.pad_token_id)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if streamer is not None:
            streamer.put(nxt.cpu())
        if stops.numel():
            unfinished = unfinished & ~torch.isin(nxt, stops)
            if not bool(unfinished.any()):
                break
        if i == opts.max_new_tokens - 1:
            break
        fast = greedy_next is not None and opts.greedy and not len(procs) and not opts.return_dict_in_generate
        logits = step(nxt, need_logits=not fast)
    if streamer is not None:
        streamer.end()
    if not opts.return_dict_in_generate:
        return ids
    return GenerateDecoderOnlyOutput(sequences=ids, scores=tuple(scores) if opts.output_scores else None,
                                     logits=tuple(raw) if opts.output_logits else None)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
    generation_config=None,
    **kwargs,
):
    """Returns (b, prompt + new) token ids, or a transformers `GenerateDecoderOnlyOutput` when
    `return_dict_in_generate=True` (`.scores` with `output_scores`, `.logits` with `output_logits`).

    Keywords as in transformers: max_new_tokens / max_length, min_new_tokens / min_length, do_sample, temperature,
    top_k, top_p, repetition_penalty, eos_token_id (int or list), pad_token_id, num_beams (1 only: beam search
    raises NotImplementedError); anything else raises TypeError. Left-padded batches (attention_mask 0 on the left)
    give the same tokens as one-at-a-time generation. `streamer` follows transformers' protocol (`put(ids)` then
    `end()`, e.g. TextStreamer). `generator` seeds sampling (None: torch's global generator, as transformers)."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    opts = resolve_options(model, generation_config, kwargs, input_ids.shape[-1])
    device = model.device
    input_ids = input_ids.to(device)
    b = input_ids.shape[0]
    cache = HybridCache(model.config)
    mask = attention_mask.to(device) if attention_mask is not None else None
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if opts.max_new_tokens <= 0:
        if streamer is not None:
            streamer.end()
        return decode_loop(opts, input_ids, mask, None, None)
    out = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, cache=cache,
                use_cache=True, logits_to_keep=1)
    state = {"mask": mask}

    def step(nxt: torch.Tensor, need_logits: bool = True) -> torch.Tensor:
        if state["mask"] is not None:
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(b, 1)], dim=1)
        return model(input_ids=nxt[:, None], attention_mask=state["mask"], cache=cache, use_cache=True).logits[:, -1]

    return decode_loop(opts, input_ids, mask, out.logits[:, -1], step, streamer, generator)
