"""Perplexity of a long token stream, and agreement with a teacher, token by token.

The n tokens are scored in segments of targets: [1, e_0) with e_0 = min(window + 1, n), then [e_{j-1}, e_j) with
e_j = min(e_{j-1} + stride, n). Every token but the first is scored exactly once.

* Models with attention layers (sliding window): segment j is one forward over the `window` tokens
  [b_j, e_j - 1), b_j = max(0, e_j - 1 - window); its target t is predicted from tokens [b_j, t), i.e. with
  between window - stride + 1 and window tokens of context (all earlier tokens in segment 0). The segments are
  independent and run `batch_size` at a time.
* Pure Mamba-2 models (no attention layer): one pass over the stream, the recurrent state carried from segment
  to segment in the model's cache, so every token sees the whole text before it; the window only sets the
  chunk length.

perplexity = exp(mean NLL); with a teacher (same vocabulary), also the share of targets where the two models'
most likely next tokens agree and the mean KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from ..models.cache import HybridCache
from ..models.config import ATTENTION


def segments(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Target ranges [s, e) covering tokens 1..n-1 once: [1, min(window + 1, n)), then steps of `stride`."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got window={window}, stride={stride}")
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n}")
    out = [(1, min(window + 1, n))]
    while out[-1][1] < n:
        s = out[-1][1]
        out.append((s, min(s + stride, n)))
    return out


def is_recurrent(model) -> bool:
    """True when no layer is attention: the whole state fits in the cache, whatever the context length."""
    return all(t != ATTENTION for t in model.config.layer_types)


def _hidden_sliding(model, ids: torch.Tensor, segs, window: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Per segment, the final hidden states (e - s, H) that predict its targets, windows run in batches."""
    for a in range(0, len(segs), batch_size):
        group = segs[a:a + batch_size]
        starts = [max(0, e - 1 - window) for _, e in group]
        width = max(e - 1 - b for (_, e), b in zip(group, starts))
        x = ids.new_zeros(len(group), width)
        for r, ((_, e), b) in enumerate(zip(group, starts)):
            x[r, : e - 1 - b] = ids[b:e - 1]  # right padding: causal, so it changes nothing before it
        h = model.model(input_ids=x.to(model.device)).last_hidden_state
        for r, ((s, e), b) in enumerate(zip(group, starts)):
            yield h[r, s - 1 - b: e - 1 - b]


def _hidden_recurrent(model, ids: torch.Tensor, segs) -> Iterator[torch.Tensor]:
    """Per segment, the hidden states predicting its targets, from one pass with the state carried in the cache:
    segment [s, e) feeds tokens [s - 1, e - 1), each token exactly once."""
    cache = HybridCache(model.config)
    for s, e in segs:
        h = model.model(input_ids=ids[None, s - 1: e - 1].to(model.device), cache=cache,
                        use_cache=True).last_hidden_state
        # no layer reads the key mask of a pure Mamba-2 cache; keeping its last column keeps the step mask the
        # decoder builds for the next chunk at (chunk, chunk + 1) instead of growing with the text
        cache.key_mask = cache.key_mask[:, -1:]
        yield h[0]


def _hidden(model, ids, segs, window, batch_size):
    if is_recurrent(model):
        return _hidden_recurrent(model, ids, segs)
    return _hidden_sliding(model, ids, segs, window, batch_size)


_ROWS = 512


def _accumulate(sums: dict, model, h, tgt, teacher, g) -> None:
    tgt = tgt.to(h.device)[:, None]
    lps = torch.log_softmax(model.lm_head(h).float(), dim=-1)
    sums["nll"] -= float(lps.gather(-1, tgt).sum())
    if g is None:
        return
    lpt = torch.log_softmax(teacher.lm_head(g).float(), dim=-1).to(lps.device)
    sums["t_nll"] -= float(lpt.gather(-1, tgt).sum())
    sums["agree"] += float((lps.argmax(-1) == lpt.argmax(-1)).sum())
    sums["kl"] += float((lpt.exp() * (lpt - lps)).sum())


@torch.no_grad()
def text_metrics(model, input_ids: torch.Tensor, *, window: int = 2048, stride: int | None = None, teacher=None,
                 batch_size: int = 8, progress: bool = False) -> dict:
    """Perplexity of `model` on one token stream input_ids (n,) (see the module docstring), and with `teacher`
    top-1 agreement and mean KL(teacher || student) per scored token.

    Returns {"perplexity", "nll", "tokens", "window", "stride", "method": "sliding" | "recurrent"} plus, with a
    teacher, {"teacher_perplexity", "top1_agreement", "kl_to_teacher", "teacher_method"}. stride defaults to
    window // 2."""
    from tqdm.auto import tqdm

    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).cpu()
    stride = window // 2 if stride is None else stride
    segs = segments(ids.numel(), window, stride)
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"teacher vocabulary ({teacher.config.vocab_size}) differs from the model's "
                         f"({model.config.vocab_size}); KL and agreement need the same tokenizer")
    hs = _hidden(model, ids, segs, window, batch_size)
    ht = _hidden(teacher, ids, segs, window, batch_size) if teacher is not None else None
    sums = dict(nll=0.0, t_nll=0.0, agree=0.0, kl=0.0)
    bar = tqdm(total=ids.numel() - 1, unit="tok", disable=not progress, desc="ppl")
    for (s, e), h in zip(segs, hs):
        g = next(ht) if ht is not None else None
        for a in range(0, e - s, _ROWS):  # fp32 log-probs of _ROWS positions at a time
            _accumulate(sums, model, h[a:a + _ROWS], ids[s + a:min(e, s + a + _ROWS)], teacher,
                        None if g is None else g[a:a + _ROWS])
        bar.update(e - s)
    bar.close()
    n = ids.numel() - 1
    out = {"perplexity": math.exp(sums["nll"] / n), "nll": sums["nll"] / n, "tokens": n, "window": window,
           "stride": stride, "method": "recurrent" if is_recurrent(model) else "sliding"}
    if teacher is not None:
        out.update(teacher_perplexity=math.exp(sums["t_nll"] / n), top1_agreement=sums["agree"] / n,
                   kl_to_teacher=sums["kl"] / n, teacher_method="recurrent" if is_recurrent(teacher) else "sliding")
    return out


def read_text_tokens(path: str | Path, tokenizer, *, add_bos: bool = False,
                     limit_tokens: int | None = None) -> torch.Tensor:
    """A UTF-8 text file as one token stream (n,), without special tokens (SmolLM2-style tokenizers add none to
    plain text; the distillation data does the same), the tokenizer's BOS first when `add_bos`; the first
    `limit_tokens` tokens when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("add_bos: the tokenizer has no BOS token")
        ids = [tokenizer.bos_token_id, *ids]
    if limit_tokens is not None:
        ids = ids[:limit_tokens]
    if len(ids) < 2:
        raise ValueError(f"{path} has {len(ids)} tokens; perplexity needs at least 2")
    return torch.tensor(ids, dtype=torch.long)
