"""Markdown report, goal check and PNG plots (matplotlib Agg) from a `mmmamba bench` results dict."""

from __future__ import annotations

from pathlib import Path

LABELS = {
    "teacher": "teacher (ours: static KV, CUDA graph)",
    "teacher_hf": "teacher (transformers default)",
    "linear": "mmMamba-linear (ours)",
    "hybrid": "mmMamba-hybrid (ours)",
    "mamba_ssm": "mamba_ssm 2.x (Mamba-2 + MLP)",
}
ORDER = ["teacher_hf", "teacher", "hybrid", "linear", "mamba_ssm"]
COLORS = {"teacher_hf": "tab:red", "teacher": "tab:orange", "hybrid": "tab:purple", "linear": "tab:blue",
          "mamba_ssm": "tab:gray"}

# PAPER (RTX 4090) values, METHOD.md §6.2-6.3, for orientation only (different GPU)
PAPER_FIG1_103K = {"teacher": (142.65, 21.69), "linear": (6.94, 5.22), "hybrid": (10.54, 8.64)}
PAPER_TABLE2 = {"teacher": (33.03, 7.75), "linear": (132.43, 1.93), "hybrid": (134.77, 1.90)}


def _model_grid(L: list, res: dict, rows: list, key: str, title: str, fmt_key, fmt_cell, gpu: bool = True) -> None:
    """Markdown table: one row per value of `key`, one column per model that has rows; "–" where missing,
    the status word where a point did not run."""
    models = [m for m in _models(res) if any(r["model"] == m for r in rows)]
    L.append(f"| {title} | " + " | ".join(_label(m, gpu) for m in models) + " |")
    L.append("|---|" + "---|" * len(models))
    for v in sorted({r[key] for r in rows}):
        cells = []
        for m in models:
            r = next((x for x in rows if x["model"] == m and x[key] == v), None)
            cells.append("–" if r is None else fmt_cell(r) if _ok(r) else r["status"].split(":")[0])
        L.append(f"| {fmt_key(v)} | " + " | ".join(cells) + " |")


def _label(name: str, gpu: bool = True) -> str:
    label = LABELS.get(name, name)
    return label if gpu else label.replace(", CUDA graph", "")


