"""Choice of the SSD backward on CUDA (ops/ssd_fla.py); the kernels themselves are checked on a GPU
(scripts/gpu/check_ssd.py, docs/benchmarks/)."""

from __future__ import annotations

import pytest
import torch
from conftest import TorchGLA

from mmmamba.ops import ssd_fla

_CHECK = ssd_fla._tile_mode  # the cached choice (a test may replace the module attribute)


@pytest.fixture(autouse=True)
def _clean():
    _CHECK.cache_clear()
    yield
    _CHECK.cache_clear()


def test_native_where_fla_allows_it(monkeypatch):
    monkeypatch.setattr(ssd_fla, "fla_backward_ok", lambda: True)
    monkeypatch.setattr(ssd_fla, "_tile_mode", lambda *a: pytest.fail("no check needed"))
    assert ssd_fla.backward_mode(64, 64, torch.device("cuda", 0)) == "native"


@pytest.mark.parametrize("errors,ms,mode", [
    ({32: 4e-3, 128: 3e-3}, {32: 1.0, 128: 2.0}, "bk32"),  # both widths pass: the faster one
    ({32: 4e-3, 128: 3e-3}, {32: 3.0, 128: 2.0}, "bk128"),
    ({32: 0.55, 128: 3e-3}, None, "bk128"),  # only one passes: no timing
    ({32: 0.55, 128: 0.6}, None, "torch"),  # none passes
])
def test_tile_width_only_after_its_check_passes_and_the_faster(monkeypatch, errors, ms, mode):
    checks, timed = [], []
    monkeypatch.setattr(ssd_fla, "fla_backward_ok", lambda: False)

    def tile_errors(K, V, dev, heads, bk):
        checks.append((K, V, dev, heads, bk))
        return {"dx": 1e-3, "dB": errors[bk]}

    def tile_ms(K, V, dev, heads, bk):
        timed.append(bk)
        return ms[bk]

    monkeypatch.setattr(ssd_fla, "tile_errors", tile_errors)
    monkeypatch.setattr(ssd_fla, "tile_ms", tile_ms)
    failing = any(e > ssd_fla.TILE_TOLERANCE for e in errors.values())
    with pytest.warns(UserWarning, match="failed its check") if failing else _no_warning():
        assert ssd_fla.backward_mode(64, 64, torch.device("cuda", 0), 9) == mode
    assert ssd_fla.backward_mode(64, 64, torch.device("cuda", 0), 9) == mode  # chosen once per shape and device
    assert checks == [(64, 64, torch.device("cuda", 0), 9, bk) for bk in (32, 128)]
    assert sorted(timed) == ([32, 128] if ms else [])
    assert mode in ssd_fla.MODE_NOTES


def test_tiles_unavailable_fall_back_to_torch(monkeypatch):
    def broken(*a, **k):
        raise ImportError("fla internals moved")

    monkeypatch.setattr(ssd_fla, "fla_backward_ok", lambda: False)
    monkeypatch.setattr(ssd_fla, "tile_errors", broken)
    with pytest.warns(UserWarning, match="unavailable.*fla internals moved"):
        assert ssd_fla.backward_mode(128, 128, torch.device("cuda", 0)) == "torch"


def test_kernel_report_forced_mode_bad_value_and_inference_paths(monkeypatch):
    """A forced SSD backward is an argument of `ops.kernel_report` (the trainer reads MMMAMBA_SSD_BACKWARD at its
    edge); nothing in ops reads the environment, and a bad name is a clear error."""
    from types import SimpleNamespace

    from mmmamba.ops import kernels

    monkeypatch.setenv("MMMAMBA_SSD_BACKWARD", "bk32")  # ignored below: only the argument counts
    monkeypatch.setattr(ssd_fla, "fla_available", lambda: True)
    monkeypatch.setattr(ssd_fla, "backward_mode", lambda *a: "native")
    for mod, name in ((kernels.gated_norm, "_fused_ok"), (kernels.conv_silu, "_fused_ok"),
                      (kernels.gla_prep, "fused_ok"), (kernels.add_norm, "rmsnorm_ok"), (kernels.swiglu, "fused_ok")):
        monkeypatch.setattr(mod, name, lambda *a: True)
    cfg = SimpleNamespace(head_dim=64, num_attention_heads=2, mamba_d_conv=2)
    dev = torch.device("cuda", 0)
    assert kernels.kernel_report(cfg, torch.bfloat16, dev, ssd_backward="torch")["ssd_backward"] == "torch"
    assert kernels.kernel_report(cfg, torch.bfloat16, dev)["ssd_backward"] == "native"
    with pytest.raises(ValueError, match="native, bk32, bk128 or torch"):
        kernels.kernel_report(cfg, torch.bfloat16, dev, ssd_backward="fast")
    assert kernels.kernel_report(cfg, torch.bfloat16, torch.device("cpu")) == {"ssd_backward": None, "fused": {}}
    monkeypatch.setattr(kernels.conv_silu, "prefill_ok", lambda *a: False)  # the engine's prefill paths
    for mod in (kernels.add_norm, kernels.rope):
        monkeypatch.setattr(mod, "fused_ok", lambda *a: True)
    report = kernels.kernel_report(cfg, torch.bfloat16, dev, inference=True)
    assert report == {"ssd_backward": None, "fused": {"gated RMSNorm": True, "add + RMSNorm": True,
                                                      "conv + SiLU (prefill)": False,
                                                      "conv + SiLU into the SSD inputs": False, "RoPE": True,
                                                      "MLP SiLU product": True}}


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_tile_errors_plumbing_with_a_torch_gla(monkeypatch):
    """tile_errors compares gradients of the simple-GLA view (q=C, k=B, v=dt*x, g=dt*A) with the SSD reference,
    with and without an initial state; here the fla Function is replaced by a sequential torch GLA, so every error
    is at bf16 rounding."""

    monkeypatch.setattr(ssd_fla, "SimpleGLATiles", TorchGLA)
    errs = ssd_fla.tile_errors(8, 8, torch.device("cpu"), T=70, heads=2, bk=32)
    assert set(errs) == {"dx", "ddt", "dB", "dC", "dx|S0", "ddt|S0", "dB|S0", "dC|S0", "dS0"}
    assert max(errs.values()) < 1e-2, errs
