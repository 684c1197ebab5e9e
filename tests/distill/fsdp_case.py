"""Stage 3 under FSDP with the trainer's settings, on the CPU (2 processes, gloo), against one process without it.

    torchrun --nproc_per_node 2 tests/distill/fsdp_case.py

Run by test_fsdp.py. accelerate applies FSDP only on accelerators, so this wraps the stage-3 module with torch's FSDP
directly, as accelerate's plugin (`trainer._fsdp_plugin`) does on GPUs: one unit per decoder layer, full sharding,
original parameters, the trainer's precision policy. Each process takes half of the batch.
"""

from __future__ import annotations

import copy
import os
import sys
import types

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import tiny_model  # noqa: E402
from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: E402
from torch.distributed.fsdp.wrap import ModuleWrapPolicy  # noqa: E402

from mmmamba.distill.recipe import parse_recipe  # noqa: E402
from mmmamba.distill.stages import EndToEndDistill  # noqa: E402
from mmmamba.distill.trainer import (  # noqa: E402
    FSDP_UNIT,
    _load_optimizer_state,
    _optimizer_state,
    build_optimizer,
    fsdp_mixed_precision,
    no_decay_ids,
)
from mmmamba.models import decoder  # noqa: E402


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    for tied in (True, False):  # SmolLM2 ties its LM head to the embedding
        student = tiny_model(["attention", "mamba2", "mamba2", "mamba2"], tie_word_embeddings=tied)
        teacher = tiny_model(["attention"] * 4, seed=1, tie_word_embeddings=tied)
        ids = torch.randint(0, 97, (2 * world, 24), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)

        ref = EndToEndDistill(copy.deepcopy(student), teacher, temperature=2.0, positions="all", ce_weight=0.5,
                              chunk_size=16)
        loss_ref, _ = ref(ids, attention_mask=mask, labels=ids)
        loss_ref.backward()
        grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}

        module = EndToEndDistill(student, teacher, temperature=2.0, positions="all", ce_weight=0.5, chunk_size=16)
        no_decay = no_decay_ids(module)
        fs = FSDP(module, auto_wrap_policy=ModuleWrapPolicy({getattr(decoder, FSDP_UNIT)}),
                  sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True,
                  mixed_precision=fsdp_mixed_precision(), device_id=torch.device("cpu"))
        part = slice(2 * rank, 2 * rank + 2)
        loss, _ = fs(ids[part], attention_mask=mask[part], labels=ids[part])
        loss.backward()  # FSDP averages the gradients over the processes: the gradient of the mean loss
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean /= world
        assert rel(mean, loss_ref.detach()) < 1e-5, (float(mean), float(loss_ref))
        worst = 0.0
        with FSDP.summon_full_params(fs, with_grads=True):
            seen = 0
            for n, p in fs.named_parameters():
                name = n.replace("_fsdp_wrapped_module.", "")
                if name in grads:
                    seen += 1
                    assert p.grad is not None, f"{name}: no gradient under FSDP"
                    worst = max(worst, rel(p.grad, grads[name]))
            assert seen == len(grads), (seen, len(grads))
        assert worst < 1e-4, f"tied={tied}: gradients differ by {worst:.2e}"
        # one AdamW step with weight decay (the trainer's groups), then its state saved and loaded, as on resume
        cfg = parse_recipe({"teacher": "x", "output_dir": "y", "defaults": {"lr": 1e-2}}).stages[3]
        opt_ref, opt = build_optimizer(ref, cfg), build_optimizer(fs, cfg, no_decay=no_decay)
        assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in opt_ref.param_groups]
        opt_ref.step()
        opt.step()
        fake_acc = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=object()), num_processes=world)
        osd = [_optimizer_state(fake_acc, fs, opt)]
        dist.broadcast_object_list(osd, src=0)
        osd = osd[0]
        opt2 = build_optimizer(fs, cfg, no_decay=no_decay)
        _load_optimizer_state(fake_acc, fs, opt2, osd)
        assert len(opt2.state) == len(opt.state) > 0
        for p in opt.state:  # each process holds its shard's moments again, as before the save
            a, b = opt.state[p], opt2.state[p]
            assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq")), "optimizer state round trip"
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)  # on the CPU, offloading would free it
        with FSDP.state_dict_type(fs, StateDictType.FULL_STATE_DICT, cfg):
            sd = fs.state_dict()
        if rank == 0:  # what the trainer saves: the whole student, unsharded, under the plain names
            want = ref.state_dict()  # after the same step: the weights agree
            assert set(sd) == set(want), set(sd) ^ set(want)
            worst_w = max(rel(sd[k].float(), want[k].float()) for k in want)
            # Adam's first step is lr * sign(g) where |g| >> eps: gradients equal to 2e-7 leave a few near-zero
            # entries flipping; weight decay missing from any matrix would show as 5e-4 (lr 1e-2 x decay 0.05)
            assert worst_w < 1e-4, f"weights after one step differ by {worst_w:.2e}"
            print(f"tied={tied}: loss {float(mean):.6f} vs {float(loss_ref.detach()):.6f}; "
                  f"gradients within {worst:.1e}; weights after a step within {worst_w:.1e}")
    if rank == 0:
        print("fsdp ok")
    dist.barrier()  # both ranks done with every collective before gloo is torn down (a rare abort at exit, once)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
