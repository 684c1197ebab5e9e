"""Distillation data: plain text, Python's pydoc topics and LLaVA / InternVL conversation JSONL (with images).

`build_dataloader(data_cfg, tokenizer, model_config, batch_size, seed, split)` returns a standard
`torch.utils.data.DataLoader` whose batches are dicts

* ``input_ids`` (b, l) long, right-padded with the tokenizer's pad id (else its eos id, else 0);
* ``attention_mask`` (b, l) long, 1 on real tokens;
* ``labels`` (b, l) long: the token id where the token is a training target, -100 elsewhere (padding; for
  conversations everything but the assistant turns). Labels are *not* shifted (the model shifts them);
* ``pixel_values`` (n_tiles_total, 3, S, S) float32, only when a sample of the batch has images: the tiles of
  all samples concatenated in sample order, matching the ``<IMG_CONTEXT>`` runs of ``input_ids``.

``data_cfg`` schema (a dict, e.g. the ``data:`` block of a recipe; every key optional except ``sources``)::

    sources:                    # list; each entry a dict, or a string shorthand ("pydoc" or a file path)
      - type: pydoc             # pydoc_data.topics (ships with Python); topics are the documents
      - type: text              # plain text files; `path` a path, a glob, or a list of them
        path: corpus/*.txt
      - type: jsonl             # conversation JSONL (one JSON object per line, see below)
        path: data/train.jsonl
        image_root: data/images #   relative image paths resolve against this (default: the JSONL's folder)
      # per-source keys: heldout_fraction (overrides the global one), max_samples (keep the first N samples),
      # split: auto (default: split by heldout_fraction) | train | heldout | all (whole source in that split)
    heldout_sources: [...]      # optional: explicit held-out sources; when given, split="heldout" uses only them
                                # (all of each) and the `sources` are not split
    max_length: 2048            # tokens per sample; text is cut into windows of this size, longer
                                # conversations are bad rows (skipped)
    min_length: 2               # text windows shorter than this are dropped
    text_mode: chunk            # chunk: each document cut into max_length windows (the last one shorter);
                                # pack: documents joined with eos between them, cut into full windows
    add_bos: null               # prepend the tokenizer's bos to text windows / conversations
                                # (null: no for text and tokenizer templates, yes for internlm2-chat)
    template: auto              # auto: internlm2-chat if model_config.template says so (HoVLE), else the
                                # tokenizer's chat template if it has one, else internlm2-chat (METHOD.md 1.5);
                                # or "tokenizer" / "internlm2-chat"
    system: null                # system prompt for conversations without one (null: the template's default;
                                # for internlm2-chat InternVL's Chinese system prompt)
    heldout_fraction: null      # share held out per source (null: 0.1 for pydoc, 0.05 for the others); held-out
                                # units are chosen by a hash of their names (topics, JSONL line numbers), text
                                # files give their last tokens, so the held-out set never depends on the seed
    shuffle: true               # also for heldout: a prefix of the (seeded, fixed) order is then a fair sample
    bucket: true                # length bucketing: sort by length inside shuffled mega-batches
    mega_batch: 64              # batches per mega-batch
    drop_last: false
    pad_to_multiple_of: null
    num_workers: 0
    strict: false               # true: the first bad row raises DataError instead of being skipped
    check_images: full          # full: decode every image while scanning; header: only read its size
    image_root: null            # default image_root for jsonl sources
    image: {max_tiles: 12, min_tiles: 1, use_thumbnail: true}   # dynamic tiling (defaults: the vision
                                # config's max_dynamic_patch / min_dynamic_patch / use_thumbnail, else these)
    base_dir: null              # relative paths resolve against this folder (default: the current one)

Conversation rows (LLaVA / InternVL shape; "messages" with "role"/"content" is accepted too)::

    {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}]}

"image" may be a list (one ``<image>`` placeholder per image) or absent (text-only row). Roles: human/user,
gpt/assistant, system. Without a placeholder, ``"<image>\\n"`` is prepended to the first user turn. Each image
becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tokens_per_tile x n_tiles) + ``</img>``.

Bad rows (malformed JSON, missing fields, unknown roles, missing or unreadable images, placeholder / image count
mismatches, images without a vision front, too long, undecodable text lines) are found while the data set is
built, logged as ``path:line: reason`` and skipped (``dataset.bad_rows``), or raise `DataError` with strict.
An image that becomes unreadable after the scan is dropped from its batch by the collator (or raises, strict).

Determinism and resume: the order depends only on (seed, epoch). Call ``loader.batch_sampler.set_epoch(e)``
and ``skip_first_batches(loader, k)`` (or accelerate's) to resume. The trainer does not let accelerate shard this
loader: its `DataStream` walks the batch sampler's index lists as one global sequence across epochs and gives
process r of n the batches g with g % n == r, loading them through a DataLoader over the same dataset, collator and
``num_workers`` (so the samples of each optimizer step do not depend on the process count).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.corpora import heldout_keys, pydoc_documents
from ..models.chat_prompt import INTERNLM2_CHAT_SYSTEM

log = logging.getLogger("mmmamba.data")

IGNORE_INDEX = -100
INTERNLM2_SYSTEM = INTERNLM2_CHAT_SYSTEM  # InternVL's system prompt for internlm2-chat (METHOD.md 1.5)
ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system",
}
TOP_KEYS = {
    "sources", "heldout_sources", "max_length", "min_length", "text_mode", "add_bos", "template", "system",
    "heldout_fraction", "shuffle", "bucket", "mega_batch", "drop_last", "pad_to_multiple_of", "num_workers",
    "strict", "check_images", "image_root", "image", "base_dir",
}
SOURCE_KEYS = {"type", "path", "image_root", "heldout_fraction", "max_samples", "split", "name"}
MAX_LOGGED = 20


class DataError(ValueError):
    """A bad data row under strict mode, or a data configuration that cannot work."""


@dataclass(frozen=True)
class BadRow:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class _RowError(Exception):
    pass


@dataclass
class Sample:
    input_ids: np.ndarray  # (l,) int64
    labels: np.ndarray | None  # (l,) int64 with -100 outside targets; None: every token is a target
    origin: str  # "path:line" or "path#tokens a-b"
    images: tuple[str, ...] = ()
    n_tiles: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class DataSettings:
    max_length: int = 2048
    min_length: int = 2
    text_mode: str = "chunk"
    add_bos: bool | None = None
    template: str = "auto"
    system: str | None = None
    heldout_fraction: float | None = None  # None: 0.1 for pydoc, 0.05 for other sources
    shuffle: bool | None = None  # None: True
    bucket: bool = True
    mega_batch: int = 64
    drop_last: bool = False
    pad_to_multiple_of: int | None = None
    num_workers: int = 0
    strict: bool = False
    check_images: str = "full"
    image_root: str | None = None
    image: dict = field(default_factory=dict)
    base_dir: str | None = None

    @classmethod
    def from_cfg(cls, cfg: dict) -> DataSettings:
        unknown = set(cfg) - TOP_KEYS
        if unknown:
            raise DataError(f"data config: unknown key(s) {sorted(unknown)}; known keys: {sorted(TOP_KEYS)}")
        s = cls(**{k: v for k, v in cfg.items() if k not in ("sources", "heldout_sources")})
        _check_types("data config", cfg, SETTING_TYPES)
        if not isinstance(s.image, dict):
            raise DataError(f"data config: image must be a mapping like {{max_tiles: 12}}, got {s.image!r}")
        _check_types("data config: image", s.image, IMAGE_TYPES)
        if s.text_mode not in ("chunk", "pack"):
            raise DataError(f"data config: text_mode {s.text_mode!r} unknown; use 'chunk' or 'pack'")
        if s.template not in ("auto", "tokenizer", "internlm2-chat"):
            raise DataError(f"data config: template {s.template!r} unknown; use auto, tokenizer or internlm2-chat")
        if s.check_images not in ("full", "header"):
            raise DataError(f"data config: check_images {s.check_images!r} unknown; use 'full' or 'header'")
        if s.max_length < 2 or s.min_length < 1:
            raise DataError("data config: max_length must be >= 2 and min_length >= 1")
        bad_img = set(s.image) - {"max_tiles", "min_tiles", "use_thumbnail"}
        if bad_img:
            raise DataError(f"data config: unknown image key(s) {sorted(bad_img)}; use max_tiles, min_tiles, "
                            "use_thumbnail")
        return s


# allowed types per setting (None allowed where listed); checked before the values are used
_INT, _NUM, _BOOL, _STR, _NONE = (int,), (int, float), (bool,), (str,), (type(None),)
SETTING_TYPES = {
    "max_length": _INT, "min_length": _INT, "text_mode": _STR, "add_bos": _BOOL + _NONE, "template": _STR,
    "system": _STR + _NONE, "heldout_fraction": _NUM + _NONE, "shuffle": _BOOL + _NONE, "bucket": _BOOL,
    "mega_batch": _INT, "drop_last": _BOOL, "pad_to_multiple_of": _INT + _NONE, "num_workers": _INT,
    "strict": _BOOL, "check_images": _STR, "image_root": _STR + _NONE, "base_dir": _STR + _NONE,
    "sources": (list, str), "heldout_sources": (list, str) + _NONE,
}
IMAGE_TYPES = {"max_tiles": _INT, "min_tiles": _INT, "use_thumbnail": _BOOL}
SOURCE_TYPES = {"type": _STR, "path": (str, list), "image_root": _STR + _NONE, "heldout_fraction": _NUM + _NONE,
                "max_samples": _INT + _NONE, "split": _STR, "name": _STR + _NONE}
_POSITIVE = {"max_length", "min_length", "mega_batch", "pad_to_multiple_of", "max_tiles", "min_tiles",
             "max_samples"}


def _check_types(where: str, cfg: dict, types: dict) -> None:
    """DataError naming the key for a value of the wrong type or out of range (bool is not an int here)."""
    for k, v in cfg.items():
        want = types.get(k)
        if want is None:
            continue
        ok = isinstance(v, want) and not (isinstance(v, bool) and bool not in want)
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in want)
            raise DataError(f"{where}: {k} must be {names}, got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if v != v or (k in _POSITIVE and v < 1) or v < 0 or (k == "heldout_fraction" and v > 1):
                raise DataError(f"{where}: {k} = {v!r} is out of range")
        if k == "path" and isinstance(v, list) and not all(isinstance(p, str) and p for p in v):
            raise DataError(f"{where}: path must be a path or a list of paths, got {v!r}")


def _norm_split(split: str) -> str:
    s = {"eval": "heldout", "validation": "heldout", "val": "heldout", "test": "heldout"}.get(split, split)
    if s not in ("train", "heldout"):
        raise DataError(f"split {split!r} unknown; use 'train' or 'heldout'")
    return s


def _norm_source(src, i: int) -> dict:
    if isinstance(src, str):
        src = {"type": "pydoc"} if src.strip().lower() == "pydoc" else {"path": src}
    if not isinstance(src, dict):
        raise DataError(f"data config: sources[{i}] must be a dict or a string, got {type(src).__name__}")
    src = dict(src)
    _check_types(f"data config: sources[{i}]", src, SOURCE_TYPES)
    unknown = set(src) - SOURCE_KEYS
    if unknown:
        raise DataError(f"data config: sources[{i}] has unknown key(s) {sorted(unknown)}; known: {sorted(SOURCE_KEYS)}")
    kind = src.get("type")
    if kind is None:
        if "path" not in src:
            raise DataError(f"data config: sources[{i}] needs a 'type' (pydoc, text, jsonl) or a 'path'")
        paths = src["path"] if isinstance(src["path"], list) else [src["path"]]
        kind = "jsonl" if all(str(p).endswith(".jsonl") for p in paths) else "text"
    kind = str(kind).lower()
    if kind not in ("pydoc", "text", "jsonl"):
        raise DataError(f"data config: sources[{i}] type {kind!r} unknown; use pydoc, text or jsonl")
    if kind != "pydoc" and not src.get("path"):
        raise DataError(f"data config: sources[{i}] ({kind}) needs a 'path'")
    split = str(src.get("split", "auto")).lower()
    if split not in ("auto", "train", "heldout", "all"):
        raise DataError(f"data config: sources[{i}] split {split!r} unknown; use auto, train, heldout or all")
    src["type"], src["split"] = kind, split
    return src


# ------------------------------------------------------------------------------------------------ the builder
class _Builder:
    """Turns sources into Samples; collects bad rows."""

    def __init__(self, settings: DataSettings, tokenizer, model_config, strict: bool):
        self.s, self.tok, self.cfg, self.strict = settings, tokenizer, model_config, strict
        self.bad_rows: list[BadRow] = []
        self.base = Path(settings.base_dir) if settings.base_dir else Path.cwd()
        template = settings.template
        if template == "auto":
            if getattr(model_config, "template", None) == "internlm2-chat":  # HoVLE configs name their template
                template = "internlm2-chat"
            else:
                template = "tokenizer" if getattr(tokenizer, "chat_template", None) else "internlm2-chat"
        if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise DataError("data config: template 'tokenizer' but the tokenizer has no chat template")
        self.template = template
        self._image_ids: tuple[int, int, int] | None = None
        self._vision: dict | None = None

    # -- reporting
    def bad(self, path, line: int, reason: str) -> None:
        row = BadRow(str(path), int(line), reason)
        if self.strict:
            raise DataError(f"bad data row {row} (strict mode; without strict it would be skipped)")
        self.bad_rows.append(row)
        if len(self.bad_rows) <= MAX_LOGGED:
            log.warning("skipped bad data row %s", row)
        elif len(self.bad_rows) == MAX_LOGGED + 1:
            log.warning("more bad data rows; see dataset.bad_rows for all of them")

    # -- tokenization helpers
    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def encode_long(self, text: str, block: int = 1 << 16) -> np.ndarray:
        """Tokenize a long text in blocks cut after a newline (no length warnings, bounded memory)."""
        out, start = [], 0
        while start < len(text):
            end = min(len(text), start + block)
            if end < len(text):
                nl = text.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            out.extend(self.encode(text[start:end]))
            start = end
        return np.asarray(out, dtype=np.int64)

    def resolve(self, p) -> Path:
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else self.base / p

    def expand_paths(self, spec) -> list[Path]:
        specs = spec if isinstance(spec, (list, tuple)) else [spec]
        out = []
        for s in specs:
            p = self.resolve(s)
            if any(c in str(s) for c in "*?["):
                hits = sorted(Path(h) for h in glob.glob(str(p), recursive=True))
                if not hits:
                    raise DataError(f"data config: no file matches {p}")
                out.extend(h for h in hits if h.is_file())
            elif not p.is_file():
                raise DataError(f"data config: file {p} does not exist")
            else:
                out.append(p)
        return out

    def fraction(self, src: dict) -> float:
        f = src.get("heldout_fraction", self.s.heldout_fraction)
        if f is None:
            f = 0.1 if src["type"] == "pydoc" else 0.05
        if not 0.0 <= float(f) < 1.0:
            raise DataError(f"data config: heldout_fraction must be in [0, 1), got {f}")
        return float(f)

    # -- text
    def windows(self, ids: np.ndarray, origin: str) -> list[Sample]:
        L, out = self.s.max_length, []
        if self.add_bos_text:
            bos = self.tok.bos_token_id
            L -= 1
        for a in range(0, len(ids), L):
            w = ids[a:a + L]
            if self.add_bos_text:
                w = np.concatenate([np.asarray([bos], dtype=np.int64), w])
            if len(w) >= self.s.min_length:
                out.append(Sample(w, None, f"{origin}#tokens{a}-{a + len(w)}"))
        return out

    @property
    def add_bos_text(self) -> bool:
        return bool(self.s.add_bos) and self.tok.bos_token_id is not None

    def text_documents(self, src: dict, split: str) -> list[tuple[str, np.ndarray]]:
        """[(origin, token ids)] of the source's documents in this split."""
        frac = self.fraction(src)
        mode = src["split"]
        docs = []
        if src["type"] == "pydoc":
            if mode == "auto":
                chosen = pydoc_documents(split, frac)
            else:
                chosen = pydoc_documents("train", 0.0)
            docs = [(f"pydoc:{name}", self.encode_long(text)) for name, text in chosen]
            return docs
        for path in self.expand_paths(src["path"]):
            text = self.read_text(path)
            if text is None:
                continue
            ids = self.encode_long(text)
            if mode == "auto" and frac > 0:
                n_held = min(len(ids), max(self.s.min_length, round(frac * len(ids)))) if len(ids) > 1 else 0
                ids = ids[len(ids) - n_held:] if split == "heldout" else ids[:len(ids) - n_held]
            docs.append((str(path), ids))
        return docs

    def read_text(self, path: Path) -> str | None:
        try:
            data = path.read_bytes()
        except OSError as e:
            self.bad(path, 0, f"cannot read the file ({e})")
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        lines = []
        for n, raw in enumerate(data.split(b"\n"), 1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                self.bad(path, n, f"not UTF-8 text (byte {e.start} of the line); line skipped")
        return "\n".join(lines)

    def text_samples(self, src: dict, split: str) -> list[Sample]:
        docs = self.text_documents(src, split)
        if self.s.text_mode == "chunk":
            return [w for origin, ids in docs for w in self.windows(ids, origin)]
        eos = self.tok.eos_token_id
        parts = []
        for _, ids in docs:
            parts.append(ids)
            if eos is not None:
                parts.append(np.asarray([eos], dtype=np.int64))
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        name = "pydoc" if src["type"] == "pydoc" else str(src.get("name") or src["path"])
        return self.windows(stream, f"{name}(packed)")

    # -- conversations
    def image_ids(self) -> tuple[int, int, int]:
        if self._image_ids is None:
            from ..models.image_processing import IMG_END_TOKEN, IMG_START_TOKEN, check_image_tokenizer

            try:
                ctx = check_image_tokenizer(self.cfg, self.tok)
            except ValueError as e:
                raise DataError(f"image rows need image tokens: {e}") from e
            ids = []
            for t in (IMG_START_TOKEN, IMG_END_TOKEN):
                enc = self.encode(t)
                if len(enc) != 1:
                    raise DataError(f"the tokenizer has no single {t} token (it encodes to {enc}); add it with "
                                    "tokenizer.add_special_tokens and resize the model's embeddings")
                ids.append(enc[0])
            self._image_ids = (ids[0], ctx, ids[1])
        return self._image_ids

    def vision(self) -> dict:
        if self._vision is None:
            from ..models.image_processing import tokens_per_tile
            from ..models.vision import vision_settings

            v = vision_settings(self.cfg.vision_config)
            img = self.s.image
            max_tiles = int(img.get("max_tiles", v.get("max_dynamic_patch", 12)))
            if not v.get("dynamic_image_size", True):
                max_tiles = 1
            min_tiles = min(int(img.get("min_tiles", v.get("min_dynamic_patch", 1))), max_tiles)
            self._vision = dict(
                image_size=int(v["image_size"]), max_num=max_tiles, min_num=min_tiles,
                use_thumbnail=bool(img.get("use_thumbnail", v.get("use_thumbnail", True))),
                tokens_per_tile=tokens_per_tile(self.cfg),
            )
        return self._vision

    def count_tiles(self, path: Path) -> int:
        from PIL import Image

        from ..models.image_processing import candidate_grids, closest_grid, open_image

        v = self.vision()
        if self.s.check_images == "full":
            size = open_image(path).size
        else:
            if not path.is_file():
                raise FileNotFoundError(f"image file {path} does not exist")
            with Image.open(path) as im:
                size = im.size
        cols, rows = closest_grid(*size, candidate_grids(v["min_num"], v["max_num"]), v["image_size"])
        return cols * rows + (1 if v["use_thumbnail"] and cols * rows != 1 else 0)

    def parse_row(self, row) -> tuple[list[dict], list[str]]:
        if not isinstance(row, dict):
            raise _RowError(f"a row must be a JSON object, got {type(row).__name__}")
        turns = row.get("conversations", row.get("messages"))
        if turns is None:
            raise _RowError("missing field 'conversations'")
        if not isinstance(turns, list) or not turns:
            raise _RowError("'conversations' must be a non-empty list")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise _RowError(f"conversations[{i}] is not an object")
            role, value = t.get("from", t.get("role")), t.get("value", t.get("content"))
            if role is None:
                raise _RowError(f"conversations[{i}] has no 'from'")
            if value is None:
                raise _RowError(f"conversations[{i}] has no 'value'")
            if not isinstance(value, str):
                raise _RowError(f"conversations[{i}].value must be a string")
            r = ROLES.get(str(role).lower())
            if r is None:
                raise _RowError(f"conversations[{i}] has unknown role {role!r} (use human/user, gpt/assistant, "
                                "system)")
            messages.append({"role": r, "content": value})
        if not any(m["role"] == "assistant" for m in messages):
            raise _RowError("no assistant ('gpt') turn to learn from")
        if not any(m["role"] == "user" for m in messages):
            raise _RowError("no user ('human') turn")
        image = row.get("image", row.get("images"))
        if image is None or image == []:
            images = []
        elif isinstance(image, str):
            images = [image]
        elif isinstance(image, list) and all(isinstance(x, str) for x in image):
            images = list(image)
        else:
            raise _RowError("'image' must be a path or a list of paths")
        return messages, images

    def render(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """[(text, is_target)] segments of the templated conversation."""
        if not any(m["role"] == "system" for m in messages):
            if self.s.system is not None:
                messages = [{"role": "system", "content": self.s.system}] + messages
            elif self.template == "internlm2-chat":
                messages = [{"role": "system", "content": INTERNLM2_SYSTEM}] + messages
        if self.template == "internlm2-chat":
            segs = []
            for m in messages:
                if m["role"] == "assistant":
                    segs += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True)]
                else:
                    segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>", False))
            return segs
        return self.render_tokenizer(messages)

    def render_tokenizer(self, messages: list[dict]) -> list[tuple[str, bool]]:
        def render(msgs, gen):
            try:
                return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            except Exception as e:  # jinja raises its own errors (e.g. roles must alternate)
                raise _RowError(f"the chat template rejects this conversation ({e})") from e

        segs, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise _RowError("the conversation starts with an assistant turn")
            prompt, full = render(messages[:i], True), render(messages[:i + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise _RowError("the chat template does not render turns as prefixes of each other; cannot mask")
            segs.append((prompt[len(done):], False))
            tail, content = full[len(prompt):], m["content"]
            at = tail.find(content)
            if at < 0 and content.strip():
                content = content.strip()
                at = tail.find(content)
            if at < 0:
                raise _RowError("the chat template changes the assistant text; cannot locate it for masking")
            end = at + len(content)
            end += len(tail[end:].rstrip())  # the turn's closing token(s), e.g. <|im_end|>, not the newline
            segs += [(tail[:at], False), (tail[at:end], True), (tail[end:], False)]
            done = full
        full = render(messages, False)
        if not full.startswith(done):
            raise _RowError("the chat template does not render turns as prefixes of each other; cannot mask")
        segs.append((full[len(done):], False))
        return [(t, y) for t, y in segs if t]

    def conversation(self, row, path: Path, line: int, image_root: Path) -> Sample:
        from ..models.image_processing import IMAGE_PLACEHOLDER

        messages, images = self.parse_row(row)
        n_ph = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] != "assistant")
        if any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] == "assistant"):
            raise _RowError(f"{IMAGE_PLACEHOLDER} in an assistant turn")
        tiles, resolved = [], []
        if images:
            if self.cfg is None or getattr(self.cfg, "vision_config", None) is None:
                raise _RowError("row has an image but the model has no vision front (config.vision_config is None)")
            if n_ph == 0:
                first = next(m for m in messages if m["role"] == "user")
                first["content"] = f"{IMAGE_PLACEHOLDER}\n" * len(images) + first["content"]
                n_ph = len(images)
            if n_ph != len(images):
                raise _RowError(f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)")
            for p in images:
                q = Path(os.path.expanduser(p))
                q = q if q.is_absolute() else image_root / q
                try:
                    tiles.append(self.count_tiles(q))
                except (OSError, ValueError, SyntaxError) as e:
                    raise _RowError(f"image {p}: {e}") from e
                resolved.append(str(q))
        elif n_ph:
            raise _RowError(f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but no 'image' field")
        ids, labels = [], []
        use_bos = self.s.add_bos if self.s.add_bos is not None else self.template == "internlm2-chat"
        if use_bos and self.tok.bos_token_id is not None:
            ids.append(self.tok.bos_token_id)
            labels.append(IGNORE_INDEX)
        k = 0
        for text, target in self.render(messages):
            pieces = text.split(IMAGE_PLACEHOLDER)
            for j, piece in enumerate(pieces):
                if j:
                    start, ctx, end = self.image_ids()
                    block = [start] + [ctx] * (self.vision()["tokens_per_tile"] * tiles[k]) + [end]
                    ids += block
                    labels += [IGNORE_INDEX] * len(block)
                    k += 1
                enc = self.encode(piece)
                ids += enc
                labels += enc if target else [IGNORE_INDEX] * len(enc)
        if len(ids) > self.s.max_length:
            raise _RowError(f"too long: {len(ids)} tokens > max_length {self.s.max_length}")
        return Sample(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), f"{path}:{line}",
                      tuple(resolved), tuple(tiles))

    def jsonl_samples(self, src: dict, split: str) -> list[Sample]:
        frac = self.fraction(src)
        root = src.get("image_root", self.s.image_root)
        out = []
        for path in self.expand_paths(src["path"]):
            image_root = self.resolve(root) if root else path.parent
            try:
                with open(path, "rb") as f:
                    raw = f.read().split(b"\n")
            except OSError as e:
                raise DataError(f"cannot read {path} ({e})") from e
            numbered = [(n, r) for n, r in enumerate(raw, 1) if r.strip()]
            if src["split"] == "auto":
                held = heldout_keys([n for n, _ in numbered], frac, salt=f"jsonl:{path.name}")
                numbered = [(n, r) for n, r in numbered if (n in held) == (split == "heldout")]
            for n, r in numbered:
                try:
                    row = json.loads(r.decode("utf-8"))
                except UnicodeDecodeError as e:
                    self.bad(path, n, f"not UTF-8 ({e.reason})")
                    continue
                except json.JSONDecodeError as e:
                    self.bad(path, n, f"malformed JSON ({e.msg} at column {e.colno})")
                    continue
                try:
                    out.append(self.conversation(row, path, n, image_root))
                except _RowError as e:
                    self.bad(path, n, str(e))
        return out

    def source_samples(self, src: dict, split: str) -> list[Sample]:
        samples = self.jsonl_samples(src, split) if src["type"] == "jsonl" else self.text_samples(src, split)
        if src.get("max_samples") is not None:
            samples = samples[: int(src["max_samples"])]
        return samples


