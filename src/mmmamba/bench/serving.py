"""Batch serving: decode throughput vs batch size and the largest batch that fits, per model and context.

Batches double from 1 (each one decoded and timed: the throughput curve) until one does not fit or the cap is
reached, then bisection between the last batch that fit and the first that did not, down to a gap of
max(1, tol x the last fit). A batch fits when reserving its cache (filled with random values, as for every decode
point past the prefill) and decoding raise no out-of-memory error; after an OOM everything is freed and the search
goes on. The cap is a memory limit: the card's own, a smaller `--batch-memory-limit-gb` (on CUDA through
`torch.cuda.set_per_process_memory_fraction`, so the allocator raises real OOMs), or on a CPU that same limit
checked against the bytes the runner holds once its cache is reserved.

Next to the measured maximum stands the analytic estimate: weights + batch x (KV up to the context + recurrent
state + one fp32 logits row) <= limit.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import contextmanager

import torch

from .measure import GB, cleanup, is_oom, param_bytes


class OverBudget(Exception):
    """The run's time budget ran out in the middle of a search."""


def search_max_batch(fits: Callable[[int], bool], cap: int, tol: float = 1 / 16) -> dict:
    """Largest b <= cap with fits(b): doubling from 1, then bisection to a gap of max(1, int(tol * lo)).

    Returns max_batch (0 if batch 1 does not fit), first_oom (the smallest batch seen not to fit, None if
    none), exact (the gap closed to 1), capped (the cap itself fit) and probes [(batch, fit)] in order."""
    probes: list[tuple[int, bool]] = []

    def probe(b: int) -> bool:
        ok = bool(fits(b))
        probes.append((b, ok))
        return ok

    lo, hi, b = 0, None, 1
    while hi is None:
        b = min(b, cap)
        if not probe(b):
            hi = b
        elif b == cap:
            return {"max_batch": cap, "first_oom": None, "exact": False, "capped": True, "probes": probes}
        else:
            lo, b = b, 2 * b
    while hi - lo > max(1, int(tol * lo)):
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return {"max_batch": lo, "first_oom": hi, "exact": hi - lo == 1, "capped": False, "probes": probes}


def oom_in_chain(e: BaseException | None) -> bool:
    """An out-of-memory error, or one raised while handling one (e.g. a CUDA graph capture cut short by an OOM)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, torch.cuda.OutOfMemoryError) or is_oom(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def free_after_oom(runner, device) -> None:
    """Drop the runner's cache, CUDA graph and step buffers, collect and return cached blocks to the driver."""
    if getattr(runner, "engine", None) is not None:
        runner.engine.release()  # also drops the warm-up flag: the next batch warms up again
    gc.collect()
    cleanup(device)


def cpu_limit_guard(limit_bytes: int) -> Callable:
    """On a CPU: raise torch.cuda.OutOfMemoryError when the runner holds more than `limit_bytes` (the same error
    the CUDA allocator raises, so the search takes the same path)."""

    def guard(runner) -> None:
        held = runner.held_bytes()
        if held > limit_bytes:
            raise torch.cuda.OutOfMemoryError(
                f"out of memory (simulated): {held / GB:.4f} GB held > limit {limit_bytes / GB:.4f} GB")

    return guard


@contextmanager
def cuda_memory_limit(device, limit_bytes: int | None):
    """Cap the caching allocator of `device` at `limit_bytes` (None: no cap) for the block."""
    dev = torch.device(device)
    if dev.type != "cuda" or limit_bytes is None:
        yield
        return
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), dev)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)


def memory_estimate(runner, cache_len: int, limit_bytes: int) -> dict:
    """Weights + per-sequence bytes (KV of `cache_len` slots + recurrent state + an fp32 logits row) and the batch
    they allow under `limit_bytes`."""
    weights = param_bytes(runner.model) + (param_bytes(runner.front) if getattr(runner, "front", None) else 0)
    state = runner.state_bytes(cache_len, 1)
    logits = 4 * runner.vocab
    per_seq = state + logits
    return {"weights_gb": weights / GB, "cache_len": cache_len, "state_gb_per_seq": state / GB,
            "logits_gb_per_seq": logits / GB, "per_seq_gb": per_seq / GB, "limit_gb": limit_bytes / GB,
            "analytic_max_batch": max(0, (limit_bytes - weights) // per_seq)}


def memory_limit_bytes(device, limit_gb: float | None) -> int | None:
    """The search's limit: `limit_gb` if given, else the CUDA card's total memory; None on a CPU without one."""
    if limit_gb is not None:
        return int(limit_gb * GB)
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    return None
