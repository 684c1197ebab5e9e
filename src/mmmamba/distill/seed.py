"""Seeding (METHOD.md §2.2): a student with the teacher's weights, Mamba-2 mixers carved from attention."""

from __future__ import annotations

import copy

import torch

from ..io import save_model
from ..layers.mamba2 import Mamba2Mixer
from ..models import ATTENTION, MAMBA2, MMMambaConfig, MMMambaForCausalLM
from ..models.placement import layer_types_for, parse_placement
from .manifest import make_manifest, manifest_files


def seed_student(
    teacher: MMMambaForCausalLM,
    attention_layers: list[int] | str | None = None,
    mode: str = "mimic",
    seed: int = 0,
) -> MMMambaForCausalLM:
    """Copy `teacher`, turn every layer not in `attention_layers` into a Mamba-2 mixer seeded from that
    layer's attention (q->C, k->B, v->x, o->out). `attention_layers`: indices or a placement spec
    ("every:4", ...); None = all Mamba-2 (mmMamba-linear). Teacher layers that are already Mamba-2 stay."""
    n = teacher.config.num_hidden_layers
    keep = parse_placement(attention_layers, n)
    types = layer_types_for(keep, n)
    for i, t in enumerate(teacher.config.layer_types):
        if t == MAMBA2 and i in keep:
            raise ValueError(f"layer {i} of the teacher is already Mamba-2; it cannot be kept as attention")
        if t == MAMBA2:
            types[i] = "mamba2"
    config: MMMambaConfig = copy.deepcopy(teacher.config)
    config.layer_types = [ATTENTION if t == "attention" else MAMBA2 for t in types]
    student = MMMambaForCausalLM(config).to(teacher.dtype)
    sd = {k: v for k, v in teacher.state_dict().items()}
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"seeding: unexpected teacher keys {unexpected[:8]}")
    gen = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(student.model.layers):
        if config.layer_types[i] == MAMBA2 and teacher.config.layer_types[i] == ATTENTION:
            mixer: Mamba2Mixer = layer.mixer
            mixer.init_from_attention(teacher.model.layers[i].mixer, mode=mode, generator=gen)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def save_seed(student: MMMambaForCausalLM, folder, tid: dict, tokenizer, *, overwrite: bool = False,
              **manifest) -> None:
    """Save a seeded student with its "seed" manifest and model card, as stage 1 and `mmmamba seed` write it
    (`manifest`: init, seed, recipe, ... as `make_manifest` takes them)."""
    man = make_manifest("seed", tid, student.config.layer_types, **manifest)
    save_model(student, folder, tokenizer, manifest_files(man, folder), overwrite=overwrite)
