"""The accelerate trainer on CPU: exact resume, stage chaining, outputs, and the KL drop on a tiny teacher."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mmmamba import MMMambaForCausalLM
from mmmamba.distill.manifest import ChainError, read_manifest
from mmmamba.distill.recipe import parse_recipe
from mmmamba.distill.stages import EndToEndDistill
from mmmamba.distill.trainer import (
    StageRunner,
    StopTraining,
    build_optimizer,
    build_scheduler,
    drop_tied_copies,
    run_distill,
)
from mmmamba.io import save_model

QUIET = dict(progress=False, log=lambda *a: None)


def _teacher(path, seed=1, init=0.02):
    from conftest import tiny_config

    torch.manual_seed(seed)
    t = MMMambaForCausalLM(tiny_config(layer_types=["attention"] * 4, initializer_range=init)).eval()
    save_model(t, path)
    return t


def _batches(n_batches=5, b=2, l=16, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, 97, (b, l), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[-1, l - 5:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100  # a "prompt" that is not a target
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _recipe(teacher, out, placement="every:2", **defaults):
    d = {"steps": 6, "batch_size": 4, "micro_batch_size": 2, "save_every": 2, "log_every": 1, **defaults}
    return parse_recipe({"teacher": str(teacher), "output_dir": str(out), "placement": placement, "defaults": d,
                         "stages": {1: {"lr": 1e-2}, 2: {"lr": 5e-3}, 3: {"lr": 5e-3}}})


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _assert_identical(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    """Each stage interrupted after step 3 (checkpoint at step 2) and resumed ends bit-identical to an
    uninterrupted run: weights, and the logged losses."""
    _teacher(tmp_path / "t")
    data = _batches(5)  # 5 micro-batches per epoch, 2 per step: epochs wrap mid-step
    run_distill(_recipe(tmp_path / "t", tmp_path / "a"), data=data, **QUIET)
    rb = _recipe(tmp_path / "t", tmp_path / "b")
    for stage in (1, 2, 3):
        with pytest.raises(StopTraining):
            StageRunner(rb, stage, data=data, stop_after=3, **QUIET).run()
        assert (tmp_path / "b" / f"stage{stage}-checkpoints" / "step-00000002").is_dir()
        with pytest.raises(ChainError, match="pass --resume"):
            StageRunner(rb, stage, data=data, **QUIET).run()
        StageRunner(rb, stage, data=data, resume=True, **QUIET).run()
    for stage in (1, 2, 3):
        _assert_identical(tmp_path / "a" / f"stage{stage}", tmp_path / "b" / f"stage{stage}")
        la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "logs" / f"stage{stage}.jsonl").read_text().splitlines()]
        lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "logs" / f"stage{stage}.jsonl").read_text().splitlines()]
        assert la == lb and len(la) == 6


def test_resume_exact_with_shuffled_dataloader(tmp_path):
    """A shuffling torch DataLoader (prepared by accelerate) resumes at the same sample of the same epoch order."""
    _teacher(tmp_path / "t")
    rows = [b for batch in _batches(4, b=2) for b in
            [{k: v[i] for k, v in batch.items()} for i in range(2)]]

    def loader():
        return torch.utils.data.DataLoader(rows, batch_size=2, shuffle=True)

    r = _recipe(tmp_path / "t", tmp_path / "a", steps=7, batch_size=2)
    StageRunner(r, 1, data=loader(), **QUIET).run()
    rb = _recipe(tmp_path / "t", tmp_path / "b", steps=7, batch_size=2)
    with pytest.raises(StopTraining):
        StageRunner(rb, 1, data=loader(), stop_after=5, **QUIET).run()
    StageRunner(rb, 1, data=loader(), resume=True, **QUIET).run()
    _assert_identical(tmp_path / "a" / "stage1", tmp_path / "b" / "stage1")


def test_resume_exact_with_distill_data_loader(tmp_path, smollm2_tokenizer):
    """The same with mmmamba.distill.data.build_dataloader (bucketed, seeded sampler) built from the recipe."""
    from conftest import tiny_config

    torch.manual_seed(0)
    t = MMMambaForCausalLM(tiny_config(layer_types=["attention"] * 4, vocab_size=len(smollm2_tokenizer))).eval()
    save_model(t, tmp_path / "t", smollm2_tokenizer)
    (tmp_path / "corpus.txt").write_text(" ".join(f"line {i}: the quick brown fox jumps." for i in range(60)))
    data = {"sources": [{"type": "text", "path": str(tmp_path / "corpus.txt")}], "max_length": 16}

    def recipe(out):
        return parse_recipe({"teacher": str(tmp_path / "t"), "output_dir": str(out), "data": data,
                             "defaults": {"steps": 7, "batch_size": 2, "micro_batch_size": 2, "save_every": 3}})

    StageRunner(recipe(tmp_path / "a"), 1, **QUIET).run()
    with pytest.raises(StopTraining):
        StageRunner(recipe(tmp_path / "b"), 1, stop_after=4, **QUIET).run()
    StageRunner(recipe(tmp_path / "b"), 1, resume=True, **QUIET).run()
    _assert_identical(tmp_path / "a" / "stage1", tmp_path / "b" / "stage1")


def test_cli_distill(tmp_path, smollm2_tokenizer, capsys):
    from conftest import tiny_config

    from mmmamba.cli import main

    torch.manual_seed(0)
    t = MMMambaForCausalLM(tiny_config(layer_types=["attention"] * 4, vocab_size=len(smollm2_tokenizer))).eval()
    save_model(t, tmp_path / "t", smollm2_tokenizer)
    (tmp_path / "corpus.txt").write_text(" ".join(f"row {i}: a quick brown fox." for i in range(40)))
    (tmp_path / "r.yaml").write_text(
        f"teacher: {tmp_path / 't'}\noutput_dir: {tmp_path / 'unused'}\nplacement: every:2\n"
        f"data: {{sources: [{{type: text, path: {tmp_path / 'corpus.txt'}}}], max_length: 16}}\n"
        "defaults: {steps: 2, batch_size: 2, micro_batch_size: 1, save_every: 1}\n"
    )
    out = tmp_path / "o"
    assert main(["distill", str(tmp_path / "r.yaml"), "--stage", "3", "--out", str(out), "--no-progress"]) == 2
    assert "stage3 needs the output of stage2" in capsys.readouterr().err
    assert main(["distill", str(tmp_path / "r.yaml"), "--stage", "1", "--out", str(out), "--no-progress"]) == 0
    assert main(["distill", str(tmp_path / "r.yaml"), "--resume", "--out", str(out), "--no-progress"]) == 0
    m = read_manifest(out / "stage3")
    assert m["complete"] and [c["stage"] for c in m["chain"]] == ["seed", "stage1", "stage2"]
    assert (out / "stage3" / "tokenizer_config.json").exists() and not (tmp_path / "unused").exists()


def test_auto_placement_in_stage3(tmp_path, smollm2_tokenizer, capsys):
    """placement auto:N measures each layer's KL sensitivity on the held-out split after stage 2."""
    from conftest import tiny_config

    torch.manual_seed(0)
    t = MMMambaForCausalLM(tiny_config(layer_types=["attention"] * 4, vocab_size=len(smollm2_tokenizer),
                                       initializer_range=0.1)).eval()
    save_model(t, tmp_path / "t", smollm2_tokenizer)
    (tmp_path / "c.txt").write_text(" ".join(f"row {i}: the lazy dog sleeps {i % 7}." for i in range(80)))
    r = parse_recipe({"teacher": str(tmp_path / "t"), "output_dir": str(tmp_path / "o"), "placement": "auto:1",
                      "data": {"sources": [{"type": "text", "path": str(tmp_path / "c.txt")}], "max_length": 16,
                               "heldout_fraction": 0.2},
                      "defaults": {"steps": 2, "batch_size": 2, "micro_batch_size": 2, "placement_batches": 2}})
    out = run_distill(r, progress=False, log=print)
    m = read_manifest(out[3])
    assert len(m["placement"]["attention_layers"]) == 1 and set(m["placement"]["sensitivity"]) == {"0", "1", "2", "3"}
    assert MMMambaForCausalLM.from_pretrained(out[3]).config.attention_layers == m["placement"]["attention_layers"]
    assert "chosen attention layers" in capsys.readouterr().out


