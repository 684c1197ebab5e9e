"""torch.compile of the distillation's per-layer work (CPU inductor): same losses and gradients as eager."""

from __future__ import annotations

import pytest
import torch

from mmmamba.distill.compile import compile_layers
from mmmamba.distill.seed import seed_student
from mmmamba.distill.stages import (
    EndToEndDistill,
    LayerwiseDistill,
    apply_placement,
    enable_checkpointing,
    set_trainable,
)


def _ids(b=2, l=24, seed=0):
    return torch.randint(0, 97, (b, l), generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(module, *args):
    loss, _ = module(*args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def _close(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_compiled_teacher_stream_matches_eager(tiny_teacher):
    torch._dynamo.reset()
    ids, mask = _ids(), torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0  # right padding: masked loss through the compiled stream
    runs = []
    for compiled in (False, True):
        student = seed_student(tiny_teacher, None)
        set_trainable(student, 2)
        runs.append(_loss_and_grads(LayerwiseDistill(student, tiny_teacher, compile=compiled), ids, mask))
    _close(*runs)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_match_eager_in_stage3(tiny_teacher, checkpointing):
    torch._dynamo.reset()
    ids = _ids(seed=1)
    runs = []
    for compiled in (False, True):
        student = apply_placement(seed_student(tiny_teacher, None), tiny_teacher, [1])
        set_trainable(student, 3)
        if checkpointing:  # the compiled forward runs inside transformers' checkpointing wrapper, and is recomputed
            enable_checkpointing(student)
            student.train()
        if compiled:
            assert compile_layers(student) == 4 and compile_layers(tiny_teacher) == 4
        runs.append(_loss_and_grads(EndToEndDistill(student, tiny_teacher, positions="all"), ids, None, ids))
    _close(*runs)
    for layer in tiny_teacher.model.layers:  # the fixture's teacher back to eager
        del layer.forward
