"""`auto:N` hybrid placement: which layers matter most when given back their attention (issue 3, item 5).

After stage 2 every layer of the student is a Mamba-2 mixer. For each candidate layer i, the student is run
with layer i alone reverted to the teacher's softmax attention (the teacher's W_Q, W_K, W_V, W_O; norms and
MLPs are the student's, which stages 1-2 keep frozen at the teacher's values), and its KL(teacher || student)
on held-out batches is compared with the all-Mamba student's. The sensitivity of layer i is that KL decrease;
`auto_placement` keeps the N layers with the largest decrease (ties: the lower index).

Cost: one forward of the teacher and of the student per batch, then for each candidate layer only the layers
from i on (the residual stream entering layer i is the same with and without the reversion). The KL is computed
in chunks of positions, so no (batch x length x vocab) fp32 tensor is ever held for the whole batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.config import ATTENTION, MAMBA2
from ..models.placement import auto_count, parse_placement

_BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")


@dataclass
class Sensitivity:
    base_kl: float  # mean per-token KL(teacher || student) of the student as given
    kl: dict[int, float]  # layer -> the same KL with that layer alone reverted to attention
    tokens: int  # positions the KL averages over

    @property
    def scores(self) -> dict[int, float]:
        """layer -> KL decrease when that layer is reverted (larger = the layer matters more)."""
        return {i: self.base_kl - v for i, v in self.kl.items()}

    def best(self, n: int) -> list[int]:
        ranked = sorted(self.kl, key=lambda i: (-self.scores[i], i))
        return sorted(ranked[:n])


def candidate_layers(student, teacher) -> list[int]:
    """Student Mamba-2 layers whose teacher layer is attention (those can be reverted)."""
    s_types, t_types = student.config.layer_types, teacher.config.layer_types
    if len(s_types) != len(t_types):
        raise ValueError(f"student has {len(s_types)} layers but the teacher {len(t_types)}; not a pair")
    return [i for i, (s, t) in enumerate(zip(s_types, t_types)) if s == MAMBA2 and t == ATTENTION]


@contextlib.contextmanager
def reverted_layer(student, teacher, layer: int):
    """Temporarily give student layer `layer` the teacher's attention mixer (shared module, not copied)."""
    s_layer, t_layer = student.model.layers[layer], teacher.model.layers[layer]
    if t_layer.layer_type != ATTENTION:
        raise ValueError(f"teacher layer {layer} is not attention; it cannot be reverted to")
    mixer, kind = s_layer.mixer, s_layer.layer_type
    s_layer.mixer, s_layer.layer_type = t_layer.mixer, ATTENTION
    try:
        yield student
    finally:
        s_layer.mixer, s_layer.layer_type = mixer, kind


def _to(batch: dict, device) -> dict:
    return {k: batch[k].to(device) for k in _BATCH_KEYS if k in batch and batch[k] is not None}


def _positions(batch: dict, tokens: str) -> torch.Tensor:
    """(b, l) bool: the positions whose next-token distributions count."""
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
    if tokens == "all":
        return mask
    if tokens == "assistant":
        if "labels" not in batch:
            raise ValueError("tokens='assistant' needs batches with labels")
        out = torch.zeros_like(mask)
        out[:, :-1] = batch["labels"][:, 1:] != -100  # position t predicts token t+1
        return out & mask
    raise ValueError(f"tokens must be 'all' or 'assistant', got {tokens!r}")


def chunked_kl_sum(
    h_student: torch.Tensor, h_teacher: torch.Tensor, head_s, head_t, mask: torch.Tensor,
    temperature: float = 1.0, chunk: int = 1024,
) -> torch.Tensor:
    """sum over masked positions of KL(softmax(t/T) || softmax(s/T)); logits made `chunk` positions at a time."""
    hs, ht = h_student[mask], h_teacher[mask]
    total = torch.zeros((), dtype=torch.float64, device=hs.device)
    for a in range(0, hs.shape[0], chunk):
        ls = head_s(hs[a:a + chunk]).float() / temperature
        lt = head_t(ht[a:a + chunk]).float() / temperature
        lp_t = F.log_softmax(lt, -1)
        total += (lp_t.exp() * (lp_t - F.log_softmax(ls, -1))).sum().double()
    return total


def _tail(student, h: torch.Tensor, batch: dict, start: int) -> torch.Tensor:
    """Run student layers start.. on the residual stream `h` entering layer `start`; final-normed states."""
    m = student.model
    b, l, _ = h.shape
    ctx, _ = m.context(b, l, h.device, h.dtype, batch.get("attention_mask"), None, None)
    for layer in m.layers[start:]:
        h = layer(h, ctx)
    return m.norm(h)


