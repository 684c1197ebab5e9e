"""save -> load is bit-identical; broken folders give errors naming the file or field; Auto classes load folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from mmmamba import MMMambaForCausalLM
from mmmamba.io import atomic_dir, atomic_write_text, check_model_folder, load_model, save_model

HYBRID = ["attention", "mamba2", "mamba2", "attention"]


@pytest.fixture
def saved(tmp_path, make_model):
    model = make_model(HYBRID, seed=3)
    out = save_model(model, tmp_path / "model", extra={"note.txt": "hello"})
    return model, out


def _assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_roundtrip_bit_identical(saved):
    model, out = saved
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "note.txt").read_text() == "hello"
    loaded = load_model(out)
    _assert_identical(model, loaded)
    assert loaded.config.layer_types == model.config.layer_types and not loaded.training
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_roundtrip_save_pretrained_and_auto(tmp_path, make_model, tied):
    model = make_model(["mamba2"] * 4, seed=4, tie_word_embeddings=tied)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    for loaded in (MMMambaForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, MMMambaForCausalLM)
        _assert_identical(model, loaded)


def test_roundtrip_bf16(tmp_path, make_model):
    model = make_model(HYBRID, seed=5).to(torch.bfloat16)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", dtype=torch.bfloat16)
    _assert_identical(model, loaded)
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_loaded_rope_buffer_is_rebuilt(saved):
    """inv_freq is a non-persistent buffer: from_pretrained builds the model on the meta device and must recompute
    it (it used to come back as uninitialised memory, silently breaking every reloaded attention layer)."""
    model, out = saved
    for loaded in (load_model(out), AutoModelForCausalLM.from_pretrained(out)):
        assert torch.equal(loaded.model.rotary[0].inv_freq, model.model.rotary[0].inv_freq)


def test_auto_model_in_fresh_process_after_import(saved):
    """A fresh interpreter loads the folder with AutoModelForCausalLM once `mmmamba` is imported."""
    _, out = saved
    code = (
        "import mmmamba, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(type(m).__name__, m.config.layer_types)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "MMMambaForCausalLM" in r.stdout and "linear_attention" in r.stdout


def test_truncated_safetensors(saved):
    _, out = saved
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError) as e:
        load_model(out)
    assert str(f) in str(e.value) and "truncated or corrupt" in str(e.value)


def test_truncated_inside_header(saved):
    _, out = saved
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        check_model_folder(out)
    assert str(f) in str(e.value)


def test_corrupt_safetensors_header(saved):
    _, out = saved
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32  # garbage in the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        load_model(out)
    assert str(f) in str(e.value)


def test_safetensors_with_trailing_garbage(saved):
    _, out = saved
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"\0" * 64)
    with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt"):
        load_model(out)


def test_missing_config(saved):
    _, out = saved
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_model(out)
    assert str(out / "config.json") in str(e.value) and "missing" in str(e.value)


def test_missing_weights(saved):
    _, out = saved
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights in") as e:
        load_model(out)
    assert str(out) in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        load_model(tmp_path / "nope")
    assert "nope" in str(e.value)


def test_corrupt_config_json(saved):
    _, out = saved
    (out / "config.json").write_text('{"model_type": "mmmamba", "hidden_size": ')
    with pytest.raises(ValueError, match="is not valid JSON") as e:
        load_model(out)
    assert str(out / "config.json") in str(e.value)


def test_unknown_layer_type(saved):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    cfg["layer_types"][2] = "retnet"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_model(out)
    msg = str(e.value)
    assert "layer_types[2]" in msg and "'retnet'" in msg


def test_layer_type_count_mismatch(saved):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    cfg["layer_types"] = cfg["layer_types"][:3]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layer_types has 3 entries but num_hidden_layers = 4"):
        load_model(out)


def test_cli_reports_io_errors(saved, capsys):
    from mmmamba.cli import main

    _, out = saved
    (out / "config.json").unlink()
    assert main(["generate", "--model", str(out), "--prompt", "hi"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_atomic_dir_keeps_old_folder_on_failure(tmp_path):
    out = tmp_path / "dst"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert (out / "keep.txt").read_text() == "old" and not (out / "new.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]  # no temporary leftovers
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]


def test_atomic_write_text(tmp_path):
    p = tmp_path / "a" / "b.json"
    atomic_write_text(p, "x")
    atomic_write_text(p, "y")
    assert p.read_text() == "y" and sorted(q.name for q in p.parent.iterdir()) == ["b.json"]
