"""Distillation throughput per stage on one GPU: tokens/s, model-FLOPs utilisation (MFU) and peak memory.

    python scripts/gpu/distill_throughput.py --teacher <SmolLM2-135M folder> [--seq 2048] [--micro-batch 8]

Runs the real stage modules (mmmamba.distill.stages: LayerwiseDistill for stages 1-2, EndToEndDistill for
stage 3) with fused AdamW, bf16 autocast (fp32 master weights, teacher in bf16), gradient clipping, on synthetic
random-token batches of `--seq` tokens (no padding). Stage 3 uses the hybrid placement `--placement`.
`--cuda-graph` replays forward + backward from a CUDA graph as the recipe option `cuda_graph` does
(mmmamba.distill.graphs). Each stage also prints the host time to issue a step against its wall time: equal
means the step is bound by the host (Python and launches), not the GPU.

FLOPs per token: `mmmamba.distill.train_cost.step_flops` (its docstring states the model). MFU = FLOPs per token x
tokens/s / peak bf16 FLOP/s (H100 SXM dense: 989 TFLOP/s). `mmmamba bench-train` measures the same at named dims
(HoVLE-2.6B, SmolLM2) with the micro-batch search and the kernels on / off; this script takes a teacher folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # as the CLI: fla's autotuning kept on disk

from mmmamba.distill.compile import compile_layers, compile_mixers
from mmmamba.distill.graphs import GraphedSteps
from mmmamba.distill.kernel_time import profile_kernels
from mmmamba.distill.seed import seed_student
from mmmamba.distill.stages import (
    EndToEndDistill,
    LayerwiseDistill,
    apply_placement,
    enable_checkpointing,
    set_trainable,
)
from mmmamba.distill.train_cost import step_flops
from mmmamba.models import ATTENTION
from mmmamba.models.placement import parse_placement
from mmmamba.teachers.hf import load_teacher


def profile_step(step, n_top: int) -> dict:
    """CUDA kernel time of one step by group (mmmamba.distill.kernel_time), the n_top largest kernels (printed too)."""
    g = profile_kernels(step, n_top)
    print(f"  one step: {g['total_ms']:.1f} ms of kernels, {g['launches']} launches")
    print("  by group: " + ", ".join(f"{k} {x['ms']:.1f} ms ({100 * x['share']:.0f} %, {x['launches']} launches)"
                                     for k, x in g["groups"].items()))
    for r in g["top"]:
        print(f"  {r['ms']:8.2f} ms  x{r['launches']:<5} {r['kernel'][:100]}")
    return g


def attribute_step(fn, n_top: int) -> list[dict]:
    """CUDA time of one eager call of fn, per (launching op, where it came from): the first mmmamba frame of the
    op's Python stack, or the autograd node it ran under in the backward. Triton kernels launched from Python (fla,
    ours) have no aten op and are listed by kernel name. The n_top largest are printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    cpu = {ev.id: ev for ev in events if ev.device_type == torch.autograd.DeviceType.CPU}
    agg = {}
    for ev in events:
        if ev.device_type != torch.autograd.DeviceType.CUDA or ev.device_time_total <= 0:
            continue
        parent = cpu.get(ev.linked_correlation_id)
        if parent is not None and parent.name.startswith("cu"):  # a runtime call (cudaLaunch..., cuLaunch...)
            parent = parent.cpu_parent
        key = ((parent.name, _origin(parent)) if parent is not None
               else ("kernel " + ev.name[:60], "(no aten op: a Triton launch)"))
        n, t = agg.get(key, (0, 0.0))
        agg[key] = (n + 1, t + ev.device_time_total)
    rows = sorted(({"op": op, "origin": o, "launches": n, "ms": t / 1e3} for (op, o), (n, t) in agg.items()),
                  key=lambda r: -r["ms"])
    print(f"  where the kernel time goes (one eager micro-step, {sum(r['ms'] for r in rows):.1f} ms):")
    for r in rows[:n_top]:
        print(f"  {r['ms']:8.2f} ms  x{r['launches']:<5} {r['op'][:44]:44} {r['origin']}")
    return rows[:n_top]