def _ctx(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _models(res) -> list[str]:
    names = list(res.get("models", {}))
    return [m for m in ORDER if m in names] + [m for m in names if m not in ORDER]


def _ok(r) -> bool:
    return r.get("status", "ok") == "ok"


def _g(x) -> str:
    return "–" if x is None else f"{x:.3g}"


def _fmt(x, nd=2, unit=""):
    if x is None:
        return "–"
    return f"{x:.{nd}f}{unit}"


def check_goals(res: dict) -> list[dict]:
    """Issue-4 goals, each with target, measured value and met (True / False / None = not measured)."""
    dec = [r for r in res.get("decode", []) if r.get("batch", 1) == 1]
    pre = res.get("prefill", [])
    big = 131072 if not res["meta"].get("tiny") else max([r["context"] for r in dec] or [0])
    goals = []

    def ratios(model):
        return [r["ratio"] for r in dec if r["model"] == model and _ok(r) and r.get("ratio")]

    for model, name in (("linear", "linear decode <= 1.3x its HBM floor at every context"),
                        ("hybrid", "hybrid decode <= 1.3x its own HBM floor at every context")):
        rs = ratios(model)
        n_fail = sum(1 for r in dec if r["model"] == model and not _ok(r))
        goals.append({"goal": name, "target": "<= 1.30x", "measured": f"max {max(rs):.2f}x" if rs else None,
                      "met": (max(rs) <= 1.3 and n_fail == 0) if rs else None})
    p = [r for r in pre if r["model"] == "linear" and r["context"] == big and _ok(r)]
    goals.append({"goal": f"linear prefill of {_ctx(big)} tokens", "target": "<= 1.1 s",
                  "measured": f"{p[0]['seconds']:.2f} s" if p else None,
                  "met": (p[0]["seconds"] <= 1.1) if p else None})
    mem = [r.get("peak_gb") for r in pre + dec if r["model"] == "linear" and r["context"] == big and _ok(r)]
    mem = [m for m in mem if m is not None]
    goals.append({"goal": f"linear peak memory at {_ctx(big)}, prefill included", "target": "<= 6 GB",
                  "measured": f"{max(mem):.2f} GB" if mem else None, "met": (max(mem) <= 6.0) if mem else None})
    lin = {r["context"]: r["ms_median"] for r in dec if r["model"] == "linear" and _ok(r)}
    ms = {r["context"]: r["ms_median"] for r in dec if r["model"] == "mamba_ssm" and _ok(r)}
    common = sorted(set(lin) & set(ms))
    goals.append({"goal": "linear decode faster than mamba_ssm (same run, same config)", "target": "ours < mamba_ssm",
                  "measured": (f"{max(lin[c] for c in common):.2f} vs {min(ms[c] for c in common):.2f} ms "
                               "(our worst vs its best)") if common else None,
                  "met": all(lin[c] < ms[c] for c in common) if common else None})
    goals.append({"goal": "mamba_ssm run side by side in the same process", "target": "run when importable",
                  "measured": "yes" if "mamba_ssm" in res.get("models", {}) else
                  f"no ({res['meta'].get('mamba_ssm_note', 'not importable')})",
                  "met": True if "mamba_ssm" in res.get("models", {}) else None})
    return goals


def on_gpu(res: dict) -> bool:
    """Whether the run was on a GPU: only then do HBM floors, GPU memory, CUDA graphs and the goals apply."""
    return str(res["meta"].get("device", "")).startswith("cuda")


def format_params(n: int | None) -> str:
    """2.53e9 -> "2.530 B", 1.4e5 -> "140.3 K": a tiny model is not "0.000 B"."""
    n = n or 0
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3f} {unit}" if unit == "B" else f"{n / div:.1f} {unit}"
    return str(n)


def write_markdown(res: dict, path: Path, plots: list[str]) -> str:
    """report.md: run facts, models, (GPU only) goals, latency, (GPU only) memory, prefill, Table 2, batch sweep,
    kernel comparison, plots and method. A CPU run says so and leaves out what only a GPU run measures."""
    gpu = on_gpu(res)
    sections = [_md_header(res["meta"], gpu), _md_models(res, gpu), _md_goals(res) if gpu else [],
                _md_latency(res, gpu), _md_memory(res) if gpu else [], _md_prefill(res), _md_table2(res),
                _md_batch(res, gpu), _md_kernel_compare(res), _md_plots(plots), _md_method(res["meta"], gpu)]
    text = "\n".join(line for sec in sections for line in sec) + "\n"
    path.write_text(text)
    return text


def _decode1(res: dict) -> list[dict]:
    return [r for r in res.get("decode", []) if r.get("batch", 1) == 1]


def _md_header(meta: dict, gpu: bool) -> list[str]:
    name = meta.get("device_name", meta["device"])
    L = [f"# mmmamba bench: {name}" + ("" if gpu else " (CPU run)"), "",
         f"Generated by `{meta.get('command', 'mmmamba bench')}` on {meta.get('date', '?')}.", ""]
    if not gpu:
        L += ["A CPU run: it times decode and prefill only. Bandwidth floors, peak memory and the speed goals are "
              "measured by `mmmamba bench --device cuda`.", ""]
    L += ["| item | value |", "|---|---|"]
    keys = ("device_name", "torch", "cuda", "triton", "transformers", "fla", "mamba_ssm", "dtype", "dims",
            "copy_bandwidth_GBps", "elapsed_s")
    for k in keys:
        if k not in meta or (not gpu and k in ("cuda", "copy_bandwidth_GBps")):
            continue
        v = f"{meta[k]:.0f} GB/s (device-to-device copy, read + write)" if k == "copy_bandwidth_GBps" else meta[k]
        L.append(f"| {k} | {v} |")
    return L + [""]


