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
