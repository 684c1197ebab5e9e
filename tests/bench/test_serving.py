"""The largest-batch search (doubling, then bisection), its OOM handling and the memory limits, without a GPU."""

from __future__ import annotations

import pytest
import torch

from mmmamba.bench.serving import cpu_limit_guard, memory_estimate, oom_in_chain, search_max_batch


@pytest.mark.parametrize("true_max", [1, 2, 3, 5, 17, 100, 1000, 1023, 1024])
def test_search_finds_the_largest_batch(true_max):
    found = search_max_batch(lambda b: b <= true_max, cap=4096, tol=0)
    assert found["max_batch"] == true_max and found["first_oom"] == true_max + 1 and found["exact"]
    probes = [b for b, _ in found["probes"]]
    doubling = [1 << i for i in range(true_max.bit_length() + 1)]
    assert probes[: len(doubling)] == doubling  # doubling first, then bisection
    assert len(probes) == len(set(probes)) and len(probes) <= 2 * true_max.bit_length() + 2


def test_search_tolerance_cap_and_nothing_fits():
    found = search_max_batch(lambda b: b <= 1000, cap=4096, tol=1 / 16)
    assert 1000 - 1000 // 16 <= found["max_batch"] <= 1000 < found["first_oom"] and not found["exact"]
    assert len(found["probes"]) < 16
    capped = search_max_batch(lambda b: True, cap=48)
    assert capped["max_batch"] == 48 and capped["capped"] and [b for b, _ in capped["probes"]][-2:] == [32, 48]
    none = search_max_batch(lambda b: False, cap=64)
    assert none["max_batch"] == 0 and none["first_oom"] == 1 and len(none["probes"]) == 1


def test_search_lets_other_errors_through():
    def fits(b):
        if b == 4:
            raise ValueError("broken kernel")
        return True

    with pytest.raises(ValueError, match="broken kernel"):
        search_max_batch(fits, cap=64)


def test_oom_is_recognised_through_a_chained_error():
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as e:
        assert oom_in_chain(e)
    assert not oom_in_chain(RuntimeError("illegal memory access"))
    assert oom_in_chain(RuntimeError("CUDA error: out of memory"))


class _Held:
    def __init__(self, n):
        self.n = n

    def held_bytes(self):
        return self.n


def test_cpu_limit_guard_raises_the_cuda_oom_error():
    guard = cpu_limit_guard(1000)
    guard(_Held(1000))
    with pytest.raises(torch.cuda.OutOfMemoryError, match="simulated"):
        guard(_Held(1001))


def test_memory_estimate_per_sequence():
    class R:
        model = torch.nn.Linear(10, 10, bias=False)  # 400 bytes of weights
        vocab = 5

        @staticmethod
        def state_bytes(ctx, batch):
            return 100 * ctx * batch

    e = memory_estimate(R(), 2, limit_bytes=400 + 3 * 220 + 219)
    assert e["cache_len"] == 2 and e["per_seq_gb"] == pytest.approx(220e-9)
    assert e["analytic_max_batch"] == 3


class _FakeEngine:
    kernels, max_len_multiple = "torch", 256

    def __init__(self):
        self.releases = 0

    def release(self):
        self.releases += 1


class _FakeRunner:
    """Runs "fit" up to `fits` rows; beyond, run_point raises the CUDA allocator's error; at `broken`, another one."""

    name, vocab = "linear", 8

    def __init__(self, fits: int, broken: int | None = None):
        self.fits, self.broken = fits, broken
        self.engine, self.model = _FakeEngine(), torch.nn.Linear(4, 4, bias=False)

    def set_kernels(self, kernels):
        self.engine.kernels = kernels

    def run_point(self, ctx, b, steps, warmup, prefill, guard=None):
        if b == self.broken:
            raise ValueError("illegal instruction")
        if b > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return None, {"ms_median": 1.0 + b / 100, "steps": steps, "kernels": self.engine.kernels}

    def weight_bytes(self, batch):
        return 64

    def state_bytes(self, ctx, batch):
        return 1000 * batch


def _fake_run(tmp_path, **kw):
    from mmmamba.bench.run import BenchOptions, _start

    run = _start(BenchOptions(device="cpu", tiny=True, out=str(tmp_path), batch_max=64, **kw).resolved(),
                 log=lambda *a: None)
    run.res["models"]["linear"] = {"kernels": "torch"}
    return run


def test_batch_context_catches_the_cuda_oom_and_frees(tmp_path):
    from mmmamba.bench.run import _batch_context

    run, runner = _fake_run(tmp_path), _FakeRunner(fits=5)
    _batch_context(run, "linear", runner, 64)
    (top,) = run.res["batch_max"]
    assert top["status"] == "ok" and top["max_batch"] == 5 and top["first_oom"] == 6 and top["exact"]
    rows = [(r["batch"], r["status"]) for r in run.res["batch"]]
    assert rows == [(1, "ok"), (2, "ok"), (4, "ok"), (8, "OOM"), (6, "OOM"), (5, "ok")]
    assert runner.engine.releases == 2  # freed after each OOM
    assert all(r["tokens_per_s"] > 0 for r in run.res["batch"] if r["status"] == "ok")


def test_batch_context_records_other_errors_and_stops(tmp_path):
    from mmmamba.bench.run import _batch_context

    run, runner = _fake_run(tmp_path), _FakeRunner(fits=50, broken=4)
    _batch_context(run, "linear", runner, 64)
    (top,) = run.res["batch_max"]
    assert top["status"].startswith("error: RuntimeError: batch 4: error: ValueError: illegal instruction")
    assert [(r["batch"], r["status"][:5]) for r in run.res["batch"]] == [(1, "ok"), (2, "ok"), (4, "error")]


def test_big_batches_switch_to_the_torch_step(tmp_path):
    from mmmamba.bench.run import _batch_sweep

    run, runner = _fake_run(tmp_path, batch_triton_max=4, batch_contexts=[64, 128]), _FakeRunner(fits=10)
    run.res["models"]["linear"]["kernels"] = runner.engine.kernels = "triton"
    _batch_sweep(run, "linear", runner)
    kernels = {(r["context"], r["batch"]): r["kernels"] for r in run.res["batch"] if r["status"] == "ok"}
    assert kernels[(64, 4)] == kernels[(128, 1)] == "triton" and kernels[(64, 8)] == kernels[(128, 8)] == "torch"
    assert runner.engine.kernels == "triton"  # restored after the sweep
