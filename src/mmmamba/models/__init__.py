"""Config, decoder, cache and vision front; registers the `mmmamba` model type with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import HybridCache
from .config import ATTENTION, MAMBA2, MMMambaConfig
from .decoder import MMMambaForCausalLM, MMMambaModel

AutoConfig.register("mmmamba", MMMambaConfig, exist_ok=True)
AutoModel.register(MMMambaConfig, MMMambaModel, exist_ok=True)
AutoModelForCausalLM.register(MMMambaConfig, MMMambaForCausalLM, exist_ok=True)

__all__ = ["ATTENTION", "MAMBA2", "HybridCache", "MMMambaConfig", "MMMambaForCausalLM", "MMMambaModel"]
