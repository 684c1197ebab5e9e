"""Chunked KL(teacher || student) and cross-entropy over the vocabulary, computed from hidden states.

Logits are formed chunk by chunk of positions (`chunk_size` rows at a time), so a (positions x vocab) fp32 tensor
never exists: at most one chunk's student and teacher logits are alive. Each chunk runs under
`torch.utils.checkpoint`, so the backward pass recomputes that chunk's logits instead of keeping every chunk's.

Per position, with temperature T, p = softmax(t / T), q = softmax(s / T):

    KL = T^2 * sum_v p_v (log p_v - log q_v)          CE = -log softmax(s)_target     (CE at T = 1)

`dense_kl_ce` is the plain reference (materialises every logit) used by the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _up(F.linear(h, w, b))


def _up(x: torch.Tensor) -> torch.Tensor:
    """fp32 (fp64 stays fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def _kl_rows(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per row, times T^2; fp32."""
    log_q = F.log_softmax(s_logits / temperature, dim=-1)
    log_p = F.log_softmax(t_logits / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def _chunk(hs, ht, w_s, b_s, w_t, b_t, weights, targets, temperature):
    s = _logits(hs, w_s, b_s)
    with torch.no_grad():
        t = _logits(ht, w_t, b_t)
    kl = (_kl_rows(s, t, temperature) * weights).sum()
    ce = s.new_zeros(())
    if targets is not None:
        ce = F.cross_entropy(s, targets, ignore_index=-100, reduction="sum")
    return kl, ce


def chunked_kl_ce(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    kl_weights: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    chunk_size: int = 1024,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    use_checkpoint: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of KL(teacher || student) at temperature T (x T^2), and the sum of CE against `targets`.

    student_hidden, teacher_hidden: (N, H) final hidden states at the selected positions (teacher's detached).
    student_weight, teacher_weight: (V, H) output heads. kl_weights: (N,) per-row KL weight (default 1; 0 drops
    a row from the KL but keeps its CE). targets: (N,) long, -100 = no CE for that row; None = no CE (returns 0).
    Returns (kl_sum, ce_sum), fp32 scalars (fp64 for fp64 inputs); divide by the row count yourself.
    """
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student has {student_hidden.shape[0]} rows, teacher {teacher_hidden.shape[0]}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student vocabulary {student_weight.shape[0]} != teacher vocabulary {teacher_weight.shape[0]}"
        )
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    n = student_hidden.shape[0]
    teacher_hidden = teacher_hidden.detach()
    if kl_weights is None:
        kl_weights = student_hidden.new_ones(n, dtype=torch.float32)
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    kl_weights = kl_weights.to(acc)
    kl_total = student_hidden.new_zeros((), dtype=acc)
    ce_total = student_hidden.new_zeros((), dtype=acc)
    for start in range(0, n, chunk_size):
        sl = slice(start, min(start + chunk_size, n))
        args = (student_hidden[sl], teacher_hidden[sl], student_weight, student_bias, teacher_weight, teacher_bias,
                kl_weights[sl], None if targets is None else targets[sl], temperature)
        needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
        if use_checkpoint and needs_grad:
            kl, ce = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            kl, ce = _chunk(*args)
        kl_total = kl_total + kl
        ce_total = ce_total + ce
    return kl_total, ce_total


def dense_kl_ce(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    kl_weights: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the same sums from full (N, V) logits, via torch's KLDivLoss."""
    s, t = _up(student_logits), _up(teacher_logits)
    kl_rows = F.kl_div(
        F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), reduction="none", log_target=True
    ).sum(-1) * temperature**2
    if kl_weights is not None:
        kl_rows = kl_rows * kl_weights.to(kl_rows.dtype)
    ce = s.new_zeros(())
    if targets is not None:
        ce = F.cross_entropy(s, targets, ignore_index=-100, reduction="sum")
    return kl_rows.sum(), ce
