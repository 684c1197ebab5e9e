"""distill.sft: supervised fine-tuning of a teacher."""

import torch

from mmmamba.distill.sft import sft_optimizer, train_sft


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # only the "answer" half is a target
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_sft_fits_a_repeated_batch(tiny_teacher):
    batch = _batch(tiny_teacher)
    with torch.no_grad():
        before = float(tiny_teacher(**batch).loss)
    log = train_sft(tiny_teacher, [batch], 40, lr=3e-3, new_lr=3e-3, log_every=10, progress=False)
    with torch.no_grad():
        after = float(tiny_teacher(**batch).loss)
    assert [r["step"] for r in log] == [10, 20, 30, 40]
    assert after < 0.5 * before
    assert not tiny_teacher.training


def test_new_parts_get_their_own_learning_rate(tiny_teacher):
    opt = sft_optimizer(tiny_teacher, 1e-4, 1e-2, ("model.layers.0.",), weight_decay=0.1)
    by_lr = {}
    for g in opt.param_groups:
        by_lr.setdefault(g["lr"], 0)
        by_lr[g["lr"]] += sum(p.numel() for p in g["params"])
    n0 = sum(p.numel() for n, p in tiny_teacher.named_parameters() if n.startswith("model.layers.0."))
    assert by_lr[1e-2] == n0
    assert by_lr[1e-4] == sum(p.numel() for p in tiny_teacher.parameters()) - n0
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}


def test_time_budget_shortens_the_run(tiny_teacher):
    batch = _batch(tiny_teacher)
    log = train_sft(tiny_teacher, [batch], 1000, log_every=5, progress=False, time_budget_s=1e-6, probe_steps=5)
    assert log[-1]["step"] == 6  # the probe, then one more step: the budget was spent


def test_time_budget_uses_the_steady_step_time(tiny_teacher, monkeypatch):
    """Slow first steps (workers starting, compiling) must not shrink the run: the rate comes from the probe's second
    half and only the budget left after the probe is divided by it."""
    import mmmamba.distill.sft as sft

    clock = {"t": 0.0, "n": 0}
    monkeypatch.setattr(sft.time, "time", lambda: clock["t"])
    batch = _batch(tiny_teacher)

    class Timed:
        def __iter__(self):
            while True:
                clock["t"] += 1.0 if clock["n"] < 5 else 0.1  # five slow steps, then 0.1 s a step
                clock["n"] += 1
                yield batch

    log = train_sft(tiny_teacher, Timed(), 1000, log_every=5, progress=False, time_budget_s=10.0, probe_steps=10)
    assert log[-1]["step"] == 10 + round((10.0 - 5.5) / 0.1)  # not 10 / 0.55 = 18 steps
