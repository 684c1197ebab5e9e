"""Quality study, vision-language: a HoVLE-style VLM teacher built on SmolLM2, then distilled to hybrid and linear.

    python examples/quality/vlm_study.py teacher --out OUT/vlm_teacher.json --work /tmp/study
        build the VLM (`mmmamba.teachers.vlm.build_vlm`: patch-embedding vision front + new decoder layers in front
        of SmolLM2), fine-tune it (`mmmamba.distill.sft`) on easy-VQA train, Fashion-MNIST train, Noto-emoji naming
        and text conversations (the teacher's own chat samples, when `text_study.py samples` ran before), evaluate
    python examples/quality/vlm_study.py student --name hybrid --placement every:4 --out OUT/vlm_hybrid.json
        three-stage distillation of that VLM with the framework's trainer, then the same evaluation

Evaluation (`mmmamba.eval.evaluate`): easy-VQA test (9,673 questions), Fashion-MNIST test as multiple choice and as
open answer, a 4-way multiple-choice emoji-name set (emoji never seen in training, and seen ones), and held-out text
perplexity against SmolLM2's (`mmmamba.eval.text_metrics`).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import DATA, HELDOUT_SETS, distill, environment, load_tokens, text_eval, write_json

from mmmamba.data.corpora import FASHION_MNIST_CLASSES
from mmmamba.eval import prompts
from mmmamba.eval.builtin import FASHION_QUESTION

# the evaluation's own prompt wording (mmmamba.eval.prompts), so training and test prompts cannot drift apart
SHORT = "\n" + prompts.SHORT
MCQ = "\n" + prompts.MC
LETTERS = "ABCDEFGHIJ"
TEXT_MIX = ("pydocs", "wordnet")  # the students' plain-text share (`student --text-mix-tokens`)


def mcq_text(question: str, options: list[str]) -> str:
    return question + "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options)) + MCQ


def _row(rid: str, image: str | None, question: str, answer: str) -> dict:
    row = {"id": rid, "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question},
                                        {"from": "gpt", "value": answer}]}
    if image:
        row["image"] = image
    return row


def write_images(work: Path, rng: np.random.Generator, limit: int | None = None) -> list[dict]:
    """Training rows (easy-VQA train, Fashion-MNIST train, emoji train; each cut to `limit`) with PNGs under
    work/vlm_data."""
    import easy_vqa
    from PIL import Image

    out = work / "vlm_data"
    (out / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    qs, ans, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    for i, (q, a, k) in enumerate(list(zip(qs, ans, ids))[:limit]):
        rows.append(_row(f"evqa-{i}", str(Path(paths[k]).resolve()), q[:1].upper() + q[1:] + SHORT, a))
    fm = np.load(DATA / "vlm" / "fmnist.npz")
    for i, (img, lab) in enumerate(list(zip(fm["train_images"], fm["train_labels"]))[:limit]):
        p = out / "img" / f"fm-{i}.png"
        Image.fromarray(img, mode="L").convert("RGB").save(p)
        name = FASHION_MNIST_CLASSES[int(lab)]
        if i % 2:
            rows.append(_row(f"fm-{i}", str(p), FASHION_QUESTION + SHORT, name))
        else:
            order = list(rng.permutation(10))
            rows.append(_row(f"fm-{i}", str(p), mcq_text(FASHION_QUESTION,
                                                         [FASHION_MNIST_CLASSES[j] for j in order]),
                             LETTERS[order.index(int(lab))]))
    em = np.load(DATA / "vlm" / "emoji.npz")
    names = list(em["names"])
    for i, (img, name, split) in enumerate(zip(em["images"], names, em["split"])):
        if split != "train":
            continue
        p = out / "img" / f"emoji-{i}.png"
        Image.fromarray(img).save(p)
        for r in range(3):  # few images: repeat each, once open and twice as a 4-way choice
            if r == 0:
                rows.append(_row(f"emoji-{i}-{r}", str(p), "What is this emoji?" + SHORT, name))
            else:
                opts = emoji_options(names, name, rng)
                rows.append(_row(f"emoji-{i}-{r}", str(p), mcq_text("What is this emoji?", opts),
                                 LETTERS[opts.index(name)]))
    return rows


def emoji_options(names: list[str], name: str, rng: np.random.Generator) -> list[str]:
    others = [n for n in rng.choice(len(names), 4, replace=False) if names[n] != name][:3]
    opts = [names[j] for j in others] + [name]
    rng.shuffle(opts)
    return opts


def text_rows(work: Path, limit: int) -> list[dict]:
    """The teacher's own chat samples (prompt, completion) as text-only conversations: keep its text behaviour."""
    path = work / "teacher_samples.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [_row(f"text-{i}", None, r["prompt"], r["completion"]) for i, r in enumerate(rows)
            if r["chat"] and r["completion"].strip()][:limit]


