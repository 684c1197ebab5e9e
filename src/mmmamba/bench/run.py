"""`mmmamba bench`: decode latency, prefill time and peak memory vs context, the paper's Table 2 (an image through
the image pipeline and the vision front, then prefill and decode) and batch serving (throughput vs batch and the
largest batch that fits), for the teacher (ours and transformers'), mmMamba-linear, mmMamba-hybrid and (where it
imports) mamba_ssm.

Writes results.json, report.md and PNG plots into --out; prints a compact table at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..inference import triton_kernels as tk
from .measure import GB, cleanup, copy_bandwidth, point
from .models import HOVLE_DIMS, HOVLE_VISION, TINY_DIMS, TINY_VISION, mamba_ssm_available
from .report import format_params, summary_table, write_markdown, write_plots
from .runners import HFRunner, MambaSSMRunner, OursRunner
from .serving import (
    OverBudget,
    cpu_limit_guard,
    cuda_memory_limit,
    free_after_oom,
    memory_estimate,
    memory_limit_bytes,
    oom_in_chain,
    search_max_batch,
)
from .vision_prompt import TABLE2_IMAGE, TABLE2_QUESTION, TINY_IMAGE, parse_size, synthetic_image

GPU_CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 105472, 131072, 262144]
TINY_CONTEXTS = [32, 64, 128]
ALL_MODELS = ["linear", "hybrid", "teacher", "teacher_hf", "mamba_ssm"]
TABLE2_VISION = ("real", "ids", "both")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass
class BenchOptions:
    device: str = "cuda"
    dtype: str = "bf16"
    tiny: bool = False
    out: str = "bench_out"
    models: list[str] = field(default_factory=lambda: list(ALL_MODELS))
    contexts: list[int] | None = None
    prefill_contexts: list[int] | None = None  # None: every context
    attn_prefill_max: int | None = None  # all-attention models: no prefill beyond this (random-filled KV instead)
    steps: int | None = None
    warmup: int | None = None
    batch_sizes: list[int] | None = None  # timed as listed; None: the search's doubling gives the curve
    batch_contexts: list[int] | None = None
    batch_models: list[str] = field(default_factory=lambda: ["linear", "hybrid", "teacher"])
    batch_search: bool = True  # the largest-batch search (its doubling also gives the throughput curve)
    batch_max: int | None = None  # the search's cap
    batch_steps: int | None = None
    batch_memory_limit_gb: float | None = None  # None: the card's memory (CUDA); no search on a CPU
    batch_triton_max: int = 64  # larger batches decode with the torch step (cuBLAS GEMMs)
    table2_vision: str = "real"  # real: image -> vision front; ids: random text ids; both
    table2_image: str | None = None  # WIDTHxHEIGHT of the synthetic image
    table2_max_tiles: int = 6
    table2_repeats: int = 3
    table2_visual: int | None = None  # the ids variant's prompt: visual + text ids
    table2_prompt: int | None = None
    table2_out: int | None = None
    kernels: str = "auto"
    cuda_graph: bool | None = None
    prefill_chunk: int | None = None
    placement: str = "every:4"
    compare_torch_contexts: list[int] | None = None
    budget_s: float = 450.0
    self_check_tol: float = 5e-2
    command: str = "mmmamba bench"

    def resolved(self) -> BenchOptions:
        o = BenchOptions(**asdict(self))
        t = o.tiny
        o.contexts = o.contexts or (TINY_CONTEXTS if t else GPU_CONTEXTS)
        o.attn_prefill_max = o.attn_prefill_max or (1 << 30 if t else 131072)
        o.steps = o.steps or (8 if t else 32)
        o.warmup = o.warmup if o.warmup is not None else (2 if t else 4)
        o.batch_contexts = o.batch_contexts or ([64] if t else [8192, 131072])
        o.batch_max = o.batch_max or (256 if t else 4096)
        o.batch_steps = o.batch_steps or (3 if t else 8)
        if o.batch_memory_limit_gb is None and t and o.device == "cpu":
            o.batch_memory_limit_gb = 0.004  # smoke run: a fake 4 MB "card" so the search runs and ends
        if o.table2_vision not in TABLE2_VISION:
            raise ValueError(f"table2_vision {o.table2_vision!r}: choose from {TABLE2_VISION}")
        o.table2_image = o.table2_image or "{}x{}".format(*(TINY_IMAGE if t else TABLE2_IMAGE))
        parse_size(o.table2_image)  # a bad size fails here, before any model is built
        o.table2_visual = o.table2_visual if o.table2_visual is not None else (16 if t else 768)
        o.table2_prompt = o.table2_prompt if o.table2_prompt is not None else (8 if t else 32)
        o.table2_out = o.table2_out if o.table2_out is not None else (16 if t else 256)
        o.prefill_chunk = o.prefill_chunk or (48 if t else 8192)
        if o.compare_torch_contexts is None:  # the same step in plain PyTorch ops (SDPA decode), CUDA-graphed
            o.compare_torch_contexts = [o.contexts[0]] + [c for c in (32768,) if c in o.contexts]
        return o


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers", "fla"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    out["mamba_ssm"] = mamba_ssm_available()
    out["cuda"] = torch.version.cuda
    return out


def _make_runner(name: str, o: BenchOptions, dims: dict, dtype):
    vision = None
    if o.table2_out and o.table2_vision != "ids":
        vision = TINY_VISION if o.tiny else HOVLE_VISION
    if name in ("linear", "hybrid", "teacher"):
        return OursRunner(name, name, dims, o.device, dtype, kernels=o.kernels, cuda_graph=o.cuda_graph,
                          prefill_chunk=o.prefill_chunk, placement=o.placement, vision=vision)
    if name == "teacher_hf":
        return HFRunner(name, dims, o.device, dtype, vision=vision)
    if name == "mamba_ssm":
        return MambaSSMRunner(name, dims, o.device, dtype)
    raise ValueError(f"unknown bench model {name!r}; choose from {ALL_MODELS}")


def _floor(rec: dict, runner, ctx: int, batch: int, bw: float) -> None:
    wb, sb = runner.weight_bytes(batch), runner.state_bytes(ctx, batch)
    rec["model_gb"], rec["state_gb"] = wb / GB, sb / GB
    rec["floor_ms"] = 1e3 * (wb + sb) / bw
    if rec.get("status") == "ok" and rec.get("ms_median"):
        rec["ratio"] = rec["ms_median"] / rec["floor_ms"]
        rec["tokens_per_s"] = batch * 1e3 / rec["ms_median"]


def self_check_failure(errs: dict, tol: float, noise_factor: float = 2.0) -> str | None:
    """Verdict on `Engine.kernel_errors`: None when the Triton step is fine, else the reason. The Triton step must be
    within `tol` of the torch step, or (bf16 / fp16, where both steps round) no further from the fp32 step than
    `noise_factor` times the torch step's own rounding error (plus `tol`)."""
    e, ef, tf = errs["triton_vs_torch"], errs["triton_vs_fp32"], errs["torch_vs_fp32"]
    if not (e == e and ef == ef and tf == tf):
        return "Triton step gave NaN"
    if e <= tol or ef <= tol + noise_factor * tf:
        return None
    return f"Triton step off by {e:.2e} (rel.; {ef:.2e} from the fp32 step, torch step {tf:.2e})"


