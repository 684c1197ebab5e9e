"""Benchmarks as lists of items: VLMEvalKit-format TSV files and JSONL files of the same columns.

TSV columns (VLMEvalKit): `index`, `question`, option columns `A`, `B`, ... (empty = no such option for the
row), `answer` (a letter, "Yes"/"No", a short answer, or a Python list literal of answers as in TextVQA), `image`
(base64; a short value naming another row's `index` reuses that row's image, as VLMEvalKit stores repeated
images), optional `hint`, `category`, `l2-category`, `image_path`. JSONL rows carry the same keys (`answer` may be
a JSON list; no `image` = a text-only item).

Task types: "mc" when option columns exist; else "yesno" when every answer is yes / no; else "short".
Metric: MME (yes/no with MME's categories or a file named *MME*), POPE (yes/no, POPE's categories or *POPE*),
plain yes/no accuracy, multiple-choice accuracy, or VQA accuracy for short answers.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .metrics import MME_COGNITION, MME_PERCEPTION, POPE_CATEGORIES
from .normalize import normalize_answer

TASKS = ("mc", "yesno", "short")
METRICS = ("mc", "yesno", "mme", "pope", "vqa", "match_any")


@dataclass
class Item:
    """One question. `answer`: the option letter (mc), "Yes"/"No" (yesno) or a list of answers (short).
    `group`: items sharing it share an image (MME acc+) or are circular copies of one question (MMBench)."""

    index: str
    question: str
    answer: str | list[str]
    options: dict[str, str] = field(default_factory=dict)
    image: Image.Image | None = None
    hint: str | None = None
    category: str | None = None
    l2_category: str | None = None
    group: str | None = None


@dataclass
class Bench:
    """A benchmark: items of one task type, the metric that scores them, and for short answers optionally the
    closed set of candidate answers (used by log-likelihood scoring)."""

    name: str
    task: str
    metric: str
    items: list[Item]
    choices: list[str] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} unknown; use one of {TASKS}")
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} unknown; use one of {METRICS}")
        if not self.items:
            raise ValueError(f"benchmark {self.name!r} has no items")

    @property
    def has_images(self) -> bool:
        return any(it.image is not None for it in self.items)


def _cell(row: dict, key: str) -> str | None:
    v = row.get(key)
    if v is None:
        return None
    v = str(v).strip() if not isinstance(v, list) else v
    return None if v in ("", "nan", "NaN", "None") else v


def decode_image(data: str, where: str) -> Image.Image:
    """A base64 string -> RGB PIL image; a clear error naming the row otherwise."""
    try:
        raw = base64.b64decode(data, validate=False)
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return im.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{where}: the image column is not a base64-encoded image ({e})") from e


def _answers(value) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    s = str(value)
    if s.startswith("[") and s.endswith("]"):
        try:
            parsed = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, list | tuple) and parsed:
            return [str(v) for v in parsed]
    return [s]


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .tsv (header line + tab-separated rows) or .jsonl file as dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON object ({e})") from e
        return rows
    if path.suffix != ".tsv":
        raise ValueError(f"benchmark file {path} must end in .tsv (VLMEvalKit format) or .jsonl")
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load_file(path: str | Path, name: str | None = None) -> Bench:
    """A VLMEvalKit-format TSV or a JSONL file of the same columns as a Bench (task type and metric detected)."""
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"benchmark file {path} has no rows")
    for key in ("question", "answer"):
        if key not in rows[0]:
            raise ValueError(f"{path}: no {key!r} column (have {sorted(rows[0])}); see VLMEvalKit's TSV format")
    letters = [c for c in string.ascii_uppercase if any(_cell(r, c) is not None for r in rows)]
    images = _image_table(rows, path)
    items = []
    for i, row in enumerate(rows):
        index = str(_cell(row, "index") or i)
        img_key = images.get(index, (None, None))
        items.append(Item(
            index=index, question=str(_cell(row, "question") or ""), answer=_answers(row["answer"]),
            options={c: str(_cell(row, c)) for c in letters if _cell(row, c) is not None},
            image=img_key[0], hint=_cell(row, "hint"), category=_cell(row, "category"),
            l2_category=_cell(row, "l2-category"), group=_cell(row, "image_path") or img_key[1],
        ))
    return _typed(name or path.stem, items)


def _image_table(rows: list[dict], path: Path) -> dict[str, tuple[Image.Image, str]]:
    """{index: (image, key of the row that holds the image data)}; short cells refer to another row's index."""
    raw = {str(_cell(r, "index") or i): _cell(r, "image") for i, r in enumerate(rows)}
    out, decoded = {}, {}
    for idx, data in raw.items():
        if data is None:
            continue
        if isinstance(data, str) and data.startswith("["):
            raise ValueError(f"{path}: row {idx} has several images; only single-image questions are supported")
        src = idx
        if len(data) <= 64:  # VLMEvalKit stores a repeated image once and names its row in the others
            if data not in raw or raw[data] is None or len(raw[data]) <= 64:
                raise ValueError(f"{path}: row {idx}'s image refers to row {data!r}, which holds no image")
            src = data
        if src not in decoded:
            decoded[src] = decode_image(raw[src], f"{path}: row {src}")
        out[idx] = (decoded[src], f"image:{src}")
    return out


def _typed(name: str, items: list[Item]) -> Bench:
    """Fix each item's answer to its task's form and choose the metric."""
    if any(it.options for it in items):
        for it in items:
            if not it.options:
                raise ValueError(f"{name}: row {it.index} has no options although others do")
            letter = str(it.answer[0]).strip().upper()
            if letter not in it.options:
                raise ValueError(f"{name}: row {it.index}'s answer {it.answer[0]!r} is not one of its options "
                                 f"{sorted(it.options)}")
            it.answer = letter
            base = int(it.index) % 1_000_000 if it.index.isdigit() else None  # circular copies: index + k * 1e6
            it.group = None if base is None else f"q{base}"
        return Bench(name, "mc", "mc", items)
    if all(len(it.answer) == 1 and normalize_answer(it.answer[0]) in ("yes", "no") for it in items):
        for it in items:
            it.answer = "Yes" if normalize_answer(it.answer[0]) == "yes" else "No"
        cats = {it.category for it in items}
        if "MME" in name.upper() or (cats <= set(MME_PERCEPTION + MME_COGNITION) and None not in cats):
            for it in items:
                it.group = it.group or f"q{it.index}"
            return Bench(name, "yesno", "mme", items)
        if "POPE" in name.upper() or (cats <= set(POPE_CATEGORIES) and None not in cats):
            return Bench(name, "yesno", "pope", items)
        return Bench(name, "yesno", "yesno", items)
    return Bench(name, "short", "vqa", items)
