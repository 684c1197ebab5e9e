"""`mmmamba bench --device cpu --tiny` runs end to end and writes well-formed JSON, markdown and PNGs."""

from __future__ import annotations

import json

import pytest
import torch

from mmmamba.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    rc = main(["bench", "--device", "cpu", "--tiny", "--out", str(out)])
    assert rc == 0
    assert torch.get_num_threads() == threads  # the smoke run's single thread is not left behind
    return out


def test_outputs_exist_and_parse(tiny_run):
    res = json.loads((tiny_run / "results.json").read_text())
    assert set(res) >= {"meta", "models", "decode", "prefill", "table2", "batch"}
    assert res["meta"]["tiny"] is True and res["meta"]["copy_bandwidth_GBps"] > 0
    assert set(res["models"]) == {"linear", "hybrid", "teacher", "teacher_hf"}  # mamba_ssm: not importable here
    for name, info in res["models"].items():
        assert info["status"] == "ok", (name, info)
        assert info["params"] > 0
    assert len(res["models"]["hybrid"]["attention_layers"]) == 1  # every:4 of 4 layers
    contexts = res["meta"]["options"]["contexts"]
    for name in res["models"]:
        pts = [r for r in res["decode"] if r["model"] == name and r["batch"] == 1]
        assert sorted(r["context"] for r in pts) == sorted(contexts)
        for r in pts:
            assert r["status"] == "ok", r
            assert r["ms_median"] > 0 and r["steps"] == res["meta"]["options"]["steps"]
            assert r["floor_ms"] > 0 and r["ratio"] > 0
        pre = [r for r in res["prefill"] if r["model"] == name]
        assert all(r["status"] == "ok" and r["seconds"] > 0 for r in pre) and len(pre) == len(contexts)
    t2 = {r["model"]: r for r in res["table2"]}
    assert set(t2) == set(res["models"])
    for r in t2.values():
        assert r["status"] == "ok" and r["out_tokens"] == res["meta"]["options"]["table2_out"]
        assert r["tokens_per_s"] > 0 and r["total_s"] >= r["prefill_s"] > 0


def test_table2_is_the_real_vision_path(tiny_run):
    """Issue 15 item 3: every Table 2 row ran an image through the pipeline and the vision front; its visual-token
    count is what the pipeline produced (224x112 -> 2x1 tiles + thumbnail, 16 tokens per 112-pixel tile)."""
    res = json.loads((tiny_run / "results.json").read_text())
    assert len(res["table2"]) == len(res["models"])
    for r in res["table2"]:
        assert r["vision"] == "real" and r["image"] == "224x112", r
        assert r["tiles"] == 3 and r["visual_tokens"] == r["vision_tokens_out"] == 3 * 16
        assert r["prompt_tokens"] == r["visual_tokens"] + r["text_tokens"] and r["text_tokens"] > 10
        assert r["vision_s"] > 0 and r["prefill_s"] > 0  # each stage on its own (timings: no order asserted)
        assert 0 < r["preprocess_s"] <= r["ttft_s"]  # medians over the same requests, TTFT includes preprocessing
        assert r["decode_tokens_per_s"] > 0
    md = (tiny_run / "report.md").read_text()
    assert md.count("| real |") == len(res["models"]) and "| ids |" not in md


def test_batch_search_runs_under_the_fake_limit(tiny_run):
    """Issue 15 item 4 on a CPU: doubling then bisection under the tiny run's fake memory limit, for our three
    models, with the analytic estimate beside the measured maximum."""
    res = json.loads((tiny_run / "results.json").read_text())
    ours = ("linear", "hybrid", "teacher")
    assert {(r["model"], r["context"]) for r in res["batch_max"]} == {(m, 64) for m in ours}
    top = {r["model"]: r for r in res["batch_max"]}
    for m in ours:
        r = top[m]
        assert r["status"] == "ok" and not r["capped"] and r["first_oom"] > r["max_batch"] >= 1
        assert 0.5 * r["estimate"]["analytic_max_batch"] <= r["max_batch"] <= r["estimate"]["analytic_max_batch"] + 1
        rows = {x["batch"]: x["status"] for x in res["batch"] if x["model"] == m}
        assert rows[r["max_batch"]] == "ok" and rows[r["first_oom"]] == "OOM"
        assert all(s == "ok" for b, s in rows.items() if b <= r["max_batch"])
    assert top["linear"]["max_batch"] > top["hybrid"]["max_batch"] > top["teacher"]["max_batch"]


def test_floor_grows_with_context_only_for_kv(tiny_run):
    res = json.loads((tiny_run / "results.json").read_text())
    by = {}
    for r in res["decode"]:
        by.setdefault(r["model"], {})[r["context"]] = r["floor_ms"]
    lin, teacher = by["linear"], by["teacher"]
    cs = sorted(lin)
    assert lin[cs[0]] == pytest.approx(lin[cs[-1]])  # recurrent state: constant
    assert teacher[cs[-1]] > teacher[cs[0]]  # KV cache grows


