"""What each distillation stage trains and how its loss is computed (METHOD.md §3).

Stage 1 / 2 (`LayerwiseDistill`): ONE forward pass over the decoder in which the residual stream is the
teacher's. At every Mamba-2 layer i the student mixer and the teacher attention (the frozen teacher's own layer in
its own dtype, SDPA / flash attention, never an L x L score matrix built here) read the same normed input r_i;
the loss compares their per-head outputs before W_O (or the outputs after W_O), and the TEACHER output
o_proj(y_t) is what the residual stream carries on into the MLP and the next layer. Every Mamba-2 layer thus
receives exactly the teacher's input for that layer, and all of them train in parallel.

Stage 3 (`EndToEndDistill`): placement turns some layers back into attention (with the teacher's weights);
the student runs on its own outputs and the loss is T^2 KL(teacher || student) (+ optional CE), computed in
chunks of positions from the final hidden states (`mmmamba.ops.kl`).
"""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.attention import Attention
from ..models import ATTENTION, MAMBA2, MMMambaForCausalLM
from .compile import allow_recompiles
from .losses import kl_ce_loss, kl_positions, layerwise_loss, masked_mse
from .stream import stream_layer

# Mixer sub-modules / parameters trained in each stage (names relative to `model.layers.{i}.mixer.`).
# Stage 1 (PAPER Eq. 3 + dt_bias and the gate norm, METHOD.md §3.1): the new SSM parameters.
STAGE1_TRAINABLE = ("conv1d", "dt_proj", "dt_bias", "A_log", "g_proj", "g_norm")
# Stage 2 (Eq. 4): + W_Q, W_K, W_V.
STAGE2_TRAINABLE = STAGE1_TRAINABLE + ("q_proj", "k_proj", "v_proj")
# Stage 3 (authors' code, METHOD.md §3.3): q, k, v, g_proj, dt_proj (W_gamma), conv1d, g_norm; NOT o_proj,
# dt_bias, A_log. `train_a=True` adds dt_bias and A_log (PAPER Eq. 5 lists a_i as trainable).
STAGE3_TRAINABLE = ("q_proj", "k_proj", "v_proj", "g_proj", "dt_proj", "conv1d", "g_norm")
STAGE3_A = ("dt_bias", "A_log")
MIXER_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "conv1d", "dt_proj", "dt_bias", "A_log", "g_proj", "g_norm")


def stage_parts(stage: int, train_a: bool = False, override: list[str] | tuple[str, ...] | None = None) -> tuple:
    """Names of the Mamba-2 mixer parts trained in `stage` (1, 2, 3); `override` replaces the default set."""
    if override is not None:
        bad = [p for p in override if p not in MIXER_PARTS]
        if bad:
            raise ValueError(f"trainable parts {bad} unknown; Mamba-2 mixer parts are {MIXER_PARTS}")
        return tuple(override)
    if stage == 1:
        return STAGE1_TRAINABLE
    if stage == 2:
        return STAGE2_TRAINABLE
    if stage == 3:
        return STAGE3_TRAINABLE + (STAGE3_A if train_a else ())
    raise ValueError(f"stage must be 1, 2 or 3, not {stage!r}")


def trainable_parameter_names(model: MMMambaForCausalLM, stage: int, train_a: bool = False,
                              override: list[str] | None = None) -> list[str]:
    """Exact parameter names trained in `stage`: the chosen parts of every Mamba-2 mixer; nothing else."""
    parts = set(stage_parts(stage, train_a, override))
    mamba = set(model.config.mamba_layers)
    names = []
    for name, _ in model.named_parameters():
        pieces = name.split(".")
        # model.layers.{i}.mixer.{part}[.weight|.bias]
        if len(pieces) >= 5 and pieces[:2] == ["model", "layers"] and pieces[3] == "mixer":
            if int(pieces[2]) in mamba and pieces[4] in parts:
                names.append(name)
    return names


def set_trainable(model: MMMambaForCausalLM, stage: int, train_a: bool = False,
                  override: list[str] | None = None) -> list[str]:
    """Freeze everything, then unfreeze exactly `trainable_parameter_names(...)`; returns those names."""
    names = trainable_parameter_names(model, stage, train_a, override)
    if not names:
        raise ValueError(f"stage {stage}: nothing to train (the student has no Mamba-2 layers)")
    keep = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return names