def test_linear_student_final_folder_loads(tmp_path):
    _teacher(tmp_path / "t")
    out = run_distill(_recipe(tmp_path / "t", tmp_path / "o", placement="none", steps=2), data=_batches(2), **QUIET)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out[3])
    assert model.config.attention_layers == [] and read_manifest(out[3])["placement"]["attention_layers"] == []
    w = _weights(out[3])
    assert all(f"model.layers.{i}.mixer.{p}" in w for i in range(4) for p in ("dt_bias", "A_log", "conv1d.weight"))
    ids = _batches(1)[0]["input_ids"]
    ref = MMMambaForCausalLM.from_pretrained(out[3]).eval()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, ref(ids).logits)


def test_outputs_manifest_and_checkpoint_files(tmp_path):
    _teacher(tmp_path / "t")
    r = _recipe(tmp_path / "t", tmp_path / "o", steps=4)
    out = run_distill(r, data=_batches(3), **QUIET)
    s1, s3 = out[1], out[3]
    for f in ("config.json", "model.safetensors", "mmmamba_manifest.json", "metrics.jsonl", "loss.png"):
        assert (s3 / f).exists(), f
    m = read_manifest(s3)
    assert m["stage"] == "stage3" and m["complete"] and m["steps"] == 4
    assert [c["stage"] for c in m["chain"]] == ["seed", "stage1", "stage2"]
    assert m["layer_types"] == ["full_attention", "linear_attention", "full_attention", "linear_attention"]
    assert m["placement"]["attention_layers"] == [0, 2]
    assert "model.layers.1.mixer.q_proj.weight" in m["trainable"]
    assert not any("dt_bias" in n or "A_log" in n or "o_proj" in n for n in m["trainable"])
    assert math.isfinite(m["final_metrics"]["loss"]) and "kl" in m["final_metrics"]
    assert (tmp_path / "o" / "logs" / "stage1_loss.png").exists()
    recs = [json.loads(x) for x in (s1 / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3, 4]
    assert all(k in recs[0] for k in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "layer_mse"))
    # checkpoints: HF folder + trainer state; optimizer state loads with weights_only=True (no unpickling)
    ck = tmp_path / "o" / "stage1-checkpoints" / "step-00000002"
    assert read_manifest(ck)["complete"] is False
    osd = torch.load(ck / "trainer" / "optimizer.pt", weights_only=True)
    assert osd["state"] and len(osd["param_groups"]) == 2
    state = json.loads((ck / "trainer" / "state.json").read_text())
    assert state["step"] == 2 and state["data"] == {"epoch": 1, "batch_in_epoch": 1, "global_batch": 4}
    assert (ck / "trainer" / "rng_0.safetensors").exists() and (ck / "trainer" / "scheduler.json").exists()
    # the final model holds every parameter (dt_bias / A_log too) and loads with from_pretrained
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(s3)
    assert isinstance(model, MMMambaForCausalLM) and model.config.attention_layers == [0, 2]
    w2, w3 = _weights(out[2]), _weights(s3)
    for k in ("model.layers.1.mixer.dt_bias", "model.layers.3.mixer.A_log"):
        assert torch.equal(w2[k], w3[k])  # not trained in stage 3, carried over from stage 2
    assert not torch.equal(w2["model.layers.1.mixer.q_proj.weight"], w3["model.layers.1.mixer.q_proj.weight"])
    assert "model.layers.0.mixer.q_proj.weight" in w3 and "model.layers.0.mixer.dt_bias" not in w3


