"""Issue 13: the trainer never loses work or trains on garbage (NaN, Ctrl-C, corrupt checkpoints, changed
settings), on tiny CPU teachers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import QUIET, _assert_identical, _batches, _recipe, _teacher

from mmmamba.distill.manifest import read_manifest
from mmmamba.distill.recipe import parse_recipe
from mmmamba.distill.trainer import Aborted, Interrupted, NonFiniteError, StageRunner, run_distill
from mmmamba.io import save_model


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON)."""
    def bad(c):
        raise ValueError(f"bare {c} in JSON")
    return json.loads(text, parse_constant=bad)


def test_item02_nan_loss_stops_and_keeps_good_checkpoint(tmp_path):
    """lr 1e3 (warmed up from 0) drives the loss to nan after a few steps: the run stops naming the step and the
    last good checkpoint, whose weights are finite, writes no final folder and only valid JSON."""
    _teacher(tmp_path / "t")
    r = parse_recipe({"teacher": str(tmp_path / "t"), "output_dir": str(tmp_path / "o"),
                      "defaults": {"steps": 12, "batch_size": 2, "micro_batch_size": 2, "save_every": 1,
                                   "log_every": 1, "keep_checkpoints": 1, "warmup": 0.5},
                      "stages": {1: {"lr": 1e3}}})
    with pytest.raises(NonFiniteError, match=r"is (nan|inf) at step (\d+); stopped before that update\. The last "
                                             r"good checkpoint is .*step-\d+"):
        StageRunner(r, 1, data=_batches(4), **QUIET).run()
    ckpts = sorted((tmp_path / "o" / "stage1-checkpoints").glob("step-*"))
    assert len(ckpts) == 1
    for k, v in load_file(str(ckpts[0] / "model.safetensors")).items():
        assert torch.isfinite(v).all(), k
    assert not (tmp_path / "o" / "stage1").exists()
    recs = [strict_json(x) for x in (tmp_path / "o" / "logs" / "stage1.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] is None and "stopped" in recs[-1]
    strict_json((ckpts[0] / "mmmamba_manifest.json").read_text())
    strict_json((ckpts[0] / "trainer" / "state.json").read_text())


class SignalAt:
    """Re-iterable batches that send `signum` to this process as micro-batch number `at` (from 1) is drawn."""

    def __init__(self, batches, at: int, *signums):
        self.batches, self.at, self.signums, self.n = batches, at, list(signums), 0

    def __iter__(self):
        for b in self.batches:
            self.n += 1
            if self.n >= self.at and self.signums:
                os.kill(os.getpid(), self.signums.pop(0))
            yield b


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_item03_signal_saves_checkpoint_and_resume_is_bitwise(tmp_path, signum):
    """SIGINT / SIGTERM in the middle of step 3 (of 6; no regular checkpoint before step 100): a checkpoint at
    step 3, Interrupted with exit code 128 + signum, the handlers restored; --resume ends bit-identical to an
    uninterrupted run. A signal in the last step completes the stage and stops before the next."""
    _teacher(tmp_path / "t")
    data = _batches(5)
    StageRunner(_recipe(tmp_path / "t", tmp_path / "a", save_every=100), 1, data=data, **QUIET).run()
    rb = _recipe(tmp_path / "t", tmp_path / "b", save_every=100)
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as e:
        StageRunner(rb, 1, data=SignalAt(data, 5, signum), **QUIET).run()
    assert e.value.exit_code == 128 + signum and e.value.step == 3 and signal.getsignal(signum) is before
    assert [p.name for p in (tmp_path / "b" / "stage1-checkpoints").iterdir()] == ["step-00000003"]
    StageRunner(rb, 1, data=data, resume=True, **QUIET).run()
    _assert_identical(tmp_path / "a" / "stage1", tmp_path / "b" / "stage1")
    with pytest.raises(Interrupted) as e:  # in the last step (micro-batches 11-12): stage 2 completes, 3 waits
        run_distill(rb, (2, 3), data=SignalAt(data, 11, signum), **QUIET)
    assert e.value.saved == tmp_path / "b" / "stage2" and read_manifest(e.value.saved)["complete"]
    assert not (tmp_path / "b" / "stage3").exists()


def test_item03_second_signal_aborts_at_once(tmp_path):
    _teacher(tmp_path / "t")
    rb = _recipe(tmp_path / "t", tmp_path / "b", save_every=100)
    with pytest.raises(Aborted) as e:
        StageRunner(rb, 1, data=SignalAt(_batches(5), 3, signal.SIGINT, signal.SIGINT), **QUIET).run()
    assert e.value.exit_code == 130 and not (tmp_path / "b" / "stage1-checkpoints").exists()


def test_item03_cli_sigint_and_sigterm_then_resume_bitwise(tmp_path, smollm2_tokenizer):
    """`mmmamba distill` in a subprocess gets SIGINT, is resumed and gets SIGTERM, is resumed again: exit codes 130
    and 143 with a message saying how to resume; the final weights equal an uninterrupted run's, bit for bit."""
    from conftest import tiny_config

    from mmmamba import MMMambaForCausalLM

    torch.manual_seed(0)
    t = MMMambaForCausalLM(tiny_config(layer_types=["attention"] * 4, vocab_size=len(smollm2_tokenizer))).eval()
    save_model(t, tmp_path / "t", smollm2_tokenizer)
    (tmp_path / "c.txt").write_text(" ".join(f"row {i}: the quick brown fox {i % 13}." for i in range(200)))
    (tmp_path / "r.yaml").write_text(
        f"teacher: {tmp_path / 't'}\noutput_dir: {tmp_path / 'a'}\n"
        f"data: {{sources: [{{type: text, path: {tmp_path / 'c.txt'}}}], max_length: 16}}\n"
        "defaults: {steps: 150, batch_size: 2, micro_batch_size: 1, save_every: 1000, log_every: 1}\n")
    from mmmamba.cli import main

    assert main(["distill", str(tmp_path / "r.yaml"), "--stage", "1", "--no-progress"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                                        os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mmmamba.cli", "distill", str(tmp_path / "r.yaml"), "--stage", "1", "--no-progress",
           "--out", str(tmp_path / "b")]
    log = tmp_path / "b" / "logs" / "stage1.jsonl"
    for signum, extra in ((signal.SIGINT, []), (signal.SIGTERM, ["--resume"])):
        n0 = len(log.read_text().splitlines()) if log.exists() else 0
        p = subprocess.Popen(cmd + extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and not (
                log.exists() and len(log.read_text().splitlines()) >= n0 + 3):
            time.sleep(0.05)
        p.send_signal(signum)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 128 + signum, err[-3000:]
        assert "--resume --out" in err and "saved" in err, err[-2000:]
    assert main(["distill", str(tmp_path / "r.yaml"), "--stage", "1", "--resume", "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    assert len(list((tmp_path / "b" / "stage1-checkpoints").glob("step-*"))) == 2
    _assert_identical(tmp_path / "a" / "stage1", tmp_path / "b" / "stage1")


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_optimizer_byte"])
def test_item05_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, damage):
    """The newest checkpoint (step 4) truncated or with a flipped byte: --resume says so, continues from step 2 and
    ends bit-identical to an uninterrupted run; the temporary folder of an interrupted checkpoint write is removed."""
    from mmmamba.distill.trainer import StopTraining

    _teacher(tmp_path / "t")
    data = _batches(5)
    StageRunner(_recipe(tmp_path / "t", tmp_path / "a"), 1, data=data, **QUIET).run()
    rb = _recipe(tmp_path / "t", tmp_path / "b")
    with pytest.raises(StopTraining):
        StageRunner(rb, 1, data=data, stop_after=5, **QUIET).run()
    ck = tmp_path / "b" / "stage1-checkpoints"
    if damage == "truncate_weights":
        f = ck / "step-00000004" / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        f = ck / "step-00000004" / "trainer" / "optimizer.pt"
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(bytes(raw))
    stale = ck / ".step-00000006.tmp-x1y2"
    (stale / "trainer").mkdir(parents=True)
    (ck / ".step-00000002.old-99").mkdir()  # an interrupted replace whose target exists again: deleted
    said = []
    StageRunner(rb, 1, data=data, resume=True, progress=False, log=said.append).run()
    assert any("step-00000004 is damaged" in m and "using the previous one, step-00000002" in m for m in said), said
    assert any("resuming from" in m and "step 2" in m for m in said) and not stale.exists()
    assert not (ck / ".step-00000002.old-99").exists()
    _assert_identical(tmp_path / "a" / "stage1", tmp_path / "b" / "stage1")


def test_item10_resume_refuses_changed_settings_and_other_teacher(tmp_path):
    """A checkpoint or a completed stage made with other settings (lr, steps) is refused on --resume, naming the
    fields, unless allow_changed; one made from another teacher is refused always; log-only settings may change."""
    from mmmamba.distill.manifest import ChainError
    from mmmamba.distill.trainer import StopTraining

    _teacher(tmp_path / "t")
    _teacher(tmp_path / "t2", seed=5)
    data = _batches(5)
    r = _recipe(tmp_path / "t", tmp_path / "o")
    with pytest.raises(StopTraining):
        StageRunner(r, 1, data=data, stop_after=3, **QUIET).run()
    def edit(**stage1):
        return parse_recipe({"teacher": str(tmp_path / "t"), "output_dir": str(tmp_path / "o"),
                             "placement": "every:2", "defaults": {"steps": 6, "batch_size": 4, "micro_batch_size": 2,
                                                                  "save_every": 2, "log_every": 1},
                             "stages": {1: {"lr": 1e-2, **stage1}, 2: {"lr": 5e-3}, 3: {"lr": 5e-3}}})

    edited = edit(lr=0.5, steps=8)
    with pytest.raises(ChainError, match=r"other settings .*lr: 0\.01 -> 0\.5; steps: 6 -> 8.*--allow-changed"):
        StageRunner(edited, 1, data=data, resume=True, **QUIET).run()
    other = _recipe(tmp_path / "t2", tmp_path / "o")
    with pytest.raises(ChainError, match="belongs to another teacher"):
        StageRunner(other, 1, data=data, resume=True, **QUIET).run()
    said = []
    out = StageRunner(edited, 1, data=data, resume=True, allow_changed=True, progress=False, log=said.append).run()
    m = read_manifest(out)
    assert m["steps"] == 8 and m["settings"]["values"]["lr"] == 0.5 and len(m["settings"]["sha256"]) == 64
    assert m["settings_changed_on_resume"] == ["lr: 0.01 -> 0.5", "steps: 6 -> 8"]
    with pytest.raises(ChainError, match=r"lr: 0\.5 -> 0\.01; steps: 8 -> 6"):  # the completed stage, too
        StageRunner(r, 1, data=data, resume=True, **QUIET).run()
    with pytest.raises(ChainError, match="belongs to another teacher"):
        StageRunner(other, 1, data=data, resume=True, **QUIET).run()
    assert StageRunner(edit(lr=0.5, steps=8, log_every=3, save_every=5), 1, data=data, resume=True,
                       **QUIET).run() == out


@pytest.mark.parametrize("placement", ["0,99", [0, 99], "tail-stacked:99", "auto:9"])
def test_item09_placement_checked_against_teacher_before_first_step(tmp_path, placement):
    """A placement that does not fit the 4-layer teacher stops stage 1 before its first step (not stage 3)."""
    _teacher(tmp_path / "t")
    with pytest.raises(ValueError, match=r"placement .*(out of range|the teacher has 4)"):
        run_distill(_recipe(tmp_path / "t", tmp_path / "o", placement=placement), data=_batches(2), **QUIET)
    assert not (tmp_path / "o" / "stage1").exists() and not (tmp_path / "o" / "logs" / "stage1.jsonl").exists()


def test_item04_micro_batch_of_unreadable_rows_is_skipped_and_reported(tmp_path, caplog):
    """A micro-batch whose every row lost its image after the scan (the collator drops them: 0 rows, as with the
    HoVLE recipes' micro-batch of 1 and one bad image) is skipped and reported; training goes on."""
    from mmmamba.distill.data import Collator

    empty = Collator(pad_id=0)([{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2]),
                                 "pixel_values": None, "origin": "rows.jsonl:7", "error": "cannot identify image"}])
    assert empty["input_ids"].shape[0] == 0 and "rows.jsonl:7" in caplog.text
    _teacher(tmp_path / "t")
    data = _batches(5)
    data.insert(2, empty)
    said = []
    out = StageRunner(_recipe(tmp_path / "t", tmp_path / "o", steps=3), 1, data=data, progress=False,
                      log=said.append).run()
    assert sum("skipped an empty micro-batch" in m for m in said) == 1 and (out / "model.safetensors").exists()


def test_item14_gpu_recipe_on_cpu_warns_with_time_per_step(tmp_path):
    """A recipe meant for a GPU (cuda_graph, as the shipped SmolLM2 recipes) on the CPU says so with an estimated
    time per step; a CPU-sized recipe does not."""
    from mmmamba.distill.trainer import cpu_matmul_rate

    _teacher(tmp_path / "t")
    said = []
    StageRunner(_recipe(tmp_path / "t", tmp_path / "g", steps=1, cuda_graph=True), 1, data=_batches(2),
                progress=False, log=said.append).run()
    warn = [m for m in said if m.startswith("WARNING: stage 1: this recipe looks meant for a GPU (it sets "
                                            "cuda_graph: true) but runs on the CPU")]
    assert len(warn) == 1 and "per step" in warn[0] and "an estimate" in warn[0] and cpu_matmul_rate() > 1e8
    said.clear()
    StageRunner(_recipe(tmp_path / "t", tmp_path / "c", steps=1), 1, data=_batches(2), progress=False,
                log=said.append).run()
    assert not any("meant for a GPU" in m for m in said)


def test_item15_manifests_relative_paths_and_model_card(tmp_path):
    """Manifests record the teacher and the earlier stages relative to their own folder (the run can move); final
    folders and the seed carry a README.md model card: teacher, layers, stages, token budget, measured results."""
    _teacher(tmp_path / "t")
    out = run_distill(_recipe(tmp_path / "t", tmp_path / "o", steps=3), data=_batches(2), **QUIET)
    m = read_manifest(out[3])
    assert m["teacher"]["path"] == "../../t" and m["teacher"]["spec"] == str(tmp_path / "t")  # the user's own
    assert [c["path"] for c in m["chain"]] == ["../seed", "../stage1", "../stage2"]
    ck = read_manifest(tmp_path / "o" / "stage3-checkpoints" / "step-00000002")  # keep_checkpoints 2 keeps it
    assert ck["teacher"]["path"] == "../../../t"
    card = (out[3] / "README.md").read_text()
    for part in ("- Teacher: `../../t`", "attention at [0, 2] (the rest Mamba-2): AMAM",
                 "- Placement: `every:2`", "| stage1 | 3 |", "| stage3 | 3 |", "Token budget:", "Measured results: kl"):
        assert part in card, (part, card)
    assert "Seeded with init `mimic`" in (tmp_path / "o" / "seed" / "README.md").read_text()
    assert (tmp_path / "o" / "stage1" / "README.md").exists()


def test_item05_interrupted_replace_restores_the_old_folder(tmp_path):
    """An atomic replace interrupted between its two renames leaves only `.NAME.old-PID`: it is renamed back, not
    deleted; temporary folders go."""
    from mmmamba.distill.trainer import remove_stale_temporaries

    (tmp_path / ".stage1.old-123").mkdir()
    (tmp_path / ".stage1.old-123" / "model.safetensors").write_text("x")
    (tmp_path / ".stage1.tmp-abc").mkdir()
    assert len(remove_stale_temporaries(tmp_path)) == 2
    assert (tmp_path / "stage1" / "model.safetensors").read_text() == "x" and not list(tmp_path.glob(".*"))
