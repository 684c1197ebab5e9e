"""`mmmamba demo` end to end at a tiny size (the real SmolLM2 teacher, 2 steps per stage)."""

import json

import pytest

from mmmamba.cli import main


@pytest.mark.slow
def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--seq-len", "64", "--batch", "2"]) == 0
    r = json.loads((out / "demo_results.json").read_text())
    assert r["attention_layers"] == [0, 4, 8, 12, 16, 20, 24, 28]
    for key in ("seeded", "distilled"):
        assert r[key]["perplexity"] > 1 and r[key]["kl_to_teacher"] > 0
    assert 1 < r["teacher_perplexity"] < r["seeded"]["perplexity"]
    assert r["samples"]["teacher"].startswith("The")
    for s in (1, 2, 3):
        assert (out / "logs" / f"stage{s}_loss.png").exists()
    assert "| student, after stages 1-3 |" in capsys.readouterr().out
    # a second run replaces its own previous output; a foreign folder is refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert main(["demo", "--out", str(foreign), "--steps", "1"]) == 2
    assert (foreign / "keep.txt").exists()
