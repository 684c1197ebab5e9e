"""Perplexity exp(mean NLL of next tokens) and mean per-token KL(teacher || student) on held-out batches."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..ops.kl import chunked_kl_ce


def _targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets (b, l-1) and their mask: labels when present, else every real token."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    labels = batch.get("labels")
    tgt = (labels if labels is not None else ids)[:, 1:]
    ok = tgt != -100
    if mask is not None:
        ok = ok & mask[:, 1:].bool()
    return tgt, ok


@torch.no_grad()
def perplexity(model, batches: Iterable[dict], max_batches: int | None = None) -> float:
    """exp(sum NLL / tokens) over the scored positions of `batches`."""
    nll, count = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        h = model.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                        pixel_values=batch.get("pixel_values")).last_hidden_state[:, :-1]
        tgt, ok = _targets(batch)
        w = model.lm_head.weight
        _, ce = chunked_kl_ce(h[ok], h[ok], w, w, targets=tgt[ok], kl_weights=torch.zeros(int(ok.sum())))
        nll += float(ce)
        count += int(ok.sum())
    if count == 0:
        raise ValueError("no scored tokens in the evaluation batches")
    return math.exp(nll / count)


@torch.no_grad()
def kl_to_teacher(student, teacher, batches: Iterable[dict], max_batches: int | None = None) -> float:
    """Mean per-token KL(teacher || student) over real (non-padding) positions; image batches (pixel_values) go
    through both models' vision fronts."""
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        px = batch.get("pixel_values")
        kw = dict(input_ids=batch["input_ids"].to(student.device),
                  attention_mask=batch["attention_mask"].to(student.device) if "attention_mask" in batch else None,
                  pixel_values=px.to(student.device, student.dtype) if px is not None else None)
        hs = student.model(**kw).last_hidden_state
        ht = teacher.model(**kw).last_hidden_state
        mask = kw["attention_mask"]
        ok = mask.bool() if mask is not None else torch.ones_like(kw["input_ids"], dtype=torch.bool)
        kl, _ = chunked_kl_ce(hs[ok], ht[ok], student.lm_head.weight, teacher.lm_head.weight)
        total += float(kl)
        count += int(ok.sum())
    return total / max(count, 1)


def heldout_metrics(model, teacher, batches: list[dict]) -> dict:
    out = {"perplexity": perplexity(model, batches)}
    if teacher is not None and teacher is not model:
        out["kl_to_teacher"] = kl_to_teacher(model, teacher, batches)
    return out
