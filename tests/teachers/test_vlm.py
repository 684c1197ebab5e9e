"""teachers.vlm: a HoVLE-style VLM around a text teacher."""

import pytest
import torch
from PIL import Image

from mmmamba.models.image_processing import IMG_CONTEXT_TOKEN, build_image_prompt
from mmmamba.teachers.hf import load_teacher
from mmmamba.teachers.vlm import build_vlm, vlm_config


@pytest.fixture
def llm_and_tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return load_teacher(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_new_layers_are_the_identity_at_step_0(llm_and_tok):
    llm, tok = llm_and_tok
    vlm = build_vlm(llm, tok, new_layers=2).eval()
    assert vlm.config.num_hidden_layers == llm.config.num_hidden_layers + 2
    assert tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) == vlm.config.img_context_token_id
    ids = torch.randint(0, llm.config.vocab_size, (2, 11))
    with torch.no_grad():
        a, b = llm(ids).logits, vlm(ids).logits
    torch.testing.assert_close(b[..., : a.shape[-1]], a, rtol=1e-5, atol=1e-5)


def test_image_prompt_runs_through_the_vlm(llm_and_tok):
    llm, tok = llm_and_tok
    vlm = build_vlm(llm, tok, new_layers=1, image_size=32, patch_size=8).eval()
    text, pix = build_image_prompt(vlm.config, tok, Image.new("RGB", (50, 20), (200, 10, 10)), "What colour?")
    assert pix.shape == (1, 3, 32, 32)  # one tile: no dynamic tiling, no thumbnail
    assert text.count(IMG_CONTEXT_TOKEN) == 4  # (32 / 8 * 0.5)^2
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = vlm.generate(ids, pixel_values=pix, max_new_tokens=3)
    assert out.shape == (1, ids.shape[1] + 3)


def test_vlm_config_rejects_a_grid_that_does_not_divide(llm_and_tok):
    llm, _ = llm_and_tok
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vlm_config(llm.config, 1, llm.config.vocab_size + 3, 5, image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="new_layers"):
        vlm_config(llm.config, -1, llm.config.vocab_size + 3, 5)
