"""Issue 13 items 1, 6, 7, 8: model folders are never written over the user's files, never unpickled, and
loading refuses missing / unexpected tensors and bad files with errors that name the file and the fix."""

from __future__ import annotations

import pytest
import torch
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


def _llama(path, safetensors=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    if safetensors:
        model.save_pretrained(path)
    else:  # a pickled checkpoint as older tools wrote it
        path.mkdir(parents=True)
        cfg.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return model


def test_item06_pickled_weights_are_never_loaded(tmp_path, monkeypatch):
    """A teacher, a student / stage input or a checkpoint that holds only pytorch_model.bin is refused with the
    conversion one-liner; torch.load is never reached."""
    from mmmamba.io import load_model
    from mmmamba.teachers.hf import load_teacher

    _llama(tmp_path / "bin", safetensors=False)
    m = tiny_model(["attention", "mamba2"] * 2)
    (tmp_path / "mm").mkdir()
    m.config.save_pretrained(tmp_path / "mm")
    torch.save(m.state_dict(), tmp_path / "mm" / "pytorch_model.bin")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for load, folder in ((load_teacher, tmp_path / "bin"), (load_model, tmp_path / "mm"),
                         (load_teacher, tmp_path / "mm")):
        with pytest.raises(FileNotFoundError, match=r"pickled weights \(pytorch_model.bin\).*safetensors.*"
                                                    r"use_safetensors=False\).save_pretrained"):
            load(folder)


def test_item07_missing_unexpected_or_mismatched_tensors_are_errors(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from mmmamba.io import load_model
    from mmmamba.teachers.hf import load_teacher

    save_model(tiny_model(["attention", "mamba2"] * 2), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(str(f))
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mixer.A_log"}, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not match its config.json \(missing \['model.layers.1.mixer.A_log'\]"):
        load_model(tmp_path / "m")
    save_file(sd, str(f), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["layer_types"] = cfg["layer_types"][::-1]  # mamba2 where the weights are attention and back
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing .*unexpected"):
        load_teacher(tmp_path / "m")
    _llama(tmp_path / "llama")
    f = tmp_path / "llama" / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.mlp.extra.weight'\]"):
        load_teacher(tmp_path / "llama")


def test_item08_bad_teacher_files_name_the_file_and_the_fix(tmp_path, capsys):
    import json

    from mmmamba.distill.recipe import parse_recipe
    from mmmamba.distill.trainer import run_distill
    from mmmamba.teachers.hf import load_teacher

    _llama(tmp_path / "t")
    f = tmp_path / "t" / "model.safetensors"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) - 100])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or corrupt.*re-create or re-download"):
        load_teacher(tmp_path / "t")
    f.write_bytes(good)
    cfg = tmp_path / "t" / "config.json"
    text = cfg.read_text()
    cfg.write_text(text[:-10])
    with pytest.raises(ValueError, match=r"t/config.json is not valid JSON"):
        load_teacher(tmp_path / "t")
    cfg.write_text(json.dumps({**json.loads(text), "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"t/config.json: model_type 'gpt2' is not supported; supported: llama, "
                                         r"qwen2, mistral .*mmmamba"):
        load_teacher(tmp_path / "t")
    cfg.write_text(text)
    # no tokenizer: seed warns loudly, distill stops with a clear message instead of "'NoneType' ... not callable"
    assert main(["seed", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "WARNING: teacher" in err and "no tokenizer files" in err
    (tmp_path / "c.txt").write_text("some text " * 50)
    r = parse_recipe({"teacher": str(tmp_path / "t"), "output_dir": str(tmp_path / "o"),
                      "data": {"sources": [{"type": "text", "path": str(tmp_path / "c.txt")}], "max_length": 16},
                      "defaults": {"steps": 1, "batch_size": 1, "micro_batch_size": 1}})
    with pytest.raises(ValueError, match=r"has no tokenizer .*save the teacher's tokenizer"):
        run_distill(r, (1,), progress=False, log=lambda *a: None)
