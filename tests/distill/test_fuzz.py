"""Issue 13: seeded fuzzing of the recipe parser and the data loader. Valid files are truncated, have bytes
flipped, or get values of the wrong type; every outcome must be a success or one clear project error
(RecipeError / DataError, one line naming the problem), never another exception. A few hundred cases, seconds."""

from __future__ import annotations

import copy
import json
import random

import pytest
import yaml

from mmmamba.distill.data import DataError, build_dataloader
from mmmamba.distill.recipe import RecipeError, load_recipe

WRONG = [None, True, -3, 0, 2.5, float("nan"), "", "x", "-1", [], [1, "a"], {}, {"k": 1}, 10**12]


def _paths(obj, prefix=()):
    """Every (path of keys / indices) into a nested dict / list."""
    out = [prefix] if prefix else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        out += _paths(v, prefix + (k,))
    return out


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _corrupt(rng: random.Random, raw: bytes, structured, dump) -> bytes:
    """One random corruption: truncation, 1-4 flipped bytes, or a value replaced by one of the wrong type."""
    kind = rng.choice(["truncate", "flip", "type", "type"])
    if kind == "truncate":
        return raw[: rng.randrange(len(raw))]
    if kind == "flip":
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= rng.choice([1, 0x20, 0x80, 0xFF])
        return bytes(b)
    obj = copy.deepcopy(structured)
    _set(obj, rng.choice(_paths(obj)), rng.choice(WRONG))
    return dump(obj)


def _one_clear_line(err: Exception) -> None:
    msg = str(err)
    assert msg and "\n" not in msg.strip() and "Traceback" not in msg, msg


RECIPE = {
    "name": "fuzz", "teacher": "t", "output_dir": "o", "seed": 1, "init": "mimic", "placement": "every:2",
    "precision": "auto", "data": {"sources": [{"type": "text", "path": "c.txt"}], "max_length": 16},
    "defaults": {"steps": 10, "batch_size": 4, "micro_batch_size": 2, "grad_clip": 1.0, "betas": [0.9, 0.99],
                 "loss": {"temperature": 2.0}},
    "stages": {1: {"lr": 1e-3, "loss": {"target": "heads", "factor": 100}}, 2: {"lr": 5e-4, "warmup": 0.2},
               3: {"lr": 5e-5, "train_a": False, "loss": {"positions": "all", "chunk_size": 64}}},
}


def test_recipe_parser_fuzz(tmp_path):
    rng = random.Random(13)
    raw = yaml.safe_dump(RECIPE, sort_keys=False).encode()
    load_recipe_path = tmp_path / "r.yaml"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        load_recipe_path.write_bytes(_corrupt(rng, raw, RECIPE, lambda o: yaml.safe_dump(o).encode()))
        try:
            load_recipe(load_recipe_path)
            outcomes["ok"] += 1
        except RecipeError as e:
            _one_clear_line(e)
            outcomes["error"] += 1
    assert outcomes["ok"] > 10 and outcomes["error"] > 100, outcomes


ROWS = [
    {"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."},
                  {"role": "assistant", "content": "Reynard."}]},
    {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"},
                       {"from": "human", "value": "again"}, {"from": "gpt", "value": "hi hi"}]},
] * 4


def test_data_loader_fuzz(tmp_path, smollm2_tokenizer):
    rng = random.Random(14)
    text = ("The quick brown fox jumps over the lazy dog. " * 30).encode()
    jsonl = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)
    cfg = {"sources": [{"type": "text", "path": "c.txt"}, {"type": "jsonl", "path": "d.jsonl"}],
           "max_length": 32, "heldout_fraction": 0.0, "base_dir": str(tmp_path), "text_mode": "chunk"}
    outcomes = {"ok": 0, "error": 0}
    for i in range(240):
        (tmp_path / "c.txt").write_bytes(text)
        (tmp_path / "d.jsonl").write_bytes(jsonl)
        case = dict(cfg)
        target = i % 3
        if target == 0:
            (tmp_path / "c.txt").write_bytes(_corrupt(rng, text, {"t": text.decode()}, lambda o: str(o).encode()))
        elif target == 1:
            (tmp_path / "d.jsonl").write_bytes(_corrupt(rng, jsonl, ROWS, lambda o: b"".join(
                json.dumps(r).encode() + b"\n" for r in o)))
        else:
            case = copy.deepcopy(cfg)  # the config is a mapping, not a file: a value of the wrong type
            _set(case, rng.choice(_paths(case)), rng.choice(WRONG))
        try:
            loader = build_dataloader(case, smollm2_tokenizer, None, 2, seed=0)
            for batch in loader:
                assert batch["input_ids"].shape == batch["labels"].shape
            outcomes["ok"] += 1
        except DataError as e:
            _one_clear_line(e)
            outcomes["error"] += 1
        except (json.JSONDecodeError, TypeError, AttributeError, KeyError) as e:  # noqa: PERF203
            pytest.fail(f"case {i}: {type(e).__name__}: {e}\n{json.dumps(case, default=str)[:500]}")
    assert outcomes["ok"] > 50 and outcomes["error"] > 10, outcomes
