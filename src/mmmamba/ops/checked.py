"""The one-off check that gates each fast GPU path on its torch reference (fused kernels, fla workarounds)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def cuda_index(device: torch.device) -> int:
    """The CUDA device number of `device` ("cuda" alone: the current device), the key of the per-device checks."""
    return device.index if device.index is not None else torch.cuda.current_device()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32: how far a fast path's output is from its reference b."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def with_long_rows(short: dict[str, float], long: dict[str, float]) -> dict[str, float]:
    """The errors of a check at few rows and at many (where backward programs take 16 rows each), as one dict."""
    return {**short, **{f"{k}|16 rows": v for k, v in long.items()}}


def passes_check(what: str, errors: Callable[[], dict[str, float]], tolerance: float, fallback: str) -> bool:
    """Run `errors()` (relative errors of the fast path against its reference) in full precision with autograd on,
    whatever context the first training step runs in. True when every error is within `tolerance`; otherwise (or
    when the check itself fails) warn that `fallback` is used and return False."""
    try:
        with torch.enable_grad(), torch.autocast("cuda", enabled=False):
            errs = errors()
    except Exception as e:  # the kernel does not compile here, or a library's internals moved
        warnings.warn(f"mmmamba: {what} unavailable ({type(e).__name__}: {e}); using {fallback}", stacklevel=3)
        return False
    if max(errs.values()) > tolerance:
        warnings.warn(f"mmmamba: {what} failed its check ({errs}); using {fallback}", stacklevel=3)
        return False
    return True
