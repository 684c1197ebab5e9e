"""Numerical kernels with a plain-torch reference beside every fast path."""

from .conv import causal_conv1d, causal_conv1d_step
from .conv_silu import conv_silu, conv_silu_ref
from .gated_norm import gated_rmsnorm, gated_rmsnorm_ref
from .ssd import ssd, ssd_chunked, ssd_naive, ssd_step

__all__ = ["causal_conv1d", "causal_conv1d_step", "conv_silu", "conv_silu_ref", "gated_rmsnorm",
           "gated_rmsnorm_ref", "ssd", "ssd_chunked", "ssd_naive", "ssd_step"]
