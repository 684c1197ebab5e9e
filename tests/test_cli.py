"""`mmmamba seed` and `mmmamba generate`, run in-process through mmmamba.cli.main."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mmmamba import ATTENTION, MAMBA2, MMMambaForCausalLM
from mmmamba.cli import main
from mmmamba.io import load_model


def _seed(teacher, out, *flags):
    return main(["seed", "--teacher", str(teacher), "--out", str(out), *flags])


def _generate(model, capsys, *flags, prompt="Hello, how are you?"):
    capsys.readouterr()
    rc = main(["generate", "--model", str(model), "--prompt", prompt, "--max-new-tokens", "6", *flags])
    return rc, capsys.readouterr()


@pytest.fixture(scope="module")
def hybrid_dir(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "hybrid"
    assert _seed(tiny_llama_dir, out, "--placement", "every:2") == 0
    return out


def test_seed_placement(hybrid_dir, tiny_llama_dir):
    cfg = json.loads((hybrid_dir / "config.json").read_text())
    assert cfg["model_type"] == "mmmamba"
    assert cfg["layer_types"] == [ATTENTION, MAMBA2, ATTENTION, MAMBA2]
    manifest = json.loads((hybrid_dir / "mmmamba_manifest.json").read_text())
    assert manifest["stage"] == "seed" and manifest["init"] == "mimic"
    assert manifest["teacher"]["spec"] == str(tiny_llama_dir) and len(manifest["teacher"]["sha256"]) == 64
    assert (hybrid_dir / "tokenizer.json").exists() and (hybrid_dir / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(hybrid_dir)
    assert isinstance(model, MMMambaForCausalLM)
    # the teacher's weights are carried over: embeddings and the kept attention layers
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert torch.equal(model.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(model.model.layers[2].mixer.q_proj.weight, teacher.model.layers[2].self_attn.q_proj.weight)
    assert torch.equal(model.model.layers[1].mixer.v_proj.weight, teacher.model.layers[1].self_attn.v_proj.weight)


def test_seed_attention_layers_and_init(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert _seed(tiny_llama_dir, out, "--attention-layers", "1,3", "--init", "inherit", "--seed", "5") == 0
    assert "attention at [1, 3]" in capsys.readouterr().out
    model = load_model(out)
    assert model.config.attention_layers == [1, 3]
    assert json.loads((out / "mmmamba_manifest.json").read_text())["init"] == "inherit"
    assert torch.equal(model.model.layers[0].mixer.dt_bias, torch.zeros(6))  # inherit: default dt_bias


def test_seed_linear_by_default(tiny_llama_dir, tmp_path):
    assert _seed(tiny_llama_dir, tmp_path / "lin") == 0
    assert load_model(tmp_path / "lin").config.layer_types == [MAMBA2] * 4


def test_seed_flag_errors(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="either --attention-layers or --placement"):
        _seed(tiny_llama_dir, tmp_path / "x", "--attention-layers", "0", "--placement", "every:2")
    assert _seed(tiny_llama_dir, tmp_path / "x", "--attention-layers", "0,9") == 2
    assert "out of range" in capsys.readouterr().err
    assert _seed(tmp_path / "no-teacher", tmp_path / "x") == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_generate_produces_text(hybrid_dir, capsys):
    rc, cap = _generate(hybrid_dir, capsys)
    assert rc == 0 and cap.out.strip(), cap
    rc2, cap2 = _generate(hybrid_dir, capsys)
    assert cap2.out == cap.out  # greedy is deterministic


def test_generate_options(hybrid_dir, capsys):
    rc, cap = _generate(hybrid_dir, capsys, "--no-chat", "--temperature", "0.9", "--top-k", "20", "--seed", "3")
    assert rc == 0 and cap.out.strip()
    rc, cap2 = _generate(hybrid_dir, capsys, "--no-chat", "--temperature", "0.9", "--top-k", "20", "--seed", "3")
    assert cap2.out == cap.out


def test_generate_without_tokenizer(tmp_path, hybrid_dir, capsys):
    load_model(hybrid_dir).save_pretrained(tmp_path / "bare")
    with pytest.raises(SystemExit, match="no tokenizer"):
        main(["generate", "--model", str(tmp_path / "bare"), "--prompt", "hi"])


@pytest.mark.slow
def test_seed_and_generate_real_smollm2(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "smol-hybrid"
    assert _seed("smollm2", out, "--placement", "every:4") == 0
    model = load_model(out)
    assert model.config.num_hidden_layers == 30 and model.config.attention_layers == list(range(0, 30, 4))
    del model
    rc, cap = _generate(out, capsys, prompt="What is the capital of France?")
    assert rc == 0 and cap.out.strip(), cap