def enable_checkpointing(model: MMMambaForCausalLM) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant), across transformers versions
    (`activation_checkpointing_enable` since 5.2x, `gradient_checkpointing_enable` before)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_checkpointing(model: MMMambaForCausalLM, on: bool) -> None:
    """`enable_checkpointing(model)`, or (on=False) every decoder layer back to keeping its activations."""
    if on:
        enable_checkpointing(model)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def right_padded(attention_mask: torch.Tensor | None) -> bool:
    """True when no row has padding before a real token (then plain causal attention gives the real tokens
    exactly the masked result, and the masks can be dropped so SDPA takes its flash path)."""
    if attention_mask is None:
        return True
    m = attention_mask.to(torch.int8)
    return bool((m[:, 1:] <= m[:, :-1]).all())


def _compute_mask(attention_mask):
    return None if right_padded(attention_mask) else attention_mask


class LayerwiseDistill(nn.Module):
    """Stages 1-2. forward(input_ids, attention_mask, pixel_values) -> (loss, {"layer_mse": (n_mamba,)}).

    target: "heads" (per-head outputs before W_O, the authors' choice) or "output" (after W_O).
    factor: loss = factor x mean over Mamba-2 layers of the MSE (1000 in the paper).
    compile: torch.compile the teacher's per-layer step (`stream.stream_layer`; one graph for every layer: norms,
    RoPE, residual adds and the MLP's SiLU-product fused around the matmuls and SDPA). The teacher is a frozen
    submodule."""

    def __init__(self, student: MMMambaForCausalLM, teacher: MMMambaForCausalLM, target: str = "heads",
                 factor: float = 1000.0, gradient_checkpointing: bool = False, compile: bool = False):
        super().__init__()
        if target not in ("heads", "output"):
            raise ValueError(f"layer-wise target {target!r} unknown; use 'heads' (before W_O) or 'output'")
        self.student, self.target, self.factor = student, target, float(factor)
        self.gradient_checkpointing = gradient_checkpointing
        self.mamba_layers = list(student.config.mamba_layers)
        if not self.mamba_layers:
            raise ValueError("layer-wise distillation needs at least one Mamba-2 layer in the student")
        for i in self.mamba_layers:
            if not isinstance(teacher.model.layers[i].mixer, Attention):
                raise ValueError(f"teacher layer {i} is not an attention layer; cannot produce its target")
        # The residual stream and the targets come from the frozen teacher itself, in its own dtype (bf16 on GPU:
        # no fp32 master weights on this path, so no casts and half the activation traffic).
        self.teacher = teacher.requires_grad_(False).eval()
        if compile:
            allow_recompiles(2 * len(teacher.model.layers) + 8)
        self._stream = torch.compile(stream_layer) if compile else stream_layer

    def _student_loss(self, mixer, pad_mask, loss_mask, r, target):
        if self.target == "heads":
            return mixer.heads_mse(r, target, pad_mask, loss_mask)
        y = mixer.o_proj(mixer.heads(r, pad_mask).reshape(*r.shape[:2], -1))
        return masked_mse(y, target, loss_mask)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, input_ids, attention_mask=None, pixel_values=None, **_unused):
        teacher = self.teacher.model
        with torch.no_grad():
            h = teacher.embed(input_ids, pixel_values)
            b, l, _ = h.shape
            ctx, _ = teacher.context(b, l, h.device, h.dtype, _compute_mask(attention_mask), None, None)
        loss_mask = None if attention_mask is None else attention_mask.bool()
        per_layer = []
        for layer, t_layer in zip(self.student.model.layers, teacher.layers):
            cos, sin = ctx.rope[t_layer.rope_index]
            with torch.no_grad():
                r, y_t, o_t, h = self._stream(t_layer, h, cos, sin, ctx.attn_mask)
            if layer.layer_type != MAMBA2:
                continue
            fn = partial(self._student_loss, layer.mixer, ctx.pad_mask, loss_mask)
            tgt = y_t if self.target == "heads" else o_t
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                per_layer.append(checkpoint(fn, r, tgt, use_reentrant=False))
            else:
                per_layer.append(fn(r, tgt))
        loss = layerwise_loss(per_layer, self.factor)
        return loss, {"layer_mse": torch.stack([x.detach().float() for x in per_layer])}


