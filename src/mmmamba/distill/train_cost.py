"""What a distillation step costs, by arithmetic: model FLOPs per token (for MFU) and an estimate of GPU memory (to
say before a run whether a stage fits a card).

FLOP model (`step_flops`). Per token; H hidden, I MLP width, V vocab, h / g query / KV heads, d head dim (state size n
= head dim p = d), L sequence length, c SSD chunk. A matmul with a weight of m x k entries costs 2mk forward; its
backward costs 2mk for the input gradient (when something below it needs one) and 2mk for the weight gradient (when
the weight trains): the "6 N" rule for a fully trained model, "2 N" for a frozen one run forward only.
  P_att = H hd + 2 H gd + hd H (q, k, v, o)            P_mlp = 3 H I
  P_mix = H hd + 2 H gd + H hd + H h (the Mamba-2 mixer's q, k, v, g_proj, dt_proj; P_mix + hd H with its o_proj)
  attention core, causal: 2 h d L forward (QK^T and PV over L/2 keys on average), 2x that backward
  SSD core: h (c (n + p) + 4 n p) forward (causal intra-chunk scores and mix; state read and update), 2x backward
Stages 1-2: the frozen teacher runs every layer (2 P_att + attention core + 2 P_mlp, no head) and every Mamba-2 mixer
  runs its projections and SSD core (2 P_mix + SSD core). Backward: 2x the SSD core and the weight gradients of the
  trained projections (the mixer's input is the teacher's stream: no input gradients).
Stage 3: the teacher forward with its head (2 H V), the student forward with its head; backward: the head's input
  gradient (2 H V), the input gradients of every layer above the lowest trained one (2 P, 2x core, 2 P_mlp), at that
  lowest layer those of its MLP, o_proj and SSD core only, and the weight gradients of the trained projections.
Not counted: norms, RoPE, the conv (d_conv taps), softmax / KL, the optimizer, and recomputation under gradient
checkpointing (model FLOPs, as MFU is defined).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..models import ATTENTION

MIXER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "g_proj", "dt_proj", "o_proj")


def _sizes(cfg, seq: int) -> dict:
    H, I = cfg.hidden_size, cfg.intermediate_size
    h, g, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    proj = {"q_proj": H * h * d, "k_proj": H * g * d, "v_proj": H * g * d, "g_proj": H * h * d, "dt_proj": H * h,
            "o_proj": h * d * H}
    return {
        "proj": proj, "p_att": proj["q_proj"] + proj["k_proj"] + proj["v_proj"] + proj["o_proj"],
        "p_mix": sum(proj.values()) - proj["o_proj"], "p_mlp": 3 * H * I, "head": H * cfg.vocab_size,
        "att_core": 2 * h * d * seq, "ssd_core": h * (cfg.mamba_chunk_size * 2 * d + 4 * d * d),
    }


def _trained_parts(trainable: Iterable[str], layer: int) -> set[str]:
    pre = f"model.layers.{layer}.mixer."
    return {n[len(pre):].split(".")[0] for n in trainable if n.startswith(pre)} & set(MIXER_PROJECTIONS)


def step_flops(cfg, stage: int, seq: int, trainable: Iterable[str]) -> dict:
    """Model FLOPs per token of one stage-`stage` step (forward + backward) of a student with config `cfg` (its
    `layer_types`) and trained parameter names `trainable`, at sequence length `seq`: {"forward": {"matmul",
    "attention", "ssd"}, "backward": {...}, "total": sum}. The formula is the module docstring's."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, not {stage!r}")
    s, trainable = _sizes(cfg, seq), list(trainable)
    fwd = {"matmul": 0, "attention": 0, "ssd": 0}
    bwd = dict(fwd)
    types = list(cfg.layer_types)
    mamba = [i for i, t in enumerate(types) if t != ATTENTION]
    weight_grads = sum(2 * s["proj"][p] for i in mamba for p in _trained_parts(trainable, i))
    bwd["matmul"] += weight_grads
    if stage in (1, 2):
        fwd["matmul"] += len(types) * 2 * (s["p_att"] + s["p_mlp"]) + len(mamba) * 2 * s["p_mix"]
        fwd["attention"] += len(types) * s["att_core"]
        fwd["ssd"] += len(mamba) * s["ssd_core"]
        bwd["ssd"] += len(mamba) * 2 * s["ssd_core"]
    else:
        fwd["matmul"] += len(types) * 2 * (s["p_att"] + s["p_mlp"]) + 2 * s["head"]  # the teacher
        fwd["attention"] += len(types) * s["att_core"]
        fwd["matmul"] += 2 * s["head"]
        bwd["matmul"] += 2 * s["head"]
        lowest = min(mamba) if mamba else len(types)
        for i, t in enumerate(types):
            core = "attention" if t == ATTENTION else "ssd"
            layer_p = s["p_att"] if t == ATTENTION else s["p_mix"] + s["proj"]["o_proj"]
            fwd["matmul"] += 2 * (layer_p + s["p_mlp"])
            fwd[core] += s["att_core" if t == ATTENTION else "ssd_core"]
            if i > lowest:
                bwd["matmul"] += 2 * (layer_p + s["p_mlp"])
                bwd[core] += 2 * s["att_core" if t == ATTENTION else "ssd_core"]
            elif i == lowest:  # the mixer's input projections need no input gradient: nothing below trains
                bwd["matmul"] += 2 * (s["p_mlp"] + s["proj"]["o_proj"])
                bwd["ssd"] += 2 * s["ssd_core"]
    return {"forward": fwd, "backward": bwd, "total": sum(fwd.values()) + sum(bwd.values())}