def emoji_tsv(work: Path, split: str, rng: np.random.Generator) -> Path:
    """A VLMEvalKit-format multiple-choice TSV (base64 PNGs) of the emoji of one split."""
    from PIL import Image

    em = np.load(DATA / "vlm" / "emoji.npz")
    names = list(em["names"])
    path = work / f"emoji_{split}.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "A", "B", "C", "D", "answer", "image", "category"])
        for i, (img, name, s) in enumerate(zip(em["images"], names, em["split"])):
            if s != split:
                continue
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            opts = emoji_options(names, name, rng)
            w.writerow([i, "What is this emoji?", *opts, LETTERS[opts.index(name)],
                        base64.b64encode(buf.getvalue()).decode(), "emoji"])
    return path


def benches(work: Path, limit: int | None) -> dict:
    """The evaluation sets: easy-VQA test, Fashion-MNIST test (multiple choice and open; the idx files carried in
    STUDY_DATA/vlm/fmnist_test, else Debian's), emoji multiple choice (unseen and seen emoji)."""
    from mmmamba.eval.builtin import FASHION_MNIST_DIR, easy_vqa_bench, fashion_mnist_bench

    root = DATA / "vlm" / "fmnist_test"
    root = root if root.is_dir() else FASHION_MNIST_DIR
    rng = np.random.default_rng(1)
    return {"easy-vqa": easy_vqa_bench(limit),
            "fashion-mnist": fashion_mnist_bench(open_answer=False, limit=limit, root=root),
            "fashion-mnist-open": fashion_mnist_bench(open_answer=True, limit=limit, root=root),
            "emoji-unseen": str(emoji_tsv(work, "heldout", rng)), "emoji-seen": str(emoji_tsv(work, "train", rng))}


def vlm_eval(model, tok, work: Path, args, smollm2=None) -> dict:
    """`mmmamba.eval.evaluate` on every set (greedy, batched, the reference generation loop) + held-out text."""
    from mmmamba.eval import evaluate

    out = {}
    for name, bench in benches(work, args.eval_limit).items():
        t0 = time.time()
        r = evaluate(model, tok, bench, limit=args.eval_limit, batch_size=args.eval_batch, progress=False,
                     engine=False)
        keep = ("index", "question", "answer", "prediction", "extracted", "score")
        out[name] = {"n": r["n"], "metrics": r["metrics"], "seconds": round(time.time() - t0, 1),
                     "examples": [{k: p.get(k) for k in keep} for p in r["predictions"][:6]]}
        print(f"{name}: {r['metrics']}", flush=True)
    sets = {n: load_tokens(n, "heldout") for n in HELDOUT_SETS}
    out["text"] = text_eval(model, sets, tokens=args.eval_tokens, window=args.window)
    if smollm2 is not None:
        out["text_smollm2"] = text_eval(smollm2, sets, tokens=args.eval_tokens, window=args.window)
    return out


def training_jsonl(work: Path, args) -> tuple[Path, dict]:
    rng = np.random.default_rng(args.seed)
    rows = write_images(work, rng, args.train_limit) + text_rows(work, args.text_rows)
    rng.shuffle(rows)
    path = work / "vlm_data" / "train.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    kinds = {}
    for r in rows:
        k = r["id"].split("-")[0]
        kinds[k] = kinds.get(k, 0) + 1
    return path, kinds


def text_mix(work: Path, tok, tokens: int) -> Path | None:
    """Plain text for the students' distillation mix: the text study's training splits (TEXT_MIX), decoded, `tokens`
    in all. Distilled on the VLM rows alone (512 text rows of 72K), the H100 students of 2026-12-07 lost SmolLM2's
    text (25x / 44x its held-out perplexity) although their teacher had kept it (1.06x)."""
    if tokens <= 0:
        return None
    path = work / "vlm_data" / "text_mix.txt"
    per = tokens // len(TEXT_MIX)
    path.write_text("\n\n".join(tok.decode(load_tokens(n, "train")[:per].astype(np.int64).tolist())
                                for n in TEXT_MIX))
    return path


def data_cfg(path: Path, num_workers: int, text: Path | None = None) -> dict:
    sources = [{"type": "jsonl", "path": str(path), "split": "train"}]
    if text is not None:  # one document, cut into max_length windows
        sources.append({"type": "text", "path": str(text), "split": "train", "name": "text-mix"})
    return {"sources": sources, "max_length": 768, "pad_to_multiple_of": 64, "num_workers": num_workers,
            "check_images": "header"}


