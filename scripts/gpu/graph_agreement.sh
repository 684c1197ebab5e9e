#!/usr/bin/env bash
# `cuda_graph: true` against eager on one GPU: stages 1-3 (global batch 16 x 512 tokens, micro-batch 8, so two
# graph replays accumulate per step), bf16, the same data order. Compares each stage's losses, the final
# weights, and tokens/s (median of steps 4 onwards: the first steps tune, warm up and capture).
# Usage: OUT=dir TEACHER_SRC=.carry/smol STEPS=12 bash scripts/gpu/graph_agreement.sh
set -eu
W=/tmp/graph STEPS=${STEPS:-12}
source "$(dirname "$0")/agreement_setup.sh"
recipe $W/eager ddp > $W/eager.yaml
EXTRA="cuda_graph: true" recipe $W/graph ddp > $W/graph.yaml
O="${OUT:-/tmp}"
trap 'cp $W/eager.log $W/graph.log "$O"/ 2>/dev/null || true' EXIT
python -m mmmamba.cli distill $W/eager.yaml --no-progress > $W/eager.log 2>&1
python -m mmmamba.cli distill $W/graph.yaml --no-progress > $W/graph.log 2>&1
python - <<PY | tee "$O"/graph_agreement.md
import json, statistics
from safetensors.torch import load_file
W = "$W"
print("| stage | loss step 1 (eager / graph) | loss last (eager / graph) | max rel. diff over steps "
      "| final weights max rel. diff | tok/s eager | tok/s graph |")
print("|---|---|---|---|---|---|---|")
worst = []
for s in (1, 2, 3):
    a = [json.loads(l) for l in open(f"{W}/eager/logs/stage{s}.jsonl")]
    b = [json.loads(l) for l in open(f"{W}/graph/logs/stage{s}.jsonl")]
    d = max(abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1e-12) for x, y in zip(a, b))
    wa, wb = load_file(f"{W}/eager/stage{s}/model.safetensors"), load_file(f"{W}/graph/stage{s}/model.safetensors")
    assert wa.keys() == wb.keys(), sorted(set(wa) ^ set(wb))
    errs = {k: float((wa[k].float() - wb[k].float()).norm() / wa[k].float().norm().clamp(min=1e-12)) for k in wa}
    rel = max(errs.values())
    worst.append(f"stage {s}: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(errs.items(), key=lambda kv: -kv[1])[:3]))
    ta, tb = (statistics.median(r["tokens_per_s"] for r in x[3:]) for x in (a, b))
    print(f"| {s} | {a[0]['loss']:.5g} / {b[0]['loss']:.5g} | {a[-1]['loss']:.5g} / {b[-1]['loss']:.5g} "
          f"| {d:.2e} | {rel:.2e} | {ta:,.0f} | {tb:,.0f} |")
print("\nlargest relative weight differences, per tensor:\n" + "\n".join(worst))
PY
grep -h "cuda_graph" $W/graph.log | sort | uniq -c
