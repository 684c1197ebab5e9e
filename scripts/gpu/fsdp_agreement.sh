#!/usr/bin/env bash
# Stage 3 under FSDP on 2 GPUs vs one GPU at the same global batch (16 sequences x 512 tokens), bf16.
# Stages 1-2 run once on one GPU; both stage-3 runs start from that stage-2 output.
# Teacher: SmolLM2-135M config + tokenizer with random weights (TEACHER_SRC), data: pydoc topics (offline).
# Usage on a 2-GPU machine: OUT=dir TEACHER_SRC=.carry/smol STEPS=12 bash scripts/gpu/fsdp_agreement.sh
set -eu
W=/tmp/fsdp STEPS=${STEPS:-12}
source "$(dirname "$0")/agreement_setup.sh"
recipe $W/one ddp > $W/one.yaml
recipe $W/two fsdp $W/one/stage2 > $W/two.yaml
O="${OUT:-/tmp}"
trap 'cp $W/one.log $W/two.log "$O"/ 2>/dev/null || true' EXIT
python -m mmmamba.cli distill $W/one.yaml --no-progress > $W/one.log 2>&1
MMMAMBA_DUMP_STACKS_AFTER=120 accelerate launch --num_processes 2 --mixed_precision bf16 -m mmmamba.cli distill \
  $W/two.yaml --stage 3 --no-progress > $W/two.log 2>&1
python - <<PY | tee "$O"/fsdp_agreement.md
import json
from safetensors.torch import load_file
W = "$W"
a = [json.loads(l) for l in open(f"{W}/one/logs/stage3.jsonl")]
b = [json.loads(l) for l in open(f"{W}/two/logs/stage3.jsonl")]
d = max(abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1e-12) for x, y in zip(a, b))
print("| steps | loss step 1 (1 GPU / 2 GPUs FSDP) | loss last (1 / 2) | max rel. diff over steps | tok/s 1 / 2 |")
print("|---|---|---|---|---|")
print(f"| {len(a)} / {len(b)} | {a[0]['loss']:.5g} / {b[0]['loss']:.5g} | {a[-1]['loss']:.5g} / {b[-1]['loss']:.5g} "
      f"| {d:.2e} | {a[-1]['tokens_per_s']:,.0f} / {b[-1]['tokens_per_s']:,.0f} |")
wa, wb = load_file(f"{W}/one/stage3/model.safetensors"), load_file(f"{W}/two/stage3/model.safetensors")
assert wa.keys() == wb.keys(), f"saved tensor names differ: {sorted(set(wa) ^ set(wb))}"
rel = max(float((wa[k].float() - wb[k].float()).norm() / wa[k].float().norm().clamp(min=1e-12)) for k in wa)
print(f"\nsaved stage-3 weights: {len(wa)} tensors, same names; max relative difference {rel:.2e}")
PY
tail -3 $W/two.log
