"""Released mmMamba-linear / -hybrid layout (fused `wvkqgdt`): tensor placement, layer types, forward."""

from __future__ import annotations

import pytest
import torch
from hovle_ckpt import hovle_raw_config, random_hovle_tensors, write_checkpoint
from hovle_reference import hovle_logits

from mmmamba.models.config import ATTENTION, MAMBA2
from mmmamba.teachers.hf import load_teacher
from mmmamba.teachers.mmmamba_hf import load_internvl_chat, load_mmmamba_hf, split_wvkqgdt

N_EMB, N_LLM, H, HEADS, KV = 8, 24, 32, 4, 2
D = H // HEADS
IMG = 97


def _write(tmp_path, mha: set[int], declare: bool = True, seed: int = 0):
    """Released folder with Mamba-2 everywhere except global layers `mha` (0-7 embedding, 8-31 LLM)."""
    types = ["mha" if i in mha else "mamba2" for i in range(N_EMB + N_LLM)]
    raw = hovle_raw_config(n_emb=N_EMB, n_llm=N_LLM, layers_block_type=(types[:N_EMB], types[N_EMB:]))
    if not declare:
        del raw["embedding_config"]["layers_block_type"], raw["llm_config"]["layers_block_type"]
    T = random_hovle_tensors(raw, seed, mamba_layers={i for i in range(N_EMB + N_LLM) if i not in mha})
    return write_checkpoint(tmp_path, raw, T), raw, T


def _pre(i):
    return f"embedding_model.encoder.{i}." if i < N_EMB else f"language_model.model.layers.{i - N_EMB}."


def _check_placement(model, T, mha):
    sd = model.state_dict()
    kvd, hd = KV * D, HEADS * D
    for i in range(N_EMB + N_LLM):
        a, L = _pre(i) + "attention.", f"model.layers.{i}.mixer."
        if i in mha:
            assert model.config.layer_types[i] == ATTENTION
            w = T[a + "wqkv.weight"].view(KV, HEADS // KV + 2, D, H)
            assert torch.equal(sd[L + "q_proj.weight"], w[:, : HEADS // KV].reshape(hd, H))
            assert torch.equal(sd[L + "k_proj.weight"], w[:, -2].reshape(kvd, H))
            assert torch.equal(sd[L + "v_proj.weight"], w[:, -1].reshape(kvd, H))
            assert torch.equal(sd[L + "o_proj.weight"], T[a + "wo.weight"])
            continue
        assert model.config.layer_types[i] == MAMBA2
        w = T[a + "wvkqgdt.weight"]
        expect = {
            "v_proj.weight": w[:kvd], "k_proj.weight": w[kvd : 2 * kvd], "q_proj.weight": w[2 * kvd : 2 * kvd + hd],
            "g_proj.weight": w[2 * kvd + hd : 2 * kvd + 2 * hd], "dt_proj.weight": w[2 * kvd + 2 * hd :],
            "o_proj.weight": T[a + "o_proj.weight"], "conv1d.weight": T[a + "conv1d.weight"],
            "conv1d.bias": T[a + "conv1d.bias"], "g_norm.weight": T[a + "g_norm_swish_gate.weight"],
            "dt_bias": T[a + "dt_bias"], "A_log": T[a + "A_log_bias"],
        }
        for k, v in expect.items():
            assert torch.equal(sd[L + k], v), (i, k)
        assert sd[L + "dt_proj.weight"].shape == (HEADS, H)
        assert sd[L + "conv1d.weight"].shape == (2 * kvd + hd, 1, 2)


def _prompt():
    return torch.tensor([[1, 5, 98] + [IMG] * 8 + [99, 17, 23, 4, 60, 8, 31]])


@pytest.mark.parametrize("mha", [set(), {1, 8, 20, 31}], ids=["linear", "hybrid"])
def test_released_layout_loads_every_tensor_in_place(tmp_path, mha):
    path, raw, T = _write(tmp_path, mha)
    model = load_mmmamba_hf(path)
    assert len(model.config.mamba_layers) == 32 - len(mha)
    assert model.config.mamba_d_conv == 2
    _check_placement(model, T, mha)
    px = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(_prompt(), pixel_values=px).logits
    assert out.shape == (1, 18, 100) and torch.isfinite(out).all()


def test_hybrid_forward_matches_plain_reference(tmp_path):
    """Small hybrid (2 + 3 layers) against a sequential reference of the released layers."""
    types = (["mamba2", "mha"], ["mha", "mamba2", "mamba2"])
    raw = hovle_raw_config(n_emb=2, n_llm=3, layers_block_type=types)
    T = random_hovle_tensors(raw, 3, mamba_layers={0, 3, 4})
    path = write_checkpoint(tmp_path, raw, T)
    model = load_mmmamba_hf(path)
    assert model.config.layer_types == [MAMBA2, ATTENTION, ATTENTION, MAMBA2, MAMBA2]
    px = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    ids = _prompt()
    with torch.no_grad():
        ours = model(ids, pixel_values=px).logits
    torch.testing.assert_close(ours, hovle_logits(raw, T, ids, px), atol=1e-5, rtol=1e-5)


def test_load_internvl_chat_and_load_teacher_delegate(tmp_path):
    path, raw, T = _write(tmp_path, {0, 9})
    for m in (load_internvl_chat(path), load_teacher(path)):
        assert m.config.layer_types[0] == ATTENTION and m.config.layer_types[1] == MAMBA2
        _check_placement(m, T, {0, 9})


def test_layer_types_inferred_without_layers_block_type(tmp_path):
    path, raw, T = _write(tmp_path, {3}, declare=False)
    m = load_internvl_chat(path)  # detected through the wvkqgdt tensors
    assert m.config.attention_layers == [3]
    _check_placement(m, T, {3})


def test_declared_type_disagreeing_with_tensors_fails(tmp_path):
    path, raw, T = _write(tmp_path, {3})
    raw["embedding_config"]["layers_block_type"][3] = "mamba2"
    write_checkpoint(tmp_path, raw, T)
    with pytest.raises(ValueError, match=r"layers_block_type\[3\] = 'mamba2'.*attention tensors"):
        load_mmmamba_hf(path)


def test_bad_block_type_list_length(tmp_path):
    path, raw, T = _write(tmp_path, set())
    raw["llm_config"]["layers_block_type"] = ["mamba2"] * 3
    write_checkpoint(tmp_path, raw, T)
    with pytest.raises(ValueError, match="llm_config.layers_block_type has 3 entries, expected 24"):
        load_mmmamba_hf(path)


def test_split_wvkqgdt_rows():
    w = torch.arange(6160.0)[:, None]  # HoVLE-2.6B sizes: v 1024 | k 1024 | q 2048 | g 2048 | dt 16
    p = split_wvkqgdt(w, 16, 8, 128)
    assert [p[n].shape[0] for n in ("v", "k", "q", "g", "dt")] == [1024, 1024, 2048, 2048, 16]
    assert p["q"][0, 0] == 2048 and p["dt"][0, 0] == 6144
    with pytest.raises(ValueError, match="wvkqgdt has 6159 rows"):
        split_wvkqgdt(w[:-1], 16, 8, 128)