class EndToEndDistill(nn.Module):
    """Stage 3. forward(input_ids, attention_mask, labels, pixel_values) -> (loss, {"kl", ["ce"]}).

    The teacher is held outside the module's parameters (not wrapped by DDP / FSDP, never trained)."""

    def __init__(self, student: MMMambaForCausalLM, teacher: MMMambaForCausalLM, temperature: float = 1.0,
                 positions: str = "assistant", ce_weight: float = 0.0, chunk_size: int = 1024,
                 gather_rows: bool = True):
        super().__init__()
        if positions not in ("assistant", "all"):
            raise ValueError(f"positions {positions!r} unknown; use 'assistant' or 'all'")
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.student = student
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())
        self.temperature, self.positions = float(temperature), positions
        self.ce_weight, self.chunk_size = float(ce_weight), int(chunk_size)
        self.gather_rows = gather_rows  # False: KL rows selected by weight, no host sync (CUDA graphs)

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, **_unused):
        cm = _compute_mask(attention_mask)
        with torch.no_grad():
            ht = self.teacher.model(input_ids=input_ids, attention_mask=cm, pixel_values=pixel_values)
        hs = self.student.model(input_ids=input_ids, attention_mask=cm, pixel_values=pixel_values)
        full = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        select = kl_positions(full, labels, self.positions)
        return kl_ce_loss(
            hs.last_hidden_state, ht.last_hidden_state, self.student.lm_head, self.teacher.lm_head, select, labels,
            temperature=self.temperature, ce_weight=self.ce_weight, chunk_size=self.chunk_size,
            gather=self.gather_rows,
        )


@torch.no_grad()
def apply_placement(student: MMMambaForCausalLM, teacher: MMMambaForCausalLM,
                    attention_layers: list[int]) -> MMMambaForCausalLM:
    """The stage-3 student: layers in `attention_layers` become attention again with the teacher's
    q/k/v/o weights (their Mamba-2 weights are dropped); every other layer keeps the student's weights."""
    cfg = student.config
    types = list(cfg.layer_types)
    for i in attention_layers:
        if not 0 <= i < cfg.num_hidden_layers:
            raise ValueError(f"attention layer {i} out of range for a {cfg.num_hidden_layers}-layer model")
        types[i] = ATTENTION
    if types == list(cfg.layer_types):
        return student
    new_cfg = copy.deepcopy(cfg)
    new_cfg.layer_types = types
    new = MMMambaForCausalLM(new_cfg).to(next(student.parameters()).dtype)
    converted = [i for i in attention_layers if cfg.layer_types[i] != ATTENTION]
    drop = tuple(f"model.layers.{i}.mixer." for i in converted)
    sd = {k: v for k, v in student.state_dict().items() if not k.startswith(drop)}
    tsd = teacher.state_dict()
    for i in converted:
        pre = f"model.layers.{i}.mixer."
        sd.update({k: v for k, v in tsd.items() if k.startswith(pre)})
    new.load_state_dict(sd, strict=True)
    new.generation_config = copy.deepcopy(student.generation_config)
    return new


@torch.no_grad()
def check_shared_weights(student: MMMambaForCausalLM, teacher: MMMambaForCausalLM) -> None:
    """Refuse a student whose teacher-inherited weights outside its Mamba-2 mixers (embeddings, norms, MLPs,
    head, attention layers), which no stage trains, differ from the teacher's: it was seeded from another
    teacher."""
    tp = dict(teacher.named_parameters())
    attn = set(student.config.attention_layers)
    bad = []
    for name, p in student.named_parameters():
        pieces = name.split(".")
        in_mixer = len(pieces) >= 5 and pieces[:2] == ["model", "layers"] and pieces[3] == "mixer"
        if in_mixer and int(pieces[2]) not in attn:
            continue
        t = tp.get(name)
        if t is None or t.shape != p.shape or not torch.equal(p.detach().cpu().to(t.dtype), t.detach().cpu()):
            bad.append(name)
    if bad:
        raise ValueError(
            f"the student's frozen weights differ from this teacher's ({len(bad)} tensors, e.g. {bad[:3]}): "
            "it was not seeded from this teacher"
        )