def test_markdown_and_plots(tiny_run):
    md = (tiny_run / "report.md").read_text()
    for section in ("## Next-token latency", "## Prefill time", "## Table 2", "## Decode throughput vs batch size",
                    "## Largest batch that fits", "## Method"):
        assert section in md
    pngs = sorted(p.name for p in tiny_run.glob("*.png"))
    assert pngs == ["batch_throughput.png", "figure1_latency_memory.png"]  # no floor-ratio plot on a CPU
    import matplotlib.image as mpimg

    for name in pngs:
        data = (tiny_run / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        img = mpimg.imread(str(tiny_run / name))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert f"]({name})" in md


def test_item13_cpu_run_is_labelled_as_cpu(tiny_run):
    """Issue 13 item 13: a CPU run says it is one and speaks of no HBM floor, GPU memory, CUDA graph or GPU goal
    (in report.md, summary.txt and the log); the tiny models' parameters are counted, not shown as "0.000 B"."""
    md = (tiny_run / "report.md").read_text()
    summary = (tiny_run / "summary.txt").read_text()
    assert md.splitlines()[0].endswith("(CPU run)")
    for text in (md, summary):
        for word in ("HBM", "GPU", "CUDA graph", "x floor", "goal:", "Goals (issue 4)", "**no**", "0.000 B"):
            assert word not in text, (word, text[:2000])
    assert "## Goals" not in md and "Peak GPU memory" not in md and "floor_ratio.png" not in md
    res = json.loads((tiny_run / "results.json").read_text())
    params = res["models"]["linear"]["params"]
    assert 1e3 < params < 1e6 and f"{params / 1e3:.1f} K" in md


def test_item13_gpu_report_keeps_floors_memory_and_goals(tmp_path):
    """The same report from a CUDA run's results still carries the floors, GPU memory, CUDA graphs and goals."""
    from mmmamba.bench.report import summary_table, write_markdown

    dec = {"model": "linear", "context": 1024, "batch": 1, "status": "ok", "ms_median": 2.0, "floor_ms": 1.6,
           "ratio": 1.25, "peak_gb": 5.5}
    res = {"meta": {"device": "cuda:0", "device_name": "H100", "tiny": False, "dtype": "bfloat16"},
           "models": {"linear": {"status": "ok", "params": 2_530_000_000, "attention_layers": [],
                                 "kernels": "triton", "cuda_graph": True}},
           "decode": [dec], "prefill": [], "table2": [], "batch": [], "kernel_compare": []}
    md = write_markdown(res, tmp_path / "report.md", [])
    assert "## Goals" in md and "Peak GPU memory" in md and "HBM floor" in md and "2.530 B" in md
    assert "CUDA graph" in md and "(CPU run)" not in md
    assert "x floor" in summary_table(res) and "goal:" in summary_table(res)


def test_goal_check_logic():
    from mmmamba.bench.report import check_goals

    def dec(model, ctx, ms, floor):
        return {"model": model, "context": ctx, "batch": 1, "status": "ok", "ms_median": ms, "floor_ms": floor,
                "ratio": ms / floor, "peak_gb": 5.5}

    res = {"meta": {"tiny": False}, "models": {"linear": {}, "hybrid": {}, "mamba_ssm": {}},
           "decode": [dec("linear", 1024, 2.0, 1.6), dec("linear", 131072, 2.05, 1.6),
                      dec("hybrid", 1024, 2.5, 1.7), dec("hybrid", 131072, 4.0, 2.0),
                      dec("mamba_ssm", 1024, 3.4, 1.7), dec("mamba_ssm", 131072, 3.5, 1.7)],
           "prefill": [{"model": "linear", "context": 131072, "status": "ok", "seconds": 1.05, "peak_gb": 5.9}]}
    goals = {g["goal"].split(" ")[0] + str(i): g["met"] for i, g in enumerate(check_goals(res))}
    assert list(goals.values()) == [True, False, True, True, True, True]


def test_bench_subcommand_options(tmp_path):
    rc = main(["bench", "--device", "cpu", "--tiny", "--out", str(tmp_path), "--models", "linear",
               "--contexts", "16,48", "--table2-out", "0", "--batch-sizes", "3", "--steps", "3",
               "--batch-contexts", "32", "--batch-max", "4"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["models"]) == ["linear"] and res["table2"] == []
    assert sorted(r["context"] for r in res["decode"]) == [16, 48]
    assert all(r["steps"] == 3 for r in res["decode"])
    assert [(r["batch"], r["phase"]) for r in res["batch"]] == [(3, "list"), (1, "search"), (2, "search"),
                                                                (4, "search")]
    (top,) = res["batch_max"]
    assert top["context"] == 32 and top["capped"] and top["max_batch"] == 4 and top["first_oom"] is None
    rc = main(["bench", "--device", "cpu", "--tiny", "--out", str(tmp_path), "--models", "linear", "--contexts", "16",
               "--table2-out", "0", "--batch-sizes", "1,2", "--no-batch-search"])
    res = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0 and [r["batch"] for r in res["batch"]] == [1, 2]
    assert res["batch_max"][0]["status"] == "not searched (--no-batch-search)"


def test_table2_ids_variant_is_labelled(tmp_path):
    rc = main(["bench", "--device", "cpu", "--tiny", "--out", str(tmp_path), "--models", "linear", "--contexts", "16",
               "--table2-vision", "both", "--table2-out", "4", "--batch-models", ""])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["vision"] for r in res["table2"]] == ["real", "ids"] and res["batch"] == res["batch_max"] == []
    ids = res["table2"][1]
    assert ids["prompt_tokens"] == ids["visual_tokens"] + ids["text_tokens"] == 16 + 8
    md = (tmp_path / "report.md").read_text()
    assert "| real |" in md and "| ids |" in md


def test_bad_table2_image_size_fails_early(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--tiny", "--out", str(tmp_path), "--table2-image", "896"]) == 2
    assert "must look like WIDTHxHEIGHT" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
