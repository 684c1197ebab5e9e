"""`mmmamba bench-train`: training throughput of distillation stages 1, 2 and 3 on one device, at named dims with
random weights (`models.dims`: hovle-2.6b, smollm2, tiny).

Per stage: the stage modules the trainer runs (`LayerwiseDistill`, `EndToEndDistill`), fused AdamW over fp32
master weights, bf16 autocast and a bf16 teacher on CUDA (fp32 on the CPU), gradient clipping, random tokens of
`seq` per row. Steps:
1. the largest micro-batch that fits (doubling, then bisection; a CUDA out-of-memory error ends a trial cleanly),
   without gradient checkpointing, or with it where fewer than `min_batch` rows fit without (`checkpointing: auto`);
2. `warmup` steps, then `steps` timed steps: tokens/s, model TFLOP/s (`train_cost.step_flops`), MFU against the
   card's dense bf16 peak, peak memory beside the estimate of `train_cost.memory_estimate`;
3. the same with the newer training kernels off (`ops.checked.SWITCHES`, and the SSD backward on 128-wide tiles
   where the 32-wide ones had been chosen), in the same process at the same micro-batch, then with them on again
   (how far two runs of one step differ: the noise of the comparison);
4. one profiled step with the kernels on and one with them off: CUDA kernel time by group (`kernel_time`).
A time budget skips what would not fit (said in the results). Writes results.json (after every stage) and
report.md into `out`.
"""

from __future__ import annotations

import datetime
import gc
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..io import atomic_write_text, json_text
from ..layers.mamba2 import set_ssd_backward
from ..models import ATTENTION, MMMambaForCausalLM
from ..models.dims import NAMED_DIMS, dims_config
from ..models.placement import parse_placement
from ..ops import kernel_report
from ..ops.checked import SWITCHES, set_kernels_off
from ..ops.ssd_fla import TILES
from .graphs import GraphedSteps
from .kernel_time import profile_kernels
from .seed import seed_student
from .stages import EndToEndDistill, LayerwiseDistill, apply_placement, set_checkpointing, set_trainable
from .train_cost import memory_estimate, parameter_counts, step_flops

MIN_STAGE_S = 15.0  # a stage is not started with less of the time budget left
# dense bf16 peak TFLOP/s by card name (first match): the H100 SXM and H200 share the same tensor cores
PEAK_BF16 = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def peak_bf16_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak (TFLOP/s) from its name, None when unknown (then no MFU unless given)."""
    return next((p for key, p in PEAK_BF16 if key.lower() in device_name.lower()), None)


@dataclass
class TrainBenchOptions:
    dims: list[str] = field(default_factory=lambda: ["smollm2"])
    stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    seq: int = 2048
    placement: str = "none"  # stage 3's attention layers (none: mmMamba-linear)
    micro_batch: int | None = None  # None: the largest that fits (on CUDA; 1 on the CPU)
    max_micro_batch: int = 64
    checkpointing: str = "auto"  # auto | on | off
    min_batch: int = 2  # auto: checkpointing when fewer rows fit without
    steps: int = 10
    warmup: int = 3
    kernels_ab: bool = True  # also time the step with the newer kernels off
    profile: bool = True
    top: int = 15
    cuda_graph: bool = False
    kl_chunk: int = 1024
    budget_s: float | None = None
    peak_tflops: float | None = None
    device: str = "cuda"
    out: str = "bench_train_out"
    command: str = "mmmamba bench-train"


class Budget:
    """Seconds left of an optional time budget."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()