def cmd_teacher(args) -> int:
    from transformers import AutoTokenizer

    from mmmamba.distill.data import build_dataloader
    from mmmamba.distill.sft import train_sft
    from mmmamba.io import save_model
    from mmmamba.teachers.hf import load_teacher, resolve_teacher
    from mmmamba.teachers.vlm import build_vlm

    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    path = resolve_teacher(args.teacher)
    tok = AutoTokenizer.from_pretrained(path)
    llm = load_teacher(path)
    vlm = build_vlm(llm, tok, new_layers=args.new_layers, image_size=args.image_size, patch_size=args.patch_size)
    jsonl, kinds = training_jsonl(work, args)
    t1 = time.time()
    loader = build_dataloader(data_cfg(jsonl, args.workers), tok, vlm.config, args.batch, args.seed)
    data_s = time.time() - t1
    vlm = vlm.to(device)
    # only the vision front gets the high rate: the new decoder layers also carry text, and Adam's first steps at
    # 1e-3 on their zero output projections move every text token's residual stream by O(1) (measured on CPU:
    # held-out text perplexity x250 after 6 steps); at the LLM's rate they start as the identity and learn slowly
    new = ("model.vision.",)
    t2 = time.time()
    log = train_sft(vlm, loader, args.steps, lr=args.lr, new_lr=args.new_lr, new_prefixes=new,
                    progress=not args.no_progress, time_budget_s=args.time_budget)
    train_s = time.time() - t2
    save_model(vlm, work / "vlm_teacher", tok, overwrite=True)  # a rerun replaces it
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vlm = vlm.to(dtype).eval()
    smollm2 = llm.to(device, dtype).eval()
    result = {"phase": "vlm_teacher", "env": environment(), "command": args.command_line,
              "config": {k: getattr(args, k) for k in ("new_layers", "image_size", "patch_size", "steps", "batch",
                                                       "lr", "new_lr", "seed")},
              "training_rows": kinds, "steps_done": log[-1]["step"] if log else 0,
              "samples_seen": (log[-1]["step"] if log else 0) * args.batch, "train_log": log,
              "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
              "eval": vlm_eval(vlm, tok, work, args, smollm2=smollm2), "seconds": round(time.time() - t0, 1)}
    write_json(Path(args.out), result)
    return 0


def stage_settings(args) -> dict:
    s1, s2, s3 = (int(x) for x in args.steps.split(","))
    mb = args.micro_batch
    return {1: dict(steps=s1, lr=1e-3, batch_size=args.batch, micro_batch_size=mb, seq_len=None),
            2: dict(steps=s2, lr=5e-4, batch_size=args.batch, micro_batch_size=mb, seq_len=None),
            3: dict(steps=s3, lr=args.lr3, batch_size=args.batch, micro_batch_size=mb, seq_len=None,
                    loss=dict(temperature=1.0, positions="assistant", ce_weight=0.0, chunk_size=1024))}


def cmd_student(args) -> int:
    from transformers import AutoTokenizer

    from mmmamba.io import load_model

    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    teacher_dir = work / "vlm_teacher"
    jsonl = work / "vlm_data" / "train.jsonl"
    placement = None if args.placement in ("none", "linear") else args.placement
    shared = work / f"vlm_{args.stages12_from}" if args.stages12_from else None
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    text = text_mix(work, tok, args.text_mix_tokens)
    run = distill(str(teacher_dir), work / f"vlm_{args.name}", placement, stage_settings(args), init=args.init,
                  data_cfg=data_cfg(jsonl, args.workers, text), stages12_from=shared)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    student = load_model(run["folder"]).to(device, dtype).eval()
    result = {"phase": "vlm_student", "name": args.name, "env": environment(), "command": args.command_line,
              "placement": placement, "attention_layers": student.config.attention_layers,
              "mamba_layers": len(student.config.mamba_layers), "distill": run,
              "text_mix_tokens": args.text_mix_tokens,
              "tokens_seen": sum(s["tokens"] or 0 for s in run["stages"].values()),
              "samples_seen": {k: s["steps"] * s["batch_size"] for k, s in run["stages"].items()},
              "eval": vlm_eval(student, tok, work, args), "seconds": round(time.time() - t0, 1)}
    write_json(Path(args.out), result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2")
    p.add_argument("--work", default="/tmp/study")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--train-limit", type=int, default=None, help="training rows per image source (smoke runs)")
    sub = p.add_subparsers(dest="phase", required=True)
    t = sub.add_parser("teacher")
    t.add_argument("--new-layers", type=int, default=2)
    t.add_argument("--image-size", type=int, default=64)
    t.add_argument("--patch-size", type=int, default=8)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=5e-5, help="decoder layers (the LLM's and the new ones)")
    t.add_argument("--new-lr", type=float, default=1e-3, help="vision front")
    t.add_argument("--text-rows", type=int, default=2000)
    t.add_argument("--time-budget", type=float, default=None, help="seconds of training (shortens --steps)")
    t.set_defaults(func=cmd_teacher)
    s = sub.add_parser("student")
    s.add_argument("--name", required=True)
    s.add_argument("--placement", default="every:4")
    s.add_argument("--init", default="mimic", choices=["mimic", "inherit", "scratch"])
    s.add_argument("--steps", default="200,200,150")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--micro-batch", type=int, default=64)
    s.add_argument("--lr3", type=float, default=2e-4)
    s.add_argument("--stages12-from", help="an earlier student (same settings) whose stages 1-2 this one shares")
    s.add_argument("--text-mix-tokens", type=int, default=1_000_000,
                   help="plain text (Python docs + WordNet train splits) added to the distillation mix, so the "
                        "student keeps the LLM's text; 0: the VLM rows alone")
    s.set_defaults(func=cmd_student)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = "python examples/quality/vlm_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
