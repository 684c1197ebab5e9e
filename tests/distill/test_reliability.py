"""Issue 13: the trainer never loses work or trains on garbage (NaN, Ctrl-C, corrupt checkpoints, changed
settings), on tiny CPU teachers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import QUIET, _batches, _teacher

from mmmamba.distill.recipe import parse_recipe
from mmmamba.distill.trainer import NonFiniteError, StageRunner


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
    with pytest.raises(NonFiniteError, match=r"is (nan|inf) at step (\d+); stopped before that update\. the last "
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
