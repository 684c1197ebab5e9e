"""Choice of the SSD backward on CUDA (ops/ssd_fla.py); the kernels themselves are checked on a GPU
(scripts/gpu/check_ssd.py, docs/benchmarks/)."""

from __future__ import annotations

import pytest
import torch

from mmmamba.ops import ssd_fla

_CHECK = ssd_fla._bk128_ok  # the cached check (a test may replace the module attribute)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("MMMAMBA_SSD_BACKWARD", raising=False)
    _CHECK.cache_clear()
    yield
    _CHECK.cache_clear()


def test_native_where_fla_allows_it(monkeypatch):
    monkeypatch.setattr(ssd_fla, "fla_backward_ok", lambda: True)
    monkeypatch.setattr(ssd_fla, "_bk128_ok", lambda *a: pytest.fail("no check needed"))
    assert ssd_fla.backward_mode(64, 64, torch.device("cuda", 0)) == "native"


@pytest.mark.parametrize("errors,mode", [({"dx": 4e-3, "dB": 3e-3}, "bk128"), ({"dx": 4e-3, "dB": 0.55}, "torch")])
def test_bk128_only_after_its_check_passes(monkeypatch, errors, mode):
    calls = []
    monkeypatch.setattr(ssd_fla, "fla_backward_ok", lambda: False)
    monkeypatch.setattr(ssd_fla, "bk128_errors", lambda K, V, dev, heads: calls.append((K, V, dev, heads)) or errors)
    with pytest.warns(UserWarning, match="failed its check") if mode == "torch" else _no_warning():
        assert ssd_fla.backward_mode(64, 64, torch.device("cuda", 0), 9) == mode
    assert ssd_fla.backward_mode(64, 64, torch.device("cuda", 0), 9) == mode
    assert calls == [(64, 64, torch.device("cuda", 0), 9)]  # checked once per (K, V, device, heads)


def test_bk128_unavailable_falls_back_to_torch(monkeypatch):
    def broken(*a, **k):
        raise ImportError("fla internals moved")

    monkeypatch.setattr(ssd_fla, "fla_backward_ok", lambda: False)
    monkeypatch.setattr(ssd_fla, "bk128_errors", broken)
    with pytest.warns(UserWarning, match="unavailable.*fla internals moved"):
        assert ssd_fla.backward_mode(128, 128, torch.device("cuda", 0)) == "torch"


def test_forced_mode_and_bad_value(monkeypatch):
    monkeypatch.setenv("MMMAMBA_SSD_BACKWARD", "torch")
    assert ssd_fla.backward_mode(64, 64, torch.device("cuda", 0)) == "torch"
    monkeypatch.setenv("MMMAMBA_SSD_BACKWARD", "fast")
    with pytest.raises(ValueError, match="native, bk128 or torch"):
        ssd_fla.backward_mode(64, 64, torch.device("cuda", 0))


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_bk128_errors_plumbing_with_a_torch_gla(monkeypatch):
    """bk128_errors compares gradients of the simple-GLA view (q=C, k=B, v=dt*x, g=dt*A) with the SSD reference,
    with and without an initial state; here the fla Function is replaced by a sequential torch GLA, so every error
    is at bf16 rounding."""

    class TorchGLA:
        @staticmethod
        def apply(q, k, v, g, S0):
            b, t, h, n = q.shape
            S = q.new_zeros(b, h, n, v.shape[-1], dtype=torch.float32) if S0 is None else S0.float()
            out = []
            for i in range(t):
                S = torch.exp(g[:, i])[..., None, None] * S + k[:, i].float()[..., None] * v[:, i].float()[..., None, :]
                out.append(torch.einsum("bhn,bhnp->bhp", q[:, i].float(), S))
            return torch.stack(out, 1).to(v.dtype), S

    monkeypatch.setattr(ssd_fla, "SimpleGLABK128", TorchGLA)
    errs = ssd_fla.bk128_errors(8, 8, torch.device("cpu"), T=70, heads=2)
    assert set(errs) == {"dx", "ddt", "dB", "dC", "dx|S0", "ddt|S0", "dB|S0", "dC|S0", "dS0"}
    assert max(errs.values()) < 1e-2, errs
