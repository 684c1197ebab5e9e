"""Quality study, text: SmolLM2-135M-Instruct distilled to mmMamba-hybrid and mmMamba-linear on real offline text.

Two phases, each one command that writes one small JSON (run on one GPU; `--smoke` shrinks everything for the CPU):

    python examples/quality/text_study.py samples --out OUT/text_teacher.json --work /tmp/study
        teacher samples (prompted generations, stored with their prompts) + the teacher's held-out metrics
    python examples/quality/text_study.py student --name hybrid --placement every:4 --out OUT/text_hybrid.json
        seed + stages 1-3 on the training mix (corpora + teacher samples), then held-out perplexity, top-1
        agreement and KL against the teacher on every held-out set, and generations side by side

Data come from `prepare.py` (STUDY_DATA, default .carry/study); the teacher samples from the first phase (--work).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    DATA,
    HELDOUT_SETS,
    TRAIN_SOURCES,
    distill,
    environment,
    load_tokens,
    packed_data,
    sample_texts,
    text_eval,
    write_json,
)

CHAT_TEMPLATES = (
    "What does the word \"{w}\" mean? Use it in a sentence.",
    "Write a short paragraph about {w}.",
    "Explain {w} to a beginner.",
)
SHOWCASE = [
    {"text": "What is the capital of France?", "chat": True},
    {"text": "Explain what a Python list comprehension is.", "chat": True},
    {"text": "Define the word \"harbour\".", "chat": True},
    {"text": "The \"for\" statement is used to iterate over", "chat": False},
    {"text": "In the beginning God created", "chat": False},
]


def load_teacher_model(spec: str, device: str):
    from transformers import AutoTokenizer

    from mmmamba.teachers.hf import load_teacher, resolve_teacher

    path = resolve_teacher(spec)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_teacher(path, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok, str(path)


def _documents(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    cut = np.flatnonzero(tokens == eos)
    return [d for d in np.split(tokens, cut + 1) if len(d) > 8]


def build_prompts(tok, n: int, rng: np.random.Generator, prefix: int = 32) -> list[dict]:
    """Half continuation prompts (a 32-token prefix of a training document), half chat prompts about a WordNet
    lemma or a Python docs page title. Only the training splits are used."""
    eos = tok.eos_token_id
    docs = {s: _documents(load_tokens(s, "train"), eos) for s in ("pydocs", "wordnet")}
    prompts = []
    for i in range(n):
        src = ("pydocs", "wordnet")[i % 2]
        d = docs[src][rng.integers(len(docs[src]))]
        if i % 4 < 2:
            start = rng.integers(0, max(1, len(d) - prefix))
            prompts.append({"text": tok.decode(d[start:start + prefix]), "chat": False, "source": src})
        else:
            head = tok.decode(d[:24]).split(" (")[0].split(",")[0] if src == "wordnet" else \
                tok.decode(d[:16]).strip().splitlines()[0].strip("*=#: ")
            w = head[:60] or "Python"
            prompts.append({"text": CHAT_TEMPLATES[i % len(CHAT_TEMPLATES)].format(w=w), "chat": True,
                            "source": src})
    return prompts


@torch.no_grad()
def generate_samples(model, tok, prompts: list[dict], batch: int, max_new_tokens: int, seed: int) -> list[dict]:
    """Sampled teacher completions (T 0.8, top-p 0.95), left-padded batches; returns prompts with their ids."""
    from tqdm import tqdm

    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    stops = sorted({t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if t is not None})
    gen = torch.Generator(device=model.device).manual_seed(seed)
    rows = []
    for i in tqdm(range(0, len(prompts), batch), desc="teacher samples"):
        group = prompts[i:i + batch]
        texts = [tok.apply_chat_template([{"role": "user", "content": p["text"]}], tokenize=False,
                                         add_generation_prompt=True) if p["chat"] else p["text"] for p in group]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=0.8, top_p=0.95, eos_token_id=stops, generator=gen)
        new = out[:, enc["input_ids"].shape[1]:].cpu().numpy()
        for p, ids, mask, cont in zip(group, enc["input_ids"].cpu().numpy(), enc["attention_mask"].cpu().numpy(), new):
            stop = next((j for j, t in enumerate(cont) if t in stops), None)
            cont = cont[:stop + 1] if stop is not None else cont
            rows.append({**p, "prompt_ids": ids[mask.astype(bool)].tolist(), "completion_ids": cont.tolist()})
    return rows


def cmd_samples(args) -> int:
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, path = load_teacher_model(args.teacher, device)
    rng = np.random.default_rng(args.seed)
    prompts = build_prompts(tok, args.n_prompts, rng)
    t1 = time.time()
    rows = generate_samples(model, tok, prompts, args.batch, args.max_new_tokens, args.seed)
    gen_s = time.time() - t1
    from mmmamba.data import heldout_keys

    held = heldout_keys(range(len(rows)), 0.05, salt="quality:teacher-samples")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    eos = tok.eos_token_id
    counts = {}
    for split in ("train", "heldout"):
        docs = [np.asarray(r["prompt_ids"] + r["completion_ids"] + [eos], dtype=np.uint16)
                for i, r in enumerate(rows) if (i in held) == (split == "heldout")]
        arr = np.concatenate(docs)
        np.save(work / f"teacher_samples.{split}.npy", arr)
        counts[split] = int(arr.size)
    with open(work / "teacher_samples.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["text"], "chat": r["chat"], "source": r["source"],
                                "completion": tok.decode(r["completion_ids"], skip_special_tokens=True)}) + "\n")
    sets = heldout_sets(work)
    metrics = text_eval(model, sets, tokens=args.eval_tokens, window=args.window)
    generated = sum(len(r["completion_ids"]) for r in rows)
    result = {
        "phase": "samples", "teacher": path, "env": environment(), "command": args.command_line,
        "n_prompts": len(rows), "max_new_tokens": args.max_new_tokens, "generated_tokens": generated,
        "generation_seconds": round(gen_s, 1), "sample_tokens": counts, "heldout": metrics,
        "eval_tokens": args.eval_tokens, "window": args.window,
        "examples": [json.loads(line) for line in open(work / "teacher_samples.jsonl")][:8],
        "showcase": sample_texts(model, tok, SHOWCASE, args.show_tokens),
        "seconds": round(time.time() - t0, 1),
    }
    write_json(Path(args.out), result)
    print(json.dumps({k: result[k] for k in ("generated_tokens", "sample_tokens", "heldout", "seconds")}, indent=1))
    return 0


def heldout_sets(work: Path) -> dict[str, np.ndarray]:
    sets = {name: load_tokens(name, "heldout") for name in HELDOUT_SETS}
    ts = work / "teacher_samples.heldout.npy"
    if ts.exists():
        sets["teacher_samples"] = np.load(ts)
    return sets


def training_mix(work: Path) -> tuple[np.ndarray, dict]:
    parts = {s: load_tokens(s, "train") for s in TRAIN_SOURCES}
    ts = work / "teacher_samples.train.npy"
    if ts.exists():
        parts["teacher_samples"] = np.load(ts)
    return np.concatenate(list(parts.values())), {k: int(v.size) for k, v in parts.items()}


def budget_steps(warmup_json: str, seconds: str, tokens_per_step: int) -> str:
    """Steps per stage that fit `seconds` ("s1,s2,s3") at the slower student's steady-state throughput measured by
    the warm-up on this machine (the last logged tokens/s of each stage), the same for both students."""
    runs = json.loads(Path(warmup_json).read_text())["runs"]
    steps = []
    for k, sec in zip(("1", "2", "3"), (float(x) for x in seconds.split(","))):
        tps = min(r["stages"][k]["tokens_per_s"] for r in runs.values())
        steps.append(str(max(10, int(sec * tps / tokens_per_step) // 10 * 10)))
    return ",".join(steps)


def stage_settings(args) -> dict:
    if getattr(args, "budget_from", None):
        if not Path(args.budget_from).exists():  # once silently fell back to --steps on the H100 (2026-12-07)
            raise SystemExit(f"--budget-from {args.budget_from}: no such file; run `text_study.py warmup` first "
                             "or give --steps instead")
        args.steps = budget_steps(args.budget_from, args.stage_seconds, args.batch * args.seq_len)
        print(f"steps per stage from the warm-up's throughput ({args.budget_from}): {args.steps}", flush=True)
    s1, s2, s3 = (max(1, int(x)) for x in args.steps.split(","))  # a stage left out of --stages never runs
    mb, mb3 = args.micro_batch, max(1, args.micro_batch // 2)
    k = getattr(args, "lr_scale", 1.0)
    return {
        1: dict(steps=s1, lr=1e-3 * k, batch_size=args.batch, micro_batch_size=mb, seq_len=args.seq_len),
        2: dict(steps=s2, lr=5e-4 * k, batch_size=args.batch, micro_batch_size=mb, seq_len=args.seq_len),
        3: dict(steps=s3, lr=args.lr3 * k, batch_size=args.batch, micro_batch_size=mb3, seq_len=args.seq_len,
                loss=dict(temperature=1.0, positions="all", ce_weight=0.0, chunk_size=1024)),
    }


def calibrated_seed(args, work: Path, mix: np.ndarray, device: str) -> str:
    """An all-Mamba-2 student seeded with mimic init, its gates calibrated (`distill.gate_calibration`) on the first
    4 x 1024 tokens of the training mix, saved where the recipe's `student:` points (stage 3 places attention)."""
    from transformers import AutoTokenizer

    from mmmamba.distill.gate_calibration import calibrate_gates, capture_attention
    from mmmamba.distill.manifest import teacher_identity
    from mmmamba.distill.seed import save_seed, seed_student
    from mmmamba.teachers.hf import load_teacher, resolve_teacher

    path = resolve_teacher(args.teacher)
    teacher = load_teacher(path).to(device).eval()
    ids = torch.from_numpy(mix[:4 * 1024].astype(np.int64)).view(4, 1024)
    student = seed_student(teacher, None, mode="mimic", seed=args.seed).eval()
    layers = calibrate_gates(student, capture_attention(teacher, [ids[i:i + 1] for i in range(4)]),
                             keep_random=args.init == "calibrated+random")
    out = work / f"{args.name}-seed"
    save_seed(student.cpu(), out, teacher_identity(path, spec=str(args.teacher)), AutoTokenizer.from_pretrained(path),
              init=f"mimic+{args.init}-gate", seed=args.seed, calibrated_layers=layers,
              calibration_tokens=int(ids.numel()))
    return str(out)


