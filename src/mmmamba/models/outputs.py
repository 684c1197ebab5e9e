"""Model outputs. Own classes, because transformers renamed `past_key_values` to `cache` within 5.x."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class DecoderOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple | None = None


@dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple | None = None
