"""Distillation throughput per stage on one GPU: tokens/s, model-FLOPs utilisation (MFU) and peak memory.

    python scripts/gpu/distill_throughput.py --teacher <SmolLM2-135M folder> [--seq 2048] [--micro-batch 8]

Runs the real stage modules (mmmamba.distill.stages: LayerwiseDistill for stages 1-2, EndToEndDistill for
stage 3) with fused AdamW, bf16 autocast (fp32 master weights, teacher in bf16), gradient clipping, on synthetic
random-token batches of `--seq` tokens (no padding). Stage 3 uses the hybrid placement `--placement`.
`--cuda-graph` replays forward + backward from a CUDA graph as the recipe option `cuda_graph` does
(mmmamba.distill.graphs). Each stage also prints the host time to issue a step against its wall time: equal
means the step is bound by the host (Python and launches), not the GPU.

FLOP formula (per token; model FLOPs, recomputation of checkpointed parts is NOT counted):
  H hidden, I MLP width, V vocab, h / g query / KV heads, d head dim, L sequence, c SSD chunk, n = p = d.
  matmul of a weight W (m x k): forward 2mk; backward 2mk for the input gradient (when something below
  needs it) + 2mk for the weight gradient (when W trains).
  P_att = H(hd) + 2 H(gd) + (hd) H     (q, k, v, o)       P_mlp = 3 H I
  P_mix = H(hd) + 2 H(gd) + H(hd) + H h  (student q, k, v, g_proj, dt_proj; o is the teacher's in stages 1-2)
  attention core (causal SDPA) forward 2 h d L   (QK^T and PV over L/2 keys on average)
  SSD core forward h (c (n + p) + 4 n p)          (intra-chunk scores and mix, state read and update)
  Stage 1/2 forward = sum over layers [2 P_att + attention core + 2 P_mlp]      (the teacher stream)
                    + sum over Mamba-2 layers [2 P_mix + SSD core]             (the student mixers)
           backward = sum over Mamba-2 layers [2 P_trainable_matmuls + 2 SSD core]  (weight grads of
                      g_proj, dt_proj (+ q, k, v in stage 2); the mixer inputs need no gradient)
  Stage 3  forward  = teacher: sum over layers [2 P_att + attn core + 2 P_mlp] + 2 H V
                    + student: sum over layers [2 P_layer + core] + 2 H V    (P_layer: P_att or P_mix + o)
           backward = input gradients of every matmul from the head down to the lowest trainable layer
                      (2 P per matmul, 2 x core per mixer, 2 H V for the head) + weight gradients of the
                      trainable matmuls (2 P each)
  MFU = (forward + backward FLOPs per token) x tokens/s / peak bf16 FLOP/s (H100 SXM dense: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import time

import torch

os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # as the CLI: fla's autotuning kept on disk

from mmmamba.distill.compile import compile_layers, compile_mixers
from mmmamba.distill.graphs import GraphedSteps
from mmmamba.distill.seed import seed_student
from mmmamba.distill.stages import (
    EndToEndDistill,
    LayerwiseDistill,
    apply_placement,
    enable_checkpointing,
    set_trainable,
)
from mmmamba.models import ATTENTION
from mmmamba.models.placement import parse_placement
from mmmamba.teachers.hf import load_teacher


def flops_per_token(cfg, stage: int, seq: int, trainable: set[str]) -> dict:
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, g, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    c = cfg.mamba_chunk_size
    q, kv, o = H * h * d, H * g * d, h * d * H
    p_att = q + 2 * kv + o
    p_mlp = 3 * H * I
    gate, dt = H * h * d, H * h
    att_core = 2 * h * d * seq
    ssd_core = h * (c * (2 * d) + 4 * d * d)
    mix_params = {"q_proj": q, "k_proj": kv, "v_proj": kv, "g_proj": gate, "dt_proj": dt, "o_proj": o}
    types = cfg.layer_types

    def trained(i, part):
        return any(n.startswith(f"model.layers.{i}.mixer.{part}.") for n in trainable)

    fwd = bwd = 0
    if stage in (1, 2):
        for i, t in enumerate(types):
            fwd += 2 * p_att + att_core + 2 * p_mlp
            if t != ATTENTION:
                fwd += 2 * (q + 2 * kv + gate + dt) + ssd_core
                bwd += 2 * ssd_core + sum(2 * w for part, w in mix_params.items() if trained(i, part))
        return {"forward": fwd, "backward": bwd}
    # stage 3
    fwd += len(types) * (2 * p_att + att_core + 2 * p_mlp) + 2 * H * V  # teacher
    lowest = min(i for i, t in enumerate(types) if t != ATTENTION)
    for i, t in enumerate(types):
        layer_p = p_att if t == ATTENTION else q + 2 * kv + gate + dt + o
        core = att_core if t == ATTENTION else ssd_core
        fwd += 2 * layer_p + core + 2 * p_mlp
        if i > lowest:  # input gradients through the whole layer
            bwd += 2 * layer_p + 2 * core + 2 * p_mlp
        elif i == lowest:  # above its mixer: the MLP and o_proj; the mixer itself: core + projections' inputs
            bwd += 2 * p_mlp + 2 * o + 2 * core
        if t != ATTENTION:
            bwd += sum(2 * w for part, w in mix_params.items() if trained(i, part))
    fwd += 2 * H * V
    bwd += 2 * H * V
    return {"forward": fwd, "backward": bwd}


KERNEL_CLASSES = [  # (class, regex on the CUDA kernel name), first match wins
    ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|wgmma_tensorop"),
    ("attention (SDPA)", r"sdpa|flash|fmha"),
    ("SSD (fla)", r"chunk_|cumsum|simple_gla"),
    ("softmax / KL", r"softmax"),
    ("elementwise / copy / reduce", r"elementwise|copy|reduce|fill|catarray|index|conv_depthwise|triton_"),
]


def profile_step(step, n_top: int) -> dict:
    """CUDA time per kernel name over one step, the n_top largest (printed too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    agg = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            c, t = agg.get(ev.name, (0, 0.0))
            agg[ev.name] = (c + 1, t + ev.device_time_total)
    total = sum(t for _, t in agg.values())
    rows = sorted(({"kernel": k[:100], "calls": c, "ms": t / 1e3} for k, (c, t) in agg.items()),
                  key=lambda r: -r["ms"])
    print(f"  one step: {total / 1e3:.1f} ms of kernels, {sum(c for c, _ in agg.values())} launches")
    cats = {}
    for name, (c, t) in agg.items():
        cat = next((k for k, pat in KERNEL_CLASSES if re.search(pat, name, re.I)), "other")
        n, ms = cats.get(cat, (0, 0.0))
        cats[cat] = (n + c, ms + t / 1e3)
    print("  by class: " + ", ".join(f"{k} {ms:.1f} ms ({100 * ms * 1e3 / total:.0f} %, {n} launches)"
                                     for k, (n, ms) in sorted(cats.items(), key=lambda kv: -kv[1][1])))
    for r in rows[:n_top]:
        print(f"  {r['ms']:8.2f} ms  x{r['calls']:<5} {r['kernel']}")
    return {"total_ms": total / 1e3, "classes": {k: {"launches": n, "ms": ms} for k, (n, ms) in cats.items()},
            "top": rows[:n_top]}


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
    f = flops_per_token(student.config, stage, args.seq, names)
    total = f["forward"] + f["backward"]
    res = {
        "stage": stage, "micro_batch": b, "seq": args.seq, "tokens_per_s": tok_s,
        "gflop_per_token": total / 1e9, "fwd_gflop_per_token": f["forward"] / 1e9,
        "bwd_gflop_per_token": f["backward"] / 1e9, "tflop_s": total * tok_s / 1e12,
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
