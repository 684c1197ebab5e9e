"""Numerical kernels with a plain-torch reference beside every fast path."""

from .conv import causal_conv1d, causal_conv1d_step, causal_conv1d_step_
from .kernels import kernel_report
from .ssd import ssd
from .ssd_ref import ssd_chunked, ssd_naive, ssd_step, ssd_step_

__all__ = ["causal_conv1d", "causal_conv1d_step", "causal_conv1d_step_", "kernel_report", "ssd", "ssd_chunked",
           "ssd_naive", "ssd_step", "ssd_step_"]
