"""Worker for tests/distill/test_trainer.py::test_two_processes_match_one_process_with_accumulation.

`python ddp_worker.py OUT TEACHER` (1 process) or `torchrun --standalone --nproc_per_node 2 ddp_worker.py OUT
TEACHER` (gloo, on CPU also where there are GPUs): stages 1-3 on a tiny teacher (written to TEACHER if missing) at
global batch 4 (micro-batch 2; 1 process accumulates 2, 2 processes accumulate 1), on the data components of
build_dataloader (DistillDataset + BucketBatchSampler + Collator) with 13 samples of mixed length: 7 micro-batches
per epoch, the last one partial. OUT/run: uninterrupted; OUT/resumed (2 processes only): each stage stopped after
step 4 (checkpoint at step 3) and resumed. OUT/list: uninterrupted on a plain list of 5 micro-batches (the
plain-iterable branch of DataStream)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest.tiny_config)

from conftest import tiny_config  # noqa: E402

from mmmamba import MMMambaForCausalLM  # noqa: E402
from mmmamba.distill.data import BucketBatchSampler, Collator, DistillDataset, Sample  # noqa: E402
from mmmamba.distill.recipe import parse_recipe  # noqa: E402
from mmmamba.distill.trainer import StageRunner, StopTraining  # noqa: E402
from mmmamba.io import save_model  # noqa: E402

torch.set_num_threads(1)
torch.cuda.is_available = lambda: False  # CPU (gloo) also on a GPU machine: the trainer then asks for cpu=True
N_SAMPLES, MICRO = 13, 2


def data(cfg, tokenizer, model_config, micro_batch_size, seed):
    rng = np.random.default_rng(0)
    samples = [Sample(rng.integers(0, 97, int(n)).astype(np.int64), None, f"s{i}")
               for i, n in enumerate(rng.integers(6, 20, N_SAMPLES))]
    ds = DistillDataset(samples, [], None, "train")
    sampler = BucketBatchSampler(ds.lengths, micro_batch_size, seed, mega_batch=2)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(0))


def batch_list(cfg, tokenizer, model_config, micro_batch_size, seed):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(5):
        ids = torch.randint(0, 97, (micro_batch_size, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, 12 - i:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def recipe(root: Path, teacher: Path, out: str):
    d = {"steps": 8, "batch_size": 4, "micro_batch_size": MICRO, "save_every": 3, "log_every": 1}
    return parse_recipe({"teacher": str(teacher), "output_dir": str(root / out), "placement": "every:2",
                         "defaults": d, "stages": {1: {"lr": 1e-2}, 2: {"lr": 5e-3}, 3: {"lr": 5e-3}}})


def main(root: Path, teacher: Path) -> None:
    import torch.distributed as dist

    quiet = dict(progress=False, log=lambda *a: None)
    if not teacher.exists():  # (the test writes it beforehand: no two processes write it at once)
        torch.manual_seed(1)
        save_model(MMMambaForCausalLM(tiny_config(layer_types=["attention"] * 4)).eval(), teacher)
    for stage in (1, 2, 3):
        StageRunner(recipe(root, teacher, "run"), stage, data=data, **quiet).run()
    for stage in (1, 2, 3):
        StageRunner(recipe(root, teacher, "list"), stage, data=batch_list, **quiet).run()
    if dist.is_available() and dist.is_initialized():
        for stage in (1, 2, 3):
            try:
                StageRunner(recipe(root, teacher, "resumed"), stage, data=data, stop_after=4, **quiet).run()
                raise AssertionError("not stopped")
            except StopTraining:
                pass
            StageRunner(recipe(root, teacher, "resumed"), stage, data=data, resume=True, **quiet).run()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