def run_bench(opts: BenchOptions, log=print) -> dict:
    """Run the benchmark described by `opts`; returns the results dict (also written to opts.out)."""
    threads = torch.get_num_threads()
    if opts.tiny and torch.device(opts.device).type == "cpu":
        torch.set_num_threads(1)  # smoke run: OpenMP hand-offs on a busy 2-core machine dominate tiny ops
    try:
        return _run_bench(opts, log)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Run:
    """What every stage of one benchmark run shares: the resolved options, the device, the results (saved after
    each point) and the time budget."""

    o: BenchOptions
    dev: torch.device
    dtype: torch.dtype
    dims: dict
    out: Path
    bw: float
    res: dict
    log: Callable
    t_start: float = field(default_factory=time.time)

    @property
    def gpu(self) -> bool:
        return self.dev.type == "cuda"

    def over_budget(self) -> bool:
        return time.time() > self.t_start + self.o.budget_s

    def save(self) -> None:
        self.res["meta"]["elapsed_s"] = round(time.time() - self.t_start, 1)
        (self.out / "results.json").write_text(json.dumps(self.res, indent=2, default=str))

    def floor(self, rec: dict, runner, ctx: int, batch: int) -> None:
        _floor(rec, runner, ctx, batch, self.bw)


def _run_bench(opts: BenchOptions, log=print) -> dict:
    run = _start(opts.resolved(), log)
    for name in _model_names(run):
        if run.over_budget():
            run.res["models"][name] = {"status": "skipped (time budget)"}
        else:
            _bench_model(run, name)
    _finish(run)
    return run.res