# ------------------------------------------------------------------------------------------------ data set
class DistillDataset(Dataset):
    """Tokenized samples; images are loaded and tiled on access."""

    def __init__(self, samples: list[Sample], bad_rows: list[BadRow], vision: dict | None, split: str):
        self.samples, self.bad_rows, self.vision, self.split = samples, bad_rows, vision, split

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.samples]

    def stats(self) -> dict:
        tokens = sum(len(s) for s in self.samples)
        targets = sum(len(s) if s.labels is None else int((s.labels != IGNORE_INDEX).sum()) for s in self.samples)
        return dict(split=self.split, samples=len(self.samples), tokens=tokens, target_tokens=targets,
                    images=sum(len(s.images) for s in self.samples), bad_rows=len(self.bad_rows))

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        ids = torch.from_numpy(s.input_ids)
        labels = ids.clone() if s.labels is None else torch.from_numpy(s.labels)
        item = {"input_ids": ids, "labels": labels, "pixel_values": None, "origin": s.origin, "error": None}
        if s.images:
            from ..models.image_processing import load_image

            v, tiles = self.vision, []
            try:
                for path, n in zip(s.images, s.n_tiles):
                    t = load_image(path, v["image_size"], v["max_num"], v["min_num"], v["use_thumbnail"])
                    if t.shape[0] != n:
                        raise ValueError(f"image {path} now gives {t.shape[0]} tiles, {n} when scanned")
                    tiles.append(t)
            except (OSError, ValueError, SyntaxError) as e:
                item["error"] = str(e)
                return item
            item["pixel_values"] = torch.cat(tiles)
        return item


