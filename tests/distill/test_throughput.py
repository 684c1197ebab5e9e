"""`mmmamba bench-train` on the CPU (tiny dims, 2 steps): files, numbers and the kernel switches restored; the
micro-batch search and its out-of-memory handling with a stand-in for the GPU's limit."""

from __future__ import annotations

import json

import pytest
import torch

from mmmamba import MMMambaForCausalLM
from mmmamba.cli import build_parser
from mmmamba.distill.seed import seed_student
from mmmamba.distill.throughput import (
    StageBench,
    TrainBenchOptions,
    is_oom,
    largest_fitting,
    options_from_args,
    peak_bf16_tflops,
    run_train_bench,
)
from mmmamba.distill.train_cost import step_flops
from mmmamba.models.dims import dims_config
from mmmamba.ops.checked import kernels_off


@pytest.mark.parametrize("limit,cap,want", [(13, 64, 13), (64, 64, 64), (200, 64, 64), (1, 64, 1), (0, 64, 0),
                                            (47, 100, 47)])
def test_largest_fitting_doubles_then_bisects(limit, cap, want):
    b, trials = largest_fitting(lambda b: b <= limit, cap)
    assert b == want
    assert all(ok == (t <= limit) for t, ok in trials)
    assert len(trials) <= 2 * cap.bit_length() + 1
    assert len({t for t, _ in trials}) == len(trials)  # no size tried twice


def test_is_oom_and_peaks():
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0 and peak_bf16_tflops("Some GPU") is None


def test_fits_catches_out_of_memory_and_frees_gradients(monkeypatch):
    """A step that runs out of memory above 3 rows: the search finds 3 and no gradient is left behind."""
    teacher = MMMambaForCausalLM(dims_config("tiny")).eval().requires_grad_(False)
    opts = TrainBenchOptions(dims=["tiny"], seq=16, device="cpu")
    sb = StageBench(3, seed_student(teacher, None), teacher, opts, torch.device("cpu"), log=lambda m: None)
    real = sb.step_fn

    def step_fn(b, graph=False):
        step = real(b, graph)

        def limited():
            loss = step()
            if b > 3:  # the gradients exist when the error comes, as in a backward that fails midway
                for p in sb.params:
                    p.grad = torch.ones_like(p)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
            return loss

        return limited

    monkeypatch.setattr(sb, "step_fn", step_fn)
    assert largest_fitting(sb.fits, 8)[0] == 3
    assert all(p.grad is None for p in sb.params)


def test_cpu_run_writes_results(tmp_path):
    opts = TrainBenchOptions(dims=["tiny"], stages=[1, 3], seq=32, micro_batch=2, steps=2, warmup=0, profile=False,
                             device="cpu", out=str(tmp_path / "out"))
    res = run_train_bench(opts, log=lambda m: None)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(res["runs"]))
    assert [r["stage"] for r in saved["runs"]] == [1, 3]
    for r in saved["runs"]:
        assert r["micro_batch"] == 2 and r["layers"] == "MMMM"
        for name in ("on", "off", "on again"):
            v = r["variants"][name]
            assert v["tokens_per_s"] > 0 and v["mfu"] is None and v["loss"] == v["loss"]  # finite, no MFU on a CPU
            assert v["tflop_s"] == pytest.approx(r["flops_per_token"]["total"] * v["tokens_per_s"] / 1e12)
        assert r["memory_estimate_gib"]["total"] > 0
    student = seed_student(MMMambaForCausalLM(dims_config("tiny")), None)
    from mmmamba.distill.stages import set_trainable

    assert saved["runs"][1]["flops_per_token"] == step_flops(student.config, 3, 32, set_trainable(student, 3))
    assert kernels_off() == frozenset()  # the switches are back on
    assert "| tiny | 3 |" in (tmp_path / "out" / "report.md").read_text()


def test_cli_options(tmp_path):
    args = build_parser().parse_args(["bench-train", "--dims", "hovle-2.6b,smollm2", "--stages", "1,3",
                                      "--budget-s", "300", "--checkpointing", "on", "--out", str(tmp_path)])
    o = options_from_args(args)
    assert o.dims == ["hovle-2.6b", "smollm2"] and o.stages == [1, 3] and o.budget_s == 300
    assert o.checkpointing == "on" and o.kernels_ab and o.micro_batch is None
    with pytest.raises(ValueError, match="dims from"):
        run_train_bench(TrainBenchOptions(dims=["llama-70b"], device="cpu"))


def test_largest_fitting_stops_with_the_best_so_far():
    tried = []
    b, trials = largest_fitting(lambda b: tried.append(b) or b <= 40, 64, stop=lambda: len(tried) >= 3)
    assert b == 4 and [t for t, _ in trials] == [1, 2, 4]


def test_report_of_a_gpu_run():
    """The markdown of a GPU-shaped result: MFU, peaks, kernel groups, an out-of-memory variant, a skipped one and
    the micro-batch search."""
    from mmmamba.distill.throughput import report_markdown

    prof = {"total_ms": 90.0, "launches": 3000, "groups": {"gemm": {"ms": 60.0, "share": 0.6, "launches": 900}}}
    on = {"tokens_per_s": 300000.0, "tflop_s": 120.0, "mfu": 120 / 989, "peak_gib": 61.5, "gpu_busy": 0.9,
          "profile": prof}
    res = {"device": "NVIDIA H100 80GB HBM3", "peak_bf16_tflops": 989.0, "torch": "2.11", "started": "now",
           "options": {"seq": 2048, "command": "mmmamba bench-train --dims hovle-2.6b"},
           "runs": [{"dims": "hovle-2.6b", "stage": 3, "layers": "M" * 32, "checkpointing": False, "micro_batch": 9,
                     "memory_estimate_gib": {"student_fp32": 9.4, "total": 70.1},
                     "search": [{"checkpointing": False, "largest": 9, "stopped_by_budget": False,
                                 "trials": [[1, True], [2, True], [4, True], [8, True], [16, False], [12, False],
                                            [10, False], [9, True]]}],
                     "variants": {"on": on, "off": {"error": "out of memory while timing"}}},
                    {"dims": "hovle-2.6b", "stage": 1, "layers": "M" * 32, "checkpointing": False,
                     "micro_batch": 20, "variants": {"on": on, "off": {"skipped": "time budget (3 s left)"}}}]}
    md = report_markdown(res)
    assert "| hovle-2.6b | 3 | 32 (0 attn) | off | 9 | on | 300,000 | 120 | 12.1 % | 61.50 | 70.1 | 90% |" in md
    assert "off: out of memory while timing" in md and "off: skipped, time budget (3 s left)" in md
    assert "gemm 60.0 ms (60%)" in md and "16 OOM, 12 OOM, 10 OOM, 9 fits -> 9" in md


def test_spent_budget_skips_stages(tmp_path):
    res = run_train_bench(TrainBenchOptions(dims=["tiny"], stages=[1, 2], budget_s=0, device="cpu",
                                            out=str(tmp_path)), log=lambda m: None)
    assert [r["skipped"].startswith("time budget") for r in res["runs"]] == [True, True]
    assert "| tiny | 2 | skipped: time budget" in (tmp_path / "report.md").read_text()