def is_oom(e: BaseException) -> bool:
    """A CUDA out-of-memory error (torch's, or one surfacing from cuBLAS / a library as a RuntimeError)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "CUBLAS_STATUS_ALLOC_FAILED" in msg)


def largest_fitting(fits: Callable[[int], bool], limit: int, start: int = 1,
                    stop: Callable[[], bool] = lambda: False) -> tuple[int, list[tuple[int, bool]]]:
    """The largest b in [start, limit] with fits(b) (fits taken as monotone: true up to some b, false above), by
    doubling from `start` and then bisecting; 0 when `start` does not fit. `stop()` true (a time budget spent) ends
    the search early with the largest b that fitted so far. Returns (b, [(b tried, fitted)])."""
    trials: list[tuple[int, bool]] = []

    def trial(b: int) -> bool:
        ok = fits(b)
        trials.append((b, ok))
        return ok

    if not trial(start):
        return 0, trials
    lo, hi = start, None
    while hi is None and lo < limit and not stop():
        b = min(2 * lo, limit)
        if trial(b):
            lo = b
        else:
            hi = b
    while hi is not None and hi - lo > 1 and not stop():
        mid = (lo + hi) // 2
        if trial(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageBench:
    """One stage's module, optimizer and step function at a micro-batch size."""

    def __init__(self, stage: int, student: MMMambaForCausalLM, teacher: MMMambaForCausalLM,
                 opts: TrainBenchOptions, device: torch.device, log: Callable[[str], None]):
        self.stage, self.student, self.teacher, self.opts, self.device, self.log = (
            stage, student, teacher, opts, device, log)
        self.names = set_trainable(student, stage)
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=0.05, fused=device.type == "cuda")
        if stage in (1, 2):
            self.module = LayerwiseDistill(student, teacher)
        else:
            self.module = EndToEndDistill(student, teacher, positions="all", chunk_size=opts.kl_chunk,
                                          gather_rows=not opts.cuda_graph)
        self.module.train()
        self.checkpointing = False
        self.gen = torch.Generator(device=device).manual_seed(0)

    def set_checkpointing(self, on: bool) -> None:
        self.checkpointing = on
        if self.stage in (1, 2):
            self.module.gradient_checkpointing = on
        else:
            set_checkpointing(self.student, on)

    def step_fn(self, b: int, graph: bool = False) -> Callable[[], torch.Tensor]:
        """One optimizer step on b fresh random rows (forward + backward of one micro-batch, clip, AdamW)."""
        module, stage, amp = self.module, self.stage, self.device.type == "cuda"
        vocab, seq, params, opt = self.student.config.vocab_size, self.opts.seq, self.params, self.opt

        def micro(batch):
            ids = batch["input_ids"]
            # no autocast weight cache under a graph, as the trainer: the replays cast the fp32 weights themselves
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=not graph):
                loss, _ = module(ids, None, ids) if stage == 3 else module(ids)
            loss.backward()
            return loss.detach(), {}

        forward_backward = GraphedSteps(micro, params, log=self.log) if graph else micro

        def step():
            ids = torch.randint(0, vocab, (b, seq), device=self.device, generator=self.gen)
            loss, _ = forward_backward({"input_ids": ids})
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            opt.zero_grad(set_to_none=not graph)  # a graph's gradient tensors stay
            return loss

        return step

    def fits(self, b: int) -> bool:
        """Whether two steps at micro-batch b run (the second with AdamW's states allocated); memory freed after."""
        ok = True
        try:
            step = self.step_fn(b)
            for _ in range(2):
                step()
            _sync(self.device)
        except Exception as e:
            if not is_oom(e):
                raise
            ok = False
        self.opt.zero_grad(set_to_none=True)
        _free(self.device)
        self.log(f"  stage {self.stage}: micro-batch {b}{' (checkpointing)' if self.checkpointing else ''}: "
                 + ("fits" if ok else "out of memory"))
        return ok


def kernel_variant(student, stage: int, device: torch.device, off: bool) -> dict:
    """Switch the newer training kernels on or off (`off`) for `student` on `device`; returns what runs
    ({"ssd_backward", "fused": {path: on}}, `ops.kernel_report`). Off: every `ops.checked.SWITCHES` path runs its
    torch reference and a 32-wide-tile SSD backward runs on 128-wide tiles (the earlier tree's only width)."""
    set_kernels_off(SWITCHES if off else ())
    if device.type != "cuda":
        return {"ssd_backward": None, "fused": {}}
    report = kernel_report(student.config, torch.bfloat16, device,
                           stream_dtype=torch.bfloat16 if stage in (1, 2) else None,
                           norm_dtype=next(student.parameters()).dtype)
    mode = report["ssd_backward"]
    if off and mode in TILES:
        mode = "bk128"
    if mode is not None:
        set_ssd_backward(student, mode)
    return {**report, "ssd_backward": mode}