def test_chaining_refusals(tmp_path):
    _teacher(tmp_path / "t")
    _teacher(tmp_path / "t2", seed=5)
    data = _batches(2)
    r = _recipe(tmp_path / "t", tmp_path / "o", steps=2)
    with pytest.raises(ChainError, match=r"stage3 needs the output of stage2 at .*stage2, which does not exist.*"
                                         r"--stage 2"):
        StageRunner(r, 3, data=data, **QUIET).run()
    StageRunner(r, 1, data=data, **QUIET).run()
    with pytest.raises(ChainError, match="already exists; pass --resume"):
        StageRunner(r, 1, data=data, **QUIET).run()
    assert StageRunner(r, 1, data=data, resume=True, **QUIET).run() == tmp_path / "o" / "stage1"  # skipped
    other = _recipe(tmp_path / "t2", tmp_path / "o", steps=2)  # same folder, another teacher
    with pytest.raises(ChainError, match="distilled from teacher .* but this run's teacher is"):
        StageRunner(other, 2, data=data, **QUIET).run()
    wrong = parse_recipe({"teacher": str(tmp_path / "t"), "output_dir": str(tmp_path / "o"),
                          "stages": {3: {"input": str(tmp_path / "o" / "stage1")}}})
    with pytest.raises(ChainError, match="stage3 expects the output of stage2, but .* is the output of stage1"):
        StageRunner(wrong, 3, data=data, **QUIET).run()


