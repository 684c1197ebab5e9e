"""Prepare the quality study's offline data on the CPU machine (docs/results/quality/README.md says why and how).

Text: the training corpora (Python 3.11 docs, WordNet 3.0 glosses, pydoc topics) and the held-out-only corpora
(KJV Bible, GCIDE dictionary), tokenized with the teacher's tokenizer into uint16 arrays, documents joined by the
tokenizer's eos (the trainer's `text_mode: pack` convention). Each training source is split by a stable hash of its
document names (`mmmamba.data.heldout_keys`), so the held-out split never depends on a seed.

Images: easy-VQA (the pip wheel is carried as it is), Fashion-MNIST (Debian `dataset-fashion-mnist`) train / test
subsets as 28x28 uint8 arrays, and the Noto colour emoji (Debian `fonts-noto-color-emoji`) rendered to 64x64 RGB with
their Unicode names, split 80 / 20 by name hash.

    python examples/quality/prepare.py --out .carry/study [--tokenizer DIR] [--fmnist-train 30000]

Writes OUT/text/{source}.{train,heldout}.npy, OUT/vlm/{fmnist,emoji}.npz and OUT/manifest.json (token counts).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import unicodedata
from pathlib import Path

import numpy as np

from mmmamba.data.corpora import heldout_keys, pydoc_documents, python_docs_files

HELDOUT_FRACTION = 0.05
# held-out-only corpora: the first N tokens of a fixed, seed-free selection
HELDOUT_ONLY_TOKENS = 65536


def wordnet_documents() -> list[tuple[str, str]]:
    """[(lemma key, "lemma (pos): gloss")] from WordNet 3.0's data files (text after '| ')."""
    docs = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in Path(f"/usr/share/wordnet/data.{pos}").read_text(errors="replace").splitlines():
            if line.startswith("  ") or "| " not in line:
                continue  # licence header
            fields, gloss = line.split("| ", 1)
            parts = fields.split()
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(int(parts[3], 16))]
            docs.append((f"{pos}:{parts[0]}", f"{', '.join(words)} ({pos}): {gloss.strip()}"))
    return docs


def python_docs_documents() -> list[tuple[str, str]]:
    root = Path(sorted(Path("/usr/share/doc").glob("python3*/html/_sources"))[-1])
    return [(str(p.relative_to(root)), p.read_text(errors="replace")) for p in python_docs_files(root)]


def kjv_text() -> str:
    out = subprocess.run(["bible", "-p", "/usr/lib", "gen1:1-rev22:21"], capture_output=True, text=True, check=True)
    return out.stdout


def gcide_text() -> str:
    """GCIDE entries with the dictd header and markup brackets dropped; from the letter M on (a fixed slice)."""
    raw = gzip.open("/usr/share/dictd/gcide.dict.dz", "rt", errors="replace").read()
    start = raw.find("\nM \\M\\")
    return re.sub(r"\[1913 Webster\]|\[PJC\]|\[Webster 1913 Suppl\.\]", "", raw[max(start, 0):])


def split_documents(name: str, docs: list[tuple[str, str]]) -> dict[str, list[str]]:
    held = heldout_keys([k for k, _ in docs], HELDOUT_FRACTION, salt=f"quality:{name}")
    return {"train": [t for k, t in docs if k not in held], "heldout": [t for k, t in docs if k in held]}


def encode(tok, texts: list[str], limit: int | None = None) -> np.ndarray:
    """Documents -> one uint16 array, each document followed by the tokenizer's eos (limit: first N tokens)."""
    eos, out, n = tok.eos_token_id, [], 0
    for i in range(0, len(texts), 256):
        for ids in tok(texts[i:i + 256], add_special_tokens=False)["input_ids"]:
            out.append(np.asarray(ids + [eos], dtype=np.uint16))
            n += len(ids) + 1
        if limit is not None and n >= limit:
            break
    arr = np.concatenate(out) if out else np.zeros(0, np.uint16)
    return arr[:limit] if limit is not None else arr


