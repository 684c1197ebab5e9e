"""Held-out metrics: perplexity and KL to the teacher."""

from .perplexity import heldout_metrics, kl_to_teacher, perplexity

__all__ = ["heldout_metrics", "kl_to_teacher", "perplexity"]