def _start(o: BenchOptions, log) -> _Run:
    """Device and dtype checks, the run's metadata and the copy bandwidth the floors are measured against."""
    dev = torch.device(o.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; use --device cpu --tiny")
    dtype = DTYPES[o.dtype]
    if dev.type == "cpu" and dtype != torch.float32 and o.tiny:
        dtype = torch.float32  # CPU smoke run: fp32 (bf16 matmuls are slow on CPU)
    dims = TINY_DIMS if o.tiny else HOVLE_DIMS
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": o.command, "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""), "tiny": o.tiny, "dims": dims, "options": asdict(o),
        **_versions(),
    }
    if meta["mamba_ssm"] is None:
        meta["mamba_ssm_note"] = "mamba_ssm not importable"
    bw = copy_bandwidth(dev)
    meta["copy_bandwidth_GBps"] = bw / GB
    if dev.type == "cuda":
        log(f"[bench] {meta['device_name']}  copy bandwidth {bw / GB:.0f} GB/s  dtype {meta['dtype']}")
    else:
        log(f"[bench] CPU run ({meta['device_name']}), dtype {meta['dtype']}: decode and prefill times only")
    res = {"meta": meta, "models": {}, "decode": [], "prefill": [], "table2": [], "batch": [], "batch_max": [],
           "kernel_compare": []}
    return _Run(o, dev, dtype, dims, out, bw, res, log)


def _model_names(run: _Run) -> list[str]:
    have_mamba_ssm = run.res["meta"]["mamba_ssm"] is not None
    if "mamba_ssm" in run.o.models and not have_mamba_ssm:
        run.log("[bench] mamba_ssm not importable: skipped")
    return [m for m in run.o.models if m != "mamba_ssm" or have_mamba_ssm]


def _bench_model(run: _Run, name: str) -> None:
    """Build one model, warm and check its kernels, then every measurement of it; free it."""
    o = run.o
    runner = _make_runner(name, o, run.dims, run.dtype)
    info = _build(run, name, runner)
    if info["status"] != "ok":
        run.log(f"[bench] {name}: build failed: {info['status']}")
        runner.free() if hasattr(runner, "free") else None
        return
    is_attn = len(info.get("attention_layers", [])) == run.dims["num_hidden_layers"]
    pctx = [c for c in (o.prefill_contexts or o.contexts) if not (is_attn and c > o.attn_prefill_max)]
    _warm(run, runner, pctx, info)
    _self_check(run, runner, info)
    _note_fallback(runner, info)
    run.log(f"[bench] {name}: {format_params(info.get('params'))} params, kernels {info.get('kernels')}, "
            f"built in {info.get('build_s')} s")
    for ctx in o.contexts:
        _context_point(run, name, runner, ctx, ctx in pctx)
        _note_fallback(runner, info)
    _compare_torch_step(run, name, runner, info)
    _table2(run, name, runner)
    _batch_sweep(run, name, runner)
    run.save()
    runner.free()
    cleanup(run.dev)


def _build(run: _Run, name: str, runner) -> dict:
    info = {"status": "ok"}
    with point(info, run.dev, run.log):
        t0 = time.time()
        info.update(runner.build())
        info["build_s"] = round(time.time() - t0, 1)
    run.res["models"][name] = info
    return info


def _warm(run: _Run, runner, pctx: list[int], info: dict) -> None:
    """Compile / tune the prefill kernels for every chunk shape the sweep will meet."""
    chunk = run.o.prefill_chunk
    lengths = [min(pctx or [64]), chunk + 64] + [(c % chunk) or chunk for c in pctx]
    warm = {"status": "ok"}
    with point(warm, run.dev, run.log):
        runner.warm([n for n in lengths if n <= max(pctx or [64]) + 64])
    if warm["status"] != "ok":
        info["warm"] = warm["status"]


