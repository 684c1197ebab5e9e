"""Supervised fine-tuning of a teacher (for example a VLM built with `teachers.vlm.build_vlm`) on conversation data.

loss = mean over target tokens of -log p(label) (the labels of `distill.data` batches: assistant turns only), AdamW
with two learning rates (`new_lr` for the parameters under `new_prefixes`: the vision front and the new layers;
`lr` for the rest), linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch

from .trainer import no_decay_ids


def _cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def sft_optimizer(model: torch.nn.Module, lr: float, new_lr: float, new_prefixes: tuple[str, ...],
                  weight_decay: float = 0.0) -> torch.optim.AdamW:
    """Four groups: (new | old) x (decay | no decay)."""
    no_decay = no_decay_ids(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (name.startswith(new_prefixes), id(p) in no_decay)
            groups.setdefault(key, []).append(p)
    params = [{"params": ps, "lr": new_lr if new else lr, "weight_decay": 0.0 if nd else weight_decay}
              for (new, nd), ps in groups.items()]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW(params, betas=(0.9, 0.999), **fused)


def train_sft(model, batches: Iterable[dict], steps: int, *, lr: float = 1e-4, new_lr: float = 1e-3,
              new_prefixes: tuple[str, ...] = ("model.vision.",), warmup: float = 0.05, grad_clip: float = 1.0,
              weight_decay: float = 0.0, log_every: int = 25, progress: bool = True,
              time_budget_s: float | None = None, probe_steps: int = 30) -> list[dict]:
    """Train `model` in place for `steps` micro-batches of `batches` (re-iterated as needed); returns the log.

    `time_budget_s`: after `probe_steps` steps the steady step time (of the probe's second half) is measured and
    the run shortened (never lengthened) to fit the budget; the cosine decay then ends at the new last step."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    opt = sft_optimizer(model, lr, new_lr, new_prefixes, weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    n_warm = min(int(round(warmup * steps)) if warmup < 1 else int(warmup), probe_steps)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                      enabled=False)
    model.train()
    log, it, t0, run_loss = [], iter(batches), time.time(), 0.0
    bar = tqdm(range(steps), desc="sft", disable=not progress)
    for step in bar:
        if step >= steps:
            break
        if step == probe_steps // 2:
            t_mid = time.time()
        if time_budget_s is not None and step == probe_steps:
            # the steady rate from the probe's second half (the first steps also start workers and compile), and
            # the budget left after the probe: the old whole-probe average gave 60 s of training for 100 s asked
            now = time.time()
            per_step = max((now - t_mid) / max(probe_steps - probe_steps // 2, 1), 1e-9)
            steps = min(steps, max(probe_steps + 1, probe_steps + int((time_budget_s - (now - t0)) / per_step)))
            bar.total = steps
        try:
            batch = next(it)
        except StopIteration:
            it = iter(batches)
            batch = next(it)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * _cosine(step, n_warm, steps)
        with amp:
            loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SFT loss is {loss.item()} at step {step}; lower the learning rates")
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run_loss += float(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            row = {"step": step + 1, "loss": run_loss / n, "grad_norm": float(gnorm), "seconds": time.time() - t0}
            log.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            run_loss = 0.0
    model.eval()
    return log
