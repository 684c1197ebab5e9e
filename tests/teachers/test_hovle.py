"""HoVLE loader: tiny random checkpoints with HoVLE's exact tensor names vs an independent reference forward."""

from __future__ import annotations

import json

import pytest
import torch
from hovle_ckpt import hovle_raw_config, random_hovle_tensors, write_checkpoint, write_hovle
from hovle_reference import hovle_logits

from mmmamba.models.chat_prompt import internlm2_chat_prompt
from mmmamba.models.config import ATTENTION
from mmmamba.teachers.hf import load_teacher
from mmmamba.teachers.hovle import fit_position_table, load_hovle, split_wqkv

IMG = 97  # img_context_token_id of the tiny checkpoints


def _ids(batch=2, L=21, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, L), generator=g)  # never IMG


def _pixels(n, size=28, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hovle_dir(tmp_path_factory):
    """8 embedding + 24 LLM layers (as HoVLE-2.6B), width 32, 4 q / 2 kv heads, different RoPE bases."""
    return write_hovle(tmp_path_factory.mktemp("hovle"), seed=0)


def test_all_32_layers_attention_with_per_group_rope(hovle_dir):
    path, raw, _ = hovle_dir
    m = load_hovle(path)
    c = m.config
    assert c.num_hidden_layers == 32 and c.layer_types == [ATTENTION] * 32
    assert c.layer_rope_theta == [10000.0] * 8 + [1e6] * 24
    assert c.img_context_token_id == IMG and c.vision_config["image_size"] == 28
    assert c.template == "internlm2-chat"
    assert m.model.rotary[m.model.layers[0].rope_index].inv_freq[1] != m.model.rotary[
        m.model.layers[8].rope_index
    ].inv_freq[1]


def test_logits_match_reference_text_only(hovle_dir):
    path, raw, T = hovle_dir
    m = load_hovle(path)
    ids = _ids()
    with torch.no_grad():
        ours = m(ids).logits
    ref = hovle_logits(raw, T, ids)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def _image_prompt(n_tiles, per_tile=4, L_text=7, seed=1):
    ids = _ids(1, L_text, seed=seed)[0].tolist()
    return torch.tensor([[1, 5, 98] + [IMG] * (per_tile * n_tiles) + [99] + ids])


def test_logits_match_reference_with_pixel_values(hovle_dir):
    path, raw, T = hovle_dir
    m = load_hovle(path)
    px = _pixels(3)  # 3 tiles of 28x28 -> 4 x 4 patches -> 2 x 2 = 4 image tokens each
    ids = _image_prompt(3)
    with torch.no_grad():
        ours = m(ids, pixel_values=px).logits
    ref = hovle_logits(raw, T, ids, px)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # the image really changes the output
    assert (ours - m(ids).logits).abs().max() > 1e-3


def test_position_table_smaller_than_tile_is_resized_like_hovle(tmp_path):
    """embedding_config.image_size 14 (table 2x2 + CLS) but force_image_size 28: HoVLE resizes on every forward."""
    path, raw, T = write_hovle(tmp_path, seed=3, n_emb=2, n_llm=3, table_image_size=14)
    m = load_hovle(path)
    assert m.model.vision.position_embedding.shape == (1, 1 + 16, 32)
    px, ids = _pixels(2, seed=4), _image_prompt(2)
    with torch.no_grad():
        torch.testing.assert_close(m(ids, pixel_values=px).logits, hovle_logits(raw, T, ids, px), atol=1e-5, rtol=1e-5)


def test_special_text_embeddings_and_shorter_head(tmp_path):
    """ids >= llm_vocab_size use special_text_embeddings[id - llm_vocab_size]; those input-only ids get logit 0."""
    path, raw, T = write_hovle(tmp_path, seed=5, n_emb=2, n_llm=2, n_special=3, vocab=100, out_vocab=100)
    m = load_hovle(path)
    assert m.config.vocab_size == 103
    torch.testing.assert_close(m.model.embed_tokens.weight[100:], T["embedding_model.special_text_embeddings.weight"])
    ids = torch.tensor([[1, 4, 100, 101, 102, 7, 9]])
    with torch.no_grad():
        ours = m(ids).logits
    torch.testing.assert_close(ours[..., :100], hovle_logits(raw, T, ids), atol=1e-5, rtol=1e-5)
    assert torch.all(ours[..., 100:] == 0)


def test_attention_biases_in_some_layers(tmp_path):
    """InternLM2's `bias=True` (LLM layers only here): biases are split like wqkv, absent ones become zero."""
    raw = hovle_raw_config(n_emb=1, n_llm=2)
    T = random_hovle_tensors(raw, 11)
    g = torch.Generator().manual_seed(12)
    for j in range(2):
        T[f"language_model.model.layers.{j}.attention.wqkv.bias"] = torch.randn(64, generator=g)
        T[f"language_model.model.layers.{j}.attention.wo.bias"] = torch.randn(32, generator=g)
    m = load_hovle(write_checkpoint(tmp_path, raw, T))
    assert m.config.qkv_bias and m.config.o_bias
    assert torch.all(m.model.layers[0].mixer.q_proj.bias == 0)
    q, k, v = split_wqkv(T["language_model.model.layers.1.attention.wqkv.bias"], 4, 2, 8)
    assert torch.equal(m.model.layers[2].mixer.k_proj.bias, k)
    ids = _ids(1, 11)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, hovle_logits(raw, T, ids), atol=1e-5, rtol=1e-5)