def _md_models(res: dict, gpu: bool) -> list[str]:
    head = "| model | parameters | attention layers | decode kernels |"
    head += " CUDA graph | Triton self-check | note |" if gpu else " note |"
    L = ["## Models", "", head, "|---|" + "---|" * (head.count("|") - 2)]
    for name in _models(res):
        m = res["models"][name]
        row = (f"| {_label(name, gpu)} | {format_params(m.get('params'))} | {len(m.get('attention_layers', []))} | "
               f"{m.get('kernels', '')} |")
        if gpu:
            sc = m.get("self_check_rel_err")
            row += f" {m.get('cuda_graph', '')} | {'–' if sc is None else f'{sc:.1e}'} |"
        L.append(row + f" {m.get('fallback') or m.get('status', '')} |")
    return L + [""]


def _md_goals(res: dict) -> list[str]:
    L = ["## Goals (issue 4)", "", "| goal | target | measured | met |", "|---|---|---|---|"]
    for g in check_goals(res):
        met = {True: "**yes**", False: "**no**", None: "not measured"}[g["met"]]
        L.append(f"| {g['goal']} | {g['target']} | {g['measured'] or '–'} | {met} |")
    return L + [""]


def _md_latency(res: dict, gpu: bool) -> list[str]:
    dec1 = _decode1(res)
    models = [m for m in _models(res) if any(r["model"] == m for r in dec1)]
    if not gpu:
        L = ["## Next-token latency, batch 1 (median ms)", ""]
        _model_grid(L, res, dec1, "context", "context", _ctx, lambda r: f"{r['ms_median']:.2f}", gpu)
        return L + [""]
    L = ["## Next-token latency, batch 1 (median ms; x = over the HBM floor)", "",
         "Floor = bytes one decode step must read (weights except the embedding table, plus KV up to the "
         "context or the recurrent state) / the measured copy bandwidth.", ""]
    _model_grid(L, res, dec1, "context", "context", _ctx, lambda r: f"{r['ms_median']:.2f} ({r['ratio']:.2f}x)"
                if r.get("ratio") else f"{r['ms_median']:.2f}", gpu)
    floors = [f"{_label(m, gpu)}: " + ", ".join(f"{_ctx(r['context'])} {r['floor_ms']:.2f}" for r in dec1
                                                if r["model"] == m and r.get("floor_ms") is not None)
              for m in models]
    return L + ["", "Floors (ms): " + "; ".join(floors), ""]


def _md_memory(res: dict) -> list[str]:
    dec1, pre = _decode1(res), res.get("prefill", [])
    models = [m for m in _models(res) if any(r["model"] == m for r in dec1)]
    L = ["## Peak GPU memory (GB, PyTorch allocated: weights + cache + activations)", "",
         "Each cell: prefill peak / decode peak at that context.", "",
         "| context | " + " | ".join(_label(m) for m in models) + " |", "|---|" + "---|" * len(models)]

    def cell(r):
        return "–" if r is None else (_fmt(r.get("peak_gb")) if _ok(r) else r["status"].split(":")[0])

    for c in sorted({r["context"] for r in dec1}):
        cells = [f"{cell(_find(pre, m, c))} / {cell(_find(dec1, m, c))}" for m in models]
        L.append(f"| {_ctx(c)} | " + " | ".join(cells) + " |")
    return L + [""]


def _find(rows: list[dict], model: str, context: int) -> dict | None:
    return next((x for x in rows if x["model"] == model and x["context"] == context), None)


def _md_prefill(res: dict) -> list[str]:
    L = ["## Prefill time (s; tokens/s)", ""]
    _model_grid(L, res, res.get("prefill", []), "context", "context", _ctx,
                lambda p: f"{p['seconds']:.3f} ({p['tokens_per_s'] / 1e3:.0f}K/s)", on_gpu(res))
    return L + [""]


