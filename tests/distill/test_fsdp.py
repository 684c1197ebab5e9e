"""Stage 3 under FSDP (the trainer's unit, sharding and precision settings) on 2 CPU processes against one
process without it: loss, gradients, one AdamW step with the trainer's weight-decay groups, the optimizer state's
save / load round trip and the gathered state dict (tests/distill/fsdp_case.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist


def test_stage3_under_fsdp_matches_one_process():
    assert dist.is_available() and dist.is_gloo_available()
    case = Path(__file__).with_name("fsdp_case.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(case)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    assert "fsdp ok" in r.stdout
    assert r.stdout.count("gradients within") == 2  # tied and untied LM head