def time_steps(step: Callable, device: torch.device, warmup: int, steps: int, budget: Budget,
               reserve_s: float = 0.0) -> dict:
    """`warmup` untimed steps, then up to `steps` timed ones (fewer when the budget, less `reserve_s`, would run
    out; at least 2): {"warmup_s", "steps", "step_s", "peak_gib", "loss"}."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss = step()
    _sync(device)
    first = time.perf_counter() - t0
    n = int(max(1, min(steps - 1, (budget.left() - reserve_s) / max(first, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(n):
        loss = step()
    _sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return {"warmup_s": warm, "steps": n, "step_s": dt / n, "peak_gib": peak, "loss": float(loss)}


def _throughput(t: dict, tokens_per_step: int, flops_per_token: float, peak_tflops: float | None) -> dict:
    tok_s = tokens_per_step / t["step_s"]
    tflops = flops_per_token * tok_s / 1e12
    return {**t, "tokens_per_s": tok_s, "tflop_s": tflops, "mfu": tflops / peak_tflops if peak_tflops else None}


def measure_variant(sb: StageBench, b: int, off: bool, share_end: float, n_variants: int, flops_per_token: float,
                    peak: float | None, profile: bool = True) -> dict:
    """Time (and, with `profile` and within the budget, profile) sb's step at micro-batch b with the newer kernels
    on or off."""
    opts, device = sb.opts, sb.device
    cuda = device.type == "cuda"
    kernels = kernel_variant(sb.student, sb.stage, device, off=off)
    step = sb.step_fn(b, graph=opts.cuda_graph and cuda)
    t = time_steps(step, device, max(opts.warmup, 3 if opts.cuda_graph and cuda else 0), opts.steps,
                   Budget(max(share_end - time.monotonic(), 0.0)), reserve_s=10.0 * n_variants)
    v = {**_throughput(t, b * opts.seq, flops_per_token, peak), "kernels": kernels}
    if profile and opts.profile and cuda and share_end - time.monotonic() > 3 * v["step_s"] + 2:
        v["profile"] = profile_kernels(step, opts.top)
        v["gpu_busy"] = v["profile"]["total_ms"] / 1e3 / v["step_s"]
    return v


def run_stage(stage: int, student, teacher, opts: TrainBenchOptions, device: torch.device, budget: Budget,
              stages_left: int, peak: float | None, log: Callable[[str], None]) -> dict:
    """Search the micro-batch, time the step with the kernels on and off, profile both (see the module doc)."""
    cuda = device.type == "cuda"
    share_end = time.monotonic() + budget.left() / max(stages_left, 1)  # this stage's fair share of the budget
    sb = StageBench(stage, student, teacher, opts, device, log)
    cfg = student.config
    flops = step_flops(cfg, stage, opts.seq, sb.names)
    res = {"stage": stage, "layers": "".join("A" if t == ATTENTION else "M" for t in cfg.layer_types),
           "trainable_params": sum(p.numel() for p in sb.params), "gflop_per_token": flops["total"] / 1e9,
           "flops_per_token": flops}
    kernel_variant(student, stage, device, off=False)  # the SSD backward the search runs with
    choices = {"on": [True], "off": [False], "auto": [False, True]}[opts.checkpointing]
    b, searches = 0, []
    for ckpt in choices:
        sb.set_checkpointing(ckpt)
        if opts.micro_batch or not cuda:
            b = opts.micro_batch or 1
            break
        search_end = time.monotonic() + 0.4 * (share_end - time.monotonic())  # the rest: the timed steps
        b, trials = largest_fitting(sb.fits, opts.max_micro_batch, stop=lambda end=search_end: time.monotonic() > end)
        complete = b in (0, opts.max_micro_batch) or (b + 1, False) in trials
        searches.append({"checkpointing": ckpt, "largest": b, "trials": trials, "stopped_by_budget": not complete})
        if b >= min(opts.min_batch, opts.max_micro_batch) or not complete:  # enough rows, or no time to look on
            break
    res.update(micro_batch=b, checkpointing=sb.checkpointing, search=searches,
               capped=bool(searches) and b == opts.max_micro_batch)
    teacher_params = parameter_counts(teacher.config)["total"]
    res["memory_estimate_gib"] = memory_estimate(cfg, stage, max(b, 1), opts.seq, res["trainable_params"],
                                                 teacher_params, sb.checkpointing, opts.kl_chunk)
    if b == 0:
        res["error"] = "out of memory at micro-batch 1" + (" with checkpointing" if sb.checkpointing else "")
        return res
    log(f"stage {stage}: micro-batch {b} x {opts.seq}, checkpointing {'on' if sb.checkpointing else 'off'}; "
        "estimated memory (GiB) " + ", ".join(f"{k} {v:.2f}" for k, v in res["memory_estimate_gib"].items()))
    # on, off, on again: the repeat says how far two runs of one step differ here (the noise of the comparison)
    variants = [("on", False)] + ([("off", True), ("on again", False)] if opts.kernels_ab else [])
    res["variants"] = {}
    step_s = 0.0
    for name, off in variants:
        left = share_end - time.monotonic()
        if name != "on" and left < 5 + (opts.warmup + 2) * step_s:
            res["variants"][name] = {"skipped": f"time budget ({left:.0f} s left for this stage)"}
            continue
        try:
            v = measure_variant(sb, b, off, share_end, len(variants), flops["total"], peak, profile=name != "on again")
        except Exception as e:
            if not is_oom(e):
                raise
            v = {"error": f"out of memory while timing ({str(e).splitlines()[0][:160]})"}
        sb.opt.zero_grad(set_to_none=True)
        _free(device)
        res["variants"][name] = v
        if "error" in v:
            log(f"stage {stage} kernels {name}: {v['error']}")
            continue
        step_s = v["step_s"]
        log(f"stage {stage} kernels {name}: {v['tokens_per_s']:,.0f} tok/s, {v['tflop_s']:.3g} TFLOP/s"
            + (f", MFU {100 * v['mfu']:.1f} %" if v["mfu"] is not None else "")
            + (f", peak {v['peak_gib']:.2f} GiB" if v["peak_gib"] is not None else ""))
    set_kernels_off(())
    return res


def _build(name: str, opts: TrainBenchOptions, device: torch.device, log) -> tuple:
    """(teacher on `device` in bf16 (CUDA) or fp32, {stage: student in fp32 on the CPU}); random weights, seed 0."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    teacher = MMMambaForCausalLM(dims_config(name)).eval().requires_grad_(False)
    linear = seed_student(teacher, None)  # stages 1-2: every layer Mamba-2 (PAPER §4.5)
    students = {s: linear for s in opts.stages if s in (1, 2)}
    if 3 in opts.stages:
        layers = parse_placement(None if opts.placement == "none" else opts.placement, teacher.config.num_hidden_layers)
        students[3] = apply_placement(linear, teacher, layers)
    teacher = teacher.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    log(f"{name}: teacher {parameter_counts(teacher.config)['total'] / 1e6:,.1f} M parameters, built in "
        f"{time.perf_counter() - t0:.1f} s")
    return teacher, students


