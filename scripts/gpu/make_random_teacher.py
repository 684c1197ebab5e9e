"""A teacher folder with a real config + tokenizer and random weights (for throughput and DDP checks where the
weights' values don't matter).  python scripts/gpu/make_random_teacher.py SRC_DIR OUT_DIR"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
model.save_pretrained(out)
for f in src.iterdir():
    if f.name not in ("config.json", "model.safetensors"):
        shutil.copy(f, out / f.name)
print("random teacher in", out, sum(p.numel() for p in model.parameters()) / 1e6, "M params")