def _md_table2(res: dict) -> list[str]:
    t2 = res.get("table2", [])
    if not t2:
        return []
    gpu = on_gpu(res)
    out = t2[0].get("out_tokens", "")
    L = [f"## Table 2 (prompt of an image + text, {out} greedy tokens)", "",
         "vision: real = a synthetic RGB image through the image pipeline (dynamic tiles, normalisation, chat "
         "prompt with `<IMG_CONTEXT>` slots) and the model's vision front (patch embedding + pixel shuffle + MLP); "
         "ids = random text ids in place of the visual tokens. TTFT = preprocessing + vision front + prefill + "
         "first token, end to end; the three stages are also timed on their own. tok/s = out / total (the "
         "paper's speed, TTFT included).", "",
         "| model | vision | visual + text tokens | preprocess (s) | vision front (s) | prefill (s) | TTFT (s) | "
         "decode tok/s | total (s) | tok/s | " + ("peak GB | " if gpu else "") + "paper tok/s (RTX 4090) |",
         "|---|" + "---|" * (11 if gpu else 10)]
    for r in t2:
        L.append(_table2_row(r, gpu))
    notes = sorted({f"{_label(r['model'], gpu)}: {r['note']}" for r in t2 if r.get("note")})
    return L + [""] + [f"* {n}" for n in notes] + ([""] if notes else [])


def _table2_row(r: dict, gpu: bool) -> str:
    head = f"| {_label(r['model'], gpu)} | {r.get('vision', 'ids')} |"
    if not _ok(r):
        return head + f" {r['status']} |" + " – |" * (9 if gpu else 8)
    paper = PAPER_TABLE2.get(r["model"] if r["model"] != "teacher_hf" else "teacher")
    cells = [f"{r.get('visual_tokens', '–')} + {r.get('text_tokens', '–')}", _fmt(r.get("preprocess_s"), 3),
             _fmt(r.get("vision_s"), 4), _fmt(r.get("prefill_s"), 3), _fmt(r.get("ttft_s"), 3),
             _fmt(r.get("decode_tokens_per_s"), 1), _fmt(r["total_s"], 3), _fmt(r["tokens_per_s"], 1)]
    if gpu:
        cells.append(_fmt(r.get("peak_gb")))
    cells.append(str(paper[0]) if paper else "–")
    return head + " " + " | ".join(cells) + " |"


def _md_batch(res: dict, gpu: bool) -> list[str]:
    bs = res.get("batch", [])
    if not bs:
        return []
    L = []
    for ctx in sorted({r["context"] for r in bs}):
        rows = [r for r in bs if r["context"] == ctx]
        title = f"{_ctx(ctx)} context (tokens/s; ms/step{'; x floor' if gpu else ''})"

        def cell(r):
            return f"{r['tokens_per_s']:.0f} ({r['ms_median']:.2f} ms" + (f", {r['ratio']:.2f}x)" if gpu else ")")

        L += [f"## Decode throughput vs batch size at {title}", ""]
        _model_grid(L, res, rows, "batch", "batch", str, cell, gpu)
        L.append("")
    return L + _md_batch_max(res, gpu)


def _md_batch_max(res: dict, gpu: bool) -> list[str]:
    bm = res.get("batch_max", [])
    if not bm:
        return []
    note = ("Search: batches double from 1 until one runs out of memory, then bisection (~: to within 1/16). "
            "Estimate: weights + batch x (KV of the reserved slots + recurrent state + an fp32 logits row) <= the "
            "limit.")
    if gpu:
        top = res["meta"].get("options", {}).get("batch_triton_max")
        note += (" The engine's warm-up snapshot of the recurrent state (to undo the warm-up step) lives in host "
                 "memory, so it does not count against the card; peak = "
                 f"`max_memory_allocated` while decoding at that batch. Batches above {top} decode with the torch "
                 "step (cuBLAS GEMMs).")
    else:
        note += " CPU run: the limit is checked against the bytes the runner holds once its cache is reserved."
    head = "| model | context | largest batch | first OOM | tok/s there | " + ("peak GB there | " if gpu else "")
    head += "estimate | weights GB | GB per sequence | limit GB | status |"
    L = ["## Largest batch that fits", "", note, "", head, "|---|" + "---|" * (head.count("|") - 2)]
    return L + [_batch_max_line(res, r, gpu) for r in bm] + [""]


