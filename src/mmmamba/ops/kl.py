"""Chunked KL(teacher || student) and cross-entropy over the vocabulary, computed from hidden states.

Logits are formed chunk by chunk of positions (`chunk_size` rows at a time), so a (positions x vocab) fp32 tensor
never exists: at most one chunk's student and teacher logits are alive, and none is kept for the backward pass.

Per position, with temperature T, p = softmax(t / T), q = softmax(s / T):

    KL = T^2 * sum_v p_v (log p_v - log q_v)          CE = -log softmax(s)_target     (CE at T = 1)
    dKL/ds = T (q - p)                                dCE/ds = softmax(s) - onehot(target)

When gradients are wanted, each chunk's gradient w.r.t. its student logits is formed in the forward pass from these
closed forms and at once multiplied into gradients of the student's hidden states (and head, if it trains), the
way fused linear cross-entropy kernels do: the backward pass only scales them, so no logits are recomputed or
stored and autograd never walks the softmax.

`dense_kl_ce` is the plain reference (materialises every logit, autograd through it) used by the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _up(F.linear(h, w, b))


def _up(x: torch.Tensor) -> torch.Tensor:
    """fp32 (fp64 stays fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def _chunk_sums(s, t, weights, targets, temperature):
    """KL and CE sums of one chunk from its student / teacher logits s, t (rows, V) in fp32 (or fp64), plus what
    their gradients need: log q = log_softmax(s / T) and p = softmax(t / T)."""
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    p = log_p.exp()
    kl = ((p * (log_p - log_q)).sum(-1) * weights).sum() * temperature**2
    ce = s.new_zeros(())
    if targets is not None:
        ce = F.cross_entropy(s, targets, ignore_index=-100, reduction="sum")
    return kl, ce, log_q, p


class _FusedKLCE(torch.autograd.Function):
    """(kl_sum, ce_sum) of `chunked_kl_ce`, with the gradients w.r.t. hs / w_s / b_s formed chunk by chunk in the
    forward pass (see the module docstring). Inputs as `chunked_kl_ce`; ht, w_t, b_t get no gradient."""

    @staticmethod
    def forward(ctx, hs, ht, w_s, b_s, w_t, b_t, weights, targets, temperature, chunk_size):
        acc = weights.dtype
        terms = ("kl", "ce") if targets is not None else ("kl",)
        # grads[term][i]: d(term sum)/d(hs, w_s, b_s)[i], or None when that input needs none
        need = [ctx.needs_input_grad[i] for i in (0, 2, 3)]
        grads = {k: [x.new_zeros(x.shape, dtype=acc) if n and x is not None else None
                     for x, n in zip((hs, w_s, b_s), need)] for k in terms}
        kl_total, ce_total = hs.new_zeros((), dtype=acc), hs.new_zeros((), dtype=acc)
        for start in range(0, hs.shape[0], chunk_size):
            sl = slice(start, min(start + chunk_size, hs.shape[0]))
            s_raw = F.linear(hs[sl], w_s, b_s)
            s = _up(s_raw)
            tg = None if targets is None else targets[sl]
            kl, ce, log_q, p = _chunk_sums(s, _logits(ht[sl], w_t, b_t), weights[sl], tg, temperature)
            kl_total, ce_total = kl_total + kl, ce_total + ce
            _accumulate(grads["kl"], sl, log_q.exp_().sub_(p).mul_(weights[sl, None] * temperature), hs[sl], w_s,
                        s_raw.dtype)  # T (q - p), in place
            if targets is not None:
                ok = (tg != -100)[:, None].to(s.dtype)  # softmax(s) - onehot(target) on rows with a target
                g = F.softmax(s, dim=-1).mul_(ok).scatter_add_(1, tg.clamp(min=0)[:, None], -ok)
                _accumulate(grads["ce"], sl, g, hs[sl], w_s, s_raw.dtype)
        ctx.terms, ctx.dtypes = terms, [x.dtype if x is not None else None for x in (hs, w_s, b_s)]
        ctx.save_for_backward(*[g for k in terms for g in grads[k]])
        return kl_total, ce_total

    @staticmethod
    def backward(ctx, g_kl, g_ce):
        saved = ctx.saved_tensors
        scale = {"kl": g_kl, "ce": g_ce}
        out = []
        for i, dtype in enumerate(ctx.dtypes):
            parts = [saved[3 * j + i] * scale[k] for j, k in enumerate(ctx.terms) if saved[3 * j + i] is not None]
            out.append(sum(parts[1:], parts[0]).to(dtype) if parts else None)
        return out[0], None, out[1], out[2], None, None, None, None, None, None


def _accumulate(grads, sl, g, h, w, dtype):
    """Gradient g (rows, V) of one term w.r.t. a chunk's logits -> that chunk's rows of the hidden-state gradient
    and the head / bias gradients (grads = [d hs, d w_s, d b_s], None where not wanted). The matmuls run in the
    logits' compute dtype (bf16 under autocast), as autograd's would."""
    gd = g.to(dtype)
    if grads[0] is not None:
        grads[0][sl] = gd @ w.to(dtype)
    if grads[1] is not None:
        grads[1] += gd.t() @ h.to(dtype)
    if grads[2] is not None:
        grads[2] += g.sum(0)


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
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    kl_weights = (student_hidden.new_ones(n) if kl_weights is None else kl_weights).to(acc)
    args = (student_hidden, teacher_hidden, student_weight, student_bias, teacher_weight, teacher_bias, kl_weights,
            targets, float(temperature))
    wants_grad = any(x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias))
    if torch.is_grad_enabled() and wants_grad:
        return _FusedKLCE.apply(*args, chunk_size)
    kl_total = student_hidden.new_zeros((), dtype=acc)
    ce_total = student_hidden.new_zeros((), dtype=acc)
    for start in range(0, n, chunk_size):
        sl = slice(start, min(start + chunk_size, n))
        s = _logits(student_hidden[sl], student_weight, student_bias)
        t = _logits(teacher_hidden[sl], teacher_weight, teacher_bias)
        kl, ce, _, _ = _chunk_sums(s, t, kl_weights[sl], None if targets is None else targets[sl], temperature)
        kl_total, ce_total = kl_total + kl, ce_total + ce
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
