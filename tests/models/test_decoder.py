"""MMMambaConfig / decoder: layer types, forward API, loss, Auto classes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from mmmamba import ATTENTION, MAMBA2, MMMambaConfig, MMMambaForCausalLM
from mmmamba.layers.attention import Attention
from mmmamba.layers.mamba2 import Mamba2Mixer

HYBRID = ["attention", "mamba2", "mamba2", "attention"]


def test_layer_type_aliases(make_config):
    cfg = make_config(layer_types=["mha", "mamba", "full_attention", "linear_attention"])
    assert cfg.layer_types == [ATTENTION, MAMBA2, ATTENTION, MAMBA2]
    assert cfg.attention_layers == [0, 2] and cfg.mamba_layers == [1, 3]
    assert make_config().layer_types == [ATTENTION] * 4


def test_layer_types_build_the_right_mixers(make_model):
    model = make_model(HYBRID)
    kinds = [type(layer.mixer) for layer in model.model.layers]
    assert kinds == [Attention, Mamba2Mixer, Mamba2Mixer, Attention]


def test_config_errors_name_the_field(make_config):
    with pytest.raises(ValueError, match=r"layer_types\[1\] = 'transformer'"):
        make_config(layer_types=["attention", "transformer", "mamba2", "mamba2"])
    with pytest.raises(ValueError, match="layer_types has 2 entries but num_hidden_layers = 4"):
        make_config(layer_types=["attention", "mamba2"])
    with pytest.raises(ValueError, match="multiple of"):
        make_config(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="layer_rope_theta"):
        make_config(layer_rope_theta=[1e4, 1e4])


def test_config_roundtrip_dict(make_config):
    cfg = make_config(layer_types=HYBRID, layer_rope_theta=[1e4, 1e4, 1e6, 1e6])
    again = MMMambaConfig.from_dict(cfg.to_dict())
    assert again.layer_types == cfg.layer_types and again.layer_rope_theta == cfg.layer_rope_theta
    assert isinstance(AutoConfig.for_model("mmmamba"), MMMambaConfig)


def test_per_layer_rope_theta(make_model):
    model = make_model(["attention"] * 4, layer_rope_theta=[1e4, 1e4, 1e6, 1e6])
    assert len(model.model.rotary) == 2
    assert [layer.rope_index for layer in model.model.layers] == [0, 0, 1, 1]


@pytest.mark.parametrize("types", [None, HYBRID, ["mamba2"] * 4])
def test_forward_shapes_and_options(make_model, types):
    model = make_model(types)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        last = model(ids, logits_to_keep=1)
        emb = model(inputs_embeds=model.get_input_embeddings()(ids))
    assert out.logits.shape == (2, 11, 97)
    assert len(out.hidden_states) == 5 and out.hidden_states[0].shape == (2, 11, 48)
    torch.testing.assert_close(last.logits[:, 0], out.logits[:, -1])
    torch.testing.assert_close(emb.logits, out.logits)
    assert out.loss is None and out.cache is None


def test_loss_is_shifted_cross_entropy(make_model):
    model = make_model(HYBRID)
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_causality(make_model):
    """Changing a later token never changes earlier logits (attention and Mamba-2 layers alike)."""
    model = make_model(HYBRID)
    ids = torch.randint(0, 97, (1, 16))
    ids2 = ids.clone()
    ids2[0, 10] = (ids[0, 10] + 1) % 97
    with torch.no_grad():
        a, b = model(ids).logits, model(ids2).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_input_errors(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="no vision front"):
        model(torch.zeros(1, 3, dtype=torch.long), pixel_values=torch.zeros(1, 3, 28, 28))


def test_auto_model_for_causal_lm(make_config):
    cfg = make_config(layer_types=HYBRID)
    model = AutoModelForCausalLM.from_config(cfg)
    assert isinstance(model, MMMambaForCausalLM)


def test_bf16_forward_runs(make_model):
    model = make_model(HYBRID).to(torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.randint(0, 97, (1, 20))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
