# Source on the GPU machine from the repo root (carry .whl, and .carry for teachers / mamba_ssm): installs the
# carried wheels into /tmp/site and sets paths. mamba_ssm (scripts/gpu/fetch_mamba_ssm.sh) joins when carried.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1 || echo "prep: wheel install failed"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false TRITON_CACHE_AUTOTUNING=1
if [ -d .carry/mamba_ssm ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/mamba_ssm/*.whl \
    >/dev/null 2>&1 || echo "prep: einops install failed"
  export PYTHONPATH=$PYTHONPATH:$PWD/.carry/mamba_ssm
fi
