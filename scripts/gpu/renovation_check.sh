#!/usr/bin/env bash
# GPU re-check of the issue-14 renovation (and the kernels that landed without a GPU): the GPU-only kernel tests, then
# a short decode bench and decode against the reference, before (a tree in .carry/before, e.g.
# `git archive 7d82e3a src scripts | tar -x -C .carry/before`) and after, on the same card in one call.
# Carry .whl (fla-core, pytest) and .carry/before. Results under $OUT (RENO_TESTS=0 skips the tests, RENO_DECODE=0 the
# decode check; RENO_SIDES picks the bench runs, default "before after after2").
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,uuid --format=csv | tee "$OUT/gpu.txt"
for side in ${RENO_SIDES:-before after after2}; do  # first (it was cut last time); after2: the same tree again, to see the noise
  root=$PWD; [ $side = before ] && root=$PWD/.carry/before
  PYTHONPATH=/tmp/site:$root/src timeout 90 python3 -m mmmamba.cli bench --models linear,hybrid --contexts 4k \
    --prefill-contexts 4k --batch-models "" --table2-out 0 --compare-torch-contexts 4k --budget-s 50 \
    --out "$OUT/bench-$side" 2>&1 | tee "$OUT/bench-$side.txt" | tail -12
done
if [ "${RENO_TESTS:-1}" = 1 ]; then
  PYTHONPATH=/tmp/site:$PWD/src timeout 150 python3 -m pytest -q -rs tests/ops/test_gated_norm.py \
    tests/ops/test_add_norm.py tests/ops/test_gla_prep.py tests/ops/test_swiglu.py tests/distill/test_graphs.py \
    tests/inference/test_engine.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
fi
[ "${RENO_DECODE:-1}" = 1 ] && for side in before after; do
  root=$PWD; [ $side = before ] && root=$PWD/.carry/before
  PYTHONPATH=/tmp/site:$root/src timeout 100 python3 $root/scripts/gpu/check_decode.py --out "$OUT/decode-$side" \
    --steps 256 2>&1 | tee "$OUT/decode-$side.txt" | tail -32
done
