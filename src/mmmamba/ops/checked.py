"""The one-off check that gates each fast GPU path on its torch reference (fused kernels, fla workarounds), and the
switches that turn the newer training kernels off by name (the same process measures a step with and without them)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable

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


# Fast paths that `set_kernels_off` can switch off (each then runs its torch reference): name -> what it is.
SWITCHES = {
    "norm_mse": "stage 1-2 per-head MSE fused into the gated RMSNorm (ops.gated_norm)",
    "rmsnorm": "RMSNorm kernels under autograd (ops.add_norm.RMSNormFn)",
    "gla_prep": "fla's SSD inputs straight from the conv output (ops.gla_prep)",
    "swiglu": "MLP SiLU product kernels (ops.swiglu)",
}
_OFF: set[str] = set()


def switchable(name: str):
    """Decorator of a fast path's once-per-device check `ok(*key) -> bool`: cached as `functools.cache`, and False
    while `name` (a key of SWITCHES) is switched off. The switch is read on every call, outside the cache."""
    if name not in SWITCHES:
        raise ValueError(f"switch {name!r} unknown; add it to ops.checked.SWITCHES")

    def wrap(fn):
        cached = functools.cache(fn)

        @functools.wraps(fn)
        def ok(*key) -> bool:
            return name not in _OFF and cached(*key)

        ok.cache_clear = cached.cache_clear
        return ok

    return wrap


def set_kernels_off(names: Iterable[str]) -> None:
    """Switch exactly `names` (keys of SWITCHES) off, every other switchable path back on."""
    names = set(names)
    bad = sorted(names - SWITCHES.keys())
    if bad:
        raise ValueError(f"kernel switches {bad} unknown; known: {', '.join(SWITCHES)}")
    _OFF.clear()
    _OFF.update(names)


def kernels_off() -> frozenset[str]:
    """The switches now off."""
    return frozenset(_OFF)
