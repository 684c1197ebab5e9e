#!/usr/bin/env bash
# Prepare mamba_ssm 2.3.2.post1 for the GPU machine (no compiler there, no internet): its Mamba-2 path is Triton
# only, so the package's Python sources suffice, plus an empty stand-in for the Mamba-1 CUDA extension that its
# __init__ imports (never called by Mamba-2). causal_conv1d is not built: mamba_ssm then runs its conv in torch, and
# the bench says so. Writes .carry/mamba_ssm/{mamba_ssm/,selective_scan_cuda.py,einops wheel}; on the GPU machine:
#   export PYTHONPATH=$PWD/.carry/mamba_ssm:$PYTHONPATH   (and pip install --target /tmp/site the einops wheel)
set -euo pipefail
cd "$(dirname "$0")/../.."
URL=https://files.pythonhosted.org/packages/af/48/aa7bec0efc7453fa0512276c0069c854bf684219050294266534bfef34bb/mamba_ssm-2.3.2.post1.tar.gz
SHA=104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028  # PyPI's published sha256
T=$(mktemp -d)
curl -sSL "$URL" -o "$T/m.tar.gz"
echo "$SHA  $T/m.tar.gz" | sha256sum -c -
tar xzf "$T/m.tar.gz" -C "$T"
rm -rf .carry/mamba_ssm && mkdir -p .carry/mamba_ssm
cp -r "$T"/mamba_ssm-2.3.2.post1/mamba_ssm .carry/mamba_ssm/
echo '"""Stand-in: mamba_ssm imports its Mamba-1 CUDA extension at import time; Mamba-2 never calls it."""' \
  > .carry/mamba_ssm/selective_scan_cuda.py
python3 -m pip download -q --no-deps --only-binary=:all: einops -d .carry/mamba_ssm
rm -rf "$T"
ls .carry/mamba_ssm