def run_train_bench(opts: TrainBenchOptions, log: Callable[[str], None] = print) -> dict:
    """Run every (dims, stage) of `opts`; returns the results (also written to opts.out after each stage)."""
    threads = torch.get_num_threads()
    if opts.dims == ["tiny"] and torch.device(opts.device).type == "cpu":
        torch.set_num_threads(1)  # smoke run: OpenMP hand-offs on a busy small machine dominate tiny ops
    try:
        return _run_train_bench(opts, log)
    finally:
        torch.set_num_threads(threads)


def _run_train_bench(opts: TrainBenchOptions, log: Callable[[str], None]) -> dict:
    bad = [d for d in opts.dims if d not in NAMED_DIMS]
    if bad or any(s not in (1, 2, 3) for s in opts.stages) or opts.checkpointing not in ("auto", "on", "off"):
        raise ValueError(f"bench-train: dims from {list(NAMED_DIMS)}, stages from 1,2,3 and checkpointing "
                         f"auto|on|off (got dims {opts.dims}, stages {opts.stages}, {opts.checkpointing!r})")
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench-train: CUDA is not available here; pass --device cpu for a CPU dry run")
    budget = Budget(opts.budget_s)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = opts.peak_tflops or (peak_bf16_tflops(name) if device.type == "cuda" else None)
    out = {"device": name, "peak_bf16_tflops": peak, "torch": torch.__version__, "options": asdict(opts),
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "runs": []}
    log(f"bench-train on {name} (peak bf16 {peak} TFLOP/s), torch {torch.__version__}, seq {opts.seq}")
    todo = [(d, s) for d in opts.dims for s in opts.stages]
    for d in opts.dims:
        teacher, students = _build(d, opts, device, log)
        on_device = None
        for stage in opts.stages:
            run = {"dims": d, "stage": stage, "placement": opts.placement if stage == 3 else "none"}
            if budget.left() < MIN_STAGE_S:
                out["runs"].append({**run, "skipped": f"time budget ({budget.left():.0f} s left)"})
                log(f"stage {stage}: skipped, time budget spent")
                write_results(out, Path(opts.out))
                continue
            student = students[stage]
            if on_device is not None and on_device is not student:
                on_device.to("cpu")
            on_device = student.to(device, torch.float32)
            _free(device)
            left = len(todo) - len(out["runs"])
            t0 = time.perf_counter()
            try:
                r = run_stage(stage, student, teacher, opts, device, budget, left, peak, log)
            finally:
                set_kernels_off(())
            out["runs"].append({**run, **r, "wall_s": time.perf_counter() - t0})
            write_results(out, Path(opts.out))
        del teacher, students, on_device
        _free(device)
    return out


