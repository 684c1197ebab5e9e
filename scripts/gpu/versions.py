"""Print torch / CUDA / device and the versions and paths of the given modules (GPU run logs)."""

import importlib
import sys

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
for m in sys.argv[1:] or ("triton", "transformers", "fla", "mmmamba"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as e:  # a log line, not a crash: the run goes on without it
        print(m, "NOT IMPORTABLE:", type(e).__name__, str(e)[:200])
