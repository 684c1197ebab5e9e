"""Issue 13 item 11: typos in nested recipe sections and duplicate YAML keys are errors."""

from __future__ import annotations

import pytest

from mmmamba.distill.recipe import RecipeError, load_recipe, parse_recipe


def test_item11_unknown_nested_key_in_defaults_loss_is_an_error():
    with pytest.raises(RecipeError, match=r"defaults\.loss: unknown key\(s\) \['temprature'\]"):
        parse_recipe({"teacher": "t", "output_dir": "o", "defaults": {"loss": {"temprature": 2.0}}})
    r = parse_recipe({"teacher": "t", "output_dir": "o", "defaults": {"loss": {"temperature": 2.0, "factor": 9}}})
    assert r.stages[3].loss["temperature"] == 2.0 and r.stages[1].loss["factor"] == 9.0  # each stage its own


@pytest.mark.parametrize("text, key", [
    ("teacher: a\nteacher: b\noutput_dir: o\n", "teacher"),
    ("teacher: a\noutput_dir: o\nstages:\n  1: {lr: 1.0e-3, lr: 2.0e-3}\n", "lr"),
    ("teacher: a\noutput_dir: o\ndefaults:\n  loss:\n    factor: 1\n    factor: 2\n", "factor"),
])
def test_item11_duplicate_yaml_key_is_an_error(tmp_path, text, key):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError, match=rf"(?s)not valid YAML.*duplicate key '{key}'"):
        load_recipe(tmp_path / "r.yaml")
