#!/usr/bin/env bash
# GPU run of issue 4: correctness of the fast decode path, then `mmmamba bench` at HoVLE-2.6B dims.
# Run from anywhere on the GPU machine:   OUT=/some/dir bash scripts/gpu/bench_all.sh
# Writes under $OUT: gpu.txt, versions.txt, check_decode.{json,log}, bench/{results.json,report.md,*.png,summary.txt},
# bench.log; prints a compact table at the end. Designed to finish in < 8 minutes on one H100 (TOTAL_S).
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_out}"
TOTAL_S="${TOTAL_S:-450}"          # wall-clock target for the whole script (seconds)
mkdir -p "$OUT/bench"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"
python scripts/gpu/versions.py triton transformers fla mamba_ssm mmmamba 2>&1 | tee "$OUT/versions.txt"

echo "== [$(elapsed) s] check_decode (fp32 identical greedy tokens, bf16 logits) =="
timeout 170 python scripts/gpu/check_decode.py --out "$OUT" --steps 256 2>&1 | tee "$OUT/check_decode.log"
CHECK_RC=${PIPESTATUS[0]}

BUDGET=$(( TOTAL_S - $(elapsed) - 75 ))   # the bench stops starting new points after BUDGET s; ~75 s left for
[ "$BUDGET" -lt 120 ] && BUDGET=120        # the points in flight, plots and the report
echo "== [$(elapsed) s] mmmamba bench (budget ${BUDGET} s) =="
timeout $(( BUDGET + 150 )) python -m mmmamba.cli bench --device cuda --out "$OUT/bench" --budget-s "$BUDGET" \
    2>&1 | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}

echo
echo "================ summary ($(elapsed) s) ================"
grep -E "^(PASS|FAIL|info) |^check_decode:" "$OUT/check_decode.log" | sed 's/  */ /g' | cut -c1-160
echo "check_decode exit ${CHECK_RC}; bench exit ${BENCH_RC}"
[ -f "$OUT/bench/summary.txt" ] && cat "$OUT/bench/summary.txt"
ls "$OUT/bench"
