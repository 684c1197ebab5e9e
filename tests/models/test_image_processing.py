"""HoVLE / InternVL dynamic tiling, normalisation, image-token expansion and image prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmmamba.models import MMMambaForCausalLM
from mmmamba.models.image_processing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_image_prompt,
    candidate_grids,
    check_image_tokenizer,
    closest_grid,
    dynamic_tiles,
    expand_image_tokens,
    load_image,
    normalize_tile,
)


def _random_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# -- grid choice --------------------------------------------------------------------------------------------------
def test_candidate_grids_enumerate_and_sort_by_tile_count():
    grids = candidate_grids(1, 6)
    assert sorted(grids) == sorted((i, j) for i in range(1, 7) for j in range(1, 7) if i * j <= 6)
    assert len(grids) == 14
    counts = [i * j for i, j in grids]
    assert counts == sorted(counts)
    assert all(3 <= i * j <= 4 for i, j in candidate_grids(3, 4))
    with pytest.raises(ValueError, match="min_num"):
        candidate_grids(0, 4)


@pytest.mark.parametrize(
    "size, max_num, grid",
    [
        ((800, 600), 12, (4, 3)),  # exact aspect 4:3
        ((2000, 400), 12, (5, 1)),  # wide
        ((300, 900), 12, (1, 3)),  # tall
        ((448, 448), 12, (1, 1)),  # square ties: area too small for 2x2
        ((900, 900), 12, (2, 2)),  # 810000 > 0.5*448^2*4 but not > 0.5*448^2*9
        ((1000, 1000), 12, (3, 3)),
        ((1000, 1000), 6, (2, 2)),
        ((1000, 800), 6, (3, 2)),  # aspect 1.25: tie between ratio 1 and 1.5, area decides for the later grid
        ((500, 400), 6, (1, 1)),  # same tie, too small: the first grid stays
    ],
)
def test_closest_grid_with_tie_rule(size, max_num, grid):
    assert closest_grid(*size, candidate_grids(1, max_num), 448) == grid


# -- tiles --------------------------------------------------------------------------------------------------------
def test_tiles_are_row_major_crops_plus_thumbnail():
    img = _random_image(60, 60, seed=1)  # 2 x 2 grid at 28-pixel tiles (3600 > 0.5 * 28^2 * 4)
    tiles = dynamic_tiles(img, 1, 6, image_size=28)
    assert len(tiles) == 5
    resized = img.resize((56, 56), Image.Resampling.BICUBIC)
    boxes = [(0, 0), (28, 0), (0, 28), (28, 28)]
    for tile, (x, y) in zip(tiles, boxes):
        assert tile.size == (28, 28)
        assert np.array_equal(np.asarray(tile), np.asarray(resized.crop((x, y, x + 28, y + 28))))
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((28, 28), Image.Resampling.BICUBIC)))


def test_single_tile_has_no_thumbnail_and_thumbnail_switch():
    assert len(dynamic_tiles(_random_image(30, 30), 1, 6, image_size=28)) == 1
    assert len(dynamic_tiles(_random_image(100, 50), 1, 6, image_size=28)) == 3  # (2, 1) + thumbnail
    assert len(dynamic_tiles(_random_image(100, 50), 1, 6, image_size=28, use_thumbnail=False)) == 2


def test_normalisation_is_imagenet():
    img = Image.new("RGB", (28, 28), (255, 0, 128))
    x = normalize_tile(img, 28)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    want = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
            (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    torch.testing.assert_close(x[:, 5, 7], torch.tensor(want), atol=1e-6, rtol=1e-6)
    rnd = _random_image(28, 28, seed=2)
    ref = (np.asarray(rnd, dtype=np.float32) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    torch.testing.assert_close(normalize_tile(rnd, 28), torch.from_numpy(ref.transpose(2, 0, 1)).float(),
                               atol=1e-6, rtol=1e-6)


def test_normalize_tile_resizes_bicubic_and_converts_mode():
    img = _random_image(40, 20).convert("L")
    x = normalize_tile(img, 28)
    rgb = img.convert("RGB").resize((28, 28), Image.Resampling.BICUBIC)
    torch.testing.assert_close(x, normalize_tile(rgb, 28))


def test_load_image_from_file_and_errors(tmp_path):
    p = tmp_path / "photo.png"
    _random_image(100, 50).save(p)
    px = load_image(p, image_size=28, max_num=6)
    assert px.shape == (3, 3, 28, 28)
    assert load_image(p, image_size=28, max_num=1).shape == (1, 3, 28, 28)
    with pytest.raises(FileNotFoundError, match="nothere.jpg"):
        load_image(tmp_path / "nothere.jpg")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(bad)


# -- prompt -------------------------------------------------------------------------------------------------------
def test_expand_image_tokens():
    body = "<img>" + "<IMG_CONTEXT>" * 8 + "</img>"
    assert expand_image_tokens("<image>\nWhat is it?", 2, 4) == body + "\nWhat is it?"
    assert expand_image_tokens("What is it?", 2, 4) == body + "\nWhat is it?"
    assert expand_image_tokens("a <image> b <image>", 1, 1).count("<image>") == 1  # first placeholder only
    assert expand_image_tokens("x", 13, 256).count("<IMG_CONTEXT>") == 3328  # 12 tiles + thumbnail


def _tokenizer(with_img_context=True, chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "describe", "the", "image", "\n", "system", "user", "assistant"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>")
    special = ["<img>", "</img>", "<|im_start|>", "<|im_end|>"] + (["<IMG_CONTEXT>"] if with_img_context else [])
    tok.add_special_tokens({"additional_special_tokens": special})
    if chat_template:
        tok.chat_template = chat_template
    return tok


@pytest.fixture
def vlm_config(make_config):
    def make(tok, **kw):
        return make_config(vision_config={"image_size": 28, "patch_size": 7}, vocab_size=max(len(tok), 20),
                           img_context_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), **kw)

    return make


def test_build_image_prompt_end_to_end(tmp_path, vlm_config):
    tok = _tokenizer()
    cfg = vlm_config(tok)
    img = tmp_path / "cat.png"
    _random_image(100, 50).save(img)
    text, px = build_image_prompt(cfg, tok, img, "describe the image", max_tiles=4)
    assert px.shape == (3, 3, 28, 28)
    assert text == "<img>" + "<IMG_CONTEXT>" * 12 + "</img>\ndescribe the image"
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert int((ids == cfg.img_context_token_id).sum()) == 12
    torch.manual_seed(0)
    model = MMMambaForCausalLM(cfg).eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids, pixel_values=px).logits).all()


def test_build_image_prompt_templates(tmp_path, vlm_config):
    img = tmp_path / "x.png"
    _random_image(30, 30).save(img)
    tok = _tokenizer()
    text, _ = build_image_prompt(vlm_config(tok, template="internlm2-chat"), tok, img, "<image>\ndescribe")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|><|im_start|>assistant\n")
    assert "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\ndescribe<|im_end|>" in text
    tmpl = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    tok2 = _tokenizer(chat_template=tmpl)
    text2, _ = build_image_prompt(vlm_config(tok2), tok2, img, "describe")
    assert text2 == "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\ndescribe<|im_end|>"
    text3, _ = build_image_prompt(vlm_config(tok2), tok2, img, "describe", chat=False)
    assert text3.startswith("<img>")


def test_tokenizer_checks(tmp_path, vlm_config, make_config):
    tok = _tokenizer()
    cfg = vlm_config(tok)
    assert check_image_tokenizer(cfg, tok) == cfg.img_context_token_id
    with pytest.raises(ValueError, match="no <IMG_CONTEXT> token"):
        check_image_tokenizer(cfg, _tokenizer(with_img_context=False))
    cfg.img_context_token_id += 1
    with pytest.raises(ValueError, match="does not belong"):
        check_image_tokenizer(cfg, tok)
    with pytest.raises(ValueError, match="no vision front"):
        build_image_prompt(make_config(), tok, tmp_path / "x.png", "hi")
    with pytest.raises(ValueError, match="img_context_token_id is not set"):
        check_image_tokenizer(make_config(vision_config={}), tok)
