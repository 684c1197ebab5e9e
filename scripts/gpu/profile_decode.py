"""Where a decode step's time goes: per-kernel CUDA time of the Engine's fused decode step at HoVLE-2.6B dims
(random bf16 weights), with the bytes each weight-reading kernel must load and its achieved bandwidth.

    PYTHONPATH=src python scripts/gpu/profile_decode.py [--variants linear,hybrid] [--context 4096] [--json F]

The step is profiled without the CUDA graph (kernel durations are the same; the graph only removes launch gaps);
the graph-replayed step time is measured separately.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from mmmamba.bench.measure import copy_bandwidth
from mmmamba.bench.models import HOVLE_DIMS, build_ours, make_config
from mmmamba.inference.engine import Engine


def cuda_kernel_times(fn) -> dict[str, list]:
    """Run fn() under torch's profiler: {kernel name: [launches, total CUDA time in us]}."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    agg = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            a = agg[ev.name]
            a[0] += 1
            a[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    return agg


def kernel_table(engine: Engine, steps: int) -> list[dict]:
    agg = cuda_kernel_times(lambda: [engine._step() for _ in range(steps)])
    rows = [{"kernel": k[:90], "calls_per_step": c / steps, "us_per_step": t / steps} for k, (c, t) in agg.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="linear,hybrid")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    out = {"device": torch.cuda.get_device_name(), "copy_bw_GBs": bw / 1e9, "context": args.context, "variants": {}}
    print(f"{out['device']}  copy bandwidth {bw / 1e9:,.0f} GB/s  context {args.context}")
    for variant in args.variants.split(","):
        model = build_ours(make_config(HOVLE_DIMS, variant), dev, torch.bfloat16)
        engine = Engine(model, kernels="triton", cuda_graph=True, share_weights=True)
        engine.reserve(1, args.context + 64)
        ids = torch.randint(0, HOVLE_DIMS["vocab_size"], (1, args.context), device=dev)
        engine.prefill(ids)
        times = engine.time_decode(steps=32, warmup=4)
        graph_ms = sorted(times)[len(times) // 2] * 1e3
        table = kernel_table(engine, args.steps)
        total = sum(r["us_per_step"] for r in table)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - \
            model.model.embed_tokens.weight.numel() * 2 * (0 if model.config.tie_word_embeddings else 1)
        print(f"\n== {variant}: graph step {graph_ms:.3f} ms | kernel sum {total / 1e3:.3f} ms | "
              f"weights read {weight_bytes / 1e9:.2f} GB -> floor {weight_bytes / bw * 1e3:.3f} ms "
              f"(gaps {graph_ms - total / 1e3:.3f} ms)")
        for r in table[:25]:
            print(f"  {r['us_per_step']:9.1f} us  x{r['calls_per_step']:5.1f}  {r['kernel']}")
        out["variants"][variant] = {"graph_ms": graph_ms, "kernel_sum_ms": total / 1e3, "kernels": table,
                                    "weight_bytes": weight_bytes}
        engine.release()
        del engine, model
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