def parameter_counts(cfg) -> dict:
    """Parameters of the decoder of `cfg` by what holds them: {"embedding", "head" (0 when tied), "layers",
    "total"}. Mamba-2 layers count their q, k, v, o, g_proj, dt_proj, conv, dt_bias, A_log and gate norm."""
    H, h, g, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    s = _sizes(cfg, 1)
    norms, mlp = 2 * H, s["p_mlp"] + (2 * cfg.intermediate_size + H if cfg.mlp_bias else 0)
    attn = s["p_att"] + ((h + 2 * g) * d if cfg.qkv_bias else 0) + (H if cfg.o_bias else 0)
    conv_ch = (h + 2 * g) * d
    mix = attn + s["proj"]["g_proj"] + s["proj"]["dt_proj"] + conv_ch * (cfg.mamba_d_conv + 1) + 2 * h + d
    layers = sum(norms + mlp + (attn if t == ATTENTION else mix) for t in cfg.layer_types)
    emb = cfg.vocab_size * H
    head = 0 if cfg.tie_word_embeddings else emb
    return {"embedding": emb, "head": head, "layers": layers + H, "total": emb + head + layers + H}


def _activation_bytes_per_token(cfg, stage: int, checkpointing: bool) -> tuple[int, int]:
    """(bytes kept for the backward per token over the whole model, extra bytes per token while one layer is
    recomputed or live), bf16 activations, fp32 residual stream (autocast over fp32 weights)."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    h, g, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    types = list(cfg.layer_types)
    mamba = [i for i, t in enumerate(types) if t != ATTENTION]
    # a Mamba-2 mixer keeps its input r (H), the projections' x, B, C ((h + 2g) d), gate (h d) and dt (h), the conv
    # output ((h + 2g) d), fla's q, k, v (3 h d: k and v repeated to h heads), the SSD output (h d) and dt in fp32
    mixer = 2 * (H + 2 * (h + 2 * g) * d + 5 * h * d + h) + 4 * h
    if stage in (1, 2):
        kept = len(mamba) * (2 * (H + h * d) if checkpointing else mixer + 2 * h * d)  # + the target y_t
        return kept, mixer if checkpointing else 0
    lowest = min(mamba) if mamba else len(types)
    attn = 2 * ((h + 2 * g) * d + h * d) + 4 * h  # q, k, v after RoPE, the SDPA output and its fp32 log-sum-exp
    layer = {t: 8 * H + 4 * I + (attn if t == ATTENTION else mixer) for t in set(types)}  # 2 fp32 norm inputs, g, u
    live = [layer[t] for i, t in enumerate(types) if i >= lowest]
    if checkpointing:
        return 4 * H * len(live), max(live, default=0)
    return sum(live), 0


def memory_estimate(cfg, stage: int, micro_batch: int, seq: int, trainable_params: int, teacher_params: int,
                    checkpointing: bool, kl_chunk: int = 1024) -> dict:
    """GiB a stage-`stage` step should take on the GPU: the fp32 student (master weights), fp32 gradients and
    AdamW's two fp32 moments of the `trainable_params`, autocast's bf16 copies of the trained weights, the bf16
    teacher (`teacher_params`), and the activations of `micro_batch` x `seq` tokens (`_activation_bytes_per_token`;
    stage 3 adds the teacher's final hidden states and the KL's fp32 logits for `kl_chunk` rows, teacher and
    student, with their softmaxes). An estimate from shapes, not a measurement: the GPU run's peak says how close."""
    gib = 2**30
    student = parameter_counts(cfg)["total"]
    kept, live = _activation_bytes_per_token(cfg, stage, checkpointing)
    tokens = micro_batch * seq
    out = {
        "student_fp32": 4 * student / gib, "grads_fp32": 4 * trainable_params / gib,
        "adam_fp32": 8 * trainable_params / gib, "autocast_bf16": 2 * trainable_params / gib,
        "teacher_bf16": 2 * teacher_params / gib, "activations": (kept + live) * tokens / gib,
    }
    if stage == 3:
        out["activations"] += 2 * cfg.hidden_size * tokens / gib
        out["kl_chunk"] = 4 * 4 * min(kl_chunk, tokens) * cfg.vocab_size / gib
    out["total"] = sum(out.values())
    return out