def parse_stages(spec: str) -> tuple[int, ...]:
    """"1,2,3", "2+3", "S1+S3" or "none" (seeding only) -> the stages to run, in order."""
    parts = [x.strip().upper().removeprefix("S") for x in spec.replace("+", ",").split(",")]
    if spec.strip().lower() in ("none", "seed", "0", ""):
        return ()
    if not all(p in ("1", "2", "3") for p in parts) or len(set(parts)) != len(parts):
        raise SystemExit(f"--stages {spec!r}: give distinct stages from 1, 2, 3 (e.g. 1,3 or S2+S3), or none")
    return tuple(sorted(int(p) for p in parts))


def cmd_student(args) -> int:
    from mmmamba.io import load_model

    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    mix, mix_counts = training_mix(work)
    placement = None if args.placement in ("none", "linear") else args.placement
    seeded = calibrated_seed(args, work, mix, device) if args.init.startswith("calibrated") else None
    shared = work / args.stages12_from if args.stages12_from else None
    run = distill(args.teacher, work / args.name, placement, stage_settings(args),
                  init="mimic" if seeded else args.init, data=packed_data(mix, args.seq_len),
                  cuda_graph=device == "cuda", student=seeded, stages12_from=shared,
                  run_stages=parse_stages(args.stages))
    teacher, tok, path = load_teacher_model(args.teacher, device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    student = load_model(run["folder"]).to(device, dtype).eval()
    seen = sum(s["tokens"] for s in run["stages"].values())
    result = {
        "phase": "student", "name": args.name, "init": args.init, "teacher": path, "env": environment(),
        "command": args.command_line,
        "placement": placement, "attention_layers": student.config.attention_layers,
        "stages_run": sorted(int(k) for k in run["stages"]),
        "mamba_layers": len(student.config.mamba_layers), "training_mix_tokens": mix_counts,
        "tokens_seen": seen,
        "epochs_per_stage": {k: round(s["tokens"] / mix.size, 2) for k, s in run["stages"].items()},
        "distill": run,
        "heldout": text_eval(student, heldout_sets(work), teacher=teacher, tokens=args.eval_tokens,
                             window=args.window),
        "eval_tokens": args.eval_tokens, "window": args.window,
        "showcase": sample_texts(student, tok, SHOWCASE, args.show_tokens),
        "seconds": round(time.time() - t0, 1),
    }
    write_json(Path(args.out), result)
    print(json.dumps({"heldout": result["heldout"], "tokens_seen": seen, "seconds": result["seconds"]}, indent=1))
    return 0


def cmd_warmup(args) -> int:
    """Both students' three stages for a few steps at the study's shapes on random tokens (any teacher with the
    right dims, e.g. random weights): Triton's autotuning and fla's kernel checks happen here, not in the timed
    runs; the per-stage times after the first steps give the machine's throughput."""
    rng = np.random.default_rng(args.seed)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.teacher).vocab_size
    tokens = rng.integers(0, vocab, size=args.batch * args.seq_len * 8, dtype=np.int64).astype(np.uint16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"phase": "warmup", "env": environment(), "command": args.command_line, "runs": {}}
    for name, placement in (("hybrid", "every:4"), ("linear", None)):
        if args.only and name != args.only:
            continue
        run = distill(args.teacher, Path(args.work) / f"warmup_{name}", placement, stage_settings(args),
                      data=packed_data(tokens, args.seq_len), cuda_graph=device == "cuda")
        for s in run["stages"].values():
            s.pop("curve", None)
        result["runs"][name] = run
        write_json(Path(args.out), result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2")
    p.add_argument("--work", default="/tmp/study", help="scratch folder shared by the phases (samples, runs)")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--show-tokens", type=int, default=48)
    sub = p.add_subparsers(dest="phase", required=True)
    s = sub.add_parser("samples")
    s.add_argument("--n-prompts", type=int, default=4096)
    s.add_argument("--batch", type=int, default=512)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.set_defaults(func=cmd_samples)
    t = sub.add_parser("student")
    t.add_argument("--name", required=True)
    t.add_argument("--placement", default="every:4", help="every:K, a list, or none (mmMamba-linear)")
    t.add_argument("--init", default="mimic",
                   choices=["mimic", "inherit", "scratch", "calibrated", "calibrated+random"],
                   help="calibrated: mimic + the calibrated output gate (distill.gate_calibration); "
                        "calibrated+random: the calibrated term added to the paper's random gate")
    t.add_argument("--stages12-from", help="name of an earlier student run (same settings) whose stages 1-2 this "
                   "one shares: only stage 3 runs (placement acts in stage 3 only)")
    t.add_argument("--stages", default="1,2,3", help="the stages to run (PAPER Table 3 ablation), e.g. 1,3 or none "
                   "(seeding only); a stage left out starts the next from the seed or the last stage run")
    t.add_argument("--budget-from", help="warm-up JSON: choose --steps to fit --stage-seconds on this machine")
    t.add_argument("--stage-seconds", default="50,55,75")
    t.set_defaults(func=cmd_student)
    w = sub.add_parser("warmup")
    w.add_argument("--only", choices=["hybrid", "linear"], help="warm up one student only")
    w.set_defaults(func=cmd_warmup)
    for q in (t, w):
        q.add_argument("--steps", default="150,150,100", help="optimizer steps of stages 1,2,3")
        q.add_argument("--batch", type=int, default=32, help="sequences per optimizer step")
        q.add_argument("--micro-batch", type=int, default=16, help="stages 1-2; stage 3 uses half")
        q.add_argument("--seq-len", type=int, default=2048)
        q.add_argument("--lr3", type=float, default=2e-4, help="stage-3 learning rate (short run: above the paper's)")
        q.add_argument("--lr-scale", type=float, default=1.0,
                       help="multiplies every stage's learning rate (1e-3, 5e-4, --lr3): short budgets, see README")
    return p


def main(argv=None) -> int:
    import sys

    args = build_parser().parse_args(argv)
    args.command_line = "python examples/quality/text_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.data = str(DATA)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
