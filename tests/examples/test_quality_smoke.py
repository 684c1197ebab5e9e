"""CPU smoke runs of examples/quality (tiny teacher, tiny data, a few steps) so the study's scripts cannot rot."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parents[2] / "examples" / "quality"


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_llama_dir, smollm2_tokenizer):
    """STUDY_DATA in prepare.py's layout, made from pydoc topics and random images (no Debian packages needed)."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("study")
    (root / "text").mkdir()
    (root / "vlm").mkdir()
    ids = np.asarray(smollm2_tokenizer("\n\n".join(topics.values()), add_special_tokens=False).input_ids[:30000],
                     dtype=np.uint16)
    for i, name in enumerate(("pydocs", "wordnet", "pydoc_topics", "kjv", "gcide")):
        chunk = ids[i * 6000:(i + 1) * 6000]
        np.save(root / "text" / f"{name}.heldout.npy", chunk[:1000])
        if name not in ("kjv", "gcide"):
            np.save(root / "text" / f"{name}.train.npy", chunk[1000:])
    rng = np.random.default_rng(0)
    np.savez_compressed(root / "vlm" / "fmnist.npz", train_images=rng.integers(0, 255, (16, 28, 28), np.uint8),
                        train_labels=rng.integers(0, 10, 16, np.uint8))
    (root / "vlm" / "fmnist_test").mkdir()  # idx files, as Debian's dataset-fashion-mnist ships them
    with gzip.open(root / "vlm" / "fmnist_test" / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes(16) + rng.integers(0, 255, 8 * 784, np.uint8).tobytes())
    with gzip.open(root / "vlm" / "fmnist_test" / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes(8) + rng.integers(0, 10, 8, np.uint8).tobytes())
    names = np.array([f"thing {i}" for i in range(12)])
    np.savez_compressed(root / "vlm" / "emoji.npz", images=rng.integers(0, 255, (12, 64, 64, 3), np.uint8),
                        names=names, split=np.array(["train"] * 8 + ["heldout"] * 4))
    return root, tiny_llama_dir, tmp_path_factory.mktemp("work")