def _batch_max_line(res: dict, r: dict, gpu: bool) -> str:
    e = r.get("estimate", {})
    best = next((x for x in res.get("batch", []) if x["model"] == r["model"] and x["context"] == r["context"]
                 and x["batch"] == r.get("max_batch") and _ok(x)), {})
    size = r.get("max_batch", "–")
    if r.get("capped"):
        size = f">= {size} (cap)"
    elif r.get("max_batch") and not r.get("exact"):
        size = f"~{size}"
    cells = [_label(r["model"], gpu), _ctx(r["context"]), size, r.get("first_oom") or "–",
             _fmt(best.get("tokens_per_s"), 0)] + ([_fmt(best.get("peak_gb"))] if gpu else [])
    cells += [e.get("analytic_max_batch", "–"), _fmt(e.get("weights_gb"), 3), _g(e.get("per_seq_gb")),
              _fmt(e.get("limit_gb"), 3), r["status"]]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _md_kernel_compare(res: dict) -> list[str]:
    kc = res.get("kernel_compare", [])
    if not kc:
        return []
    L = ["## Decode step: fused Triton kernels vs the same step in plain PyTorch ops (both CUDA-graphed)", "",
         "| model | context | kernels | ms | x floor |", "|---|---|---|---|---|"]
    for r in kc:
        L.append(f"| {_label(r['model'])} | {_ctx(r['context'])} | {r.get('kernels', '')} | "
                 f"{_fmt(r.get('ms_median'))} | {_fmt(r.get('ratio'))} |" if _ok(r) else
                 f"| {_label(r['model'])} | {_ctx(r['context'])} | torch | {r['status']} | – |")
    return L + [""]


def _md_plots(plots: list[str]) -> list[str]:
    if not plots:
        return []
    return ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]


def _md_method(meta: dict, gpu: bool) -> list[str]:
    L = ["## Method", "",
         "* Random weights at the stated dims (speed and memory do not depend on the values), "
         f"{meta.get('dtype')}. Batch 1 unless stated."]
    if gpu:
        L.append("* Ours: prefill in chunks of `prefill_chunk` tokens through all layers (states carried, keys/values "
                 "appended to a static cache); decode = one CUDA-graph replay per token, greedy token fed back on the "
                 "device; latency = median of per-step CUDA-event times over the timed steps after warm-up steps.")
    else:
        L.append("* Ours: prefill in chunks of `prefill_chunk` tokens through all layers (states carried, keys/values "
                 "appended to a static cache); decode = one eager step of plain PyTorch ops per token; latency = "
                 "median of per-step wall times over the timed steps after warm-up steps.")
    L += ["* transformers: `LlamaForCausalLM` (SDPA, default `DynamicCache`), one forward per token as "
          "`generate` runs it; Table 2 uses `generate` itself, fed by our vision front through `inputs_embeds` "
          "(transformers has no HoVLE class).",
          "* Where the prefill column says '–' (quadratic models past `attn_prefill_max`, and the batch sweep), "
          "the cache was filled with random values of the right shape instead of running the prefill; "
          "decode cost depends only on the cache size."]
    if gpu:
        L.append("* Memory: `torch.cuda.max_memory_allocated` (weights included); the paper's numbers are "
                 "whole-process GPU memory on an RTX 4090.")
    if meta.get("tiny"):
        L.append("* **Tiny CPU smoke configuration**: numbers are not meaningful, the run only checks the pipeline.")
    return L


def _ctx_ticks(ax, recs) -> None:
    ax.set_xscale("log", base=2)
    cs = sorted({r["context"] for r in recs})
    if cs:
        ax.set_xticks(cs)
        ax.set_xticklabels([_ctx(c) for c in cs], rotation=45, fontsize=8)
        ax.minorticks_off()


