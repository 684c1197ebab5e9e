"""Distillation losses (METHOD.md §3): layer-wise MSE for stages 1-2, KL (+ optional CE) for stage 3.

Padding never counts (the authors average over padding too; METHOD.md §8 item 2).
"""

from __future__ import annotations

import torch

from ..ops.kl import chunked_kl_ce
from ..ops.mse import masked_mse

__all__ = ["kl_ce_loss", "kl_positions", "layerwise_loss", "masked_mse"]


def layerwise_loss(per_layer: list[torch.Tensor], factor: float = 1000.0) -> torch.Tensor:
    """Stage 1-2 loss: factor x mean over layers of the per-layer MSEs."""
    if not per_layer:
        raise ValueError("no Mamba-2 layer to distil: the student has only attention layers")
    return factor * torch.stack([x.float() for x in per_layer]).mean()


def kl_positions(attention_mask: torch.Tensor | None, labels: torch.Tensor | None, positions: str) -> torch.Tensor:
    """Which positions' next-token distributions enter the stage-3 KL, (b, l) bool.

    "assistant": position t counts when token t+1 is a training target (labels[t+1] != -100), i.e. the
    distribution that predicts an assistant token; "all": every non-padding position."""
    if positions == "all":
        if attention_mask is not None:
            return attention_mask.bool()
        ref = labels
        if ref is None:
            raise ValueError("positions='all' needs attention_mask or labels")
        return torch.ones_like(ref, dtype=torch.bool)
    if positions == "assistant":
        if labels is None:
            raise ValueError("positions='assistant' needs `labels` in the batch (-100 where not a target)")
        sel = torch.zeros_like(labels, dtype=torch.bool)
        sel[:, :-1] = labels[:, 1:] != -100
        if attention_mask is not None:
            sel &= attention_mask.bool()
        return sel
    raise ValueError(f"positions {positions!r} unknown; use 'assistant' or 'all'")


def kl_ce_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: torch.nn.Linear,
    teacher_head: torch.nn.Linear,
    select: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int = 1024,
    gather: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-3 loss = mean over selected positions of T^2 KL(teacher || student) + ce_weight x mean CE.

    student_hidden, teacher_hidden: (b, l, H) final (normed) hidden states; select: (b, l) bool from
    `kl_positions`; labels: (b, l), CE at position t targets labels[t+1]. Never forms a (b, l, V) tensor.
    gather: True = only the rows that enter the KL or CE go through the heads (boolean indexing: a host sync);
    False = every row does, the others with weight 0 (no sync, fixed shapes: what a CUDA graph needs)."""
    want_ce = ce_weight > 0 and labels is not None
    targets = None
    rows = select
    if want_ce:
        nxt = torch.full_like(labels, -100)
        nxt[:, :-1] = labels[:, 1:]
        rows = select | (nxt != -100)
        targets = nxt[rows] if gather else nxt.flatten()
    if gather:
        hs, ht, kl_w = student_hidden[rows], teacher_hidden[rows], select[rows]
    else:
        hs, ht, kl_w = student_hidden.flatten(0, 1), teacher_hidden.flatten(0, 1), select.flatten()
    kl_sum, ce_sum = chunked_kl_ce(
        hs, ht, student_head.weight, teacher_head.weight, temperature=temperature, kl_weights=kl_w,
        targets=targets, chunk_size=chunk_size, student_bias=student_head.bias, teacher_bias=teacher_head.bias,
    )
    n_kl = kl_w.sum().clamp(min=1).float()
    kl = kl_sum / n_kl
    loss = kl
    metrics = {"kl": kl.detach(), "kl_tokens": kl_w.sum().detach()}
    if want_ce:
        ce = ce_sum / (targets != -100).sum().clamp(min=1).float()
        loss = loss + ce_weight * ce
        metrics["ce"] = ce.detach()
    return loss, metrics