def test_stages_cut_kl_to_teacher_tenfold(tmp_path):
    """A tiny random teacher (init std ~ 1/sqrt(hidden)), 8 random sequences of 32 tokens: seeded start vs the
    hybrid after stages 1 + 2 + 3, KL(teacher || student) per token on the distillation data."""
    teacher = _teacher(tmp_path / "t", seed=1, init=0.14)
    ids = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4]), "labels": ids[i:i + 4]}
            for i in (0, 4)]
    r = parse_recipe({
        "teacher": str(tmp_path / "t"), "output_dir": str(tmp_path / "o"), "placement": "every:4",
        "defaults": {"batch_size": 4, "micro_batch_size": 4, "save_every": 1000, "log_every": 10},
        "stages": {1: {"lr": 1e-2, "steps": 30}, 2: {"lr": 1e-2, "steps": 30},
                   3: {"lr": 1e-2, "steps": 120, "loss": {"positions": "all"}}},
    })
    out = run_distill(r, data=data, **QUIET)

    def kl(folder):
        student = MMMambaForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            return EndToEndDistill(student, teacher, positions="all")(ids)[0].item()

    start, end = kl(tmp_path / "o" / "seed"), kl(out[3])
    assert kl(out[2]) < start
    assert end * 10 <= start, f"KL {start:.4f} -> {end:.4f}: less than a 10x reduction"


def test_optimizer_groups_and_wsd_schedule(tiny_teacher):
    from mmmamba.distill.seed import seed_student
    from mmmamba.distill.stages import set_trainable

    student = seed_student(tiny_teacher, None)
    set_trainable(student, 1)
    cfg = parse_recipe({"teacher": "x", "output_dir": "y", "defaults": {"steps": 20}}).stages[1]
    opt = build_optimizer(student, cfg)
    decay, plain = opt.param_groups
    names = {id(p): n for n, p in student.named_parameters()}
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert {names[id(p)].split("mixer.")[1] for p in decay["params"]} == {"conv1d.weight", "dt_proj.weight",
                                                                          "g_proj.weight"}
    assert {names[id(p)].split("mixer.")[1] for p in plain["params"]} == {"conv1d.bias", "dt_bias", "A_log",
                                                                          "g_norm.weight"}
    assert opt.defaults["betas"] == (0.9, 0.999)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0] / cfg.lr)
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5)  # warmup: 2 steps (10 %)
    assert all(x == pytest.approx(1.0) for x in lrs[2:18])  # stable: 16 steps (80 %)
    assert lrs[18] == pytest.approx(1.0) and lrs[19] == pytest.approx(0.5)  # decay: 2 steps (10 %, cosine)