class Collator:
    """Right padding; drops (or, strict, raises on) samples whose images failed to load."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None, strict: bool = False):
        self.pad_id, self.multiple, self.strict = int(pad_id), pad_to_multiple_of, strict

    def __call__(self, items: list[dict]) -> dict:
        good = []
        for it in items:
            if it["error"] is not None:
                msg = f"{it['origin']}: {it['error']}"
                if self.strict:
                    raise DataError(f"bad data row {msg} (strict mode)")
                log.warning("dropped data row %s from its batch", msg)
                continue
            good.append(it)
        L = max((len(it["input_ids"]) for it in good), default=0)
        if self.multiple and L % self.multiple:
            L += self.multiple - L % self.multiple
        b = len(good)
        input_ids = torch.full((b, L), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, L), dtype=torch.long)
        labels = torch.full((b, L), IGNORE_INDEX, dtype=torch.long)
        for r, it in enumerate(good):
            n = len(it["input_ids"])
            input_ids[r, :n] = it["input_ids"]
            attention_mask[r, :n] = 1
            labels[r, :n] = it["labels"]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pix = [it["pixel_values"] for it in good if it["pixel_values"] is not None]
        if pix:
            batch["pixel_values"] = torch.cat(pix)
        return batch


# ------------------------------------------------------------------------------------------------ sampling
class EpochCounter(Sampler):
    """Holds the epoch; exposed as `batch_sampler.sampler` so every accelerate wrapper finds `set_epoch`."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(range(self.n))


