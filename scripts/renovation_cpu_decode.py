"""CPU decode ms/token of the engine's torch step at SmolLM2-135M dims (random weights, fp32, batch 1, 512-token
prompt), linear and hybrid (every:4). Run it against two trees to compare them:

    PYTHONPATH=<tree>/src python scripts/renovation_cpu_decode.py out.json
"""

import json
import statistics
import sys

import torch

from mmmamba.bench.models import build_ours, make_config
from mmmamba.inference.engine import Engine

DIMS = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192)


def main(path: str) -> None:
    torch.set_num_threads(2)
    out = {}
    for variant, placement in (("linear", None), ("hybrid", "every:4")):
        model = build_ours(make_config(DIMS, variant, placement), torch.device("cpu"), torch.float32)
        eng = Engine(model, kernels="torch", cuda_graph=False)
        eng.reserve(1, 1024)
        eng.prefill(torch.randint(0, DIMS["vocab_size"], (1, 512)))
        out[variant] = statistics.median(eng.time_decode(steps=64, warmup=8)) * 1e3
    with open(path, "w") as f:
        json.dump(out, f)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
