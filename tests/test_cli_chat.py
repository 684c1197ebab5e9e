"""`mmmamba chat` fed through its standard input, and `mmmamba generate` saying that the model stopped at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "inference"))
from chat_models import write_png, write_tiny_vlm  # noqa: E402

from mmmamba.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return write_tiny_vlm(tmp_path_factory.mktemp("cli_chat") / "vlm")


def _chat(model_dir, stdin: str, *flags, timeout=120):
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mmmamba.cli", "chat", "--model", str(model_dir), "--device", "cpu",
                           "--max-new-tokens", "5", "--max-tiles", "2", *flags], input=stdin, text=True,
                          capture_output=True, timeout=timeout, env=env)


def test_chat_session_through_stdin(vlm_dir, tmp_path):
    good = write_png(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    script = "\n".join([
        "hello what is this",
        f"/image {tmp_path / 'missing.png'}",
        f"/image {bad}",
        f"/image {good}",
        "describe the image please",
        "/bogus",
        "/reset",
        "tell me more",
        "/quit",
        "never read",
    ]) + "\n"
    r = _chat(vlm_dir, script)
    out = r.stdout
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.startswith("mmmamba chat:")
    assert out.count("model> ") == 3 and out.count(" tokens/s]") == 3
    assert f"[image not added: image file {tmp_path / 'missing.png'} does not exist]" in out
    assert "[image not added: image file" in out and "bad.png could not be read as an image" in out
    assert f"[image {good} added (" in out
    assert "[unknown command /bogus" in out and "[conversation reset]" in out
    answers = [ln.split("model> ", 1)[1] for ln in out.splitlines() if "model> " in ln]
    assert all(a.strip() for a in answers), out  # streamed text, not nothing


def test_chat_with_image_flag_and_eof(vlm_dir, tmp_path):
    r = _chat(vlm_dir, "describe this\n", "--image", str(write_png(tmp_path / "p.png")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "added (" in r.stdout and r.stdout.count("model> ") == 1


def test_chat_and_generate_say_when_the_model_stops_at_once(tmp_path, capsys):
    d = write_tiny_vlm(tmp_path / "mute", eos_first=True)
    r = _chat(d, "hello\n")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[the model ended its answer at once: its first token was the end token '<|im_" in r.stdout
    capsys.readouterr()
    assert main(["generate", "--model", str(d), "--prompt", "hello", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert "the model ended its answer at once" in cap.err and "no text to show" in cap.err


def test_chat_fails_clearly_on_a_broken_tokenizer(vlm_dir, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(vlm_dir, d)
    (d / "tokenizer.json").write_text("{ broken")
    r = _chat(d, "hello\n")
    assert r.returncode == 2 and "could not load the tokenizer of" in r.stderr and "broken" in r.stderr
