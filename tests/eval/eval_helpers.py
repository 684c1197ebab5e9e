"""Helpers of the eval tests: a tiny byte-level tokenizer (chat template, image tokens), PNGs as base64, TSV files,
tiny random models."""

from __future__ import annotations

import base64
import io

import torch
from conftest import tiny_model
from PIL import Image

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(chat: bool = True):
    """Every byte is a token (any text encodes and decodes), plus <|im_start|>, <|im_end|> (end), <pad>, <s> and
    the image tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<pad>", "bos_token": "<s>",
                            "additional_special_tokens": ["<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>"]})
    if chat:
        tok.chat_template = CHAT
    return tok


def png_b64(seed: int, size=(20, 14)) -> str:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, header: list[str], rows: list[list]) -> None:
    path.write_text("\n".join("\t".join(str(c) for c in r) for r in [header, *rows]) + "\n")


def make_model(tok, vision: bool, layer_types, seed: int = 0):
    kw = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if vision:
        kw.update(vision_config={"image_size": 28, "patch_size": 7},
                  img_context_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    return tiny_model(layer_types=layer_types, seed=seed, **kw)
