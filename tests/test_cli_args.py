"""Issue 13 item 12: bad command-line values stop with a clear message (argparse, exit 2), not a traceback."""

from __future__ import annotations

import pytest
import torch

from mmmamba.cli import main

GEN = ["generate", "--model", "unused", "--prompt", "hi"]


@pytest.mark.parametrize("args, says", [
    (["--top-k", "-3"], "--top-k: -3 is out of range: 0 (off) or more"),
    (["--top-k", "x"], "--top-k: 'x' is not an integer"),
    (["--dtype", "float8"], "--dtype: invalid choice: 'float8'"),
    (["--max-new-tokens", "-5"], "--max-new-tokens: -5 is out of range: at least 1 token"),
    (["--temperature", "-1"], "--temperature: -1 is out of range: 0 (greedy) or more"),
    (["--top-p", "0"], "--top-p: 0 is out of range: in (0, 1]"),
    (["--device", "tpu9"], "--device: 'tpu9' is not a device"),
    (["--temperature", "nan"], "--temperature: 'nan' is not a finite number"),
])
def test_item12_generate_arguments_are_validated(args, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(GEN + args)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_item12_cuda_device_without_cuda_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(GEN + ["--device", "cuda"])
    assert e.value.code == 2 and "CUDA is not available here" in capsys.readouterr().err


def test_item12_demo_arguments_are_validated(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    assert "--steps: 0 is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["ppl", "f.txt", "--model", "m", "--window", "0"], "--window: 0 is out of range: at least 2"),
    (["eval", "--model", "m", "--bench", "easy-vqa", "--batch-size", "-1"], "--batch-size: -1 is out of range"),
    (["eval", "--model", "m", "--bench", "easy-vqa", "--dtype", "float8"], "--dtype: invalid choice"),
    (["chat", "--model", "m", "--top-k", "-3"], "--top-k: -3 is out of range"),
    (["chat", "--model", "m", "--repetition-penalty", "0"], "--repetition-penalty: 0 is out of range: above 0"),
    (["serve", "--model", "m", "--port", "70000"], "--port: 70000 is out of range: 1-65535"),
])
def test_item12_eval_ppl_chat_serve_arguments_are_validated(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err