def _origin(ev) -> str:
    """The first mmmamba frame above a profiled op, or the autograd node (backward) it ran under."""
    e = ev
    while e is not None:
        for frame in e.stack or ():
            if "/mmmamba/" in frame and "distill_throughput" not in frame:
                return frame.split("/mmmamba/")[-1]
        if e.name.startswith("autograd::engine::evaluate_function"):
            return "backward " + e.name.split(": ")[-1]
        e = e.cpu_parent
    return "?"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def host_timing(step, device, n: int = 5) -> dict:
    """Per step: host seconds spent issuing the work vs wall seconds to finish it. Issue time close to the wall
    time means the GPU waits on Python and launches (CPU-bound); much shorter means the GPU is the limit."""
    torch.cuda.synchronize(device)
    issue = wall = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize(device)
        issue += t1 - t0
        wall += time.perf_counter() - t0
    out = {"issue_ms": 1e3 * issue / n, "wall_ms": 1e3 * wall / n}
    print(f"  host: {out['issue_ms']:.1f} ms to issue a step, {out['wall_ms']:.1f} ms wall per step", flush=True)
    return out


def run_stage(stage, student, teacher, args, device):
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    names = set(set_trainable(student, stage))
    student = student.to(device, torch.float32)
    if stage in (1, 2):
        module = LayerwiseDistill(student, teacher, gradient_checkpointing=args.grad_ckpt,
                                  compile=args.compile).to(device)
    else:
        if args.grad_ckpt:
            enable_checkpointing(student)
        module = EndToEndDistill(student, teacher.to(device), chunk_size=args.kl_chunk,
                                 gather_rows=not args.cuda_graph)
    module.train()
    if args.compile:  # as the recipe option `compile`: elementwise work fused by inductor around our kernels
        compile_mixers(student) if stage in (1, 2) else compile_layers(student) + compile_layers(teacher)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05, fused=cuda)
    b = args.micro_batch if stage in (1, 2) else args.micro_batch3
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = student.config.vocab_size

    def batch():
        return torch.randint(0, vocab, (b, args.seq), device=device, generator=gen)

    def micro(inputs):
        ids = inputs["input_ids"]
        # no autocast weight cache under a graph, as the trainer: the replays cast the fp32 weights themselves
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not args.cuda_graph):
            loss, _ = module(ids, None, ids) if stage == 3 else module(ids)
        loss.backward()
        return loss.detach(), {}

    forward_backward = GraphedSteps(micro, params) if args.cuda_graph else micro

    def step():
        loss, _ = forward_backward({"input_ids": batch()})
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        opt.zero_grad(set_to_none=not args.cuda_graph)  # a graph's gradient tensors stay
        return loss

    t0 = time.perf_counter()
    for _ in range(max(args.warmup, 3 if args.cuda_graph else 0)):  # graphs: 2 eager steps, then the capture
        step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    print(f"stage {stage}: {args.warmup} warm-up steps took {warm_s:.1f} s (first-use tuning / compiling)", flush=True)
    top = profile_step(step, args.profile) if args.profile and cuda else {}
    if args.attribute and cuda:  # eager (the kernels a graph replays are these)
        try:
            top["attributed"] = attribute_step(lambda: micro({"input_ids": batch()}), args.attribute)
        except Exception as e:  # a diagnostic: never lose the throughput run to it
            print(f"  attribution failed: {type(e).__name__}: {e}")
        opt.zero_grad(set_to_none=not args.cuda_graph)
    host = host_timing(step, device) if cuda else {}
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(device)
    dt = time.perf_counter() - t0
    tok_s = b * args.seq * args.steps / dt
    f = step_flops(student.config, stage, args.seq, names)
    f_fwd, f_bwd = sum(f["forward"].values()), sum(f["backward"].values())
    total = f["total"]
    res = {
        "stage": stage, "micro_batch": b, "seq": args.seq, "tokens_per_s": tok_s,
        "gflop_per_token": total / 1e9, "fwd_gflop_per_token": f_fwd / 1e9,
        "bwd_gflop_per_token": f_bwd / 1e9, "tflop_s": total * tok_s / 1e12,
        "mfu": total * tok_s / (args.peak_tflops * 1e12),
        "peak_mem_gib": (torch.cuda.max_memory_allocated() if cuda else float("nan")) / 2**30,
        "trainable_params": sum(p.numel() for p in params), "final_loss": float(loss.detach()),
        "layer_types": "".join("A" if t == ATTENTION else "M" for t in student.config.layer_types),
        "ssd_backward": os.environ.get("MMMAMBA_SSD_BACKWARD", "auto"), "compile": args.compile, "profile": top,
        "warmup_s": warm_s, "cuda_graph": args.cuda_graph, "host": host,
    }
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher folder (e.g. SmolLM2-135M-Instruct) or 'smollm2'")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=16, help="stages 1-2 sequences per step")
    ap.add_argument("--micro-batch3", type=int, default=8, help="stage 3 sequences per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--placement", default="every:4", help="stage-3 attention layers (none = linear)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--kl-chunk", type=int, default=1024)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100 SXM: 989)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--compile", action="store_true", help="as the recipe option `compile` (torch.compile per layer)")
    ap.add_argument("--cuda-graph", action="store_true", help="replay forward + backward as one CUDA graph")
    ap.add_argument("--profile", type=int, default=0, help="print the N kernels taking most time in one step")
    ap.add_argument("--attribute", type=int, default=0,
                    help="print the N (op, source line) pairs taking most kernel time in one eager micro-step")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only for a quick correctness dry run")
    args = ap.parse_args()
    device = torch.device(args.device)
    teacher = load_teacher(args.teacher, dtype=torch.float32).eval().requires_grad_(False)
    try:
        from mmmamba.ops.ssd import fla_available

        backend = "fla" if fla_available() else "torch (chunked reference)"
    except ImportError:
        backend = "?"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | SSD backend: {backend} | "
          f"seq {args.seq} | bf16 autocast, fp32 master weights, teacher bf16")
    results = []
    for stage in [int(s) for s in args.stages.split(",")]:
        student = seed_student(teacher, None)  # stages 1-2: every layer Mamba-2 (PAPER §4.5)
        if stage == 3:
            layers = parse_placement(args.placement, teacher.config.num_hidden_layers)
            student = apply_placement(student, teacher, layers)
        t_bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
        try:
            results.append(run_stage(stage, student, t_bf16, args, device))
        except torch.cuda.OutOfMemoryError:
            results.append({"stage": stage, "error": "OOM"})
        r = results[-1]
        if "error" not in r:
            print(f"stage {stage}: {r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f} %", flush=True)
        if args.json:  # after every stage: a run cut short keeps what it measured
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "device": name, "results": results}, fh, indent=2)
        del student, t_bf16
        if device.type == "cuda":
            torch.cuda.empty_cache()
    hdr = (f"{'stage':>5} {'layers':>32} {'mb':>3} {'tok/s':>10} {'GFLOP/tok':>9} {'TFLOP/s':>8} "
           f"{'MFU':>6} {'peak GiB':>8} {'trainable':>11}")
    print(hdr)
    for r in results:
        if "error" in r:
            print(f"{r['stage']:>5} {r['error']}")
            continue
        print(f"{r['stage']:>5} {r['layer_types']:>32} {r['micro_batch']:>3} {r['tokens_per_s']:>10,.0f} "
              f"{r['gflop_per_token']:>9.3f} {r['tflop_s']:>8.1f} {100 * r['mfu']:>5.1f}% {r['peak_mem_gib']:>8.2f} "
              f"{r['trainable_params']:>11,}")


if __name__ == "__main__":
    main()
