"""Shared pieces of the quality study: data from `prepare.py`'s arrays, one distillation run, text metrics."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

DATA = Path(os.environ.get("STUDY_DATA", ".carry/study"))
TRAIN_SOURCES = ("pydocs", "wordnet", "pydoc_topics")
HELDOUT_SETS = ("kjv", "gcide", "pydocs", "wordnet", "pydoc_topics")


def write_json(path: Path, obj) -> None:
    """Atomic JSON write; non-finite floats become null, so the file stays valid JSON (`mmmamba.io`)."""
    from mmmamba.io import atomic_write_text, json_text

    atomic_write_text(path, json_text(obj, indent=2) + "\n")


def environment() -> dict:
    """Who ran it where: card, date, versions, commit."""
    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
           "python": platform.python_version(), "device": "cpu"}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    env["commit"] = os.environ.get("STUDY_COMMIT")  # the GPU machine gets the tree without .git
    if not env["commit"]:
        try:
            env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["commit"] = None
    import transformers

    env["transformers"] = transformers.__version__
    return env


def load_tokens(name: str, split: str, root: Path = DATA) -> np.ndarray:
    return np.load(root / "text" / f"{name}.{split}.npy")


class PackedWindows(Dataset):
    """Non-overlapping windows of `seq_len` tokens of one token array (the trainer's `text_mode: pack`)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype(np.int64))


def _collate(rows: list[torch.Tensor]) -> dict:
    ids = torch.stack(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def packed_data(tokens: np.ndarray, seq_len: int):
    """A `run_distill(data=...)` callable: shuffled packed windows, micro-batches of the stage's size. The
    trainer's DataStream draws each epoch's order from (seed, epoch), so runs are reproducible and resumable."""
    def make(cfg, tokenizer, model_config, micro_batch_size, seed):
        return DataLoader(PackedWindows(tokens, seq_len), batch_size=micro_batch_size, shuffle=True, drop_last=True,
                          collate_fn=_collate)
    return make


def stage_summary(out_dir: Path, stage: int) -> dict:
    """First and last logged loss of a stage, from its JSONL log."""
    path = out_dir / "logs" / f"stage{stage}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return {}
    return {"first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "logged": len(rows),
            "tokens_per_s": rows[-1].get("tokens_per_s"), "tokens_counted": rows[-1].get("tokens"),
            "curve": [[r.get("step"), r["loss"]] for r in rows]}


def stage_tokens(cfg, summary: dict) -> int | None:
    """Fixed-length windows: batch x seq_len x steps; conversations (seq_len None): what the trainer counted."""
    return cfg.batch_size * cfg.seq_len * cfg.steps if cfg.seq_len else summary.get("tokens_counted")


def distill(teacher: str, out_dir: Path, placement, stages: dict, *, init: str = "mimic", data=None,
            data_cfg: dict | None = None, seed: int = 0, cuda_graph: bool = False, run_stages=(1, 2, 3),
            student: str | None = None, stages12_from: Path | None = None, log=print) -> dict:
    """Seed from `teacher` (or start from the seeded `student` folder) and run `run_stages` of the three-stage
    recipe with the framework's trainer.

    `stages`: {k: {steps, batch_size, micro_batch_size, lr, seq_len?, loss?}}; returns per-stage wall time, steps,
    tokens and losses, and the folder of the last stage. `stages12_from`: the output folder of an earlier run of
    the same teacher and stage 1-2 settings; stages 1-2 train every layer as Mamba-2 whatever the placement (which
    only acts in stage 3), so a second placement needs only stage 3, from that run's stage 2. A `run_stages`
    without stage 1 (the stage ablation, PAPER Table 3) starts its first stage from the seed (`seed_folder`), and
    each later stage from the last one run; none at all leaves the seeded student."""
    from mmmamba.distill.recipe import parse_recipe
    from mmmamba.distill.trainer import StageRunner

    common = dict(log_every=5, save_every=10**9, keep_checkpoints=0, warmup=0.1, decay=0.1, cuda_graph=cuda_graph)
    raw = {"name": out_dir.name, "teacher": teacher, "output_dir": str(out_dir), "seed": seed, "init": init,
           "student": student,
           "placement": placement, "data": data_cfg or {}, "precision": "auto", "defaults": common,
           "stages": {k: v for k, v in stages.items()}}
    if stages12_from is not None:
        raw["stages"][3] = {**raw["stages"][3], "input": str(Path(stages12_from) / "stage2"), "input_stage": 2}
        run_stages = (3,)
    else:  # a stage subset: each stage after a gap starts from the seed or the last stage run
        first = ["seed"] if 1 not in run_stages else []
        for prev, k in zip(first + list(run_stages), run_stages[1 - len(first):]):
            if prev == "seed":
                src = seed_folder(teacher, out_dir / "seed", init, seed, student=student)
            else:
                src = out_dir / f"stage{prev}"
            if prev == "seed" or k != prev + 1:
                raw["stages"][k] = {**raw["stages"][k], "input": str(src), "input_stage": prev}
    recipe = parse_recipe(raw, source="examples/quality")
    result, folder = {"init": init, "placement": placement, "stages": {}}, None
    if stages12_from is not None:
        result["stages12_from"] = str(stages12_from)
        for k in (1, 2):
            cfg = recipe.stages[k]
            summary = stage_summary(Path(stages12_from), k)
            result["stages"][k] = {"seconds": None, "shared": True, "steps": cfg.steps, "lr": cfg.lr,
                                   "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                                   "tokens": stage_tokens(cfg, summary), **summary}
    for k in run_stages:
        t0 = time.time()
        folder = StageRunner(recipe, k, data=data, progress=False, log=log).run()
        cfg, summary = recipe.stages[k], stage_summary(out_dir, k)
        result["stages"][k] = {"seconds": round(time.time() - t0, 1), "steps": cfg.steps, "lr": cfg.lr,
                               "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                               "tokens": stage_tokens(cfg, summary), **summary}
    result["folder"] = str(folder or seed_folder(teacher, out_dir / "seed", init, seed, student=student))
    return result


def seed_folder(teacher: str, out: Path, init: str, seed: int, *, student: str | None = None) -> Path:
    """The seeded all-Mamba-2 student (PAPER §4.5) as stage 1 would write it, for runs that skip stage 1 (or
    `student`, an already seeded folder, as it is)."""
    if student is not None:
        return Path(student)
    from transformers import AutoTokenizer

    from mmmamba.distill.manifest import read_manifest, teacher_identity
    from mmmamba.distill.seed import save_seed, seed_student
    from mmmamba.teachers.hf import load_teacher, resolve_teacher

    if out.is_dir() and (read_manifest(out) or {}).get("init") == init:
        return out
    path = resolve_teacher(teacher)
    model = seed_student(load_teacher(path).eval(), None, mode=init, seed=seed)
    save_seed(model, out, teacher_identity(path, spec=str(teacher)), AutoTokenizer.from_pretrained(path), init=init,
              seed=seed)
    return out


@torch.no_grad()
def text_eval(model, sets: dict[str, np.ndarray], *, teacher=None, tokens: int = 32768, window: int = 1024,
              batch_size: int = 8) -> dict:
    """Held-out perplexity (and, with a teacher, top-1 agreement and KL) on the first `tokens` of each set,
    through `mmmamba.eval.text_metrics`."""
    from mmmamba.eval import text_metrics

    out = {}
    for name, arr in sets.items():
        ids = torch.from_numpy(arr[:tokens].astype(np.int64))
        out[name] = text_metrics(model, ids, window=window, stride=window // 2, teacher=teacher,
                                 batch_size=batch_size)
    return out


@torch.no_grad()
def sample_texts(model, tok, prompts: list[dict], max_new_tokens: int = 48, seed: int = 0) -> list[dict]:
    """Greedy and sampled (T 0.7, top-p 0.9) completions of each prompt ({"text", "chat"})."""
    rows = []
    for p in prompts:
        text = p["text"]
        if p.get("chat"):
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
        row = {"prompt": p["text"], "chat": bool(p.get("chat"))}
        for mode, kw in (("greedy", {}), ("sampled", dict(do_sample=True, temperature=0.7, top_p=0.9))):
            gen = torch.Generator(device=model.device).manual_seed(seed)
            out = model.generate(ids, max_new_tokens=max_new_tokens, generator=gen, **kw)
            row[mode] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        rows.append(row)
    return rows