def _self_check(run: _Run, runner, info: dict) -> None:
    """The Triton decode step against the torch step (and fp32); torch kernels from here on if it fails."""
    if not hasattr(runner, "self_check") or info.get("kernels") != "triton":
        return
    rec = {"status": "ok"}
    bad = None
    with point(rec, run.dev, run.log):
        errs = runner.self_check()
        info["self_check_rel_err"] = errs["triton_vs_torch"]
        info["self_check_vs_fp32"] = {k: errs[k] for k in ("triton_vs_fp32", "torch_vs_fp32")}
        bad = self_check_failure(errs, run.o.self_check_tol)
    if rec["status"] != "ok":
        bad = f"self-check failed ({rec['status']})"
    if bad:
        info["fallback"] = f"{bad}: torch kernels used"
        runner.set_kernels("torch")
        info["kernels"] = "torch"


def _note_fallback(runner, info: dict) -> None:
    """The engine's own fallback to torch kernels (a Triton kernel that failed to compile or launch), if any."""
    if getattr(runner, "engine", None) is not None and runner.engine.fallback_reason:
        info["fallback"], info["kernels"] = runner.engine.fallback_reason, runner.engine.kernels


def _context_point(run: _Run, name: str, runner, ctx: int, do_pre: bool) -> None:
    """Prefill (if `do_pre`) and decode at one context, batch 1; decode on a random-filled cache if the prefill
    failed."""
    o, dev = run.o, run.dev
    d = {"model": name, "context": ctx, "batch": 1}
    p = {"model": name, "context": ctx, "batch": 1}
    if run.over_budget():
        d["status"] = p["status"] = "skipped (time budget)"
    else:
        with point(d, dev, run.log):
            pre, dec = runner.run_point(ctx, 1, o.steps, o.warmup, prefill=do_pre)
            d.update(dec)
            if pre is not None:
                p.update(pre)
        if do_pre:
            p["status"] = "ok" if "seconds" in p else d["status"]
        if do_pre and d["status"] != "ok" and not run.over_budget():
            d2 = {"model": name, "context": ctx, "batch": 1}
            with point(d2, dev, run.log):
                _, dec = runner.run_point(ctx, 1, o.steps, o.warmup, prefill=False)
                d2.update(dec)
            if d2["status"] == "ok":
                d = {**d2, "note": f"prefill failed ({d['status'][:80]}); decode on random-filled cache"}
    run.floor(d, runner, ctx, 1)
    run.res["decode"].append(d)
    if do_pre:
        run.res["prefill"].append(p)
    nan = float("nan")
    line = f"[bench] {name:<10} ctx {ctx:>7}: decode {d.get('ms_median', nan):8.3f} ms "
    if run.gpu:
        line += (f"({d.get('ratio', nan):.2f}x floor {d['floor_ms']:.3f} ms) prefill {p.get('seconds', nan):.3f} s  "
                 f"peak {d.get('peak_gb') or 0:.2f}/{p.get('peak_gb') or 0:.2f} GB  [{d['status']}]")
    else:
        line += f"prefill {p.get('seconds', nan):.3f} s  [{d['status']}]"
    run.log(line)
    run.save()


def _compare_torch_step(run: _Run, name: str, runner, info: dict) -> None:
    """The same decode step in plain PyTorch ops at a few contexts (Triton runs only)."""
    if info.get("kernels") != "triton" or not hasattr(runner, "set_kernels"):
        return
    o = run.o
    for ctx in o.compare_torch_contexts:
        if run.over_budget():
            break
        r = {"model": name, "context": ctx, "batch": 1}
        runner.set_kernels("torch")
        with point(r, run.dev, run.log):
            _, dec = runner.run_point(ctx, 1, o.steps, o.warmup, prefill=False)
            r.update(dec)
        runner.set_kernels("triton")
        run.floor(r, runner, ctx, 1)
        run.res["kernel_compare"].append(r)
        run.log(f"[bench] {name:<10} ctx {ctx:>7}: torch-ops step {r.get('ms_median', float('nan')):.3f} ms")


