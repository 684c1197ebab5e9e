"""The Table 2 prompt through the package's own image pipeline (`mmmamba.models.image_processing`): a deterministic
synthetic RGB image -> dynamic tiles + thumbnail -> ImageNet normalisation -> the internlm2-chat prompt with
`<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>` -> token ids.

A random-weight benchmark has no tokenizer: `bench_tokenizer` builds a word-level one (a transformers
`PreTrainedTokenizerFast`) over the prompt's words, one token per CJK character as InternLM2 roughly tokenises the
system message, with `<IMG_CONTEXT>` at `config.img_context_token_id`. The timed preprocessing is then the work a
served request does: tiling, normalising, templating, tokenising and the copy to the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from ..models.chat_prompt import internlm2_chat_prompt
from ..models.image_processing import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    build_image_prompt,
    tokens_per_tile,
)
from .measure import sync

TABLE2_QUESTION = "Describe the image specifically"  # Cobra's benchmark prompt (METHOD.md §5)
TABLE2_IMAGE = (896, 448)  # 2 x 1 tiles + thumbnail = 3 tiles x 256 = 768 visual tokens (METHOD.md §6.2)
TINY_IMAGE = (224, 112)  # the same grid at the tiny config's 112-pixel tiles: 3 x 16 = 48 visual tokens
SPECIAL = ["[UNK]", IMG_START_TOKEN, IMG_END_TOKEN, "<|im_start|>", "<|im_end|>"]


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test picture (colour gradients, stripes, a bright box and noise), width x height."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    rgb = torch.stack([x, y, 0.5 + 0.5 * torch.sin(12.0 * (x + 2 * y))], dim=-1)
    rgb[height // 4: height // 2, width // 3: width // 2] = torch.tensor([0.95, 0.85, 0.1])
    rgb = (rgb + 0.05 * torch.randn(rgb.shape, generator=g)).clamp(0, 1)
    return Image.fromarray((rgb * 255).to(torch.uint8).numpy(), mode="RGB")


def parse_size(text: str) -> tuple[int, int]:
    """"896x448" -> (896, 448)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size {text!r} must look like WIDTHxHEIGHT, e.g. 896x448") from None
    if w < 1 or h < 1:
        raise ValueError(f"image size {text!r} must be positive")
    return w, h


def bench_tokenizer(config, question: str = TABLE2_QUESTION):
    """Word-level tokenizer over the internlm2-chat prompt of `question` (ids 0..n-1), the chat / image special
    tokens after them and `<IMG_CONTEXT>` at config.img_context_token_id; any other word is `[UNK]`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=False,
                                      lowercase=False)
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for w, _ in pre.pre_tokenize_str(norm.normalize_str(internlm2_chat_prompt(question)))})
    vocab = {w: i for i, w in enumerate(words + SPECIAL)}
    img_id = config.img_context_token_id
    if len(vocab) > min(img_id, config.vocab_size):
        raise ValueError(f"the bench tokenizer needs {len(vocab)} ids below img_context_token_id {img_id} and "
                         f"vocab_size {config.vocab_size}")
    vocab[IMG_CONTEXT_TOKEN] = img_id
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer, tk.pre_tokenizer = norm, pre
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:] + [IMG_CONTEXT_TOKEN]})
    return tok


@dataclass
class VisionPrompt:
    """One request: ids (1, L) and pixel tiles (n, 3, S, S) on the device, with its counts and its
    preprocessing time (s)."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    tiles: int
    visual_tokens: int
    text_tokens: int
    preprocess_s: float


def prompt_maker(config, device, image: Image.Image, question: str = TABLE2_QUESTION,
                 max_tiles: int = 6) -> Callable[[], VisionPrompt]:
    """A function that runs the image pipeline on `image` and returns the timed `VisionPrompt`."""
    tok = bench_tokenizer(config, question)
    per_tile = tokens_per_tile(config)

    def make() -> VisionPrompt:
        sync(device)
        t0 = time.perf_counter()
        text, pixels = build_image_prompt(config, tok, image, question, max_tiles=max_tiles)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], device=device)
        pixels = pixels.to(device)
        sync(device)
        dt = time.perf_counter() - t0
        n_img = int((ids == config.img_context_token_id).sum())
        if n_img != pixels.shape[0] * per_tile:
            raise ValueError(f"the prompt has {n_img} <IMG_CONTEXT> ids for {pixels.shape[0]} tiles of {per_tile} "
                             "tokens: the tokenizer split the image tokens")
        return VisionPrompt(ids, pixels, pixels.shape[0], n_img, ids.shape[1] - n_img, dt)

    return make