def write_results(res: dict, out: Path) -> None:
    """results.json and report.md into `out` (each written atomically)."""
    atomic_write_text(out / "results.json", json_text(res, indent=2))
    atomic_write_text(out / "report.md", report_markdown(res))


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, spec)


def report_markdown(res: dict) -> str:
    """A short markdown report: one row per (dims, stage, kernels on / off), the kernel-time groups below."""
    peak = res["peak_bf16_tflops"]
    lines = [f"# Training throughput: {res['device']}", "",
             f"{res['started']}, torch {res['torch']}, seq {res['options']['seq']}, peak bf16 "
             f"{_fmt(peak, '.0f')} TFLOP/s. Command: `{res['options']['command']}`", "",
             "| dims | stage | layers | ckpt | micro-batch | kernels | tok/s | TFLOP/s | MFU | peak GiB | "
             "est. GiB | GPU busy |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups, notes = [], []
    for r in res["runs"]:
        for sr in r.get("search", []):
            tried = ", ".join(f"{b} {'fits' if ok else 'OOM'}" for b, ok in sr["trials"])
            notes.append(f"- {r['dims']} stage {r['stage']}, checkpointing {'on' if sr['checkpointing'] else 'off'}: "
                         f"{tried} -> {sr['largest']}" + (" (search cut short by the time budget)"
                                                          if sr["stopped_by_budget"] else ""))
        est = r.get("memory_estimate_gib")
        if est:
            notes.append(f"- {r['dims']} stage {r['stage']} memory estimate (GiB): "
                         + ", ".join(f"{k} {v:.2f}" for k, v in est.items()))
        if "skipped" in r:
            lines.append(f"| {r['dims']} | {r['stage']} | skipped: {r['skipped']} | | | | | | | | | |")
            continue
        head = f"| {r['dims']} | {r['stage']} | {len(r['layers'])} ({r['layers'].count('A')} attn) | " \
               f"{'on' if r.get('checkpointing') else 'off'} | {r.get('micro_batch')} | "
        est = r.get("memory_estimate_gib", {}).get("total")
        if "error" in r:
            lines.append(head + f"{r['error']} | | | | | {_fmt(est, '.1f')} | |")
            continue
        for name, v in r.get("variants", {}).items():
            if "skipped" in v or "error" in v:
                lines.append(head + f"{name}: {v.get('error') or 'skipped, ' + v['skipped']} | | | | | | |")
                continue
            lines.append(head + f"{name} | {v['tokens_per_s']:,.0f} | {v['tflop_s']:.3g} | "
                         f"{_fmt(v['mfu'], '.1f', 100)}{'' if v['mfu'] is None else ' %'} | "
                         f"{_fmt(v['peak_gib'], '.2f')} | {_fmt(est, '.1f')} | {_fmt(v.get('gpu_busy'), '.0%')} |")
            if "profile" in v:
                g = ", ".join(f"{k} {x['ms']:.1f} ms ({x['share']:.0%})" for k, x in v["profile"]["groups"].items())
                groups.append(f"- {r['dims']} stage {r['stage']}, kernels {name}: {v['profile']['total_ms']:.1f} ms "
                              f"in {v['profile']['launches']} launches: {g}")
    if groups:
        lines += ["", "Kernel time of one step by group:", *groups]
    if notes:
        lines += ["", "Micro-batch searches and memory estimates:", *notes]
    lines += ["", "MFU: model FLOPs (mmmamba.distill.train_cost.step_flops; recomputation not counted) x tokens/s "
              "over the peak. Kernels off: " + ", ".join(SWITCHES) + " and the SSD backward on 128-wide tiles."]
    return "\n".join(lines) + "\n"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def add_arguments(p) -> None:
    d = TrainBenchOptions()
    p.add_argument("--dims", default=",".join(d.dims), help=f"comma list of named dims from {list(NAMED_DIMS)}")
    p.add_argument("--stages", type=_ints, default=d.stages, help="e.g. 1,2,3")
    p.add_argument("--seq", type=int, default=d.seq, help="tokens per row")
    p.add_argument("--placement", default=d.placement, help="stage 3's attention layers (none: mmMamba-linear)")
    p.add_argument("--micro-batch", type=int, help="rows per step (default: the largest that fits; 1 on the CPU)")
    p.add_argument("--max-micro-batch", type=int, default=d.max_micro_batch, help="the search's upper end")
    p.add_argument("--checkpointing", choices=["auto", "on", "off"], default=d.checkpointing,
                   help=f"gradient checkpointing (auto: when fewer than {d.min_batch} rows fit without)")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per measurement (fewer if the budget ends)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first (first-use tuning)")
    p.add_argument("--no-kernels-ab", action="store_true", help="skip the run with the newer kernels off")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled step (kernel time by group)")
    p.add_argument("--top", type=int, default=d.top, help="kernels listed per profile")
    p.add_argument("--cuda-graph", action="store_true", help="replay forward + backward from a CUDA graph")
    p.add_argument("--kl-chunk", type=int, default=d.kl_chunk, help="stage 3: KL rows per chunk")
    p.add_argument("--budget-s", type=float, help="time budget in seconds (what would not fit is skipped)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak (default: from the card's name)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=d.out, help="output folder (results.json, report.md)")


def options_from_args(args) -> TrainBenchOptions:
    import sys

    return TrainBenchOptions(
        dims=[x.strip() for x in args.dims.split(",") if x.strip()], stages=args.stages, seq=args.seq,
        placement=args.placement, micro_batch=args.micro_batch, max_micro_batch=args.max_micro_batch,
        checkpointing=args.checkpointing, steps=args.steps, warmup=args.warmup, kernels_ab=not args.no_kernels_ab,
        profile=not args.no_profile, top=args.top, cuda_graph=args.cuda_graph, kl_chunk=args.kl_chunk,
        budget_s=args.budget_s, peak_tflops=args.peak_tflops, device=args.device, out=args.out,
        command="mmmamba bench-train " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench-train"] else sys.argv[1:]),
    )
