"""torch.compile of the distillation's per-layer work (recipe option `compile`, GPU): inductor fuses the
elementwise work around the matmuls, SDPA and our own kernels, which stay outside the graphs
(`torch.compiler.disable`)."""

from __future__ import annotations

import torch

from ..models import MAMBA2


def compile_mixers(model) -> int:
    """torch.compile the per-head path up to the gated norm (`ssm_heads`, which `heads` and `heads_mse` call) of
    every Mamba-2 mixer: inductor fuses what is left between the mixer's own kernels (softplus, splits, repeats,
    masks); the SSD, conv + SiLU and gated norm keep theirs, outside the graphs. Returns how many mixers were compiled
    (none twice)."""
    mixers = [layer.mixer for layer in model.model.layers if layer.layer_type == MAMBA2]
    return _compile_methods(mixers, "ssm_heads")


def compile_layers(model) -> int:
    """torch.compile every decoder layer's forward (stage 3, teacher and student): norms, RoPE, residual adds, the
    MLP's SiLU product and the mixers' elementwise work are fused around the matmuls, SDPA and our own kernels
    (which stay outside the graphs). Returns how many layers were compiled (none twice)."""
    return _compile_methods(list(model.model.layers), "forward")


def allow_recompiles(n: int) -> None:
    """Let dynamo keep n compiled entries per code object: the layers share code but may each need an entry of
    their own (other guards); past the default limit (8) dynamo would silently run the rest eagerly."""
    cfg = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, limit):
            setattr(cfg, limit, max(getattr(cfg, limit), n))


def _compile_methods(modules, name: str) -> int:
    allow_recompiles(2 * len(modules) + 8)
    n = 0
    for m in modules:
        fn = getattr(m, name)
        if not hasattr(fn, "_torchdynamo_orig_callable"):
            setattr(m, name, torch.compile(fn))
            n += 1
    return n