class BucketBatchSampler(Sampler):
    """Batches of indices, a pure function of (seed, epoch): shuffle, cut into mega-batches of
    `mega_batch * batch_size`, sort each by length (longest first), cut into batches, shuffle the batches."""

    def __init__(self, lengths, batch_size: int, seed: int, shuffle: bool = True, bucket: bool = True,
                 mega_batch: int = 64, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.shuffle, self.bucket = int(batch_size), int(seed), shuffle, bucket
        self.mega_batch, self.drop_last = max(1, int(mega_batch)), drop_last
        self.sampler = EpochCounter(len(self.lengths))
        self._cache: tuple[int, list[list[int]]] | None = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.bucket:
            mega = self.mega_batch * self.batch_size
            parts = [order[a:a + mega] for a in range(0, n, mega)]
            order = np.concatenate([p[np.argsort(-self.lengths[p], kind="stable")] for p in parts]) if parts else order
        batches = [order[a:a + self.batch_size].tolist() for a in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and self.bucket and batches:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def __iter__(self):
        yield from self.batches()

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class SkipBatchSampler(Sampler):
    """`batch_sampler` without its first `skip` batches (keeps set_epoch / sampler / batch_size visible)."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, int(skip)
        self.sampler = getattr(batch_sampler, "sampler", None)
        self.batch_size = getattr(batch_sampler, "batch_size", None)
        self.drop_last = getattr(batch_sampler, "drop_last", False)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self):
        for i, b in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield b

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


def skip_first_batches(loader: DataLoader, num_batches: int, epoch: int | None = None) -> DataLoader:
    """A DataLoader over the same data and collation that starts after `num_batches` batches of `epoch`
    (default: the loader's current epoch); for exact resume."""
    bs = loader.batch_sampler
    if epoch is not None and hasattr(bs, "set_epoch"):
        bs.set_epoch(epoch)
    return DataLoader(
        loader.dataset, batch_sampler=SkipBatchSampler(bs, num_batches), collate_fn=loader.collate_fn,
        num_workers=loader.num_workers, pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers if loader.num_workers else False,
    )


# ------------------------------------------------------------------------------------------------ entry points
def pad_token_id(tokenizer) -> int:
    for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if t is not None:
            return int(t)
    return 0


def build_dataset(data_cfg: dict, tokenizer, model_config=None, split: str = "train",
                  strict: bool | None = None) -> DistillDataset:
    """Scan and tokenize the sources of `data_cfg` for one split (see the module docstring)."""
    if not isinstance(data_cfg, dict):
        raise DataError(f"data config must be a dict, got {type(data_cfg).__name__}")
    split = _norm_split(split)
    settings = DataSettings.from_cfg(data_cfg)
    strict = settings.strict if strict is None else strict
    raw = data_cfg.get("sources")
    if not raw:
        raise DataError("data config: 'sources' is missing or empty (e.g. sources: [{type: pydoc}])")
    sources = [_norm_source(s, i) for i, s in enumerate(raw)]
    if data_cfg.get("heldout_sources"):
        held = [_norm_source(s, i) for i, s in enumerate(data_cfg["heldout_sources"])]
        if split == "heldout":
            sources = [dict(s, split="all") for s in held]
        else:
            sources = [dict(s, split="all") if s["split"] == "auto" else s for s in sources]
    sources = [s for s in sources if s["split"] in ("auto", "all", split)]
    b = _Builder(settings, tokenizer, model_config, strict)
    samples = []
    for src in sources:
        samples += b.source_samples(src, split)
    if b.bad_rows:
        log.warning("%d bad data row(s) skipped in split %r", len(b.bad_rows), split)
    if not samples:
        raise DataError(f"no usable samples for split {split!r} ({len(b.bad_rows)} bad rows skipped); "
                        "check the data config's sources and heldout_fraction")
    vision = b.vision() if any(s.images for s in samples) else None
    ds = DistillDataset(samples, b.bad_rows, vision, split)
    log.info("data (%s): %s", split, ds.stats())
    return ds


def build_dataloader(
    data_cfg: dict,
    tokenizer,
    model_config,
    batch_size: int,
    seed: int,
    split: str = "train",
    *,
    strict: bool | None = None,
    num_workers: int | None = None,
    shuffle: bool | None = None,
) -> DataLoader:
    """A deterministic DataLoader of padded batches (see the module docstring for the batch keys and the
    `data_cfg` schema). `strict`, `num_workers`, `shuffle` override the config's values."""
    settings = DataSettings.from_cfg(data_cfg)
    dataset = build_dataset(data_cfg, tokenizer, model_config, split, strict)
    if shuffle is None:
        shuffle = True if settings.shuffle is None else bool(settings.shuffle)
    sampler = BucketBatchSampler(dataset.lengths, batch_size, seed, shuffle=shuffle, bucket=settings.bucket,
                                 mega_batch=settings.mega_batch, drop_last=settings.drop_last)
    collate = Collator(pad_token_id(tokenizer), settings.pad_to_multiple_of,
                       settings.strict if strict is None else strict)
    workers = settings.num_workers if num_workers is None else num_workers
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      persistent_workers=False)
