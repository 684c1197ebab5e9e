#!/usr/bin/env bash
# 2-GPU vs 1-GPU loss agreement at the same global batch (16 sequences x 512 tokens), stages 1-3, bf16.
# Teacher: SmolLM2-135M config + tokenizer with random weights (TEACHER_SRC), data: pydoc topics (offline).
# Usage on a 2-GPU machine: OUT=dir TEACHER_SRC=.carry/smol bash scripts/gpu/ddp_agreement.sh
set -eu
W=/tmp/ddp STEPS=${STEPS:-40}
source "$(dirname "$0")/agreement_setup.sh"
recipe $W/one ddp > $W/one.yaml
recipe $W/two ddp > $W/two.yaml
O="${OUT:-/tmp}"
trap 'cp $W/one.log $W/two.log "$O"/ 2>/dev/null || true' EXIT   # keep both logs, also on failure or timeout
python -m mmmamba.cli distill $W/one.yaml --no-progress > $W/one.log 2>&1
# a stuck run prints every thread's stack each 120 s (MMMAMBA_DUMP_STACKS_AFTER) into two.log
MMMAMBA_DUMP_STACKS_AFTER=120 accelerate launch --num_processes 2 --mixed_precision bf16 -m mmmamba.cli distill \
  $W/two.yaml --no-progress > $W/two.log 2>&1
python - <<PY | tee ${OUT:-/tmp}/ddp_agreement.md
import json
W = "$W"
print("| stage | steps | loss step 1 (1 GPU / 2 GPUs) | loss last (1 / 2) | max rel. diff over steps | tok/s 1 GPU | tok/s 2 GPUs |")
print("|---|---|---|---|---|---|---|")
for s in (1, 2, 3):
    a = [json.loads(l) for l in open(f"{W}/one/logs/stage{s}.jsonl")]
    b = [json.loads(l) for l in open(f"{W}/two/logs/stage{s}.jsonl")]
    d = max(abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1e-12) for x, y in zip(a, b))
    print(f"| {s} | {len(a)} | {a[0]['loss']:.5g} / {b[0]['loss']:.5g} | {a[-1]['loss']:.5g} / {b[-1]['loss']:.5g} "
          f"| {d:.2e} | {a[-1]['tokens_per_s']:,.0f} | {b[-1]['tokens_per_s']:,.0f} |")
PY
cp $W/one/logs/stage3.jsonl ${OUT:-/tmp}/one_stage3.jsonl; cp $W/two/logs/stage3.jsonl ${OUT:-/tmp}/two_stage3.jsonl
tail -3 $W/two.log
