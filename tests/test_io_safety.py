"""Issue 13 items 1, 6, 7, 8: model folders are never written over the user's files, never unpickled, and
loading refuses missing / unexpected tensors and bad files with errors that name the file and the fix."""

from __future__ import annotations

import pytest
from conftest import tiny_model

from mmmamba.cli import main
from mmmamba.io import save_model


def _attention_teacher(path):
    t = tiny_model(["attention"] * 4, seed=1)
    save_model(t, path)
    return t


def test_item01_save_model_and_seed_refuse_to_replace_other_folders(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    (run / "notes.txt").write_text("my notes")
    model = tiny_model(["attention", "mamba2"] * 2)
    with pytest.raises(FileExistsError, match="not empty .*notes.txt.* not an mmmamba model folder"):
        save_model(model, run)
    _attention_teacher(tmp_path / "t")
    assert main(["seed", "--teacher", str(tmp_path / "t"), "--out", str(run)]) == 2
    assert "not an mmmamba model folder" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "my notes" and (run / "stage1").is_dir()
    # an mmmamba model folder is replaced only with --overwrite / overwrite=True
    assert main(["seed", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s")]) == 0
    assert main(["seed", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s"), "--placement",
                 "every:2"]) == 2
    assert "already holds an mmmamba model; pass --overwrite" in capsys.readouterr().err
    assert main(["seed", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s"), "--placement", "every:2",
                 "--overwrite"]) == 0
    with pytest.raises(FileExistsError, match="overwrite"):
        save_model(model, tmp_path / "s")
    save_model(model, tmp_path / "s", overwrite=True)
    (tmp_path / "empty").mkdir()
    save_model(model, tmp_path / "empty")  # an empty folder is fine
    assert not list(tmp_path.glob(".*tmp-*"))
