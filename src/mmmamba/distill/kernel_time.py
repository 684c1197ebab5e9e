"""Where a training step's GPU time goes: torch.profiler's CUDA kernels of one step, grouped by what they do."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

# (group, pattern on the kernel name), first match wins. Our Triton kernels are named for their op (ops/*.py).
KERNEL_GROUPS = [
    ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|wgmma|s\d+_tensorop|splitk"),
    ("attention", r"flash|fmha|sdpa|attention|efficient_attention"),
    ("ssd", r"chunk_|cumsum|simple_gla|dqkwg|gla_prep|conv_silu|causal_conv|recompute_w_u|solve_tril"),
    ("norm", r"rmsnorm|gated_norm|fwd_mse|layer_norm|_norm_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("elementwise", r"elementwise|vectorized|unrolled|copy|fill|reduce|cat|index|silu|rope|softmax|scatter|gather"
                    r"|where|triton_"),
]


def kernel_group(name: str) -> str:
    """The group of a CUDA kernel name (`KERNEL_GROUPS`), "other" when none matches."""
    return next((g for g, pat in KERNEL_GROUPS if re.search(pat, name, re.I)), "other")


def group_kernel_times(times: dict[str, tuple[int, float]], top: int = 15) -> dict:
    """times: kernel name -> (launches, microseconds) -> {"total_ms", "launches", "groups": {group: {"ms",
    "share", "launches"}}, "top": the `top` kernels by time [{"kernel", "group", "launches", "ms"}]}."""
    total = sum(t for _, t in times.values())
    groups: dict[str, dict] = {}
    for name, (n, t) in times.items():
        g = groups.setdefault(kernel_group(name), {"ms": 0.0, "launches": 0})
        g["ms"] += t / 1e3
        g["launches"] += n
    for g in groups.values():
        g["share"] = g["ms"] * 1e3 / total if total else 0.0
    rows = sorted(({"kernel": k[:120], "group": kernel_group(k), "launches": n, "ms": t / 1e3}
                   for k, (n, t) in times.items()), key=lambda r: -r["ms"])
    return {"total_ms": total / 1e3, "launches": sum(n for n, _ in times.values()),
            "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]["ms"])), "top": rows[:top]}


def profile_kernels(step: Callable[[], object], top: int = 15) -> dict:
    """Run `step` once under torch.profiler (CUDA activity) and group its kernels' time (`group_kernel_times`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    times: dict[str, tuple[int, float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            n, t = times.get(ev.name, (0, 0.0))
            times[ev.name] = (n + 1, t + ev.device_time_total)
    return group_kernel_times(times, top)
