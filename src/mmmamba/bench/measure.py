"""Measurement helpers: copy bandwidth, HBM floors, peak memory, timing, clean OOM handling."""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from contextlib import contextmanager

import torch

GB = 1e9


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cleanup(device, collect: bool = False) -> None:
    """Return cached GPU memory to the driver; `collect` also runs the garbage collector (slow with a big heap:
    only after errors and between models)."""
    if collect and torch.device(device).type == "cuda":
        gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device) -> float | None:
    """Peak bytes allocated by PyTorch since the last reset (GB), None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GB


def peak_reserved_gb(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_reserved() / GB


@torch.no_grad()
def copy_bandwidth(device, nbytes: int | None = None, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write (2 x size per copy)."""
    dev = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if dev.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    src.fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(dev)
    if dev.type == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            dst.copy_(src)
        e.record()
        torch.cuda.synchronize()
        t = s.elapsed_time(e) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        t = time.perf_counter() - t0
    del src, dst
    return 2 * nbytes * iters / t


def param_bytes(model) -> int:
    """Bytes of the distinct parameter storages of `model` (shared / tied storage counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), p.numel())
        if key in seen:
            continue
        seen.add(key)
        total += p.numel() * p.element_size()
    return total


def param_count(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), p.numel())
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def decode_weight_bytes(model, embedding: torch.Tensor, batch: int, lm_head: torch.Tensor | None = None) -> int:
    """Weight bytes one decode step must read: every parameter except the input embedding table, of which only
    `batch` rows are read (a tied LM head is read whole)."""
    total = param_bytes(model)
    tied = lm_head is not None and lm_head.data_ptr() == embedding.data_ptr()
    if not tied:
        total -= embedding.numel() * embedding.element_size()
        total += batch * embedding.shape[1] * embedding.element_size()
    return total


def floor_s(read_bytes: int, bandwidth: float) -> float:
    """Time to stream `read_bytes` once at the measured copy bandwidth (read + write bytes per second)."""
    return read_bytes / bandwidth


def summarize(times_s: list[float]) -> dict:
    ts = sorted(times_s)
    q = lambda f: ts[min(len(ts) - 1, max(0, round(f * (len(ts) - 1))))]  # noqa: E731
    return {"ms_median": 1e3 * statistics.median(ts), "ms_p10": 1e3 * q(0.1), "ms_p90": 1e3 * q(0.9),
            "ms_mean": 1e3 * statistics.fmean(ts), "steps": len(ts)}


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "cuda_error_out_of_memory" in msg


@contextmanager
def point(record: dict, device, log=print):
    """Run one measurement point; OOM -> status "OOM", other errors -> "error: ..." (logged), memory freed."""
    record.setdefault("status", "ok")
    failed = False
    try:
        yield record
    except Exception as e:  # noqa: BLE001 - a benchmark point must never abort the run
        failed = True
        if is_oom(e):
            record["status"] = "OOM"
        else:
            record["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
            log(traceback.format_exc(limit=6))
    finally:
        cleanup(device, collect=failed)
