"""mmmamba: turn a decoder-only Transformer (LLM or HoVLE-style VLM) into a Mamba-2 or hybrid model."""

from .models import ATTENTION, MAMBA2, HybridCache, MMMambaConfig, MMMambaForCausalLM, MMMambaModel

__version__ = "0.1.0"
__all__ = ["ATTENTION", "MAMBA2", "HybridCache", "MMMambaConfig", "MMMambaForCausalLM", "MMMambaModel"]
