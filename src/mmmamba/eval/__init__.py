"""Evaluation: benchmark runs (`evaluate`), long-text perplexity (`text_metrics`), held-out batch metrics."""

from .builtin import BUILTIN, load_bench
from .perplexity import heldout_metrics, kl_to_teacher, perplexity
from .ppl import read_text_tokens, text_metrics
from .runner import evaluate, markdown_table, write_results
from .tsv import Bench, Item, load_file

__all__ = ["BUILTIN", "Bench", "Item", "evaluate", "heldout_metrics", "kl_to_teacher", "load_bench", "load_file",
           "markdown_table", "perplexity", "read_text_tokens", "text_metrics", "write_results"]
