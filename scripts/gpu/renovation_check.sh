#!/usr/bin/env bash
# GPU re-check of the issue-14 renovation (and the kernels that landed without a GPU): decode against the reference
# before (a tree in .carry/before, e.g. `git archive 7d82e3a src scripts | tar -x -C .carry/before`) and after, and
# the GPU-only kernel tests. Carry .whl (fla-core) and .carry/before. Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,uuid --format=csv | tee "$OUT/gpu.txt"
PYTHONPATH=/tmp/site:$PWD/src timeout 240 python3 -m pytest -q -rs tests/ops/test_gated_norm.py tests/ops/test_add_norm.py tests/ops/test_gla_prep.py tests/ops/test_swiglu.py tests/distill/test_graphs.py tests/inference/test_engine.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
for side in before after; do
  root=$PWD; [ $side = before ] && root=$PWD/.carry/before
  PYTHONPATH=/tmp/site:$root/src timeout 150 python3 $root/scripts/gpu/check_decode.py --out "$OUT/decode-$side" \
    --steps 256 2>&1 | tail -15 | tee "$OUT/decode-$side.txt"
done
