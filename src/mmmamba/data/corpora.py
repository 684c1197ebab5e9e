"""Offline corpora for distillation and held-out evaluation (docs/ASSETS.md).

Text
* `pydoc_topics()` / `pydoc_documents(split)`: the 79 topics of `pydoc_data.topics` (about 465 k characters of
  Python reference documentation), which ships with every CPython. The held-out split is a fixed set of topics
  chosen by a hash of their names, so it never depends on a training seed.
* `python_docs_files()`: the reST sources of the Python documentation from Debian's `python3.X-doc`, if installed.

Image + text (LLaVA / InternVL conversation JSONL, readable by `mmmamba.distill.data`)
* `fashion_mnist_jsonl()`: Fashion-MNIST (Debian `dataset-fashion-mnist`) as PNGs with "what is this?" turns.
* `easy_vqa_jsonl()`: easy-VQA (`pip install easy-vqa`) questions and answers over its 64x64 PNGs.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from pathlib import Path

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SPLITS = ("train", "heldout")


def _check_split(split: str) -> str:
    split = {"eval": "heldout", "validation": "heldout", "val": "heldout", "test": "heldout"}.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"split {split!r} unknown; use 'train' or 'heldout'")
    return split


def stable_hash(text: str) -> int:
    """A process-independent 64-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def heldout_keys(keys, fraction: float, salt: str = "") -> set:
    """The round(fraction * n) keys (at least 1 when fraction > 0 and n >= 2) with the smallest stable hash.

    Deterministic and independent of any seed, so a held-out set stays the same across runs and stages."""
    keys = list(keys)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    n = len(keys)
    if fraction == 0.0 or n < 2:
        return set()
    k = min(n - 1, max(1, round(fraction * n)))
    ranked = sorted(keys, key=lambda key: (stable_hash(f"{salt}:{key}"), str(key)))
    return set(ranked[:k])


def pydoc_topics() -> dict[str, str]:
    """{topic name: text} from `pydoc_data.topics`, sorted by name."""
    from pydoc_data.topics import topics

    return {k: topics[k] for k in sorted(topics)}


def pydoc_documents(split: str = "train", heldout_fraction: float = 0.1) -> list[tuple[str, str]]:
    """[(topic, text)] of one split of `pydoc_data.topics`; the two splits partition the topics."""
    split = _check_split(split)
    docs = pydoc_topics()
    held = heldout_keys(docs, heldout_fraction, salt="pydoc")
    return [(k, v) for k, v in docs.items() if (k in held) == (split == "heldout")]


def write_pydoc_corpus(out_dir: str | os.PathLike, heldout_fraction: float = 0.1) -> dict[str, Path]:
    """Write train.txt and heldout.txt (topics separated by blank lines); returns {split: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        p = out / f"{split}.txt"
        p.write_text("\n\n".join(text.strip() for _, text in pydoc_documents(split, heldout_fraction)) + "\n")
        paths[split] = p
    return paths


def python_docs_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The reST sources of the Python docs (Debian `python3.X-doc`), sorted; [] when not installed."""
    if root is None:
        found = sorted(glob.glob("/usr/share/doc/python3*/html/_sources"))
        if not found:
            return []
        root = found[-1]
    return sorted(Path(root).rglob("*.txt"))


def _read_idx(path: Path, offset: int):
    import numpy as np

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def fashion_mnist_jsonl(
    out_dir: str | os.PathLike,
    split: str = "train",
    limit: int | None = 1000,
    root: str | os.PathLike = FASHION_MNIST_DIR,
    scale: int = 1,
) -> Path:
    """Fashion-MNIST as conversation JSONL: PNGs under out_dir/images and out_dir/{split}.jsonl with rows
    {"image": "images/...png", "conversations": [human "<image>\\nWhat piece of clothing is this?", gpt class]}.

    `split`: "train" (the 60k training images) or "heldout" (the 10k test images). `scale` enlarges the 28x28
    images by an integer factor (nearest)."""
    from PIL import Image

    split = _check_split(split)
    root, out = Path(root), Path(out_dir)
    stem = "train" if split == "train" else "t10k"
    img_file = next((p for p in (root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-images-idx3-ubyte")
                     if p.exists()), None)
    lab_file = next((p for p in (root / f"{stem}-labels-idx1-ubyte.gz", root / f"{stem}-labels-idx1-ubyte")
                     if p.exists()), None)
    if img_file is None or lab_file is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {stem} files not found under {root}: `apt-get install dataset-fashion-mnist`"
        )
    images = _read_idx(img_file, 16).reshape(-1, 28, 28)
    labels = _read_idx(lab_file, 8)
    n = len(labels) if limit is None else min(limit, len(labels))
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            name = f"images/{stem}-{i:05d}.png"
            im = Image.fromarray(images[i], mode="L")
            if scale > 1:
                im = im.resize((28 * scale, 28 * scale), Image.Resampling.NEAREST)
            im.save(out / name)
            row = {"id": f"fashion-mnist-{stem}-{i}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\nWhat piece of clothing is this?"},
                {"from": "gpt", "value": f"{FASHION_MNIST_CLASSES[int(labels[i])]}."},
            ]}
            f.write(json.dumps(row) + "\n")
    return path


def easy_vqa_jsonl(out_dir: str | os.PathLike, split: str = "train", limit: int | None = None) -> Path:
    """easy-VQA (`pip install easy-vqa`) as conversation JSONL out_dir/{split}.jsonl with absolute image paths;
    "train" = its training set, "heldout" = its test set."""
    split = _check_split(split)
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("easy-VQA is not installed: `pip install easy-vqa==1.0`") from None
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    n = len(questions) if limit is None else min(limit, len(questions))
    with open(path, "w") as f:
        for i in range(n):
            q = questions[i][:1].upper() + questions[i][1:]
            row = {"id": f"easy-vqa-{split}-{i}", "image": str(Path(paths[image_ids[i]]).resolve()),
                   "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                     {"from": "gpt", "value": f"{answers[i]}"}]}
            f.write(json.dumps(row) + "\n")
    return path
