#!/usr/bin/env bash
# GPU run of issue 15 items 3 and 4 on one card, in under 8 minutes:
#   A. the paper's Table 2 through the real vision path (synthetic 896x448 image -> 3 tiles -> 768 visual tokens
#      through the vision front, the internlm2-chat prompt, 256 greedy tokens) for teacher (ours and transformers'
#      decoder fed by our vision front), hybrid and linear, HoVLE-2.6B dims, random weights, bf16;
#   B. batch serving: decode tokens/s vs batch and the largest batch that fits the card at 8K and 128K, linear and
#      hybrid against our teacher (doubling, then bisection; OOMs caught), with the analytic estimate and a plot.
# The lead carries .whl (fla-core, gguf, pytest wheels, as in /work/main/.whl): run(command="bash
# scripts/gpu/bench_serving.sh", carry=[".whl"]). mamba_ssm is not carried: its Table 2 row is left out.
# Writes $OUT/bench_serving.tgz (table2/ and serving/: results.json, report.md, summary.txt, *.png, each run's log)
# plus $OUT/gpu.txt and $OUT/summary.txt (both summaries), so at most 3 files come back.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_out}"
WORK=/tmp/bench_serving
rm -rf "$WORK" && mkdir -p "$WORK/table2" "$WORK/serving" "$OUT"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
. scripts/gpu/prep.sh   # wheels into /tmp/site, PYTHONPATH, offline flags

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"

# A: Table 2 (budget 140 s of new points; the transformers teacher's 256 eager tokens take ~20 s of it)
echo "== [$(elapsed) s] Table 2, real vision path =="
timeout 210 python3 -m mmmamba.cli bench --device cuda --out "$WORK/table2" --models linear,hybrid,teacher,teacher_hf \
    --contexts 8k --compare-torch-contexts "" --batch-models "" --table2-vision real --budget-s 140 \
    2>&1 | tee "$WORK/table2/bench.log"
echo "table2 exit ${PIPESTATUS[0]}"

# B: batch serving at 8K and 128K, teacher first (few probes), then linear, hybrid. Budget: what is left of ~440 s,
# less ~60 s for the points in flight and the report (worst case with both timeouts: 210 + 170 + 80 s).
BUDGET=$(( 440 - $(elapsed) - 60 )); [ "$BUDGET" -lt 90 ] && BUDGET=90
echo "== [$(elapsed) s] batch serving (budget ${BUDGET} s) =="
timeout $(( BUDGET + 80 )) python3 -m mmmamba.cli bench --device cuda --out "$WORK/serving" \
    --models teacher,linear,hybrid --contexts 8k --compare-torch-contexts "" --table2-out 0 \
    --batch-contexts 8k,128k --batch-models teacher,linear,hybrid --budget-s "$BUDGET" \
    2>&1 | tee "$WORK/serving/bench.log"
echo "serving exit ${PIPESTATUS[0]}"

for part in table2 serving; do
  echo "== $part ==" ; cat "$WORK/$part/summary.txt" 2>/dev/null
done | tee "$OUT/summary.txt"
tar -czf "$OUT/bench_serving.tgz" -C "$WORK" table2 serving
echo "done in $(elapsed) s: $(ls "$OUT")"
