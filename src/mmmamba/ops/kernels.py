"""Which fast paths a model runs on a device. Every fused kernel of `ops` sits beside its torch reference and is
checked once per device and dtype against it (`ops.checked.passes_check`); one that fails, or does not compile,
falls back to the reference with a warning. `kernel_report` runs those checks up front for a model's config, so that
the trainer and the inference engine can say (and choose) which paths they use; the SSD backward is chosen here once
and then handed to the mixers as an explicit argument (`Mamba2Mixer.ssd_backward`)."""

from __future__ import annotations

import torch

from . import add_norm, conv_silu, gated_norm, gla_prep, rope, ssd_fla, swiglu
from .checked import cuda_index


def check_ssd_backward(mode: str) -> str:
    """`mode` if it names an SSD backward of `ssd_fla.MODE_NOTES`, else a clear error."""
    if mode not in ssd_fla.MODE_NOTES:
        raise ValueError(f"SSD backward {mode!r} unknown: use native, bk32, bk128 or torch")
    return mode


def kernel_report(config, dtype: torch.dtype, device, *, stream_dtype: torch.dtype | None = None,
                  norm_dtype: torch.dtype | None = None, ssd_backward: str | None = None,
                  inference: bool = False) -> dict:
    """{"ssd_backward": mode or None, "fused": {path: passed its check}} for a model of `config` whose mixers run in
    `dtype` on `device`. "ssd_backward": None without fla-core (the chunked torch SSD); else `ssd_backward` when given
    (forced), or `ssd_fla.backward_mode`'s choice. "fused": the Mamba-2 mixer's gated RMSNorm, conv + SiLU and (with
    fla) the SSD's inputs from the conv output; with `stream_dtype` (stages 1-2: a frozen teacher stream beside the
    mixers) the per-head MSE in the gated norm and the stream's add + RMSNorm, RoPE and SiLU product; without, the
    RMSNorm (in `norm_dtype`, default `dtype`) and MLP SiLU product the whole model runs through. `inference`: the
    no-gradient paths of the engine's prefill instead (no SSD backward). Off CUDA: {}."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"ssd_backward": None, "fused": {}}
    d, index = config.head_dim, cuda_index(device)
    if inference:
        return {"ssd_backward": None, "fused": {
            "gated RMSNorm": gated_norm._fused_ok(d, dtype, index),
            "add + RMSNorm": add_norm.fused_ok(dtype, index),
            "conv + SiLU (prefill)": conv_silu.prefill_ok(config.mamba_d_conv, dtype, True, None, index),
            "conv + SiLU into the SSD inputs": conv_silu.split_ok(d) and ssd_fla.fla_available()
            and conv_silu.prefill_ok(config.mamba_d_conv, dtype, True, d, index),
            "RoPE": rope.fused_ok(dtype, index),
            "MLP SiLU product": swiglu.fused_ok(dtype, index)}}
    mode = None
    if ssd_fla.fla_available():
        mode = check_ssd_backward(ssd_backward) if ssd_backward else ssd_fla.backward_mode(
            d, d, device, config.num_attention_heads)
    fused = {"gated RMSNorm": gated_norm._fused_ok(d, dtype, index),
             "conv + SiLU": conv_silu._fused_ok(config.mamba_d_conv, dtype, True, index)}
    if mode is not None:
        fused["SSD inputs from the conv output"] = gla_prep.fused_ok(d, dtype, index)
    if stream_dtype is not None:
        fused["per-head MSE in the gated RMSNorm"] = gated_norm._fused_mse_ok(d, dtype, index)
        fused["teacher stream add + RMSNorm"] = add_norm.fused_ok(stream_dtype, index)
        fused["teacher RoPE"] = rope.fused_ok(stream_dtype, index)
        fused["teacher MLP SiLU product"] = swiglu.fused_ok(stream_dtype, index)
    else:
        fused["RMSNorm"] = add_norm.rmsnorm_ok(norm_dtype or dtype, index)
        fused["MLP SiLU product"] = swiglu.fused_ok(dtype, index)
    return {"ssd_backward": mode, "fused": fused}
