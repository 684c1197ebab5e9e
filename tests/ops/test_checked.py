"""The kernel switches of ops.checked: a switched-off fast path reports False without running its check, and runs
its check (once) when switched back on."""

from __future__ import annotations

import pytest
import torch

from mmmamba.ops import add_norm, gated_norm, gla_prep, swiglu
from mmmamba.ops.checked import SWITCHES, kernels_off, set_kernels_off, switchable

# (module, its check function, the switch, the check's key)
CHECKS = [(gated_norm, "_fused_mse_ok", "norm_mse", (64, torch.bfloat16, 0)),
          (add_norm, "rmsnorm_ok", "rmsnorm", (torch.float32, 0)),
          (gla_prep, "fused_ok", "gla_prep", (64, torch.bfloat16, 0)),
          (swiglu, "fused_ok", "swiglu", (torch.bfloat16, 0))]


@pytest.fixture(autouse=True)
def switches_on():
    yield
    set_kernels_off(())


@pytest.mark.parametrize("mod,fn,name,key", CHECKS, ids=[c[2] for c in CHECKS])
def test_each_training_kernel_has_a_switch(monkeypatch, mod, fn, name, key):
    if getattr(mod, "triton", None) is None:
        pytest.skip("triton not installed")
    ran = []
    monkeypatch.setattr(mod, "passes_check", lambda what, errors, tol, fallback: ran.append(what) or True)
    monkeypatch.setattr(add_norm, "fused_ok", lambda *a: True)  # rmsnorm_ok's forward-kernel check first
    check = getattr(mod, fn)
    check.cache_clear()
    try:
        set_kernels_off([name])
        assert check(*key) is False and ran == []
        set_kernels_off(set(SWITCHES) - {name})
        assert check(*key) is True and len(ran) == 1
        assert check(*key) is True and len(ran) == 1  # cached: checked once
        set_kernels_off([name])
        assert check(*key) is False
    finally:
        check.cache_clear()


def test_switch_names_are_checked():
    with pytest.raises(ValueError, match="unknown; known: norm_mse"):
        set_kernels_off(["fast_norm"])
    with pytest.raises(ValueError, match="unknown"):
        switchable("nope")
    set_kernels_off(["swiglu", "gla_prep"])
    assert kernels_off() == {"swiglu", "gla_prep"}
    set_kernels_off(())
    assert kernels_off() == frozenset()
