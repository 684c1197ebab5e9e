"""Test helper: a tiny random vision-language mmmamba folder (hybrid decoder, 28-pixel tiles of 4 image tokens)
with a word-level tokenizer that has ChatML's special tokens and a chat template; and small PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmmamba import MMMambaConfig, MMMambaForCausalLM
from mmmamba.io import save_model

WORDS = ("hello world what is in the image a cat dog red blue green picture of describe this please tell me more "
         "about it yes no one two three big small and on mat sitting").split()
SPECIAL = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "user", "assistant", "system", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = CHATML
    return tok


def write_tiny_vlm(out: str | Path, seed: int = 0, eos_first: bool = False) -> Path:
    """Save the tiny VLM + tokenizer to `out`. `eos_first`: the model's first token to any prompt is one of its
    stop tokens, so it ends every answer at once."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = MMMambaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mamba_chunk_size=8, max_position_embeddings=512,
        layer_types=["attention", "mamba2"], vision_config={"image_size": 28, "patch_size": 7},
        img_context_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
    )
    model = MMMambaForCausalLM(cfg).eval()
    im_end, im_start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        model.lm_head.weight[im_end] = 0  # a random model would rarely stop; keep it talking (bounded by max)
        if eos_first:  # only hidden dim 0 reaches the head, which maps it to one of the two stop tokens
            model.model.norm.weight.zero_()
            model.model.norm.weight[0] = 1.0
            model.lm_head.weight.zero_()
            model.lm_head.weight[im_end, 0] = 50.0
            model.lm_head.weight[im_start, 0] = -50.0
    model.generation_config.eos_token_id = [im_end, im_start] if eos_first else im_end
    return save_model(model, out, tok)


def write_png(path: str | Path, w: int = 40, h: int = 30, seed: int = 0) -> Path:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return Path(path)
