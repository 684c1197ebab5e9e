"""A calibrated output gate for seeded Mamba-2 mixers (beyond the paper; docs/results/quality/ measures it).

With the paper's init (METHOD.md §2.2) W_G is random (xavier, gain 2^-2.5): SiLU(W_G u) multiplies each channel of
the normalised SSM output by a small factor of random sign, so at step 0 the mixer's output does not point where its
attention layer's does (mean cosine ~0). Calibration keeps every other seeded value and sets, from the teacher's
activations on a few sequences:

* W_G = c 1 ubar^T / |ubar|^2 (ubar: the mean normed layer input), so that W_G u ~ c for typical tokens and
  SiLU(W_G u) is a near-constant positive factor;
* the gated norm's weight w (head_dim,) by least squares against the attention's per-head output t:
  w_j = sum t_j n_j / sum n_j^2 over tokens and heads, n = RMSNorm(y) * SiLU(W_G u).

With `keep_random=True` the paper's random W_G is kept and the calibrated rank-1 term added to it, so the gate rows
start different from one another (the rank-1 term alone gives every row the same start).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..models import ATTENTION, MAMBA2


@torch.no_grad()
def capture_attention(teacher, batches: Iterable[torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (normed inputs u (n, l, H), attention per-head outputs t (n, l, h, d))} of every attention layer of
    `teacher`, over the token batches (b, l) given (concatenated along the batch)."""
    acts: dict[int, list] = {}
    hooks = []
    for i, layer in enumerate(teacher.model.layers):
        if layer.layer_type != ATTENTION:
            continue

        def hook(mod, args, res, i=i):
            u, cos, sin = args[:3]
            acts.setdefault(i, []).append((u.detach(), mod.heads(u, cos, sin).detach()))
        hooks.append(layer.mixer.register_forward_hook(hook))
    try:
        for ids in batches:
            teacher(ids.to(teacher.device))
    finally:
        for h in hooks:
            h.remove()
    return {i: (torch.cat([u for u, _ in v]), torch.cat([t for _, t in v])) for i, v in acts.items()}


@torch.no_grad()
def calibrate_gate(mixer, u: torch.Tensor, t: torch.Tensor, c: float = 3.0, keep_random: bool = False) -> None:
    """Set `mixer`'s W_G and gated-norm weight from inputs u (n, l, H) and attention outputs t (n, l, h, d)."""
    ubar = u.reshape(-1, u.shape[-1]).float().mean(0)
    w = (c * ubar / ubar.pow(2).sum()).to(mixer.g_proj.weight.dtype).expand_as(mixer.g_proj.weight)
    mixer.g_proj.weight.copy_(w + mixer.g_proj.weight if keep_random else w)
    mixer.g_norm.weight.fill_(1.0)
    n = mixer.g_norm(*mixer.ssm_heads(u)).float()
    num = (n * t.float()).sum(dim=(0, 1, 2))
    den = n.pow(2).sum(dim=(0, 1, 2)).clamp(min=1e-12)
    mixer.g_norm.weight.copy_(num / den)


def calibrate_gates(student, acts: dict[int, tuple[torch.Tensor, torch.Tensor]], c: float = 3.0,
                    keep_random: bool = False) -> list[int]:
    """Calibrate every Mamba-2 layer of `student` that has captured teacher activations; returns their indices."""
    done = []
    for i, (u, t) in acts.items():
        if student.config.layer_types[i] == MAMBA2:
            calibrate_gate(student.model.layers[i].mixer, u.to(student.device), t.to(student.device), c, keep_random)
            done.append(i)
    return done