def prepare_text(tok, out: Path) -> dict:
    assert tok.vocab_size < 65536, "uint16 token arrays need a vocabulary below 65,536"
    (out / "text").mkdir(parents=True, exist_ok=True)
    counts = {}
    train_sources = {"pydocs": python_docs_documents(), "wordnet": wordnet_documents(),
                     "pydoc_topics": pydoc_documents("train", 0.0)}
    for name, docs in train_sources.items():
        for split, texts in split_documents(name, docs).items():
            arr = encode(tok, texts)
            np.save(out / "text" / f"{name}.{split}.npy", arr)
            counts[f"{name}.{split}"] = int(arr.size)
            print(f"{name}.{split}: {len(texts)} documents, {arr.size:,} tokens")
    for name, text in {"kjv": kjv_text(), "gcide": gcide_text()}.items():
        paras = [p for p in text.split("\n\n") if p.strip()]
        arr = encode(tok, paras, HELDOUT_ONLY_TOKENS)
        np.save(out / "text" / f"{name}.heldout.npy", arr)
        counts[f"{name}.heldout"] = int(arr.size)
        print(f"{name}.heldout: {arr.size:,} tokens")
    return counts


def fashion_mnist(out: Path, n_train: int, n_test: int) -> dict:
    root = Path("/usr/share/datasets/fashion-mnist")

    def read(stem, kind, offset):
        return np.frombuffer(gzip.open(root / f"{stem}-{kind}-ubyte.gz").read(), np.uint8, offset=offset)

    arrays = {}
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        arrays[f"{split}_images"] = read(stem, "images-idx3", 16).reshape(-1, 28, 28)[:n]
        arrays[f"{split}_labels"] = read(stem, "labels-idx1", 8)[:n]
    np.savez_compressed(out / "vlm" / "fmnist.npz", **arrays)
    return {k: int(v.shape[0]) for k, v in arrays.items() if k.endswith("labels")}


def emoji(out: Path, size: int = 64) -> dict:
    """Single-code-point Noto colour emoji rendered at 109 px on white, resized to size x size, with their names."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", 109)
    images, names = [], []
    for cp in range(0x1F300, 0x1FAFF):
        ch = chr(cp)
        name = unicodedata.name(ch, "")
        if not name or unicodedata.category(ch) != "So":
            continue
        canvas = Image.new("RGBA", (136, 128), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), ch, font=font, embedded_color=True)
        if canvas.getbbox() is None:
            continue  # not in the font
        rgb = Image.new("RGB", canvas.size, (255, 255, 255))
        rgb.paste(canvas, mask=canvas.split()[3])
        images.append(np.asarray(rgb.crop(canvas.getbbox()).resize((size, size), Image.Resampling.BICUBIC)))
        names.append(name.lower())
    held = heldout_keys(names, 0.2, salt="quality:emoji")
    split = np.array(["heldout" if n in held else "train" for n in names])
    np.savez_compressed(out / "vlm" / "emoji.npz", images=np.stack(images), names=np.array(names), split=split)
    return {"emoji": len(names), "emoji_heldout": int((split == "heldout").sum())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".carry/study")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the converted SmolLM2 teacher)")
    p.add_argument("--fmnist-train", type=int, default=30000)
    p.add_argument("--fmnist-test", type=int, default=10000)
    p.add_argument("--skip-text", action="store_true")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from mmmamba.teachers.hf import smollm2_path

    out = Path(args.out)
    (out / "vlm").mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or smollm2_path())
    manifest = {"tokenizer": str(args.tokenizer or "smollm2"), "heldout_fraction": HELDOUT_FRACTION}
    if not args.skip_text:
        manifest["text_tokens"] = prepare_text(tok, out)
    manifest["fmnist"] = fashion_mnist(out, args.fmnist_train, args.fmnist_test)
    manifest["emoji"] = emoji(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
