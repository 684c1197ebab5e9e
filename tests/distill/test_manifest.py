"""Stage chaining: manifests, teacher identity, and refusals that name what was expected."""

from __future__ import annotations

import json

import pytest

from mmmamba.distill.manifest import (
    MANIFEST_NAME,
    ChainError,
    chain_after,
    check_input,
    make_manifest,
    read_manifest,
    stage_name,
    teacher_identity,
    weights_sha256,
    write_manifest,
)
from mmmamba.io import save_model


@pytest.fixture
def teachers(tmp_path, make_model):
    a = make_model(layer_types=["attention"] * 4, seed=1)
    b = make_model(layer_types=["attention"] * 4, seed=2)
    save_model(a, tmp_path / "ta")
    save_model(b, tmp_path / "tb")
    return teacher_identity(tmp_path / "ta", "ta"), teacher_identity(tmp_path / "tb", "tb")


def _stage_dir(tmp_path, name, stage, teacher, complete=True):
    d = tmp_path / name
    d.mkdir()
    write_manifest(d, make_manifest(stage, teacher, ["linear_attention"] * 4, steps=5, complete=complete,
                                    final_metrics={"loss": 0.5}))
    return d


def test_teacher_hash_depends_on_weights_only(tmp_path, teachers, make_model):
    ta, tb = teachers
    assert ta["sha256"] != tb["sha256"] and len(ta["sha256"]) == 64
    again = make_model(layer_types=["attention"] * 4, seed=1)
    save_model(again, tmp_path / "ta_copy")
    assert weights_sha256(tmp_path / "ta_copy") == ta["sha256"]  # same weights elsewhere: same teacher
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_sha256(tmp_path)


def test_manifest_fields_and_chain(tmp_path, teachers):
    ta, _ = teachers
    d1 = _stage_dir(tmp_path, "s1", 1, ta)
    m1 = read_manifest(d1)
    for key in ("format", "stage", "complete", "teacher", "layer_types", "recipe", "steps", "final_metrics", "chain",
                "trainable", "created"):
        assert key in m1
    assert m1["stage"] == "stage1" and m1["teacher"]["sha256"] == ta["sha256"]
    chain = chain_after(m1, d1)
    assert chain[-1]["stage"] == "stage1" and chain[-1]["path"] == str(d1.resolve())
    m2 = make_manifest(2, ta, m1["layer_types"], chain=chain)
    assert [c["stage"] for c in chain_after(m2, tmp_path)] == ["stage1", "stage2"]
    assert stage_name(3) == "stage3" and stage_name("seed") == "seed"
    with pytest.raises(ValueError):
        stage_name(4)


def test_refuses_missing_folder(tmp_path, teachers):
    with pytest.raises(ChainError, match=r"stage3 needs the output of stage2 at .*does not exist"):
        check_input(tmp_path / "nope", 2, teachers[0], for_stage=3)


def test_refuses_folder_without_manifest(tmp_path, teachers, make_model):
    """The authors' issue #4: stage 3 silently started from a bare model."""
    save_model(make_model(), tmp_path / "bare")
    with pytest.raises(ChainError, match=f"stage3 needs the output of stage2 .* no {MANIFEST_NAME}"):
        check_input(tmp_path / "bare", 2, teachers[0], for_stage=3)


def test_refuses_wrong_stage(tmp_path, teachers):
    d = _stage_dir(tmp_path, "s1", 1, teachers[0])
    with pytest.raises(ChainError, match="stage3 expects the output of stage2, but .* is the output of stage1"):
        check_input(d, 2, teachers[0], for_stage=3)
    assert check_input(d, [1, 2], teachers[0], for_stage=3)["stage"] == "stage1"  # explicitly allowed


def test_refuses_wrong_teacher(tmp_path, teachers):
    ta, tb = teachers
    d = _stage_dir(tmp_path, "s2", 2, ta)
    with pytest.raises(ChainError, match=r"distilled from teacher 'ta'.*this run's teacher is 'tb'"):
        check_input(d, 2, tb, for_stage=3)


def test_refuses_unfinished_stage(tmp_path, teachers):
    d = _stage_dir(tmp_path, "ck", 2, teachers[0], complete=False)
    with pytest.raises(ChainError, match="unfinished"):
        check_input(d, 2, teachers[0], for_stage=3)


def test_refuses_corrupt_manifest(tmp_path, teachers):
    d = tmp_path / "bad"
    d.mkdir()
    (d / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ChainError, match="not valid JSON"):
        check_input(d, 2, teachers[0], for_stage=3)


def test_seed_cli_writes_a_chainable_manifest(tmp_path, teachers):
    from mmmamba.cli import main

    assert main(["seed", "--teacher", str(tmp_path / "ta"), "--out", str(tmp_path / "seed")]) == 0
    m = check_input(tmp_path / "seed", "seed", teachers[0], for_stage=1)
    assert m["teacher"]["sha256"] == teachers[0]["sha256"] and m["init"] == "mimic"
    assert json.loads((tmp_path / "seed" / "config.json").read_text())["layer_types"] == m["layer_types"]