def write_plots(res: dict, out: Path) -> list[str]:
    """PNG plots into `out`: latency and memory vs context, (GPU only) latency over the HBM floor, batch
    throughput. Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = on_gpu(res)
    plots = [("figure1_latency_memory.png", _plot_latency_memory)]
    if gpu:
        plots.append(("floor_ratio.png", _plot_floor_ratio))
    if res.get("batch"):
        plots.append(("batch_throughput.png", _plot_batch))
    for name, draw in plots:
        fig = draw(plt, res, gpu)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    return [name for name, _ in plots]


def _finish_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_latency_memory(plt, res: dict, gpu: bool):
    dec1, pre = _decode1(res), res.get("prefill", [])
    models = [m for m in _models(res) if any(r["model"] == m for r in dec1)]
    fig, (ax, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in models:
        pts = sorted((r["context"], r["ms_median"]) for r in dec1 if r["model"] == m and _ok(r))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=_label(m, gpu), color=COLORS.get(m))
        for c in sorted(r["context"] for r in dec1 if r["model"] == m and r.get("status") == "OOM"):
            ax.annotate("OOM", (c, ax.get_ylim()[1] if pts else 1), color=COLORS.get(m), fontsize=8)
        fl = sorted((r["context"], r["floor_ms"]) for r in dec1 if r["model"] == m and r.get("floor_ms"))
        if gpu and fl and m in ("linear", "hybrid", "teacher"):
            ax.plot([p[0] for p in fl], [p[1] for p in fl], ":", color=COLORS.get(m), alpha=0.6)
    _ctx_ticks(ax, dec1)
    ax.set_yscale("log")
    _finish_axes(ax, "context length (tokens)", "next-token latency (ms)",
                 "(c) next-token latency" + (" (dotted: HBM floor)" if gpu else ", CPU"))
    ylabel = "peak memory, prefill + decode (GB)"
    for m in models:
        pts = []
        for c in sorted({r["context"] for r in dec1 if r["model"] == m}):
            vals = [r.get("peak_gb") for r in pre + dec1 if r["model"] == m and r["context"] == c and _ok(r)]
            vals = [v for v in vals if v is not None]
            if vals:
                pts.append((c, max(vals)))
        if not pts:  # CPU: no allocator statistics; plot weights + cache bytes instead
            pts = sorted((r["context"], r.get("model_gb", 0) + r.get("state_gb", 0)) for r in dec1
                         if r["model"] == m and _ok(r))
            ylabel = "weights + cache (GB, computed)"
        if pts:
            ax_mem.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=_label(m, gpu), color=COLORS.get(m))
    _ctx_ticks(ax_mem, dec1)
    _finish_axes(ax_mem, "context length (tokens)", ylabel,
                 "(d) GPU memory" if gpu else "(d) weights + cache, computed")
    return fig


def _plot_floor_ratio(plt, res: dict, gpu: bool):
    dec1 = _decode1(res)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in [m for m in _models(res) if any(r["model"] == m for r in dec1)]:
        pts = sorted((r["context"], r["ratio"]) for r in dec1 if r["model"] == m and _ok(r) and r.get("ratio"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=_label(m), color=COLORS.get(m))
    ax.axhline(1.3, color="k", ls="--", lw=1, label="goal 1.3x")
    ax.axhline(1.0, color="k", ls=":", lw=1)
    _ctx_ticks(ax, dec1)
    ax.set_yscale("log")
    _finish_axes(ax, "context length (tokens)", "latency / HBM floor", "decode latency over the HBM floor (batch 1)")
    return fig


def _plot_batch(plt, res: dict, gpu: bool):
    """tokens/s vs batch, one panel per context, one line per model; a star at the largest batch that fits."""
    bs = res["batch"]
    ctxs = sorted({r["context"] for r in bs})
    fig, axes = plt.subplots(1, len(ctxs), figsize=(6 * len(ctxs), 4.5), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        rows = [r for r in bs if r["context"] == ctx]
        for m in [m for m in _models(res) if any(r["model"] == m for r in rows)]:
            pts = sorted((r["batch"], r["tokens_per_s"]) for r in rows if r["model"] == m and _ok(r))
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=_label(m, gpu), color=COLORS.get(m), ms=3)
            top = _batch_max_row(res, m, ctx)
            best = [p for p in pts if top and p[0] == top.get("max_batch")]
            if best:
                ax.plot(*best[0], "*", ms=14, color=COLORS.get(m), markeredgecolor="k")
                ax.annotate(f"max {best[0][0]}", best[0], textcoords="offset points", xytext=(4, -12), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _finish_axes(ax, "batch size", "decode throughput (tokens/s)",
                     f"decode throughput at {_ctx(ctx)} context (star: largest batch that fits)")
    return fig


def _batch_max_row(res: dict, model: str, ctx: int) -> dict | None:
    return next((r for r in res.get("batch_max", []) if r["model"] == model and r["context"] == ctx), None)


def _summary_table2(res: dict) -> list[str]:
    lines = []
    for r in res.get("table2", []):
        if _ok(r):
            ttft = f"TTFT {r['ttft_s']:.3f} s, " if r.get("ttft_s") is not None else ""
            lines.append(f"table2 {r['model']:<10} vision {r.get('vision', 'ids'):<4} {r['tokens_per_s']:.1f} tok/s  "
                         f"{ttft}total {r['total_s']:.3f} s (prefill {r['prefill_s']:.3f} s)")
    return lines


def _summary_batch(res: dict) -> list[str]:
    lines, bs = [], res.get("batch", [])
    for ctx in sorted({r["context"] for r in bs}):
        for m in _models(res):
            pts = sorted((r["batch"], r) for r in bs if r["model"] == m and r["context"] == ctx)
            if not pts:
                continue
            cells = [f"{b}:{r['tokens_per_s']:.0f}" if _ok(r) else f"{b}:{r['status'][:8]}" for b, r in pts]
            top = _batch_max_row(res, m, ctx) or {}
            lines.append(f"batch@{_ctx(ctx)} tok/s {m:<10} " + " ".join(cells) +
                         f"  -> largest {top.get('max_batch', '-')} [{top.get('status', '-')}]")
    return lines


def summary_table(res: dict) -> str:
    """Compact text table for the end of a run (batch 1 decode ms, prefill s; on a GPU also x floor and peak GB)."""
    gpu = on_gpu(res)
    pre = {(r["model"], r["context"]): r for r in res.get("prefill", [])}
    head = f"{'model':<12} {'ctx':>6} {'decode ms':>10}"
    lines = [head + (f" {'x floor':>8} {'prefill s':>10} {'peak GB':>8}" if gpu else f" {'prefill s':>10}")]
    for m in _models(res):
        for r in sorted((x for x in _decode1(res) if x["model"] == m), key=lambda x: x["context"]):
            p = pre.get((m, r["context"]))
            ok = _ok(r)
            dms = f"{r['ms_median']:.3f}" if ok else r["status"][:10]
            pre_s = f"{p['seconds']:.3f}" if p and _ok(p) else (p["status"][:10] if p else "-")
            if not gpu:
                lines.append(f"{m:<12} {_ctx(r['context']):>6} {dms:>10} {pre_s:>10}")
                continue
            peaks = [v for v in ((p or {}).get("peak_gb"), r.get("peak_gb")) if v is not None]
            ratio = f"{r['ratio']:.2f}" if ok and r.get("ratio") else "-"
            peak = f"{max(peaks):.2f}" if peaks else "-"
            lines.append(f"{m:<12} {_ctx(r['context']):>6} {dms:>10} {ratio:>8} {pre_s:>10} {peak:>8}")
    for r in res.get("kernel_compare", []):
        if _ok(r):
            lines.append(f"plain-PyTorch-ops step {r['model']:<10} {_ctx(r['context']):>6} {r['ms_median']:.3f} ms "
                         f"({r.get('ratio', 0):.2f}x floor)")
    lines += _summary_table2(res)
    lines += _summary_batch(res)
    if gpu:
        lines += [f"goal: {g['goal']}: {g['measured']} -> {g['met']}" for g in check_goals(res)]
    else:
        lines.append("CPU run: decode and prefill times only (floors, peak memory and goals: --device cuda)")
    return "\n".join(lines)