def _run_worker(args, out, teacher, timeout=240):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*args, str(Path(__file__).with_name("ddp_worker.py")), str(out), str(teacher)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_two_processes_match_one_process_with_accumulation(tmp_path):
    """Global batch 4 as 1 process x micro 2 x accumulation 2 and as 2 processes (torchrun, gloo) x micro 2 x
    accumulation 1, on a bucketed DataLoader with 7 micro-batches per epoch (odd, the last one partial), 8 steps
    (2 micro-batches each: past two epoch boundaries, steps 4 and 8 straddle one): each step sees the same samples,
    so the logged losses, token counts and final weights of stages 1-3 are bit-identical. A 2-process run stopped
    after step 4 and resumed from its step-3 checkpoint (the next step straddles the epoch boundary: one process
    takes the partial last batch of epoch 0, the other the first of epoch 1) matches too, and so does a plain list of
    5 batches (tests/distill/ddp_worker.py)."""
    import shutil
    import sys

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    _teacher(tmp_path / "t")  # = the worker's teacher
    _run_worker([sys.executable], tmp_path / "one", tmp_path / "t")
    _run_worker([torchrun, "--standalone", "--nproc_per_node", "2"], tmp_path / "two", tmp_path / "t")

    def log(run, stage):
        return [json.loads(x) for x in (run / "logs" / f"stage{stage}.jsonl").read_text().splitlines()]

    one, two, resumed = tmp_path / "one" / "run", tmp_path / "two" / "run", tmp_path / "two" / "resumed"
    for stage in (1, 2, 3):
        a, b, c = log(one, stage), log(two, stage), log(resumed, stage)
        assert len(a) == 8 and [r["epoch"] for r in a] == [0, 0, 0, 1, 1, 1, 1, 2]
        for key in ("loss", "tokens", "epoch"):
            assert [r[key] for r in a] == [r[key] for r in b] == [r[key] for r in c], (stage, key)
        _assert_identical(one / f"stage{stage}", two / f"stage{stage}")
        _assert_identical(one / f"stage{stage}", resumed / f"stage{stage}")
        a, b = log(tmp_path / "one" / "list", stage), log(tmp_path / "two" / "list", stage)  # a plain list of batches
        assert [(r["loss"], r["tokens"], r["epoch"]) for r in a] == [(r["loss"], r["tokens"], r["epoch"]) for r in b]
        _assert_identical(tmp_path / "one" / "list" / f"stage{stage}", tmp_path / "two" / "list" / f"stage{stage}")
    for step, pos in ((3, {"epoch": 0, "batch_in_epoch": 6, "global_batch": 6}),
                      (6, {"epoch": 1, "batch_in_epoch": 5, "global_batch": 12})):
        ck = resumed / "stage1-checkpoints" / f"step-{step:08d}" / "trainer" / "state.json"
        assert json.loads(ck.read_text())["data"] == pos


def test_fsdp_without_gpus_is_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = parse_recipe({"teacher": str(tmp_path / "t"), "output_dir": str(tmp_path / "o"), "distributed": "fsdp"})
    with pytest.raises(ValueError, match="fsdp needs GPUs.*distributed: ddp"):
        StageRunner(r, 3, data=_batches(2), **QUIET).run()


def test_kernels_chosen_and_logged_on_cuda(tmp_path, monkeypatch):
    """On CUDA the runner picks the SSD backward and checks the fused gated RMSNorm before DDP wraps the module,
    and says which ones train."""
    from conftest import tiny_config

    from mmmamba.ops import add_norm, conv_silu, gated_norm, gla_prep, rope, ssd_fla, swiglu

    asked, checked, said = [], [], []
    monkeypatch.setattr(ssd_fla, "fla_available", lambda: True)
    monkeypatch.setattr(ssd_fla, "backward_mode", lambda K, V, dev, h: asked.append((K, V, dev, h)) or "bk128")
    monkeypatch.setattr(gated_norm, "_fused_ok", lambda d, dtype, index: checked.append((d, dtype, index)) or True)
    monkeypatch.setattr(conv_silu, "_fused_ok", lambda k, dtype, bias, index: checked.append((k, dtype)) or False)
    monkeypatch.setattr(gla_prep, "fused_ok", lambda d, dtype, index: checked.append(("prep", d)) or True)
    monkeypatch.setattr(swiglu, "fused_ok", lambda dtype, index: checked.append(("silu", dtype)) or True)
    monkeypatch.setattr(add_norm, "rmsnorm_ok", lambda dtype, index: checked.append(("norm", dtype)) or True)
    r = parse_recipe({"teacher": str(tmp_path / "t"), "output_dir": str(tmp_path / "o")})
    runner = StageRunner(r, 1, progress=False, log=said.append)
    student = MMMambaForCausalLM(tiny_config(layer_types=["attention", "mamba2"] * 2))
    runner._choose_kernels(student, torch.device("cuda", 0), torch.bfloat16)
    d, h = student.config.head_dim, student.config.num_attention_heads
    k = student.config.mamba_d_conv
    assert asked == [(d, d, torch.device("cuda", 0), h)]
    # stage 3: the student's norms in its parameters' dtype (fp32), its MLPs under autocast (bf16)
    assert checked == [(d, torch.bfloat16, 0), (k, torch.bfloat16), ("prep", d), ("norm", torch.float32),
                       ("silu", torch.bfloat16)]
    assert "128-wide tiles" in said[0]
    assert "gated RMSNorm: fused Triton kernels" in said[1] and "conv + SiLU: torch ops" in said[1]
    assert "SSD inputs from the conv output: fused" in said[1] and "RMSNorm: fused" in said[1]
    assert "teacher stream" not in said[1]

    monkeypatch.setattr(add_norm, "fused_ok", lambda dtype, index: checked.append(("stream", dtype)) or True)
    monkeypatch.setattr(rope, "fused_ok", lambda dtype, index: checked.append(("rope", dtype)) or True)
    monkeypatch.setattr(gated_norm, "_fused_mse_ok", lambda d, dtype, index: checked.append(("mse", d)) or True)
    runner._choose_kernels(student, torch.device("cuda", 0), torch.bfloat16, torch.bfloat16)  # stages 1-2
    assert checked[-4:] == [("mse", d), ("stream", torch.bfloat16), ("rope", torch.bfloat16), ("silu", torch.bfloat16)]
    assert "teacher stream add + RMSNorm: fused" in said[-1] and "teacher RoPE: fused" in said[-1]
    assert "per-head MSE in the gated RMSNorm: fused" in said[-1] and "teacher MLP SiLU product: fused" in said[-1]
    runner._choose_kernels(student, torch.device("cpu"), torch.float32)  # nothing to choose on the CPU
    assert len(asked) == 2 and len(said) == 4