def _table2(run: _Run, name: str, runner) -> None:
    """The Table 2 rows of one model: the real vision path and / or the random-id prompt (`--table2-vision`)."""
    o = run.o
    if not o.table2_out:
        return
    for mode in _table2_modes(o, runner):
        t = {"model": name, "vision": mode}
        if mode == "ids" and o.table2_vision != "ids" and not getattr(runner, "has_vision", False):
            t["note"] = "no vision front: random text ids"
        if run.over_budget():
            t["status"] = "skipped (time budget)"
        else:
            with point(t, run.dev, run.log):
                t.update(_table2_point(o, runner, mode))
        run.res["table2"].append(t)
        nan = float("nan")
        first = f"TTFT {t['ttft_s']:.3f} s" if "ttft_s" in t else f"prefill {t.get('prefill_s', nan):.3f} s"
        run.log(f"[bench] {name:<10} table2 ({mode}): {first}, {t.get('tokens_per_s', nan):.1f} tok/s "
                f"(total {t.get('total_s', nan):.3f} s) [{t['status']}]")


def _table2_modes(o: BenchOptions, runner) -> list[str]:
    modes = ["real", "ids"] if o.table2_vision == "both" else [o.table2_vision]
    if not getattr(runner, "has_vision", False):  # mamba_ssm: no vision front, no embedding input
        modes = ["ids"]
    return modes


def _table2_point(o: BenchOptions, runner, mode: str) -> dict:
    if mode == "ids":
        rec = runner.table2(o.table2_visual + o.table2_prompt, o.table2_out)
        return {**rec, "visual_tokens": o.table2_visual, "text_tokens": o.table2_prompt}
    w, h = parse_size(o.table2_image)
    return {"image": o.table2_image, **runner.table2_vision(synthetic_image(w, h), TABLE2_QUESTION,
                                                            o.table2_max_tiles, o.table2_out, o.table2_repeats)}


def _batch_sweep(run: _Run, name: str, runner) -> None:
    """Throughput vs batch and the largest batch that fits, at every batch context (our runners only)."""
    if name not in run.o.batch_models or not hasattr(runner, "engine"):
        return
    base = runner.engine.kernels
    for ctx in run.o.batch_contexts:
        _batch_context(run, name, runner, ctx)
        if runner.engine.kernels != base:  # a big batch switched to the torch step (or fell back)
            runner.set_kernels(base)


def _batch_context(run: _Run, name: str, runner, ctx: int) -> None:
    """The listed batches, then the largest-batch search, at one context; one `batch_max` record."""
    o = run.o
    limit = memory_limit_bytes(run.dev, o.batch_memory_limit_gb)
    known: dict[int, bool] = {}
    rec = {"model": name, "context": ctx, "status": "ok"}
    failed = False
    with cuda_memory_limit(run.dev, limit if o.batch_memory_limit_gb is not None else None):
        try:
            for b in o.batch_sizes or []:
                _batch_probe(run, runner, ctx, limit, known, b, "list")
            _batch_search(run, runner, ctx, limit, known, rec)
        except OverBudget:
            rec["status"] = "skipped (time budget)"
        except Exception as e:  # noqa: BLE001 - a failed search must not abort the run
            rec["status"], failed = f"error: {type(e).__name__}: {str(e)[:300]}", True
    if failed:  # outside the except block: its traceback no longer holds the failed batch's tensors
        free_after_oom(runner, run.dev)
    run.res["batch_max"].append(rec)
    run.log(f"[bench] {name:<10} ctx {ctx:>7}: largest batch that fits {rec.get('max_batch', '-')} "
            f"(first OOM {rec.get('first_oom', '-')}; estimate "
            f"{rec.get('estimate', {}).get('analytic_max_batch', '-')}) [{rec['status']}]")
    run.save()


def _batch_search(run: _Run, runner, ctx: int, limit: int | None, known: dict, rec: dict) -> None:
    if not run.o.batch_search or limit is None:
        rec["status"] = "not searched (" + ("--no-batch-search" if not run.o.batch_search else
                                           "a CPU run needs --batch-memory-limit-gb") + ")"
        return
    o = run.o
    rec["estimate"] = memory_estimate(runner, _cache_len(runner, ctx + min(o.warmup, 2) + o.batch_steps + 4), limit)
    found = search_max_batch(lambda b: _batch_probe(run, runner, ctx, limit, known, b, "search"), o.batch_max)
    rec.update({k: v for k, v in found.items() if k != "probes"}, probes=len(found["probes"]))


