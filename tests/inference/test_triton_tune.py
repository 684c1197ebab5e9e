"""The block-size tuner of the decode kernels (inference/triton_kernels.py `_tune`): fastest candidate kept, failing
candidates skipped, result cached; timings come from `_kernel_ms` (faked here, measured on the GPU)."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@pytest.fixture
def tk(monkeypatch):
    from mmmamba.inference import triton_kernels as tk

    monkeypatch.setattr(tk, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return tk


def test_fastest_candidate_kept_failures_skipped_and_cached(tk, monkeypatch):
    times = {(8, 512, 4, 0): 0.020, (4, 1024, 4, 0): 0.011, (16, 256, 4, 0): 0.015}
    launched, timed = [], []

    def launch(cfg):
        launched.append(cfg)
        if cfg == (2, 2048, 4, 0):
            raise RuntimeError("out of resources")

    monkeypatch.setattr(tk, "_kernel_ms", lambda fn: timed.append(fn.args[0]) or times[fn.args[0]])
    x = types.SimpleNamespace(is_cuda=True)
    key = ("test", 1)
    best = tk._tune(key, [(8, 512, 4, 0), (2, 2048, 4, 0), (4, 1024, 4, 0), (16, 256, 4, 0)], launch, x)
    assert best == (4, 1024, 4, 0) and tk._TUNED[key] == best
    assert (key, (2, 2048, 4, 0)) in tk._FAILED and (2, 2048, 4, 0) not in timed
    tk._TUNED.pop(key)


def test_no_tuning_when_disabled_or_off_gpu(tk, monkeypatch):
    monkeypatch.setattr(tk, "_kernel_ms", lambda fn: pytest.fail("nothing should be timed"))
    cands = [(8, 512, 4, 0), (4, 1024, 4, 0)]
    assert tk._tune(("t", 2), cands, lambda c: None, types.SimpleNamespace(is_cuda=False)) == cands[0]
    tune = tk.DecodeOptions.from_env({"MMMAMBA_TRITON_TUNE": "0"}).tune
    assert tk._tune(("t", 3), cands, lambda c: None, types.SimpleNamespace(is_cuda=True), tune) == cands[0]


def test_decode_options_from_environment(monkeypatch):
    """The kernels' knobs come from the environment only through DecodeOptions.from_env (the engine's edge)."""
    from mmmamba.inference import triton_kernels as tk

    o = tk.DecodeOptions.from_env({"MMMAMBA_GEMV_CONFIG": "8,256,4,1", "MMMAMBA_PDL": "1",
                                   "MMMAMBA_GEMV_PREFETCH": "0", "MMMAMBA_TRITON_TUNE": "0"})
    assert o == tk.DecodeOptions(pdl=True, gemv_prefetch=False, gemv_config=(8, 256, 4, 1), tune=False)
    assert tk.DecodeOptions.from_env({}) == tk.DecodeOptions()
    with pytest.raises(ValueError, match="four integers"):
        tk.DecodeOptions.from_env({"MMMAMBA_GEMV_CONFIG": "8,256"})
    monkeypatch.setenv("MMMAMBA_PDL", "1")
    assert tk.DecodeOptions.from_env().pdl


def test_programmatic_dependent_launch_is_opt_in(monkeypatch):
    from mmmamba.inference import triton_kernels as tk

    cuda_like = types.SimpleNamespace(is_cuda=True, device=types.SimpleNamespace(index=0))
    monkeypatch.setattr(tk, "interpreting", lambda: False)
    monkeypatch.setattr(tk, "_pdl_device", lambda index: True)
    monkeypatch.setenv("MMMAMBA_PDL", "1")  # read by DecodeOptions.from_env only, never by the kernels
    assert not tk.use_pdl(cuda_like)  # off unless asked for
    on = tk.DecodeOptions(pdl=True)
    assert tk.use_pdl(cuda_like, on)
    assert not tk.use_pdl(torch.zeros(1), on)  # CPU tensors: never
    monkeypatch.setattr(tk, "interpreting", lambda: True)
    assert not tk.use_pdl(cuda_like, on)  # the interpreter has no grid dependency control


def test_prefill_split_route_only_for_power_of_two_head_dims():
    """The conv kernel writes fla's layout in column blocks inside one head: head dims 16, 32, ... only (others take
    the split-then-copy route)."""
    from mmmamba.ops.conv_silu import split_ok

    assert all(split_ok(d) for d in (16, 64, 128, 256))
    assert not any(split_ok(d) for d in (8, 80, 96, 192))
