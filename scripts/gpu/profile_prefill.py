"""Where a long prefill's time goes: per-kernel CUDA time of the Engine's chunked prefill at HoVLE-2.6B dims (random
bf16 weights), grouped by kernel, with the matmul FLOPs and their achieved rate.

    PYTHONPATH=src python scripts/gpu/profile_prefill.py [--variant linear] [--context 131072] [--json F]

The prefill runs once untimed (Triton tuning, fla's first use), then once timed by CUDA events, then once under
the profiler.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from profile_decode import cuda_kernel_times  # scripts/gpu, beside this file

from mmmamba.bench.models import HOVLE_DIMS, build_ours, make_config
from mmmamba.inference.engine import Engine

CLASSES = (("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet")), ("fla", ("chunk_", "fwd_kernel")),
           ("triton elementwise", ("_add_rmsnorm", "_silu_mul", "_conv_silu", "_gated", "_rope")))


def kernel_class(name: str) -> str:
    for cls, keys in CLASSES:
        if any(k in name for k in keys):
            return cls
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="linear")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = build_ours(make_config(HOVLE_DIMS, args.variant), dev, torch.bfloat16)
    engine = Engine(model, kernels="triton", cuda_graph=False, share_weights=True)
    ids = torch.randint(0, HOVLE_DIMS["vocab_size"], (1, args.context), device=dev)
    engine.reserve(1, args.context + 1)
    engine.prefill(ids)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    engine.prefill(ids)
    e.record()
    e.synchronize()
    wall_ms = s.elapsed_time(e)
    agg = cuda_kernel_times(lambda: engine.prefill(ids))
    rows = sorted(({"kernel": k[:100], "calls": c, "ms": t / 1e3, "class": kernel_class(k)}
                   for k, (c, t) in agg.items()), key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    flops = 2 * n_params * args.context
    by_class = defaultdict(float)
    for r in rows:
        by_class[r["class"]] += r["ms"]
    print(f"{torch.cuda.get_device_name()}  {args.variant} prefill of {args.context} tokens: {wall_ms:.1f} ms wall, "
          f"{total:.1f} ms of kernels; matmul FLOPs {flops / 1e12:.1f} T -> {flops / wall_ms / 1e9:.0f} TFLOP/s over "
          f"the wall time, {flops / max(by_class['gemm'], 1e-9) / 1e9:.0f} TFLOP/s in the GEMM kernels")
    print("  by class: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])))
    for r in rows[:30]:
        print(f"  {r['ms']:9.2f} ms  x{r['calls']:5d}  [{r['class']}] {r['kernel']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "variant": args.variant, "context": args.context,
                       "wall_ms": wall_ms, "kernel_ms": total, "by_class": by_class, "kernels": rows}, f, indent=1)


if __name__ == "__main__":
    main()
