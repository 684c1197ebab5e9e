"""Regenerate docs/results/quality/ (README.md tables + PNG plots) from the JSON files the runs brought back.

    python examples/quality/report.py [--raw docs/results/quality/raw] [--out docs/results/quality]

Nothing is typed in by hand: every number comes from a JSON file in --raw, with the card, date, command, token
budget and wall time recorded there. Missing runs are listed as not run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

TEXT_SETS = ("kjv", "gcide", "pydocs", "wordnet", "pydoc_topics", "teacher_samples")
TEXT_NAMES = {"kjv": "KJV Bible", "gcide": "GCIDE", "pydocs": "Python docs (held-out pages)",
              "wordnet": "WordNet glosses (held-out)", "pydoc_topics": "pydoc topics (held-out)",
              "teacher_samples": "teacher samples (held-out)"}
VLM_SETS = ("easy-vqa", "fashion-mnist", "fashion-mnist-open", "emoji-unseen", "emoji-seen")
TARGETS_TEXT = {"hybrid": 1.15, "linear": 1.4}
TARGETS_VLM = {"hybrid": 0.97, "linear": 0.90}
CHANCE = {"fashion-mnist": 0.10, "emoji-unseen": 0.25, "emoji-seen": 0.25}  # 10-way and 4-way multiple choice


def at_chance(metrics: dict, name: str) -> bool:
    """Within 5 points of guessing: a share of such a teacher's accuracy says nothing."""
    return name in CHANCE and acc(metrics) is not None and acc(metrics) < CHANCE[name] + 0.05


def load(raw: Path, name: str) -> dict | None:
    p = raw / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def student_runs(raw: Path, prefix: str) -> dict[str, dict | None]:
    """The main students (hybrid, linear; None when not run), then every variant `<prefix>_<name>.json`."""
    runs = {n: load(raw, f"{prefix}_{n}") for n in ("hybrid", "linear")}
    for p in sorted(raw.glob(f"{prefix}_*.json")):
        n = p.stem[len(prefix) + 1:]
        if n not in ("teacher", *runs):
            runs[n] = load(raw, p.stem)
    return runs


def text_ratio(r: dict, smollm2: dict) -> float:
    """Geometric mean over the held-out text sets of a VLM run's perplexity over SmolLM2's."""
    logs = [math.log(r["eval"]["text"][s]["perplexity"] / smollm2[s]["perplexity"]) for s in smollm2]
    return math.exp(sum(logs) / len(logs))