def test_several_processes_take_the_first_ones_ssd_backward(tmp_path, monkeypatch):
    """The dq/dk/dg tile width is timed on each process; with several, all take the first process's choice, handed
    to every Mamba-2 mixer as its explicit `ssd_backward` (no environment variable is written)."""
    import accelerate.utils
    from conftest import tiny_config

    from mmmamba.ops import add_norm, conv_silu, gated_norm, gla_prep, ssd_fla, swiglu

    monkeypatch.setenv("MMMAMBA_SSD_BACKWARD", "")  # unset (empty) now, and restored after the test
    monkeypatch.setattr(ssd_fla, "fla_available", lambda: True)
    monkeypatch.setattr(ssd_fla, "backward_mode", lambda K, V, dev, h: "bk128")  # this process timed 128 faster
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objs: ["bk32"])  # the first process: 32
    monkeypatch.setattr(gated_norm, "_fused_ok", lambda *a: True)
    monkeypatch.setattr(conv_silu, "_fused_ok", lambda *a: True)
    monkeypatch.setattr(gla_prep, "fused_ok", lambda *a: True)
    monkeypatch.setattr(swiglu, "fused_ok", lambda *a: True)
    monkeypatch.setattr(add_norm, "rmsnorm_ok", lambda *a: True)
    said = []
    r = parse_recipe({"teacher": str(tmp_path / "t"), "output_dir": str(tmp_path / "o")})
    runner = StageRunner(r, 3, progress=False, log=said.append)
    runner.acc = SimpleNamespace(num_processes=2, is_main_process=True)
    student = MMMambaForCausalLM(tiny_config(layer_types=["attention", "mamba2"] * 2))
    runner._choose_kernels(student, torch.device("cuda", 0), torch.bfloat16)
    mixers = [m for m in student.modules() if hasattr(m, "ssd_backward")]
    assert mixers and all(m.ssd_backward == "bk32" for m in mixers) and "32-wide tiles" in said[0]
    assert os.environ["MMMAMBA_SSD_BACKWARD"] == ""


