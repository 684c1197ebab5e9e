"""Table 2's real path: the synthetic image through the image pipeline and the vision front into our engine and
into transformers' decoder (tiny config, CPU)."""

from __future__ import annotations

import pytest
import torch

from mmmamba.bench.models import TINY_DIMS, TINY_VISION, build_hf_llama, build_ours, build_vision_front, make_config
from mmmamba.bench.table2 import HFVisionSteps, OursVisionSteps
from mmmamba.bench.vision_prompt import bench_tokenizer, parse_size, prompt_maker, synthetic_image
from mmmamba.inference.engine import Engine
from mmmamba.models.image_processing import IMG_CONTEXT_TOKEN, tokens_per_tile


@pytest.fixture(scope="module")
def config():
    return make_config(TINY_DIMS, "hybrid", vision=TINY_VISION)


def test_synthetic_image_is_deterministic():
    a, b, c = synthetic_image(64, 32), synthetic_image(64, 32), synthetic_image(64, 32, seed=1)
    assert a.size == (64, 32) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes() != c.tobytes()
    assert parse_size("896x448") == (896, 448)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("896")


def test_prompt_counts_match_the_pipeline(config):
    tok = bench_tokenizer(config)
    assert tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) == config.img_context_token_id
    for size, tiles in (((224, 112), 3), ((112, 112), 1), ((336, 112), 4)):
        p = prompt_maker(config, "cpu", synthetic_image(*size))()
        assert p.tiles == tiles and p.pixel_values.shape == (tiles, 3, 112, 112)
        assert p.visual_tokens == tiles * tokens_per_tile(config) == int((p.input_ids == 500).sum())
        assert p.text_tokens == p.input_ids.shape[1] - p.visual_tokens and p.preprocess_s > 0


@torch.no_grad()
def test_engine_first_token_uses_the_image(config):
    model = build_ours(config, "cpu", torch.float32)
    p = prompt_maker(config, "cpu", synthetic_image(224, 112))()
    steps = OursVisionSteps(model, Engine(model, kernels="torch"), n_out=4)
    assert steps.vision(p).shape == (3, 16, config.hidden_size)
    steps._reserve(p)
    got = steps.engine.prefill(p.input_ids, pixel_values=p.pixel_values)
    ref = model(p.input_ids, pixel_values=p.pixel_values).logits[:, -1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    text_only = model(p.input_ids).logits[:, -1]
    assert (ref - text_only).abs().max() > 1e-3  # the image tokens changed the answer
    assert steps.first_token(p).tolist() == ref.argmax(-1).tolist()
    assert steps.generate(p, 4) == 4


@torch.no_grad()
def test_hf_steps_put_the_vision_tokens_in_the_image_slots(config):
    model = build_hf_llama(TINY_DIMS, "cpu", torch.float32)
    front = build_vision_front(config, "cpu", torch.float32)
    p = prompt_maker(config, "cpu", synthetic_image(224, 112))()
    steps = HFVisionSteps(model, front, config.img_context_token_id, "past_key_values", lambda o: o.past_key_values)
    emb, text = steps.embeds(p), steps.embeds(p, with_image=False)
    slots = p.input_ids[0] == config.img_context_token_id
    torch.testing.assert_close(emb[0, slots], front(p.pixel_values).reshape(-1, config.hidden_size))
    torch.testing.assert_close(emb[0, ~slots], text[0, ~slots])
    assert steps.generate(p, 3) == 3
