"""Offline corpora: text that ships with Python or Debian, and small image + text sets (docs/ASSETS.md)."""

from .corpora import (
    easy_vqa_jsonl,
    fashion_mnist_jsonl,
    heldout_keys,
    pydoc_documents,
    pydoc_topics,
    python_docs_files,
    stable_hash,
    write_pydoc_corpus,
)

__all__ = [
    "easy_vqa_jsonl",
    "fashion_mnist_jsonl",
    "heldout_keys",
    "pydoc_documents",
    "pydoc_topics",
    "python_docs_files",
    "stable_hash",
    "write_pydoc_corpus",
]
