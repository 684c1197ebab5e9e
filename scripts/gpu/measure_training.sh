# One GPU call that checks and measures the training kernels against an earlier tree, on the same GPU.
#
#   git archive REV | (mkdir -p .carry/base && tar -x -C .carry/base)      # here, once: the baseline tree
#   run (carry .whl .carry): OUT=$OUT bash scripts/gpu/measure_training.sh [.carry/base]
#
# Writes under $OUT: gpus.txt; tests.log (the GPU-only tests of the fused kernels and the CUDA-graph steps);
# ssd.log (check_ssd.py: every SSD backward mode at SmolLM2's head shape); tp-new.{log,json} and, given a base
# tree, tp-base.{log,json} (distill_throughput.py, stages 1 and 3 with CUDA graphs, per-kernel profile and the
# eager attribution of kernel time to source lines). Needs the carried fla-core wheel and `.carry/smol` (a
# SmolLM2 config + tokenizer; random weights are made here). A fresh machine spends ~4 min tuning fla at first use.
set -uo pipefail
BASE=${1:-}
: "${OUT:?set OUT}"
. scripts/gpu/prep.sh
nvidia-smi -L > "$OUT/gpus.txt"
python3 scripts/gpu/make_random_teacher.py .carry/smol /tmp/smol > /dev/null 2>&1 || { echo "no teacher"; exit 1; }
TP="--teacher /tmp/smol --steps 8 --warmup 3 --stages 1,3 --cuda-graph --profile 16"
python3 scripts/gpu/distill_throughput.py $TP --attribute 40 --json "$OUT/tp-new.json" 2>&1 \
  | grep -v Warning | tee "$OUT/tp-new.log"
if [ -n "$BASE" ]; then
  # the baseline's own sources and scripts (the wheels stay this tree's install under /tmp/site)
  (cd "$BASE" && PYTHONPATH=/tmp/site:$PWD/src python3 scripts/gpu/distill_throughput.py $TP \
    --json "$OUT/tp-base.json" 2>&1 | grep -v Warning | tee "$OUT/tp-base.log")
fi
python3 -m pytest -q -rA tests/ops/test_gated_norm.py tests/ops/test_add_norm.py tests/ops/test_swiglu.py \
  tests/ops/test_gla_prep.py tests/distill/test_graphs.py \
  2>&1 | tail -30 > "$OUT/tests.log"
python3 scripts/gpu/check_ssd.py --lengths 4096 --shapes 9x64 --modes bk32,bk128,torch 2>&1 | tail -12 \
  > "$OUT/ssd.log"
tail -3 "$OUT/tests.log" "$OUT/ssd.log"
