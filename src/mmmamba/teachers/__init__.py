"""Teacher loaders: any source model -> MMMambaForCausalLM with every layer `full_attention`."""

from .hf import config_from_hf, convert_hf_model, load_teacher, smollm2_path

__all__ = ["config_from_hf", "convert_hf_model", "load_teacher", "smollm2_path"]
