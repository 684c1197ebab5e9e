"""Tokenizers of model folders, without remote code.

`load_tokenizer(path)` loads what transformers' AutoTokenizer loads natively; folders that ship InternLM2's
tokenizer (HoVLE, InternVL, the released mmMamba: `tokenizer.model` + a tokenizer_config.json whose auto_map
points to custom code) get a fast tokenizer built here from the SentencePiece model with InternLM2's behaviour:

* SentencePiece BPE with byte fallback, pieces merged by score (tokenizers' BPE, merges from the piece scores);
* text is split at the added tokens first (`<|im_start|>`, `<|im_end|>`, `<img>`, `<IMG_CONTEXT>`, ... from
  tokenizer_config.json's added_tokens_decoder, at their ids), then each piece is encoded as SentencePiece does:
  spaces become `▁` and, with the model's add_dummy_prefix, a `▁` is put in front;
* `<s>` is prepended (add_bos_token, default on), `</s>` appended only with add_eos_token;
* decoding joins the pieces, `▁` -> space, byte pieces -> UTF-8, and drops the one leading space;
* `<unk>` / `<s>` / `</s>` are ids 0 / 1 / 2, pad is `</s>`, padding on the left.

A folder whose tokenizer cannot be loaded raises, naming the folder and the file at fault."""

from __future__ import annotations

import json
import os
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
INTERNLM2_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")


class TokenizerLoadError(ValueError):
    """A tokenizer folder that cannot be loaded (the message names the folder / file and the reason)."""


def _config(path: Path) -> dict:
    f = path / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise TokenizerLoadError(f"{f}: not valid JSON ({e})") from e


def is_internlm2(path: Path, cfg: dict | None = None) -> bool:
    """A folder with InternLM2's tokenizer: its class named in tokenizer_config.json (tokenizer_class or auto_map)."""
    cfg = _config(path) if cfg is None else cfg
    names = [cfg.get("tokenizer_class") or ""]
    auto = (cfg.get("auto_map") or {}).get("AutoTokenizer") or []
    names += [a for a in ([auto] if isinstance(auto, str) else auto) if a]
    return any(n.split(".")[-1] in INTERNLM2_CLASSES for n in names)


def load_tokenizer(path: str | os.PathLike, required: bool = True):
    """The tokenizer of a model folder (a transformers fast tokenizer).

    Raises TokenizerLoadError naming the folder / file when the files are there but cannot be loaded, or (with
    `required`) when the folder has no tokenizer files; without `required` such a folder gives None."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        if required:
            raise TokenizerLoadError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
                                     "model's tokenizer beside its weights")
        return None
    cfg = _config(path)
    if is_internlm2(path, cfg):
        return internlm2_tokenizer(path, cfg)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError, ...) for bad files
        files = ", ".join(sorted(f.name for f in path.iterdir() if f.name.startswith(("tokenizer", "special"))))
        raise TokenizerLoadError(f"could not load the tokenizer of {path} (files: {files}): "
                                 f"{type(e).__name__}: {e}") from e


def _read_spm(model_file: Path):
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    if not model_file.is_file():
        raise TokenizerLoadError(f"{model_file} is missing: an InternLM2 tokenizer is built from its SentencePiece "
                                 "model")
    try:
        return SentencePieceExtractor(str(model_file)).proto
    except Exception as e:  # protobuf's DecodeError and friends
        raise TokenizerLoadError(f"{model_file}: not a SentencePiece model ({type(e).__name__}: {e})") from e


def _added_tokens(cfg: dict, n_pieces: int, model_file: Path) -> dict[int, dict]:
    """added_tokens_decoder of tokenizer_config.json as {id: entry}, checked against the SentencePiece vocab."""
    added = {int(i): e for i, e in (cfg.get("added_tokens_decoder") or {}).items()}
    ids = sorted(i for i in added if i >= n_pieces)
    if ids and ids != list(range(n_pieces, n_pieces + len(ids))):
        raise TokenizerLoadError(f"tokenizer_config.json beside {model_file}: added token ids {ids} do not follow "
                                 f"the {n_pieces} SentencePiece pieces without gaps")
    return added


def internlm2_tokenizer(path: str | os.PathLike, cfg: dict | None = None):
    """InternLM2's tokenizer (see the module docstring) as a transformers fast tokenizer, from
    `path/tokenizer.model` and `path/tokenizer_config.json`."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    path = Path(path)
    cfg = _config(path) if cfg is None else cfg
    model_file = path / "tokenizer.model"
    proto = _read_spm(model_file)
    if proto.trainer_spec.model_type != 2:
        raise TokenizerLoadError(f"{model_file}: InternLM2's tokenizer is a BPE SentencePiece model, this one has "
                                 f"model_type {proto.trainer_spec.model_type}")
    # as InternLM2's own fast tokenizer: only the dummy prefix and the space -> ▁ rule of the SentencePiece
    # normalizer are applied (InternLM2's model has the identity normalizer and keeps extra whitespace)
    norm = proto.normalizer_spec
    pieces = [p.piece for p in proto.pieces]
    added = _added_tokens(cfg, len(pieces), model_file)
    n_extra = sum(i >= len(pieces) for i in added)
    vocab = pieces + [added[i]["content"] for i in range(len(pieces), len(pieces) + n_extra)]
    for i, e in added.items():  # an added token inside the SentencePiece range takes its id (as InternLM2 does)
        vocab[i] = e["content"]
    vocab[:3] = ["<unk>", "<s>", "</s>"]
    # control / user-defined pieces and the added tokens are matched whole, never merged
    whole = {p.piece for p in proto.pieces if p.type in (2, 3, 4)} | {e["content"] for e in added.values()}
    bpe_vocab = {w: i for i, w in enumerate(vocab)}
    scores = {w: proto.pieces[i].score for i, w in enumerate(vocab[:len(pieces)]) if w not in whole}
    merges = generate_merges(bpe_vocab, scores, skip_tokens=whole)
    tk = Tokenizer(BPE(bpe_vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    tk.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1, right=0)])
    tk.add_special_tokens([
        AddedToken(e["content"], single_word=e.get("single_word", False), lstrip=e.get("lstrip", False),
                   rstrip=e.get("rstrip", False), normalized=e.get("normalized", False),
                   special=e.get("special", True))
        for _, e in sorted(added.items())])

    bos, eos = vocab[1], vocab[2]
    single = ([f"{bos}:0"] if cfg.get("add_bos_token", True) else []) + ["$A:0"] + (
        [f"{eos}:0"] if cfg.get("add_eos_token", False) else [])
    pair = single + [x.replace("$A", "$B").replace(":0", ":1") for x in single]
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=[(bos, 1), (eos, 2)])

    def tok_name(key: str, default: str) -> str:
        v = cfg.get(key, default)
        return v.get("content", default) if isinstance(v, dict) else (v or default)

    extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=tok_name("bos_token", "<s>"), eos_token=tok_name("eos_token", "</s>"),
        unk_token=tok_name("unk_token", "<unk>"), pad_token=tok_name("pad_token", "</s>"),
        additional_special_tokens=[x["content"] if isinstance(x, dict) else x for x in extra],
        clean_up_tokenization_spaces=False, padding_side=cfg.get("padding_side", "left"),
        model_max_length=cfg.get("model_max_length", int(1e30)),
    )
    if cfg.get("chat_template"):
        tok.chat_template = cfg["chat_template"]
    return tok
