"""Choice of the SSD backward on CUDA (ops/ssd_fla.py); the kernels themselves are checked on a GPU
(scripts/gpu/check_ssd.py, docs/benchmarks/)."""

from __future__ import annotations

import pytest
import torch
from conftest import TorchGLA

from mmmamba.ops import ssd_fla

_CHECK = ssd_fla._tile_mode  # the cached choice (a test may replace the module attribute)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("MMMAMBA_SSD_BACKWARD", raising=False)
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


def test_forced_mode_and_bad_value(monkeypatch):
    monkeypatch.setenv("MMMAMBA_SSD_BACKWARD", "torch")
    assert ssd_fla.backward_mode(64, 64, torch.device("cuda", 0)) == "torch"
    monkeypatch.setenv("MMMAMBA_SSD_BACKWARD", "fast")
    with pytest.raises(ValueError, match="native, bk32, bk128 or torch"):
        ssd_fla.backward_mode(64, 64, torch.device("cuda", 0))


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