@torch.no_grad()
def layer_sensitivity(
    student,
    teacher,
    batches: Iterable[dict],
    layers: list[int] | None = None,
    temperature: float = 1.0,
    tokens: str = "all",
    max_batches: int | None = None,
    chunk: int = 1024,
    progress: bool = False,
) -> Sensitivity:
    """KL(teacher || student) per token, as given and with each of `layers` (default: every candidate)
    reverted alone to the teacher's attention, on held-out `batches` (dicts from `build_dataloader`)."""
    cands = candidate_layers(student, teacher)
    layers = cands if layers is None else list(layers)
    bad = [i for i in layers if i not in cands]
    if bad:
        raise ValueError(f"layers {bad} cannot be reverted: not Mamba-2 in the student or not attention in the "
                         f"teacher (candidates: {cands})")
    device = next(student.parameters()).device
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    base, per = torch.zeros((), dtype=torch.float64), {i: torch.zeros((), dtype=torch.float64) for i in layers}
    count = 0
    try:
        for n, raw in enumerate(batches):
            if max_batches is not None and n >= max_batches:
                break
            batch = _to(raw, device)
            mask = _positions(batch, tokens)
            if not bool(mask.any()):
                continue
            count += int(mask.sum())
            fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
            h_t = teacher.model(**fwd).last_hidden_state
            out = student.model(**fwd, output_hidden_states=True)
            hidden = out.hidden_states  # hidden[i] = residual stream entering layer i
            base += chunked_kl_sum(out.last_hidden_state, h_t, student.lm_head, teacher.lm_head, mask,
                                   temperature, chunk).cpu()
            for i in layers:
                with reverted_layer(student, teacher, i):
                    h_s = _tail(student, hidden[i], batch, i)
                per[i] += chunked_kl_sum(h_s, h_t, student.lm_head, teacher.lm_head, mask, temperature, chunk).cpu()
            if progress:
                print(f"sensitivity: batch {n + 1} done ({count} positions)", flush=True)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    if count == 0:
        raise ValueError("no positions to measure: the batches are empty or have no target tokens")
    return Sensitivity(float(base) / count, {i: float(v) / count for i, v in per.items()}, count)


def auto_placement(student, teacher, batches: Iterable[dict], n: int, **kwargs) -> tuple[list[int], dict[int, float]]:
    """`auto:N`: the N layers whose reversion alone to attention lowers KL(teacher || student) the most on
    `batches`, sorted, and every candidate layer's KL decrease. kwargs: see `layer_sensitivity`."""
    cands = candidate_layers(student, teacher)
    if not 0 <= n <= len(cands):
        raise ValueError(f"auto:{n} asks for {n} attention layers but only {len(cands)} layers can be reverted")
    if n == 0:
        return [], {}
    sens = layer_sensitivity(student, teacher, batches, **kwargs)
    return sens.best(n), sens.scores


def format_sensitivity(scores: dict[int, float], chosen: list[int], base_kl: float | None = None) -> str:
    """A text table: every layer's KL decrease when reverted alone, its rank, and whether it was chosen."""
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    rank = {i: r + 1 for r, i in enumerate(ranked)}
    keep = set(chosen)
    cols = [f"{'layer':>5}", f"{'KL drop':>12}"]
    if base_kl is not None:
        cols += [f"{'KL reverted':>12}", f"{'share':>7}"]
    head = "  ".join(cols + [f"{'rank':>4}", "chosen"])
    lines = []
    if base_kl is not None:
        lines.append(f"KL(teacher || student) per token with no layer reverted: {base_kl:.6g}")
    lines += [head, "-" * len(head)]
    for i in sorted(scores):
        row = [f"{i:5d}", f"{scores[i]:12.6g}"]
        if base_kl is not None:
            share = scores[i] / base_kl if base_kl else math.nan
            row += [f"{base_kl - scores[i]:12.6g}", f"{share:7.1%}"]
        lines.append("  ".join(row + [f"{rank[i]:4d}", "yes" if i in keep else ""]).rstrip())
    lines.append(f"chosen attention layers: {sorted(keep)}")
    return "\n".join(lines)


def print_sensitivity(scores: dict[int, float], chosen: list[int], base_kl: float | None = None, file=None) -> None:
    print(format_sensitivity(scores, chosen, base_kl), file=file, flush=True)


def resolve_placement(
    spec, num_layers: int, *, student=None, teacher=None, batches=None, verbose: bool = True, **kwargs
) -> tuple[list[int], dict[int, float] | None]:
    """(attention layers, sensitivities or None) for any spec; "auto:N" measures each layer's KL sensitivity
    on `batches` with `student` (after stage 2) and `teacher` and, if verbose, prints the table.
    kwargs go to `layer_sensitivity`."""
    n = auto_count(spec)
    if n is None:
        return parse_placement(spec, num_layers), None
    if student is None or teacher is None or batches is None:
        raise ValueError(f"placement {spec!r} needs the stage-2 student, the teacher and held-out batches")
    if student.config.num_hidden_layers != num_layers:
        raise ValueError(f"student has {student.config.num_hidden_layers} layers, expected {num_layers}")
    cands = candidate_layers(student, teacher)
    if n > len(cands):
        raise ValueError(f"placement {spec!r}: only {len(cands)} layers can be reverted to attention")
    if n == 0:
        return [], {}
    sens = layer_sensitivity(student, teacher, batches, **kwargs)
    chosen = sens.best(n)
    if verbose:
        print(format_sensitivity(sens.scores, chosen, sens.base_kl), flush=True)
    return chosen, sens.scores
