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



def _model_grid(L: list, res: dict, rows: list, key: str, title: str, fmt_key, fmt_cell) -> None:
    """Markdown table: one row per value of `key`, one column per model that has rows; "–" where missing,
    the status word where a point did not run."""
    models = [m for m in _models(res) if any(r["model"] == m for r in rows)]
    L.append(f"| {title} | " + " | ".join(_label(m) for m in models) + " |")
    L.append("|---|" + "---|" * len(models))
    for v in sorted({r[key] for r in rows}):
        cells = []
        for m in models:
            r = next((x for x in rows if x["model"] == m and x[key] == v), None)
            cells.append("–" if r is None else fmt_cell(r) if _ok(r) else r["status"].split(":")[0])
        L.append(f"| {fmt_key(v)} | " + " | ".join(cells) + " |")

def _label(name: str) -> str:
    return LABELS.get(name, name)


def _ctx(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _models(res) -> list[str]:
    names = list(res.get("models", {}))
    return [m for m in ORDER if m in names] + [m for m in names if m not in ORDER]


def _ok(r) -> bool:
    return r.get("status", "ok") == "ok"


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


def write_markdown(res: dict, path: Path, plots: list[str]) -> str:
    meta = res["meta"]
    L = []
    L.append(f"# mmmamba bench: {meta.get('device_name', meta['device'])}")
    L.append("")
    L.append(f"Generated by `{meta.get('command', 'mmmamba bench')}` on {meta.get('date', '?')}.")
    L.append("")
    L.append("| item | value |")
    L.append("|---|---|")
    for k in ("device_name", "torch", "cuda", "triton", "transformers", "fla", "mamba_ssm", "dtype", "dims",
              "copy_bandwidth_GBps", "elapsed_s"):
        if k in meta:
            v = meta[k]
            if k == "copy_bandwidth_GBps":
                v = f"{v:.0f} GB/s (device-to-device copy, read + write)"
            L.append(f"| {k} | {v} |")
    L.append("")
    L.append("## Models")
    L.append("")
    L.append("| model | parameters | attention layers | decode kernels | CUDA graph | Triton self-check | note |")
    L.append("|---|---|---|---|---|---|---|")
    for name in _models(res):
        m = res["models"][name]
        nat = len(m.get("attention_layers", []))
        sc = m.get("self_check_rel_err")
        L.append(f"| {_label(name)} | {m.get('params', 0) / 1e9:.3f} B | {nat} | {m.get('kernels', '')} | "
                 f"{m.get('cuda_graph', '')} | {'–' if sc is None else f'{sc:.1e}'} | "
                 f"{m.get('fallback') or m.get('status', '')} |")
    L.append("")
    L.append("## Goals (issue 4)")
    L.append("")
    L.append("| goal | target | measured | met |")
    L.append("|---|---|---|---|")
    for g in check_goals(res):
        met = {True: "**yes**", False: "**no**", None: "not measured"}[g["met"]]
        L.append(f"| {g['goal']} | {g['target']} | {g['measured'] or '–'} | {met} |")
    L.append("")

    dec1 = [r for r in res.get("decode", []) if r.get("batch", 1) == 1]
    ctxs = sorted({r["context"] for r in dec1})
    models = [m for m in _models(res) if any(r["model"] == m for r in dec1)]
    L.append("## Next-token latency, batch 1 (median ms; x = over the HBM floor)")
    L.append("")
    L.append("Floor = bytes one decode step must read (weights except the embedding table, plus KV up to the "
             "context or the recurrent state) / the measured copy bandwidth.")
    L.append("")
    L.append("| context | " + " | ".join(_label(m) for m in models) + " |")
    L.append("|---|" + "---|" * len(models))
    for c in ctxs:
        cells = []
        for m in models:
            r = next((x for x in dec1 if x["model"] == m and x["context"] == c), None)
            if r is None:
                cells.append("–")
            elif not _ok(r):
                cells.append(r["status"].split(":")[0])
            else:
                cells.append(f"{r['ms_median']:.2f} ({r['ratio']:.2f}x)" if r.get("ratio") else
                             f"{r['ms_median']:.2f}")
        L.append(f"| {_ctx(c)} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("Floors (ms): " + "; ".join(
        f"{_label(m)}: " + ", ".join(f"{_ctx(r['context'])} {r['floor_ms']:.2f}" for r in dec1
                                     if r["model"] == m and r.get("floor_ms") is not None)
        for m in models))
    L.append("")

    pre = res.get("prefill", [])
    L.append("## Peak GPU memory (GB, PyTorch allocated: weights + cache + activations)")
    L.append("")
    L.append("Each cell: prefill peak / decode peak at that context.")
    L.append("")
    L.append("| context | " + " | ".join(_label(m) for m in models) + " |")
    L.append("|---|" + "---|" * len(models))
    for c in ctxs:
        cells = []
        for m in models:
            p = next((x for x in pre if x["model"] == m and x["context"] == c), None)
            d = next((x for x in dec1 if x["model"] == m and x["context"] == c), None)
            ps = "–" if p is None else (_fmt(p.get("peak_gb")) if _ok(p) else p["status"].split(":")[0])
            ds = "–" if d is None else (_fmt(d.get("peak_gb")) if _ok(d) else d["status"].split(":")[0])
            cells.append(f"{ps} / {ds}")
        L.append(f"| {_ctx(c)} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("## Prefill time (s; tokens/s)")
    L.append("")
    _model_grid(L, res, pre, "context", "context", _ctx,
                lambda p: f"{p['seconds']:.3f} ({p['tokens_per_s'] / 1e3:.0f}K/s)")
    L.append("")

    t2 = res.get("table2", [])
    if t2:
        L.append("## Table 2 protocol (prompt of visual + text tokens, 256 greedy tokens, tok/s includes prefill)")
        L.append("")
        L.append("| model | prompt | out | prefill (s) | total (s) | tok/s | paper tok/s (RTX 4090) |")
        L.append("|---|---|---|---|---|---|---|")
        for r in t2:
            paper = PAPER_TABLE2.get(r["model"] if r["model"] != "teacher_hf" else "teacher")
            if not _ok(r):
                L.append(f"| {_label(r['model'])} | – | – | – | – | {r['status']} | – |")
                continue
            L.append(f"| {_label(r['model'])} | {r['prompt_tokens']} | {r['out_tokens']} | {r['prefill_s']:.3f} | "
                     f"{r['total_s']:.3f} | {r['tokens_per_s']:.1f} | {paper[0] if paper else '–'} |")
        L.append("")

    bs = res.get("batch", [])
    if bs:
        bctx = bs[0]["context"]
        L.append(f"## Decode throughput vs batch size at {_ctx(bctx)} context (tokens/s; ms/step; x floor)")
        L.append("")
        _model_grid(L, res, bs, "batch", "batch", str,
                    lambda r: f"{r['tokens_per_s']:.0f} ({r['ms_median']:.2f} ms, {r['ratio']:.2f}x)")
        L.append("")

    kc = res.get("kernel_compare", [])
    if kc:
        L.append("## Decode step: fused Triton kernels vs the same step in plain PyTorch ops (both CUDA-graphed)")
        L.append("")
        L.append("| model | context | kernels | ms | x floor |")
        L.append("|---|---|---|---|---|")
        for r in kc:
            L.append(f"| {_label(r['model'])} | {_ctx(r['context'])} | {r.get('kernels', '')} | "
                     f"{_fmt(r.get('ms_median'))} | {_fmt(r.get('ratio'))} |" if _ok(r) else
                     f"| {_label(r['model'])} | {_ctx(r['context'])} | torch | {r['status']} | – |")
        L.append("")
    if plots:
        L.append("## Plots")
        L.append("")
        for p in plots:
            L.append(f"![{p}]({p})")
        L.append("")
    L.append("## Method")
    L.append("")
    L.append("* Random weights at the stated dims (speed and memory do not depend on the values), "
             f"{meta.get('dtype')}. Batch 1 unless stated.")
    L.append("* Ours: prefill in chunks of `prefill_chunk` tokens through all layers (states carried, keys/values "
             "appended to a static cache); decode = one CUDA-graph replay per token, greedy token fed back on the "
             "device; latency = median of per-step CUDA-event times over the timed steps after warm-up steps.")
    L.append("* transformers: `LlamaForCausalLM` (SDPA, default `DynamicCache`), one forward per token as "
             "`generate` runs it; Table 2 uses `generate` itself.")
    L.append("* Where the prefill column says '–' (quadratic models past `attn_prefill_max`, and the batch sweep), "
             "the cache was filled with random values of the right shape instead of running the prefill; "
             "decode cost depends only on the cache size.")
    L.append("* Memory: `torch.cuda.max_memory_allocated` (weights included); the paper's numbers are whole-process "
             "GPU memory on an RTX 4090.")
    if meta.get("tiny"):
        L.append("* **Tiny CPU smoke configuration**: numbers are not meaningful, the run only checks the pipeline.")
    text = "\n".join(L) + "\n"
    path.write_text(text)
    return text


def _ctx_ticks(ax, recs) -> None:
    ax.set_xscale("log", base=2)
    cs = sorted({r["context"] for r in recs})
    if cs:
        ax.set_xticks(cs)
        ax.set_xticklabels([_ctx(c) for c in cs], rotation=45, fontsize=8)
        ax.minorticks_off()


def write_plots(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    dec1 = [r for r in res.get("decode", []) if r.get("batch", 1) == 1]
    pre = res.get("prefill", [])
    models = [m for m in _models(res) if any(r["model"] == m for r in dec1)]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for m in models:
        pts = sorted((r["context"], r["ms_median"]) for r in dec1 if r["model"] == m and _ok(r))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=_label(m), color=COLORS.get(m))
        oom = sorted(r["context"] for r in dec1 if r["model"] == m and r.get("status") == "OOM")
        for c in oom:
            ax.annotate("OOM", (c, ax.get_ylim()[1] if pts else 1), color=COLORS.get(m), fontsize=8)
        fl = sorted((r["context"], r["floor_ms"]) for r in dec1 if r["model"] == m and r.get("floor_ms"))
        if fl and m in ("linear", "hybrid", "teacher"):
            ax.plot([p[0] for p in fl], [p[1] for p in fl], ":", color=COLORS.get(m), alpha=0.6)
    _ctx_ticks(ax, dec1)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("next-token latency (ms)")
    ax.set_title("(c) next-token latency (dotted: HBM floor)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
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
            ax.set_ylabel("weights + cache (GB, computed)")
        else:
            ax.set_ylabel("peak memory, prefill + decode (GB)")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=_label(m), color=COLORS.get(m))
    _ctx_ticks(ax, dec1)
    ax.set_xlabel("context length (tokens)")
    ax.set_title("(d) GPU memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "figure1_latency_memory.png", dpi=120)
    plt.close(fig)
    files.append("figure1_latency_memory.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in models:
        pts = sorted((r["context"], r["ratio"]) for r in dec1 if r["model"] == m and _ok(r) and r.get("ratio"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=_label(m), color=COLORS.get(m))
    ax.axhline(1.3, color="k", ls="--", lw=1, label="goal 1.3x")
    ax.axhline(1.0, color="k", ls=":", lw=1)
    _ctx_ticks(ax, dec1)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("latency / HBM floor")
    ax.set_title("decode latency over the HBM floor (batch 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "floor_ratio.png", dpi=120)
    plt.close(fig)
    files.append("floor_ratio.png")

    bs = res.get("batch", [])
    if bs:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m in [m for m in _models(res) if any(r["model"] == m for r in bs)]:
            pts = sorted((r["batch"], r["tokens_per_s"]) for r in bs if r["model"] == m and _ok(r))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=_label(m), color=COLORS.get(m))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode throughput (tokens/s)")
        ax.set_title(f"decode throughput at {_ctx(bs[0]['context'])} context")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "batch_throughput.png", dpi=120)
        plt.close(fig)
        files.append("batch_throughput.png")
    return files


def summary_table(res: dict) -> str:
    """Compact text table for the end of a run (batch 1 decode ms and x floor, prefill s, peak GB)."""
    dec1 = [r for r in res.get("decode", []) if r.get("batch", 1) == 1]
    pre = {(r["model"], r["context"]): r for r in res.get("prefill", [])}
    lines = [f"{'model':<12} {'ctx':>6} {'decode ms':>10} {'x floor':>8} {'prefill s':>10} {'peak GB':>8}"]
    for m in _models(res):
        for r in sorted((x for x in dec1 if x["model"] == m), key=lambda x: x["context"]):
            p = pre.get((m, r["context"]))
            ok = _ok(r)
            peaks = [v for v in ((p or {}).get("peak_gb"), r.get("peak_gb")) if v is not None]
            dms = f"{r['ms_median']:.3f}" if ok else r["status"][:10]
            ratio = f"{r['ratio']:.2f}" if ok and r.get("ratio") else "-"
            pre_s = f"{p['seconds']:.3f}" if p and _ok(p) else (p["status"][:10] if p else "-")
            peak = f"{max(peaks):.2f}" if peaks else "-"
            lines.append(f"{m:<12} {_ctx(r['context']):>6} {dms:>10} {ratio:>8} {pre_s:>10} {peak:>8}")
    for r in res.get("kernel_compare", []):
        if _ok(r):
            lines.append(f"plain-PyTorch-ops step {r['model']:<10} {_ctx(r['context']):>6} {r['ms_median']:.3f} ms "
                         f"({r.get('ratio', 0):.2f}x floor)")
    for r in res.get("table2", []):
        if _ok(r):
            lines.append(f"table2 {r['model']:<12} {r['tokens_per_s']:.1f} tok/s  total {r['total_s']:.3f} s "
                         f"(prefill {r['prefill_s']:.3f} s)")
    bs = res.get("batch", [])
    for m in _models(res):
        pts = sorted((r["batch"], r) for r in bs if r["model"] == m)
        if pts:
            cells = [f"{b}:{r['tokens_per_s']:.0f}" if _ok(r) else f"{b}:{r['status'][:8]}" for b, r in pts]
            lines.append(f"batch@{_ctx(pts[0][1]['context'])} tok/s {m:<10} " + " ".join(cells))
    for g in check_goals(res):
        lines.append(f"goal: {g['goal']}: {g['measured']} -> {g['met']}")
    return "\n".join(lines)