def test_every_tensor_lands_in_place(hovle_dir):
    path, raw, T = hovle_dir
    m = load_hovle(path)
    sd = m.state_dict()
    kv, d, g = 2, 8, 2  # 4 q heads / 2 kv heads of width 8
    for i in (0, 7, 8, 31):
        pre = f"embedding_model.encoder.{i}." if i < 8 else f"language_model.model.layers.{i - 8}."
        w = T[pre + "attention.wqkv.weight"]
        q, k, v = (sd[f"model.layers.{i}.mixer.{n}_proj.weight"] for n in "qkv")
        for kvh in range(kv):  # row blocks [q(kvh*g+0), ..., q(kvh*g+g-1), k(kvh), v(kvh)]
            base = kvh * (g + 2)
            for gi in range(g):
                qh = kvh * g + gi
                assert torch.equal(q[qh * d : (qh + 1) * d], w[(base + gi) * d : (base + gi + 1) * d])
            assert torch.equal(k[kvh * d : (kvh + 1) * d], w[(base + g) * d : (base + g + 1) * d])
            assert torch.equal(v[kvh * d : (kvh + 1) * d], w[(base + g + 1) * d : (base + g + 2) * d])
        L = f"model.layers.{i}."
        pairs = {
            "mixer.o_proj.weight": "attention.wo.weight", "mlp.gate_proj.weight": "feed_forward.w1.weight",
            "mlp.up_proj.weight": "feed_forward.w3.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
            "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        }
        for ours, theirs in pairs.items():
            assert torch.equal(sd[L + ours], T[pre + theirs]), (i, ours)
    top = {
        "model.embed_tokens.weight": "embedding_model.llm_text_embeddings.weight",
        "model.norm.weight": "language_model.model.norm.weight",
        "lm_head.weight": "language_model.output.weight",
        "model.vision.patch_embedding.weight": "embedding_model.vision_embeddings.patch_embedding.weight",
        "model.vision.patch_embedding.bias": "embedding_model.vision_embeddings.patch_embedding.bias",
        "model.vision.position_embedding": "embedding_model.vision_embeddings.position_embedding",
        "model.vision.mlp.0.weight": "embedding_model.pixel_shuffle_proj.0.weight",
        "model.vision.mlp.2.bias": "embedding_model.pixel_shuffle_proj.2.bias",
    }
    for ours, theirs in top.items():
        assert torch.equal(sd[ours], T[theirs]), ours


def test_split_wqkv_handles_bias_and_checks_rows():
    w = torch.arange(72, dtype=torch.float32).reshape(36, 2)  # 4 q heads, 1 kv head: (4 + 2) * d rows, d = 6
    q, k, v = split_wqkv(w, 4, 1, 6)
    assert torch.equal(q, w[:24]) and torch.equal(k, w[24:30]) and torch.equal(v, w[30:])
    qb, kb, vb = split_wqkv(torch.arange(36.0), 4, 1, 6)
    assert qb.shape == (24,) and torch.equal(kb, torch.arange(24.0, 30.0))
    with pytest.raises(ValueError, match="wqkv has 35 rows"):
        split_wqkv(w[:35], 4, 1, 6)


def test_fit_position_table_keeps_native_size():
    t = torch.randn(1, 17, 5)
    assert fit_position_table(t, 4) is t
    with pytest.raises(ValueError, match="square"):
        fit_position_table(torch.randn(1, 18, 5), 4)


def test_load_teacher_dispatch_sharded_and_bf16(tmp_path):
    path, raw, T = write_hovle(tmp_path, seed=6, n_emb=2, n_llm=2, shards=3)
    m = load_teacher(path)
    ids = _ids(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, hovle_logits(raw, T, ids), atol=1e-5, rtol=1e-5)
    assert load_hovle(path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_seed_save_and_reload_keep_vision_and_rope(tmp_path):
    from mmmamba.distill.seed import seed_student
    from mmmamba.io import load_model, save_model

    path, raw, T = write_hovle(tmp_path / "hovle", seed=7, n_emb=2, n_llm=2)
    teacher = load_hovle(path)
    student = seed_student(teacher, attention_layers=[0, 3]).eval()
    save_model(student, tmp_path / "student")
    again = load_model(tmp_path / "student")
    assert again.config.layer_rope_theta == teacher.config.layer_rope_theta
    assert again.config.vision_config == teacher.config.vision_config
    px, ids = _pixels(1, seed=8), _image_prompt(1)
    with torch.no_grad():
        a, b = student(ids, pixel_values=px).logits, again(ids, pixel_values=px).logits
    assert torch.equal(a, b) and torch.isfinite(a).all()


# -- errors --------------------------------------------------------------------------------------------------
def _write(tmp_path, mutate_raw=None, mutate_tensors=None, **kw):
    raw = hovle_raw_config(n_emb=1, n_llm=1, **kw)
    T = random_hovle_tensors(raw, 0)
    if mutate_raw:
        mutate_raw(raw)
    if mutate_tensors:
        mutate_tensors(T)
    return write_checkpoint(tmp_path, raw, T)


def test_missing_tensor_is_named(tmp_path):
    p = _write(tmp_path, mutate_tensors=lambda T: T.pop("language_model.layers.0.x", None)
               or T.pop("language_model.model.layers.0.feed_forward.w3.weight"))
    with pytest.raises(ValueError, match=r"language_model\.model\.layers\.0\.feed_forward\.w3\.weight"):
        load_hovle(p)


def test_unknown_tensor_is_reported(tmp_path):
    p = _write(tmp_path, mutate_tensors=lambda T: T.__setitem__("embedding_model.mystery.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match="unexpected tensors.*mystery"):
        load_hovle(p)


def test_layer_count_mismatch(tmp_path):
    p = _write(tmp_path, mutate_raw=lambda r: r["llm_config"].__setitem__("num_hidden_layers", 2))
    with pytest.raises(ValueError, match="llm_config.num_hidden_layers = 2"):
        load_hovle(p)


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda r: r["embedding_config"].__setitem__("pixel_shuffle_loc", "post"), "pixel_shuffle_loc"),
        (lambda r: r["embedding_config"].__setitem__("rms_norm_eps", 1e-5), "rms_norm_eps"),
        (lambda r: r["llm_config"].__setitem__("rope_scaling", {"type": "yarn", "factor": 2.0}), "rope_scaling"),
        (lambda r: r.pop("llm_config"), "llm_config"),
    ],
)
def test_unsupported_configs_fail_clearly(tmp_path, mutate, msg):
    with pytest.raises(ValueError, match=msg):
        load_hovle(_write(tmp_path, mutate_raw=mutate))


def test_dynamic_ntk_rope_is_accepted(tmp_path):
    p = _write(tmp_path, mutate_raw=lambda r: r["llm_config"].__setitem__("rope_scaling", {"type": "dynamic",
                                                                                             "factor": 2.0}))
    assert load_hovle(p).config.rope_scaling_config is None


def test_truncated_weights_file_is_named(tmp_path):
    p = _write(tmp_path)
    f = p / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hovle(p)


def test_chat_template_matches_internvl_mpt_style():
    s = internlm2_chat_prompt("hi", system_message="SYS")
    assert s == "<|im_start|>system\nSYS<|im_end|><|im_start|>user\nhi<|im_end|><|im_start|>assistant\n"
    assert json.dumps(internlm2_chat_prompt("q")).count("InternVL") == 1


def test_generation_stops_on_im_end_for_internlm2_chat(tmp_path):
    """Full InternLM2 vocabulary (92553): `<|im_end|>` (92542) joins eos; a generation_config.json wins."""
    path, raw, T = write_hovle(tmp_path, seed=9, n_emb=1, n_llm=1, vocab=92553, img_context_token_id=92546)
    assert load_hovle(path).generation_config.eos_token_id == [2, 92542]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_hovle(path).generation_config.eos_token_id == 7


def test_hovle_2p6b_dims_and_parameter_count():
    """HoVLE-2.6B's shapes (METHOD.md §1.6) on the meta device: 32 layers, 256 tokens per tile and
    2.606 B teacher parameters = ours + the unused CLS and LLM tok_embeddings; seeded linear student 2.742 B."""
    from mmmamba.distill.seed import seed_student
    from mmmamba.models import MMMambaForCausalLM
    from mmmamba.models.image_processing import tokens_per_tile
    from mmmamba.teachers.hovle import hovle_config

    raw = hovle_raw_config(hidden=2048, heads=16, kv_heads=8, inter=8192, vocab=92553, image_size=448, patch=14,
                           img_context_token_id=92546)
    meta = {"embedding_model.llm_text_embeddings.weight": torch.empty(92553, 2048, device="meta"),
            "language_model.output.weight": torch.empty(92553, 2048, device="meta")}
    meta.update({f"embedding_model.encoder.{i}.ffn_norm.weight": None for i in range(8)})
    meta.update({f"language_model.model.layers.{j}.ffn_norm.weight": None for j in range(24)})
    cfg = hovle_config(raw, meta)
    assert (cfg.num_hidden_layers, cfg.head_dim, tokens_per_tile(cfg)) == (32, 128, 256)
    with torch.device("meta"):
        teacher = MMMambaForCausalLM(cfg)
        n_teacher = sum(p.numel() for p in teacher.parameters())
        assert n_teacher + 2048 + 92553 * 2048 == 2_606_327_808
        student = seed_student(teacher)
        n_student = sum(p.numel() for p in student.parameters())
    assert n_student - n_teacher == 32 * 4_239_520
    assert round((n_student + 2048 + 92553 * 2048) / 1e9, 3) == 2.742


def test_cli_generate_with_image_on_hovle_folder(tmp_path, capsys):
    """`mmmamba generate --model HOVLE_DIR --image PNG`: tiling, internlm2-chat prompt, <IMG_CONTEXT> expansion."""
    import numpy as np
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mmmamba.cli import main

    path, raw, T = write_hovle(tmp_path / "hovle", seed=10, n_emb=2, n_llm=2)
    special = {"[UNK]": 3, "<|im_end|>": 92, "<|im_start|>": 93, "<img>": 95, "</img>": 96, "<IMG_CONTEXT>": IMG}
    vocab = {**{f"w{i}": i for i in range(100) if i not in special.values()}, **special}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|im_start|>", "<img>", "</img>",
                                                         "<IMG_CONTEXT>"]})
    tok.save_pretrained(path)
    img = tmp_path / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8)).save(img)
    rc = main(["generate", "--model", str(path), "--prompt", "w5 w6", "--image", str(img), "--max-tiles", "4",
               "--max-new-tokens", "3", "--device", "cpu"])
    assert rc == 0
    bad = tmp_path / "bad.png"
    bad.write_text("no image")
    rc = main(["generate", "--model", str(path), "--prompt", "w5", "--image", str(bad), "--device", "cpu"])
    assert rc == 2 and "bad.png" in capsys.readouterr().err
