"""load_tokenizer: InternLM2 tokenizers (HoVLE / InternVL / released mmMamba folders) built natively from
tokenizer.model, checked against SentencePiece itself; clear errors naming the file."""

from __future__ import annotations

import json
import re

import pytest

from mmmamba.models.tokenizer import TokenizerLoadError, is_internlm2, load_tokenizer

spm = pytest.importorskip("sentencepiece")

CHAT = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
VISION = ["<img>", "</img>", "<IMG_CONTEXT>"]  # added after the SentencePiece vocab, as InternVL does

CORPUS = """The quick brown fox jumps over the lazy dog. A picture of a cat sitting on a mat.
What is shown in this image? Describe the image in detail. The answer is 42, not 41.
def main():\n    return {"key": [1, 2, 3]}  # code with  two spaces
Numbers 3.14159 and 2,718; e-mail someone@example.com; URLs like https://example.org/a?b=c
""" * 20


@pytest.fixture(scope="module")
def internlm2_dir(tmp_path_factory):
    """A folder shaped like HoVLE's: a BPE SentencePiece model with byte fallback, <unk>/<s>/</s> at 0/1/2, the
    chat tokens as user-defined pieces, and tokenizer_config.json pointing at InternLM2's remote code."""
    d = tmp_path_factory.mktemp("internlm2_tok")
    (d / "corpus.txt").write_text(CORPUS)
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), model_type="bpe", vocab_size=420,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=CHAT, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    n = sp.get_piece_size()
    added = {str(sp.piece_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                      "normalized": False, "single_word": False} for t in CHAT}
    added.update({str(n + i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                               "normalized": False, "single_word": False} for i, t in enumerate(VISION)})
    (d / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "tokenizer_class": "InternLM2Tokenizer", "added_tokens_decoder": added,
        "additional_special_tokens": CHAT + VISION, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }))
    return d, sp, n


def _reference_encode(sp, n, text):
    """InternLM2's documented behaviour from SentencePiece itself: split at the added tokens, encode each piece of
    text with SentencePiece (dummy prefix per piece), <s> first."""
    ids = {t: sp.piece_to_id(t) for t in CHAT} | {t: n + i for i, t in enumerate(VISION)}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(ids, key=len, reverse=True)) + ")"
    out = [1]
    for part in re.split(pattern, text):
        if part in ids:
            out.append(ids[part])
        elif part:
            out += sp.encode(part)
    return out


TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and  double  spaces ",
    "line one\nline two\n\ttab",
    "Unicode: café, naïve, 中文字符, emoji 🐍🚀",
    "numbers 1234567 and 3.14",
    "<|im_start|>user\nWhat is shown in this image?<|im_end|><|im_start|>assistant\n",
    "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe the image.",
    "unseen wörds zzzqqq ÆØÅ",
    "",
    " ",
]


def test_detected_and_loaded_without_remote_code(internlm2_dir):
    d, sp, n = internlm2_dir
    assert is_internlm2(d)
    tok = load_tokenizer(d)
    assert len(tok) == n + len(VISION)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == n + 2
    assert tok.convert_tokens_to_ids("<|im_end|>") == sp.piece_to_id("<|im_end|>")
    assert tok.padding_side == "left"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_sentencepiece(internlm2_dir, text):
    d, sp, n = internlm2_dir
    tok = load_tokenizer(d)
    ids = tok(text)["input_ids"]
    assert ids == _reference_encode(sp, n, text)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[1:]
    plain = [i for i in ids if i < n and sp.id_to_piece(i) not in CHAT and i > 2]
    assert tok.decode(plain) == sp.decode(plain)
    if not any(t in text for t in CHAT + VISION):
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]) == (text if text.strip() else
                                                                                  sp.decode(ids[1:]))


def test_byte_fallback_round_trips_unseen_characters(internlm2_dir):
    d, sp, n = internlm2_dir
    tok = load_tokenizer(d)
    text = "Ω≈ç√∫ 😀 ありがとう"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(sp.id_to_piece(i).startswith("<0x") for i in ids)
    assert tok.decode(ids) == text


def test_chat_template_and_batch_padding(internlm2_dir):
    d, sp, n = internlm2_dir
    tok = load_tokenizer(d)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    batch = tok(["a", "a longer text"], padding=True)["input_ids"]
    assert batch[0][0] == 2 and batch[1][0] == 1  # left padding with </s>


def test_errors_name_the_file(internlm2_dir, tmp_path):
    d, _, _ = internlm2_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer_config.json").write_text((d / "tokenizer_config.json").read_text())
    with pytest.raises(TokenizerLoadError, match=r"bad/tokenizer.model is missing"):
        load_tokenizer(bad)
    (bad / "tokenizer.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(TokenizerLoadError, match=r"bad/tokenizer.model: not a SentencePiece model"):
        load_tokenizer(bad)
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match=r"bad/tokenizer_config.json: not valid JSON"):
        load_tokenizer(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerLoadError, match="has no tokenizer files"):
        load_tokenizer(empty)
    assert load_tokenizer(empty, required=False) is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(TokenizerLoadError, match=r"could not load the tokenizer of .*broken"):
        load_tokenizer(broken)