def fmt(x, nd=2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "–"
    return f"{x:,.{nd}f}" if isinstance(x, float) else str(x)


def where(r: dict) -> str:
    e = r.get("env", {})
    return (f"{e.get('device', '?')}, {e.get('date', '?')}, commit {e.get('commit', '?')}, torch {e.get('torch')}, "
            f"transformers {e.get('transformers')}; wall {fmt(r.get('seconds'), 0)} s; `{r.get('command', '')}`")


def acc(metrics: dict) -> float | None:
    return metrics.get("accuracy", metrics.get("vqa_accuracy"))


# -------------------------------------------------------------------------------------------------- text
def text_section(raw: Path, out: Path) -> list[str]:
    t, runs = load(raw, "text_teacher"), student_runs(raw, "text")
    lines = ["## 1. Text: SmolLM2-135M-Instruct → mmMamba-hybrid and mmMamba-linear", ""]
    if t is None:
        return lines + ["Not run yet.", ""]
    sets = [s for s in TEXT_SETS if s in t["heldout"]]
    lines += ["Held-out perplexity (each set's first "
              f"{fmt(t['eval_tokens'], 0)} tokens, window {t['window']}, stride {t['window'] // 2}; sets never "
              "trained on). Students: ratio to the teacher in brackets; top-1 agreement and KL(teacher ‖ student) "
              "per token against the teacher on the same tokens.", "",
              "| model | " + " | ".join(TEXT_NAMES[s] for s in sets) + " | mean top-1 agreement | mean KL |",
              "|---|" + "---|" * (len(sets) + 2)]
    lines.append("| teacher | " + " | ".join(fmt(t["heldout"][s]["perplexity"]) for s in sets) + " | 1 | 0 |")
    for n, r in runs.items():
        if r is None:
            lines.append(f"| {n} | not run |" + " |" * (len(sets) + 1))
            continue
        cells = []
        for s in sets:
            p, tp = r["heldout"][s]["perplexity"], t["heldout"][s]["perplexity"]
            cells.append(f"{fmt(p)} ({fmt(p / tp)}×)")
        agree = sum(r["heldout"][s]["top1_agreement"] for s in sets) / len(sets)
        kl = sum(r["heldout"][s]["kl_to_teacher"] for s in sets) / len(sets)
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {fmt(agree, 3)} | {fmt(kl, 3)} |")
    lines += ["", "Targets (issue 12): hybrid perplexity ≤ 1.15× and linear ≤ 1.4× the teacher's on held-out text.", ""]
    for n, limit in TARGETS_TEXT.items():
        r = runs.get(n)
        if r is None:
            lines.append(f"- {n}: not run")
            continue
        ratios = {s: r["heldout"][s]["perplexity"] / t["heldout"][s]["perplexity"] for s in sets}
        met = all(v <= limit for v in ratios.values())
        worst = max(ratios, key=ratios.get)
        lines.append(f"- {n}: **{'met' if met else 'not met'}** (worst {TEXT_NAMES[worst]}: "
                     f"{fmt(ratios[worst])}×; best {fmt(min(ratios.values()))}×)")
    lines += ["", "Training (the framework's trainer, `examples/quality/text_study.py student`):", "",
              "| student | stage | steps | batch × seq | tokens | epochs of the mix | lr | first → last loss "
              "| wall s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n, r in runs.items():
        if r is None:
            continue
        for k, s in r["distill"]["stages"].items():
            lines.append(f"| {n} | {k} | {s['steps']} | {s['batch_size']} × {s['seq_len']} | {fmt(s['tokens'], 0)} "
                         f"| {fmt(r['epochs_per_stage'][k])} | {s['lr']:g} | {fmt(s.get('first_loss'), 3)} → "
                         f"{fmt(s.get('last_loss'), 3)} | "
                         + (f"shared with {Path(r['distill']['stages12_from']).name} |" if s.get("shared")
                            else f"{fmt(s['seconds'], 0)} |"))
    mix = next((r["training_mix_tokens"] for r in runs.values() if r), None)
    if mix:
        lines += ["", "Training mix (tokens): " + ", ".join(f"{k} {fmt(v, 0)}" for k, v in mix.items())
                  + f"; total {fmt(sum(mix.values()), 0)}. Teacher samples: {fmt(t['generated_tokens'], 0)} tokens "
                  f"generated from {t['n_prompts']} prompts (T 0.8, top-p 0.95) in {fmt(t['generation_seconds'], 0)} "
                  "s, stored with their prompts; 5 % of them held out."]
    plot_curves({n: r for n, r in runs.items() if r}, out / "text_loss_curves.png", "Text students: stage losses")
    lines += ["", "![stage losses](text_loss_curves.png)", "", "Generations (greedy, then sampled T 0.7 top-p 0.9; "
              "48 new tokens):", ""]
    for i, row in enumerate(t["showcase"]):
        lines.append(f"**Prompt{' (chat)' if row['chat'] else ''}:** {row['prompt']!r}")
        lines.append("")
        for n, r in [("teacher", t)] + [(n, r) for n, r in runs.items() if r]:
            sc = r["showcase"][i]
            lines.append(f"- {n}: greedy {sc['greedy']!r} / sampled {sc['sampled']!r}")
        lines.append("")
    lines += ["Runs:", "", f"- teacher samples + teacher metrics: {where(t)}"]
    lines += [f"- {n}: {where(r)}" for n, r in runs.items() if r]
    return lines + [""]


def plot_curves(runs: dict, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for n, r in runs.items():
        for k, ax in zip(("1", "2", "3"), axes):
            curve = r["distill"]["stages"].get(k, {}).get("curve") or []
            if curve:
                ax.plot([c[0] for c in curve], [c[1] for c in curve], label=n)
    for k, ax in zip((1, 2, 3), axes):
        ax.set_title(f"stage {k}" + (" (1000 × per-head MSE)" if k < 3 else " (KL)"))
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- VLM
def vlm_section(raw: Path, out: Path) -> list[str]:
    t = load(raw, "vlm_teacher")
    runs = student_runs(raw, "vlm")
    lines = ["## 2. Vision-language: a HoVLE-style VLM on SmolLM2 → hybrid and linear", ""]
    if t is None:
        return lines + ["Not run yet.", ""]
    c = t["config"]
    lines += [f"Teacher: SmolLM2-135M-Instruct with a patch-embedding vision front ({c['image_size']} px, "
              f"{c['patch_size']} px patches, pixel shuffle 0.5 → 16 image tokens) and {c['new_layers']} new decoder "
              "layers in front (identity at step 0), fine-tuned with `mmmamba.distill.sft` for "
              f"{t.get('steps_done', c['steps'])} steps × {c['batch']} (lr {c['lr']:g} decoder layers, {c['new_lr']:g} "
              "vision front) on "
              + ", ".join(f"{k} {v}" for k, v in t["training_rows"].items()) + " rows.", "",
              "| model | " + " | ".join(VLM_SETS) + " | text ppl (mean ratio to SmolLM2) |",
              "|---|" + "---|" * (len(VLM_SETS) + 1)]
    sm = t["eval"].get("text_smollm2")
    rows = [("teacher", t)] + [(n, r) for n, r in runs.items()]
    for n, r in rows:
        if r is None:
            lines.append(f"| {n} | not run |" + " |" * len(VLM_SETS))
            continue
        cells = []
        for s in VLM_SETS:
            a = acc(r["eval"][s]["metrics"]) if s in r["eval"] else None
            ta = acc(t["eval"][s]["metrics"]) if s in t["eval"] else None
            cell = fmt(100 * a, 1) if a is not None else "–"
            if a is not None and s in t["eval"] and at_chance(t["eval"][s]["metrics"], s):
                cell += " †" if n == "teacher" else ""
            elif n != "teacher" and a is not None and ta:
                cell += f" ({fmt(100 * a / ta, 0)} %)"
            cells.append(cell)
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {fmt(text_ratio(r, sm) if sm else None)}× |")
    if sm:
        lines.append("| SmolLM2 (text only) | – | – | – | – | – | 1× |")
    lines += ["", "Accuracy in %; students: share of the teacher's accuracy in brackets. easy-VQA: VQA accuracy over "
              "its test questions; Fashion-MNIST: 10-way multiple choice (letter) and open answer (class name); "
              "emoji: 4-way multiple choice of Unicode names, for emoji never seen in training and for seen ones. "
              "† the teacher is within 5 points of chance (10 % / 25 %) there: the students' share of it says "
              "nothing and is left out.", ""]
    ev, fm = acc(t["eval"]["easy-vqa"]["metrics"]), acc(t["eval"]["fashion-mnist"]["metrics"])
    line = (f"- Teacher targets: easy-VQA ≥ 90 %: **{'met' if ev >= 0.9 else 'not met'}** ({fmt(100 * ev, 1)} %); "
            f"Fashion-MNIST ≥ 85 %: **{'met' if fm >= 0.85 else 'not met'}** ({fmt(100 * fm, 1)} %)")
    if sm:
        tr = text_ratio(t, sm)
        line += f"; text perplexity within 1.2× of SmolLM2's: **{'met' if tr <= 1.2 else 'not met'}** ({fmt(tr)}×)"
    lines.append(line)
    for n, limit in TARGETS_VLM.items():
        r = runs.get(n)
        if r is None:
            lines.append(f"- {n} ≥ {int(limit * 100)} % of the teacher: not run")
            continue
        shares = {s: acc(r["eval"][s]["metrics"]) / max(acc(t["eval"][s]["metrics"]), 1e-9)
                  for s in ("easy-vqa", "fashion-mnist")}
        moot = [s for s in shares if at_chance(t["eval"][s]["metrics"], s)]
        missed = [s for s, v in shares.items() if v < limit and s not in moot]
        lines.append(f"- {n} ≥ {int(limit * 100)} % of the teacher on easy-VQA and Fashion-MNIST: "
                     f"**{'not met' if missed else 'not shown' if moot else 'met'}** ("
                     + ", ".join(f"{s} {fmt(100 * v, 1)} %" for s, v in shares.items()) + ")"
                     + (f"; the teacher is at chance on {', '.join(moot)}, so that share says nothing" if moot
                        else ""))
    for n, r in runs.items():
        if r:
            st = r["distill"]["stages"]
            lines.append(f"- {n}: " + " / ".join(str(st[k]["steps"]) for k in st) + f" steps × {st['1']['batch_size']} "
                         "rows, " + (f"{fmt(r['tokens_seen'], 0)} tokens" if r.get("tokens_seen")
                                   else "tokens not in this JSON (see its log)")
                         + (f" (stages 1–2 shared with {Path(r['distill']['stages12_from']).name})"
                            if r["distill"].get("stages12_from") else "")
                         + (f"; {fmt(r['text_mix_tokens'], 0)} plain-text tokens in the mix" if r.get("text_mix_tokens")
                            else ""))
    plot_curves({n: r for n, r in runs.items() if r}, out / "vlm_loss_curves.png", "VLM students: stage losses")
    lines += ["", "![stage losses](vlm_loss_curves.png)", "", "Runs:", "", f"- teacher: {where(t)}"]
    lines += [f"- {n}: {where(r)}" for n, r in runs.items() if r]
    return lines + [""]


# ---------------------------------------------------------------------------------------------- gate init
def gate_section(raw: Path) -> list[str]:
    g = load(raw, "gate_init_cpu")
    lines = ["## 3. Beyond the paper: a calibrated output gate", ""]
    if g is None:
        return lines + ["Not run yet.", ""]
    lines += ["`mmmamba.distill.gate_calibration`: W_G reads the mean normed layer input (so SiLU(W_G u) is a "
              "near-constant positive factor instead of a random one) and the gated norm's weight is fitted by "
              "least squares to the teacher's attention output, on "
              f"{g['calibration_sequences']} training sequences of {g['seq_len']} tokens. Step 0 (no training), on "
              f"{g['eval_sequences']} held-out Python-docs sequences:", "",
              "| student / init | stage-1 loss at step 0 | mixer-vs-attention cosine | perplexity | KL to teacher |",
              "|---|---|---|---|---|"]
    for n, r in g["results"].items():
        if n == "teacher":
            lines.append(f"| teacher | – | 1 | {fmt(r['perplexity'])} | 0 |")
        else:
            lines.append(f"| {n} | {fmt(r['stage1_loss'], 1)} | {fmt(r['cosine'], 3)} | {fmt(r['perplexity'])} | "
                         f"{fmt(r['kl_to_teacher'], 3)} |")
    lines += ["", f"Run: {where(g)}", ""]
    paper = load(raw, "text_hybrid")
    variants = {p.stem[len("text_hybrid-"):]: load(raw, p.stem) for p in sorted(raw.glob("text_hybrid-*.json"))}
    variants = {n: r for n, r in variants.items() if r.get("init", "mimic") != "mimic"}  # inits, not budgets or lr
    if paper and variants:
        sets = list(paper["heldout"])

        def mean_kl(r):
            return sum(r["heldout"][s]["kl_to_teacher"] for s in sets) / len(sets)

        def lasts(r):
            return " / ".join(fmt(r["distill"]["stages"][k].get("last_loss"), 3) for k in ("1", "2", "3"))

        lines += ["After training at the same budget (section 1's hybrid runs with each init, stages 1 / 2 / 3):", "",
                  "| hybrid init | mean KL to teacher | last stage losses |", "|---|---|---|",
                  f"| paper (mimic) | {fmt(mean_kl(paper), 3)} | {lasts(paper)} |"]
        lines += [f"| {n} | {fmt(mean_kl(r), 3)} | {lasts(r)} |" for n, r in variants.items()]
        best = min(variants, key=lambda n: mean_kl(variants[n]))
        wins = mean_kl(variants[best]) < mean_kl(paper)
        lines += ["", f"Best variant: {best}, **{'better' if wins else 'worse'}** than the paper's init"
                  + ("." if wins else "; the paper's init stays the default."), ""]
    return lines


# -------------------------------------------------------------------------------------------------- ablations
ABLATIONS = {
    3: ("Stages (PAPER Table 3, mmMamba-linear)", {"S1+S2+S3": "text_linear"},
        ["none", "S1", "S2", "S3", "S1+S2", "S1+S3", "S2+S3", "S1+S2+S3"]),
    4: ("Initialisation (PAPER Table 4, mmMamba-linear, all three stages)", {"mimic": "text_linear"},
        ["scratch", "inherit", "mimic"]),
    5: ("Number of attention layers (PAPER Table 5; stages 1-2 shared, stage 3 alone differs)",
        {"0": "text_linear", "8": "text_hybrid"}, ["0", "1", "2", "4", "8"]),
    6: ("Placement of 8 attention layers (PAPER Table 6; stages 1-2 shared)", {"head-interleaved": "text_hybrid"},
        ["tail-stacked", "head-stacked", "tail-interleaved", "head-interleaved", "auto"]),
}


def summary(r: dict, t: dict) -> dict:
    """Geometric-mean perplexity ratio to the teacher, mean top-1 agreement and mean KL over the held-out sets."""
    sets = [s for s in t["heldout"] if s in r["heldout"]]
    logr = sum(math.log(r["heldout"][s]["perplexity"] / t["heldout"][s]["perplexity"]) for s in sets) / len(sets)
    return {"ratio": math.exp(logr),
            "top1": sum(r["heldout"][s]["top1_agreement"] for s in sets) / len(sets),
            "kl": sum(r["heldout"][s]["kl_to_teacher"] for s in sets) / len(sets),
            "tokens": r.get("tokens_seen"), "layers": r.get("attention_layers"), "seconds": r.get("seconds")}


def ablation_rows(raw: Path, table: int, t: dict) -> dict[str, dict | None]:
    _, linked, order = ABLATIONS[table]
    out = {}
    for name in order:
        r = load(raw, linked.get(name, f"ablation_t{table}_{name}"))
        out[name] = None if r is None else {**summary(r, t), "main": name in linked}
    return out


def ablation_section(raw: Path, out: Path) -> list[str]:
    t = load(raw, "text_teacher")
    lines = ["## 4. Ablations in miniature (text model)", ""]
    if t is None or not any(raw.glob("ablation_t*.json")):
        return lines + ["Not run yet.", ""]
    lines += ["`examples/quality/ablate.py`: every row is one `text_study.py student` run; rows of a table have the "
              "same token budget (the main runs' settings). Ratio: geometric mean over the held-out sets of the "
              "perplexity ratio to the teacher (1 is the teacher); top-1 and KL against the teacher, mean over the "
              "sets. Rows marked * are the main runs of section 1.", ""]
    tables = {}
    for table, (title, _, _) in ABLATIONS.items():
        rows = ablation_rows(raw, table, t)
        if not any(v and not v["main"] for v in rows.values()):
            continue
        tables[table] = rows
        lines += [f"### {title}", "", "| row | attention layers | tokens | ppl ratio | top-1 | KL | wall s |",
                  "|---|---|---|---|---|---|---|"]
        for name, v in rows.items():
            if v is None:
                lines.append(f"| {name} | not run | | | | | |")
                continue
            lines.append(f"| {name}{' *' if v['main'] else ''} | {len(v['layers'] or [])} | {fmt(v['tokens'], 0)} | "
                         f"{fmt(v['ratio'])}× | {fmt(v['top1'], 3)} | {fmt(v['kl'], 3)} | {fmt(v['seconds'], 0)} |")
        best = min((n for n, v in rows.items() if v), key=lambda n: rows[n]["kl"])
        lines += ["", f"Lowest KL: **{best}**.", ""]
    plot_ablations(tables, out / "ablations.png")
    return lines + ["![ablations: mean KL to the teacher per row](ablations.png)", ""]


def plot_ablations(tables: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tables:
        return
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 3.6), squeeze=False)
    for ax, (table, rows) in zip(axes[0], tables.items()):
        names = [n for n, v in rows.items() if v]
        ax.bar(names, [rows[n]["kl"] for n in names], color=["C1" if rows[n]["main"] else "C0" for n in names])
        ax.set_title(f"Table {table}", fontsize=10)
        ax.set_ylabel("mean KL to teacher")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def budget_section(raw: Path, out: Path) -> list[str]:
    """Runs of one student that differ only in budget (`text_<family>-x<N>.json`: N times the steps) or in batch at
    the same tokens (`text_<family>-b<N>.json`: N sequences a step, fewer steps), beside `text_<family>.json`."""
    t = load(raw, "text_teacher")
    families: dict[str, list[dict]] = {}
    for p in sorted(raw.glob("text_*.json")):
        name = p.stem[len("text_"):]
        m = re.fullmatch(r"(.+?)(?:-([xb])(\d+))?(-lr3?x[\d.]+)?", name)
        family, kind = m.group(1) + (m.group(4) or ""), m.group(2) or ""
        if family != "teacher":
            r = json.loads(p.read_text())
            st = r["distill"]["stages"]
            families.setdefault(family, []).append(
                {"name": name, "kind": kind, **summary(r, t), "steps": " / ".join(str(st[k]["steps"]) for k in st),
                 "shape": f"{st['1']['batch_size']} × {st['1']['seq_len']}"})
    families = {f: sorted(v, key=lambda r: (r["tokens"] or 0, r["kind"])) for f, v in families.items()
                if len(v) > 1}
    lines = ["## 5. Budget: quality against training tokens", ""]
    if t is None or not families:
        return lines + ["Not run yet.", ""]
    lines += ["The same student at several budgets: names ending in -x*N* ran *N* times section 1's steps (stages "
              "1 / 2 / 3 scaled together); -b*N* ran section 1's steps with *N* sequences a step: the tokens of a "
              "longer run in fewer, larger steps, at the same learning rates. Ratio, top-1 and KL as in section 4.",
              "",
              "| run | steps | batch × seq | tokens | ppl ratio | top-1 | KL | wall s |",
              "|---|---|---|---|---|---|---|---|"]
    for rows in families.values():
        lines += [f"| {r['name']} | {r['steps']} | {r['shape']} | {fmt(r['tokens'], 0)} | {fmt(r['ratio'])}× | "
                  f"{fmt(r['top1'], 3)} | {fmt(r['kl'], 3)} | {fmt(r['seconds'], 0)} |" for r in rows]
    plot_budget(families, out / "budget.png")
    return lines + ["", "![mean KL and perplexity ratio against training tokens](budget.png)", ""]


LR_TAG = re.compile(r"(.+?)-lr(3?)x([\d.]+)")


def lr_section(raw: Path) -> list[str]:
    """Runs named `text_<run>-lrx<K>` (every stage's learning rate times K, `text_study.py --lr-scale`) or
    `text_<run>-lr3x<K>` (stage 3's alone) beside `text_<run>.json`, the same run at the recipe's rates."""
    t = load(raw, "text_teacher")
    pairs = []
    for p in sorted(raw.glob("text_*-lr*x*.json")):
        m = LR_TAG.fullmatch(p.stem[len("text_"):])
        base = load(raw, f"text_{m.group(1)}") if m else None
        if m and base is not None and t is not None:
            pairs.append((m.group(1), base, p.stem[len("text_"):], json.loads(p.read_text())))
    lines = ["## 6. Learning rate at a short budget", ""]
    if not pairs:
        return lines + ["Not run yet.", ""]

    def lrs(r):
        return " / ".join(f"{r['distill']['stages'][k]['lr']:g}" for k in ("1", "2", "3"))

    lines += ["Each run beside the same run at the recipe's learning rates (stage 1 / 2 / 3), same steps and tokens. "
              "Ratio, top-1 and KL as in section 4.", "",
              "| run | lr | steps | tokens | ppl ratio | top-1 | KL | baseline ppl ratio | baseline KL |",
              "|---|---|---|---|---|---|---|---|---|"]
    for base_name, base, name, r in pairs:
        a, b = summary(r, t), summary(base, t)
        steps = " / ".join(str(r["distill"]["stages"][k]["steps"]) for k in ("1", "2", "3"))
        lines.append(f"| {name} | {lrs(r)} | {steps} | {fmt(a['tokens'], 0)} | {fmt(a['ratio'])}× | "
                     f"{fmt(a['top1'], 3)} | {fmt(a['kl'], 3)} | {fmt(b['ratio'])}× ({base_name}, {lrs(base)}) | "
                     f"{fmt(b['kl'], 3)} |")
    return lines + [""]


def plot_budget(families: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, (family, rows) in enumerate(families.items()):
        line = [r for r in rows if r["kind"] != "b"]
        for ax, key in zip(axes, ("kl", "ratio")):
            ax.plot([r["tokens"] for r in line], [r[key] for r in line], "o-", color=f"C{i}", label=family)
            for r in rows:
                if r["kind"] == "b":
                    ax.plot([r["tokens"]], [r[key]], "s", color=f"C{i}", mfc="none", label=f"{r['name']} (fewer steps)")
    for ax, label in zip(axes, ("mean KL to teacher", "perplexity ratio to teacher (geo-mean)")):
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (all stages)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--raw", default="docs/results/quality/raw")
    p.add_argument("--out", default="docs/results/quality")
    p.add_argument("--note", default="", help="a paragraph under the title (e.g. where and at what scale it ran)")
    args = p.parse_args(argv)
    raw, out = Path(args.raw), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = ["# Quality study (issue 12)", "",
            "Generated by `python examples/quality/report.py` from the JSON files in `raw/` (each names its card, "
            "date, commit and command). Reproduce: `examples/quality/README.md`.", ""]
    if args.note:
        head += [args.note, ""]
    body = (text_section(raw, out) + vlm_section(raw, out) + gate_section(raw) + ablation_section(raw, out)
            + budget_section(raw, out) + lr_section(raw))
    (out / "README.md").write_text("\n".join(head + body) + "\n")
    print(f"wrote {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