def test_compile_option_compiles_teacher_step_mixers_and_layers(tmp_path, monkeypatch):
    """`compile: true`: stages 1-2 compile the teacher's layer step once and every Mamba-2 mixer's per-head path;
    stage 3 every student and teacher layer. torch.compile is replaced by a recorder here; the compiled numerics
    are checked against eager in tests/distill/test_compile.py."""
    compiled = []

    def fake_compile(fn, **kw):
        owner = getattr(fn, "__self__", None)
        compiled.append(type(owner).__name__ if owner is not None else fn.__name__)

        def wrapper(*a, **k):
            return fn(*a, **k)

        wrapper._torchdynamo_orig_callable = fn
        return wrapper

    monkeypatch.setattr(torch, "compile", fake_compile)
    _teacher(tmp_path / "t")
    r = _recipe(tmp_path / "t", tmp_path / "o", steps=2, compile=True)
    StageRunner(r, 1, data=_batches(2), **QUIET).run()
    assert compiled == ["stream_layer"] + ["Mamba2Mixer"] * 4
    compiled.clear()
    StageRunner(r, 2, data=_batches(2), **QUIET).run()
    out = StageRunner(r, 3, data=_batches(2), **QUIET).run()
    assert compiled == ["stream_layer"] + ["Mamba2Mixer"] * 4 + ["DecoderLayer"] * 8
    assert (out / "model.safetensors").exists()
    from mmmamba.distill.compile import compile_mixers

    model = MMMambaForCausalLM.from_pretrained(out)
    assert compile_mixers(model) == 2 and compile_mixers(model) == 0  # every:2 leaves 2 mixers; never twice
    with pytest.raises(Exception, match="compile"):
        parse_recipe({"teacher": "t", "output_dir": "o", "defaults": {"compile": "sometimes"}})


@pytest.mark.parametrize("tied", [True, False])
def test_tied_head_written_once_from_gathered_copies(tmp_path, tied):
    """FSDP gathers the tied LM head and embedding as two CPU copies; the saved folder must still hold the head
    once (as on one device) and load back to the same model."""
    from conftest import tiny_model

    model = tiny_model(["attention", "mamba2", "attention", "mamba2"], tie_word_embeddings=tied)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}  # no shared storage, as FSDP's offload
    sd = drop_tied_copies(gathered, model)
    assert ("lm_head.weight" in sd) == (not tied)
    keys = set(sd)  # save_pretrained empties the dict it is given as it writes
    model.save_pretrained(tmp_path, state_dict=sd, safe_serialization=True)
    assert set(load_file(tmp_path / "model.safetensors")) == keys
    back = MMMambaForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    if tied:
        gathered["lm_head.weight"] = gathered["lm_head.weight"] + 1
        with pytest.raises(RuntimeError, match="tied"):
            drop_tied_copies(gathered, model)


def test_cuda_graph_says_when_it_runs_eagerly(tmp_path, monkeypatch):
    """One recipe serves one GPU and several: under DDP / FSDP, or on a CPU, cuda_graph says it runs eagerly."""
    said = []
    runner = StageRunner(_recipe(tmp_path / "t", tmp_path / "o", cuda_graph=True), 1, progress=False,
                         log=said.append)

    class Acc:
        device, num_processes, is_main_process = torch.device("cuda", 0), 2, True

    runner.acc = Acc()
    step = runner._micro_step(torch.nn.Linear(2, 2), 1, [])
    assert "runs on one GPU only" in said[-1] and step.__name__ == "micro"
    Acc.device, Acc.num_processes = torch.device("cpu"), 1
    runner._micro_step(torch.nn.Linear(2, 2), 1, [])
    assert "needs a GPU" in said[-1]


def test_cuda_graph_settings_train_as_eager_on_cpu(tmp_path):
    """`cuda_graph: true` on a CPU says it runs eagerly. What it changes besides the graphs, gradients zeroed in
    place and stage 3's KL rows selected by weight instead of gathered, trains the same model: stages 1-2
    bit-identical, stage 3 within fp32 rounding. Unpadded batches lose their all-ones mask on the way."""
    _teacher(tmp_path / "t")
    data = _batches(5) + _batches(3, seed=1, pad=False)
    run_distill(_recipe(tmp_path / "t", tmp_path / "a"), data=data, **QUIET)
    said = []
    run_distill(_recipe(tmp_path / "t", tmp_path / "b", cuda_graph=True), data=data, progress=False, log=said.append)
    assert sum("cuda_graph needs a GPU; running eagerly" in s for s in said) == 3
    for stage in (1, 2):
        _assert_identical(tmp_path / "a" / f"stage{stage}", tmp_path / "b" / f"stage{stage}")
    wa, wb = _weights(tmp_path / "a" / "stage3"), _weights(tmp_path / "b" / "stage3")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7)
