"""transformers teachers (Llama, Qwen2, Mistral; the real SmolLM2-135M) converted into mmmamba's decoder."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mmmamba.models import ATTENTION
from mmmamba.teachers.hf import config_from_hf, convert_hf_model, load_teacher

COMMON = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def _llama(**kw):
    return LlamaForCausalLM(LlamaConfig(**{**COMMON, **kw}))


def _qwen2(**kw):
    return Qwen2ForCausalLM(Qwen2Config(**{**COMMON, **kw}))


def _mistral(**kw):
    return MistralForCausalLM(MistralConfig(**{**COMMON, "sliding_window": None, **kw}))


TEACHERS = {
    "llama": lambda: _llama(),
    "llama-tied-mha": lambda: _llama(tie_word_embeddings=True, num_key_value_heads=6),
    "llama-gqa-9q-3kv": lambda: _llama(hidden_size=72, num_attention_heads=9, num_key_value_heads=3),
    "llama-bias-theta": lambda: _llama(attention_bias=True, mlp_bias=True,
                                       rope_parameters={"rope_type": "default", "rope_theta": 123456.0}),
    "llama3-rope": lambda: _llama(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": lambda: _qwen2(),
    "qwen2-tied": lambda: _qwen2(tie_word_embeddings=True, num_key_value_heads=3),
    "mistral": lambda: _mistral(),
}


def _randomize_all(model, seed=0):
    """Random weights everywhere, including norms and biases (transformers inits them to 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.endswith("bias") else 0.08))
    return model.eval()


@pytest.mark.parametrize("name", list(TEACHERS))
def test_converted_teacher_reproduces_logits(name):
    torch.manual_seed(0)
    hf = _randomize_all(TEACHERS[name]())
    ours = convert_hf_model(hf).eval()
    assert ours.config.layer_types == [ATTENTION] * 3
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    err = (got - ref).abs().max().item()
    assert err <= 1e-5, f"{name}: max abs logit error {err:.3g}"


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_converted_teacher_left_padded_batch(name):
    """Left-padded rows: our positions come from the mask; transformers gets the same explicit position ids."""
    hf = _randomize_all(TEACHERS[name](), seed=2)
    ours = convert_hf_model(hf).eval()
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (got[keep] - ref[keep]).abs().max().item() <= 1e-5


def test_conversion_copies_weights_exactly():
    hf = _randomize_all(_qwen2(), seed=4)
    ours = convert_hf_model(hf)
    sd = ours.state_dict()
    for k, v in hf.state_dict().items():
        key = k.replace(".self_attn.", ".mixer.")
        assert torch.equal(sd[key], v), k
    assert ours.config.qkv_bias and not ours.config.o_bias


def test_conversion_dtype():
    hf = _randomize_all(_llama())
    assert convert_hf_model(hf, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_unsupported_teachers_are_named():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        config_from_hf(GPT2Config())
    with pytest.raises(ValueError, match="sliding-window"):
        config_from_hf(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=16))


def test_load_teacher_from_folder(tmp_path):
    hf = _randomize_all(_mistral(), seed=5)
    hf.save_pretrained(tmp_path)
    ours = load_teacher(tmp_path)
    ids = torch.randint(0, 101, (1, 17))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5


def test_load_teacher_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_teacher(tmp_path / "nowhere")


@pytest.mark.slow
def test_real_smollm2_matches_transformers(smollm2_dir, smollm2_tokenizer):
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    ours = load_teacher(smollm2_dir).eval()
    cfg = ours.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    text = smollm2_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = smollm2_tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, f"SmolLM2 relative logit error {rel:.3g}"
    assert torch.equal(got[0, -1].argmax(), ref[0, -1].argmax())
