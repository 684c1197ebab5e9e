"""Beyond the paper (issue 12 item 4): does the seeded Mamba-2 mixer reproduce its attention layer at step 0, and
does a calibrated output gate help?

With the paper's init the gate W_G is random (xavier, gain 2^-2.5), so SiLU(W_G u) multiplies each channel of the
normalised SSM output by a small random factor of either sign, and the mixer's output does not point where the
attention's does. The calibrated init (`mmmamba.distill.gate_calibration`) keeps the rest of the paper's init and
fits W_G and the gated norm's weight to the teacher's attention on a few training sequences.

Reports, per init: the stage-1 loss at step 0 (1000 x mean over layers of the per-head MSE, the trainer's
definition), the mean cosine between mixer and attention per-head outputs, and the seeded model's held-out
perplexity and KL to the teacher (all layers Mamba-2, and the every:4 hybrid).

    python examples/quality/gate_init.py --out docs/results/quality/raw/gate_init_cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import environment, load_tokens, write_json

from mmmamba.distill.gate_calibration import calibrate_gates, capture_attention


@torch.no_grad()
def layer_metrics(student, acts) -> dict:
    mse, cos = [], []
    for i, (u, t) in acts.items():
        if student.config.layer_types[i] != "linear_attention":
            continue
        y = student.model.layers[i].mixer.heads(u).float()
        mse.append(F.mse_loss(y, t.float()).item())
        cos.append(F.cosine_similarity(y, t.float(), dim=-1).mean().item())
    return {"stage1_loss": 1000 * float(np.mean(mse)), "cosine": float(np.mean(cos)),
            "cosine_per_layer": [round(x, 3) for x in cos]}


def seeded(teacher, placement, init: str, calib) -> torch.nn.Module:
    from mmmamba.distill.seed import seed_student

    s = seed_student(teacher, placement, mode="mimic").eval()
    if init.startswith("calibrated"):
        calibrate_gates(s, calib, keep_random=init == "calibrated+random")
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2")
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib", type=int, default=4, help="calibration sequences (training split)")
    p.add_argument("--eval", type=int, default=4, help="held-out sequences")
    args = p.parse_args(argv)
    from mmmamba.eval import kl_to_teacher, perplexity
    from mmmamba.teachers.hf import load_teacher

    t0 = time.time()
    torch.manual_seed(0)
    teacher = load_teacher(args.teacher).eval()
    L = args.seq_len
    train = load_tokens("pydocs", "train")
    calib_ids = torch.from_numpy(train[:args.calib * L].astype(np.int64)).view(args.calib, L)
    held = load_tokens("pydocs", "heldout")
    eval_ids = torch.from_numpy(held[:args.eval * L].astype(np.int64)).view(args.eval, L)
    calib, acts = capture_attention(teacher, [calib_ids]), capture_attention(teacher, [eval_ids])
    batches = [{"input_ids": eval_ids[i:i + 2]} for i in range(0, args.eval, 2)]
    rows = {"teacher": {"perplexity": perplexity(teacher, batches)}}
    for placement in (None, "every:4"):
        for init in ("paper", "calibrated", "calibrated+random"):
            s = seeded(teacher, placement, init, calib)
            name = f"{'linear' if placement is None else 'hybrid'}/{init}"
            rows[name] = {**layer_metrics(s, acts), "perplexity": perplexity(s, batches),
                          "kl_to_teacher": kl_to_teacher(s, teacher, batches)}
            print(name, {k: v for k, v in rows[name].items() if k != "cosine_per_layer"}, flush=True)
    import sys

    command = "python examples/quality/gate_init.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(Path(args.out), {"env": environment(), "command": command, "seq_len": L,
                                "calibration_sequences": args.calib, "eval_sequences": args.eval, "results": rows,
                                "seconds": round(time.time() - t0, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