def _run(script: str, args: list[str], data: Path, timeout: int = 600) -> None:
    env = {**os.environ, "STUDY_DATA": str(data), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(HERE / script), *args], cwd=HERE, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_text_study_phases_and_report(study, tmp_path):
    data, teacher, work = study
    common = ["--teacher", str(teacher), "--work", str(work), "--eval-tokens", "256", "--window", "64",
              "--show-tokens", "3"]
    _run("text_study.py", common + ["--out", str(tmp_path / "text_teacher.json"), "samples", "--n-prompts", "4",
                                    "--batch", "4", "--max-new-tokens", "6"], data)
    _run("text_study.py", common + ["--out", str(tmp_path / "text_hybrid.json"), "student", "--name", "hybrid",
                                    "--steps", "2,2,2", "--batch", "2", "--micro-batch", "2", "--seq-len", "32"], data)
    _run("text_study.py", common + ["--out", str(tmp_path / "text_linear.json"), "student", "--name", "linear",
                                    "--placement", "none", "--init", "calibrated", "--steps", "2,2,2", "--batch", "2",
                                    "--micro-batch", "2", "--seq-len", "32"], data)
    _run("text_study.py", common + ["--out", str(tmp_path / "text_linear-shared.json"), "student", "--name",
                                    "linear-shared", "--placement", "none", "--stages12-from", "hybrid", "--steps",
                                    "2,2,2", "--batch", "2", "--micro-batch", "2", "--seq-len", "32"], data)
    _run("text_study.py", common + ["--out", str(tmp_path / "text_hybrid-lrx2.json"), "student", "--name",
                                    "hybrid-lrx2", "--lr-scale", "2", "--steps", "2,2,2", "--batch", "2",
                                    "--micro-batch", "2", "--seq-len", "32"], data)
    lrx2 = json.loads((tmp_path / "text_hybrid-lrx2.json").read_text())["distill"]["stages"]
    assert [lrx2[k]["lr"] for k in "123"] == pytest.approx([2e-3, 1e-3, 4e-4])
    shared = json.loads((tmp_path / "text_linear-shared.json").read_text())
    assert shared["distill"]["stages"]["1"]["shared"] and shared["mamba_layers"] == 4
    assert shared["distill"]["stages"]["2"]["last_loss"] == json.loads(
        (tmp_path / "text_hybrid.json").read_text())["distill"]["stages"]["2"]["last_loss"]
    t = json.loads((tmp_path / "text_teacher.json").read_text())
    assert t["sample_tokens"]["train"] > 0 and set(t["heldout"]) >= {"kjv", "gcide", "pydocs", "teacher_samples"}
    for name in ("hybrid", "linear"):
        r = json.loads((tmp_path / f"text_{name}.json").read_text())
        assert set(r["distill"]["stages"]) == {"1", "2", "3"}
        assert all(0 <= v["top1_agreement"] <= 1 and v["kl_to_teacher"] >= 0 for v in r["heldout"].values())
    assert json.loads((tmp_path / "text_linear.json").read_text())["mamba_layers"] == 4
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, str(HERE / "report.py"), "--raw", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "README.md").read_text()
    assert "| hybrid |" in md and "| linear |" in md and (out / "text_loss_curves.png").exists()
    assert "## 4. Ablations in miniature (text model)\n\nNot run yet." in md

    # the ablation driver: stage subsets (seeding only; stages 2+3 from the seed) and placements on shared stages 1-2
    passthrough = ["--", *common, "student", "--steps", "2,2,2", "--batch", "2", "--micro-batch", "2", "--seq-len",
                   "32"]
    _run("ablate.py", ["--table", "3", "--only", "none,S1+S3,S2+S3", "--layers", "4", "--raw", str(tmp_path),
                       *passthrough], data)
    _run("ablate.py", ["--table", "6", "--only", "tail-interleaved,auto", "--layers", "4", "--raw", str(tmp_path),
                       *passthrough], data)
    seed_only = json.loads((tmp_path / "ablation_t3_none.json").read_text())
    s23 = json.loads((tmp_path / "ablation_t3_S2+S3.json").read_text())
    assert seed_only["stages_run"] == [] and seed_only["tokens_seen"] == 0
    assert s23["stages_run"] == [2, 3] and s23["distill"]["stages"]["2"]["steps"] == 3  # 6 steps over 2 stages
    assert s23["mamba_layers"] == 4 and s23["distill"]["stages"]["3"]["seconds"] > 0
    assert json.loads((tmp_path / "ablation_t3_S1+S3.json").read_text())["stages_run"] == [1, 3]
    auto = json.loads((tmp_path / "ablation_t6_auto.json").read_text())
    assert len(auto["attention_layers"]) == 1 and auto["distill"]["stages"]["1"]["shared"]
    assert json.loads((tmp_path / "ablation_t6_tail-interleaved.json").read_text())["attention_layers"] == [3]
    x2 = json.loads((tmp_path / "text_hybrid.json").read_text())  # the report's budget section groups by name
    x2["tokens_seen"] *= 2
    (tmp_path / "text_hybrid-x2.json").write_text(json.dumps(x2))
    for stage in x2["distill"]["stages"].values():  # the same tokens in larger steps
        stage["batch_size"] *= 2
    (tmp_path / "text_hybrid-b4.json").write_text(json.dumps(x2))
    r = subprocess.run([sys.executable, str(HERE / "report.py"), "--raw", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "README.md").read_text()
    assert "| S2+S3 |" in md and "| none |" in md and "| auto |" in md and (out / "ablations.png").exists()
    budget = md.split("## 5. Budget")[1]
    assert budget.index("| hybrid |") < budget.index("| hybrid-b4 |") < budget.index("| hybrid-x2 |")
    assert "| 4 × 32 |" in budget and (out / "budget.png").exists()
    assert "| hybrid-lrx2 | 0.002 / 0.001 / 0.0004 |" in md.split("## 6. Learning rate")[1]
    gate = md.split("## 3.")[1].split("## 4.")[0]  # inits only: budget and learning-rate runs are not init variants
    assert "| x2 |" not in gate and "| lrx2 |" not in gate


def test_vlm_study_teacher_and_student(study, tmp_path):
    pytest.importorskip("easy_vqa")
    data, teacher, work = study
    common = ["--teacher", str(teacher), "--work", str(work), "--eval-tokens", "128", "--window", "64",
              "--workers", "0", "--train-limit", "8", "--eval-limit", "4", "--eval-batch", "4", "--no-progress"]
    _run("vlm_study.py", common + ["--out", str(tmp_path / "vlm_teacher.json"), "teacher", "--steps", "3",
                                   "--batch", "4", "--text-rows", "4"], data)
    _run("vlm_study.py", common + ["--out", str(tmp_path / "vlm_hybrid.json"), "student", "--name", "hybrid",
                                   "--steps", "1,1,1", "--batch", "2", "--micro-batch", "2", "--text-mix-tokens",
                                   "4000"], data)
    t = json.loads((tmp_path / "vlm_teacher.json").read_text())
    s = json.loads((tmp_path / "vlm_hybrid.json").read_text())
    for r in (t, s):
        assert {"easy-vqa", "fashion-mnist", "emoji-unseen", "text"} <= set(r["eval"])
        assert r["eval"]["easy-vqa"]["n"] == 4
    assert s["attention_layers"] and s["mamba_layers"] > 0
    mix = (work / "vlm_data" / "text_mix.txt").read_text()  # the students' plain-text share, decoded
    assert s["tokens_seen"] > 0 and all(v["tokens"] > 0 for v in s["distill"]["stages"].values())
    assert s["text_mix_tokens"] == 4000 and 1000 < len(mix.split()) and mix.count("\n\n") >= 1


def test_budget_from_a_missing_warmup_is_an_error(tmp_path, monkeypatch):
    """A --budget-from file that is not there must stop the run, not fall back to the default steps."""
    monkeypatch.syspath_prepend(str(HERE))
    import text_study

    args = text_study.build_parser().parse_args(["--out", "-", "student", "--name", "x", "--budget-from",
                                                 str(tmp_path / "warmup.json")])
    with pytest.raises(SystemExit, match="no such file"):
        text_study.stage_settings(args)
