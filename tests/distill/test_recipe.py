"""Recipes: the paper's defaults, the shipped YAML files, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmmamba.distill.recipe import RecipeError, load_recipe, parse_recipe
from mmmamba.models.placement import parse_placement

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
BASE = {"teacher": "smollm2", "output_dir": "runs/x"}


def test_paper_defaults():
    r = parse_recipe(dict(BASE))
    s1, s2, s3 = r.stages[1], r.stages[2], r.stages[3]
    assert (s1.lr, s2.lr, s3.lr) == (1e-3, 5e-4, 5e-5)
    assert (s1.batch_size, s2.batch_size, s3.batch_size) == (128, 128, 64)
    assert all(s.steps == 20000 and s.weight_decay == 0.05 and s.betas == [0.9, 0.999] and s.grad_clip == 5.0
               and s.warmup == 0.1 and s.decay == 0.1 for s in (s1, s2, s3))
    assert s1.loss == {"target": "heads", "factor": 1000.0}
    assert s3.loss == {"temperature": 1.0, "positions": "assistant", "ce_weight": 0.0, "chunk_size": 1024}
    assert not s3.train_a and r.init == "mimic" and r.precision == "auto"
    # 8 processes x micro-batch 2 x accumulation 8 = 128 (the paper's stage 1-2 setting)
    assert s1.accumulation(8) == 8 and s3.accumulation(8) == 8


def test_defaults_and_stage_overrides_merge():
    r = parse_recipe({**BASE, "defaults": {"steps": 10, "grad_clip": 1.0, "loss": {"factor": 10}},
                      "stages": {"stage2": {"lr": "2e-4", "loss": {"target": "output"}}, 3: {"train_a": True}}})
    assert r.stages[1].steps == r.stages[3].steps == 10 and r.stages[2].grad_clip == 1.0
    assert r.stages[2].lr == 2e-4  # YAML reads 2e-4 (no dot) as a string: accepted
    assert r.stages[2].loss == {"target": "output", "factor": 10.0} and r.stages[1].loss["factor"] == 10.0
    assert r.stages[3].train_a and r.stages[3].loss["temperature"] == 1.0


@pytest.mark.parametrize("name", ["smollm2_linear", "smollm2_hybrid", "hovle_linear", "hovle_hybrid"])
def test_shipped_recipes(name, monkeypatch):
    for var in ("HOVLE_DIR", "VLM_SFT_JSONL", "VLM_SFT_IMAGES"):
        monkeypatch.setenv(var, f"/data/{var.lower()}")
    r = load_recipe(RECIPES / f"{name}.yaml")
    assert [r.stages[s].lr for s in (1, 2, 3)] == [1e-3, 5e-4, 5e-5]
    assert [r.stages[s].batch_size for s in (1, 2, 3)] == [128, 128, 64]
    assert all(r.stages[s].steps == 20000 and r.stages[s].grad_clip == 5.0 for s in (1, 2, 3))
    n_layers = 32 if name.startswith("hovle") else 30
    expect = [0, 4, 8, 12, 16, 20, 24, 28] if name.endswith("hybrid") else []
    assert parse_placement(r.placement, n_layers) == expect
    assert r.data.get("sources")
    if name.startswith("hovle"):
        assert r.teacher == "/data/hovle_dir" and r.stages[1].accumulation(8) == 8


def test_unset_env_var_is_named(monkeypatch):
    monkeypatch.delenv("HOVLE_DIR", raising=False)
    with pytest.raises(RecipeError, match="HOVLE_DIR is not set"):
        load_recipe(RECIPES / "hovle_linear.yaml")


@pytest.mark.parametrize("raw, match", [
    ({"output_dir": "x"}, "'teacher' is required"),
    ({**BASE, "lr": 1}, r"unknown key\(s\) \['lr'\]"),
    ({**BASE, "stages": {4: {}}}, "stage key 4 unknown"),
    ({**BASE, "stages": {1: {"lr": "fast"}}}, r"stages\.1\.lr: expected a number, got 'fast'"),
    ({**BASE, "stages": {1: {"lr": -1}}}, r"stages\.1\.lr: must be positive"),
    ({**BASE, "stages": {1: {"steps": 2.5}}}, r"stages\.1\.steps: expected an integer"),
    ({**BASE, "stages": {2: {"batchsize": 4}}}, r"stages\.2: unknown key\(s\) \['batchsize'\]"),
    ({**BASE, "stages": {1: {"loss": {"temperature": 2}}}}, r"stages\.1\.loss: unknown key"),
    ({**BASE, "stages": {3: {"loss": {"positions": "prompt"}}}}, "positions: 'prompt' unknown"),
    ({**BASE, "stages": {1: {"loss": {"target": "logits"}}}}, "target: 'logits' unknown"),
    ({**BASE, "stages": {1: {"train_a": True}}}, "train_a: only stage 3"),
    ({**BASE, "stages": {2: {"trainable": ["mlp"]}}}, r"stages\.2\.trainable"),
    ({**BASE, "stages": {1: {"warmup": 0.6, "decay": 0.6}}}, "exceed 1"),
    ({**BASE, "stages": {1: {"batch_size": 10, "micro_batch_size": 3}}}, None),
    ({**BASE, "init": "random"}, "init 'random' unknown"),
    ({**BASE, "placement": "sometimes:4"}, "placement: placement kind 'sometimes' unknown"),
    ({**BASE, "precision": "fp8"}, "precision 'fp8' unknown"),
    ({**BASE, "data": [1]}, "data: expected a mapping"),
    ({**BASE, "stages": {1: {"cuda_graph": "yes"}}}, r"stages\.1\.cuda_graph"),
    ({**BASE, "defaults": {"compile": True, "cuda_graph": True}}, "compile and cuda_graph both set"),
])
def test_errors_name_the_field(raw, match):
    if match is None:  # batch not a multiple of the micro-batch: caught when the process count is known
        r = parse_recipe(raw)
        with pytest.raises(RecipeError, match="not a multiple of micro_batch_size 3"):
            r.stages[1].accumulation(1)
        return
    with pytest.raises(RecipeError, match=match):
        parse_recipe(raw)


def test_cuda_graph_option():
    r = parse_recipe({**BASE, "stages": {3: {"cuda_graph": True}}})
    assert [r.stages[s].cuda_graph for s in (1, 2, 3)] == [False, False, True]


def test_auto_placement_spec_is_accepted():
    assert parse_recipe({**BASE, "placement": "auto:4"}).placement == "auto:4"


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("teacher: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "none.yaml")
    p.write_text("teacher: smollm2\noutput_dir: a\n")
    assert load_recipe(p, {"output_dir": "b"}).output_dir == "b"