def _probe_kernels(run: _Run, runner, b: int) -> None:
    """The Triton step's row tiles are sized for small batches (one tile of pow2(b) rows per weight tile): above
    `batch_triton_max` rows the torch step (cuBLAS GEMMs) decodes; each probe row records its kernels."""
    want = "torch" if b > run.o.batch_triton_max else run.res["models"][runner.name].get("kernels", "torch")
    if runner.engine.kernels != want:
        runner.set_kernels(want)


def _cache_len(runner, n: int) -> int:
    """KV slots the engine reserves for n tokens (it rounds up to a multiple)."""
    m = runner.engine.max_len_multiple
    return -(-n // m) * m


def _batch_probe(run: _Run, runner, ctx: int, limit: int | None, known: dict, b: int, phase: str) -> bool:
    """Decode at batch b from a random-filled cache of ctx tokens; True if it fit. Out-of-memory (real on CUDA,
    simulated against `limit` on a CPU) -> False, memory freed; other errors are recorded and propagate."""
    if b in known:
        return known[b]
    if run.over_budget():
        raise OverBudget
    o = run.o
    r = {"model": runner.name, "context": ctx, "batch": b, "phase": phase, "status": "ok"}
    guard = cpu_limit_guard(limit) if limit is not None and not run.gpu else None
    _probe_kernels(run, runner, b)
    try:
        _, dec = runner.run_point(ctx, b, o.batch_steps, min(o.warmup, 2), prefill=False, guard=guard)
        r.update(dec)
    except Exception as e:
        r["status"] = "OOM" if oom_in_chain(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
    if r["status"] == "OOM":  # freed outside the except block (its traceback holds the half-made cache)
        free_after_oom(runner, run.dev)
    run.floor(r, runner, ctx, b)
    run.res["batch"].append(r)
    run.log(f"[bench] {runner.name:<10} ctx {ctx:>7} batch {b:>5}: {r.get('tokens_per_s', float('nan')):9.1f} "
            f"tok/s [{r['status']}]")
    if r["status"] not in ("ok", "OOM"):
        raise RuntimeError(f"batch {b}: {r['status']}")
    known[b] = r["status"] == "ok"
    return known[b]


def _finish(run: _Run) -> None:
    """The tuned kernel configurations, plots, report.md and the summary table."""
    res, out, log = run.res, run.out, run.log
    if run.gpu and tk.available():
        res["meta"]["triton_gemv_configs"] = {str(k[:8]): list(v) for k, v in tk._TUNED.items()}
    run.save()
    plots = []
    try:
        plots = write_plots(res, out)
    except Exception as e:  # noqa: BLE001 - keep the JSON and markdown even if plotting fails
        log(f"[bench] plotting failed: {e}")
    write_markdown(res, out / "report.md", plots)
    run.save()
    table = summary_table(res)
    (out / "summary.txt").write_text(table + "\n")
    log(table)
    log(f"[bench] wrote {out / 'results.json'}, {out / 'report.md'} and {len(plots)} plots "
        f"in {time.time() - run.t_start:.0f} s")


def _ints(s: str) -> list[int]:
    out = []
    for x in s.split(","):
        x = x.strip().lower()
        if not x:
            continue
        mult = 1
        if x.endswith("k"):
            x, mult = x[:-1], 1024
        out.append(int(float(x) * mult))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny config and short lists: a CPU smoke run in seconds")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--out", default="bench_out", help="output folder (results.json, report.md, *.png)")
    p.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma list from {ALL_MODELS}")
    p.add_argument("--contexts", type=_ints, help="e.g. 1k,4k,128k (default 1K ... 256K; tiny: 32,64,128)")
    p.add_argument("--prefill-contexts", type=_ints, help="contexts whose prefill is run and timed (default all)")
    p.add_argument("--attn-prefill-max", type=int, help="all-attention models: random KV beyond this (131072)")
    p.add_argument("--steps", type=int, help="timed decode steps per point (default 32)")
    p.add_argument("--warmup", type=int, help="untimed decode steps first (default 4)")
    p.add_argument("--batch-sizes", type=_ints, help="batch sizes timed as listed before the largest-batch search, "
                   "whose doubling 1,2,4,... gives the throughput curve anyway (default: none)")
    p.add_argument("--batch-contexts", "--batch-context", dest="batch_contexts", type=_ints,
                   help="contexts of the batch sweep (default 8k,128k; tiny: 64)")
    p.add_argument("--batch-models", default="linear,hybrid,teacher", help="empty: no batch sweep")
    p.add_argument("--no-batch-search", action="store_true",
                   help="time only --batch-sizes, no largest-batch search")
    p.add_argument("--batch-max", type=int, help="cap of the largest-batch search (default 4096; tiny: 256)")
    p.add_argument("--batch-steps", type=int, help="timed decode steps per batch probe (default 8; tiny: 3)")
    p.add_argument("--batch-memory-limit-gb", type=float,
                   help="memory limit of the largest-batch search (default: the CUDA card's memory; on a CPU the "
                        "search runs only with this limit, checked against the bytes held; tiny CPU: 0.004)")
    p.add_argument("--batch-triton-max", type=int, default=64,
                   help="batches above this decode with the torch step (cuBLAS GEMMs) instead of the Triton one")
    p.add_argument("--table2-vision", default="real", choices=TABLE2_VISION,
                   help="Table 2 prompt: real = synthetic image -> image pipeline -> vision front (default); "
                        "ids = random text ids (the old protocol); both")
    p.add_argument("--table2-image", help="WIDTHxHEIGHT of the synthetic image (default 896x448: 3 tiles, 768 "
                                          "visual tokens; tiny: 224x112)")
    p.add_argument("--table2-max-tiles", type=int, default=6, help="dynamic tiling's tile limit (6)")
    p.add_argument("--table2-repeats", type=int, default=3, help="timed repeats of each TTFT stage (median)")
    p.add_argument("--table2-visual", type=int, help="ids variant: visual token ids in the prompt (768)")
    p.add_argument("--table2-prompt", type=int, help="ids variant: text token ids in the prompt (32)")
    p.add_argument("--table2-out", type=int, help="generated tokens (256); 0 skips Table 2")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--prefill-chunk", type=int, help="prefill chunk in tokens (8192)")
    p.add_argument("--placement", default="every:4", help="hybrid attention placement (every:4)")
    p.add_argument("--compare-torch-contexts", type=_ints,
                   help="contexts where the plain-PyTorch step (SDPA attention) is also timed (default: first, 32K)")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting new points after this many seconds")


def options_from_args(args) -> BenchOptions:
    return BenchOptions(
        device=args.device, dtype=args.dtype, tiny=args.tiny, out=args.out,
        models=[m.strip() for m in args.models.split(",") if m.strip()], contexts=args.contexts,
        prefill_contexts=args.prefill_contexts, attn_prefill_max=args.attn_prefill_max, steps=args.steps,
        warmup=args.warmup, batch_sizes=args.batch_sizes, batch_contexts=args.batch_contexts,
        batch_models=[m.strip() for m in args.batch_models.split(",") if m.strip()], batch_max=args.batch_max,
        batch_search=not args.no_batch_search,
        batch_steps=args.batch_steps, batch_memory_limit_gb=args.batch_memory_limit_gb,
        batch_triton_max=args.batch_triton_max,
        table2_vision=args.table2_vision, table2_image=args.table2_image, table2_max_tiles=args.table2_max_tiles,
        table2_repeats=args.table2_repeats, table2_visual=args.table2_visual, table2_prompt=args.table2_prompt,
        table2_out=args.table2_out,
        kernels=args.kernels, cuda_graph=False if args.no_cuda_graph else None, prefill_chunk=args.prefill_chunk,
        placement=args.placement, compare_torch_contexts=args.compare_torch_contexts, budget_s=args.budget_s,
        command="mmmamba bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmmamba.bench.run", description=__doc__)
    add_arguments(p)
    run_bench(options_from_args(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
