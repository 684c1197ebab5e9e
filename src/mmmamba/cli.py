"""`mmmamba` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def _number(kind, low=None, high=None, low_open=False, what=""):
    """argparse type: a `kind` number in [low, high] ((low, high] with low_open), with a message saying so."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return v

    return parse


def _device(text: str) -> str:
    """argparse type: a torch device this machine has."""
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device ({e}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available here (torch {torch.__version__}, "
                                         "no GPU or a CPU-only build); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} GPU(s) here")
    return text


POSITIVE = _number(int, 1, what="at least 1")
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def _load_tokenizer(path):
    """None for a folder without tokenizer files; files that cannot be loaded raise, naming the file."""
    from .models.tokenizer import load_tokenizer

    return load_tokenizer(path, required=False)


def cmd_seed(args) -> int:
    from .distill.seed import save_seed, seed_student
    from .io import check_output_folder
    from .teachers.hf import load_teacher, resolve_teacher

    if args.attention_layers and args.placement:
        raise SystemExit("give either --attention-layers or --placement, not both")
    check_output_folder(args.out, args.overwrite)  # before the teacher loads: refuse early
    path = resolve_teacher(args.teacher)
    teacher = load_teacher(path)
    student = seed_student(teacher, args.attention_layers or args.placement, mode=args.init, seed=args.seed)
    from .distill.manifest import teacher_identity

    tokenizer = _load_tokenizer(path)
    if tokenizer is None:
        print(f"WARNING: teacher {path} has no tokenizer files (tokenizer.json / tokenizer_config.json), so the "
              f"student in {args.out} gets none; `distill` and `generate` need one: save the teacher's tokenizer "
              "into both folders (AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(FOLDER))", file=sys.stderr)
    save_seed(student, args.out, teacher_identity(path, spec=str(args.teacher)), tokenizer, overwrite=args.overwrite,
              init=args.init, seed=args.seed)
    n_attn = len(student.config.attention_layers)
    print(f"seeded {args.out}: {len(student.config.mamba_layers)} Mamba-2 + {n_attn} attention layers "
          f"(attention at {student.config.attention_layers})")
    return 0


def cmd_distill(args) -> int:
    from transformers.utils import logging as hf_logging

    from .distill.recipe import load_recipe
    from .distill.trainer import Interrupted, run_distill

    hf_logging.disable_progress_bar()  # per-file load / save bars would drown the training bar
    recipe = load_recipe(args.recipe, {"output_dir": args.out})
    stages = [1, 2, 3] if args.stage == "all" else [int(args.stage)]
    try:
        run_distill(recipe, stages, resume=args.resume, progress=not args.no_progress,
                    allow_changed=args.allow_changed)
    except Interrupted as e:
        again = f"mmmamba distill {args.recipe} --resume" + (f" --out {args.out}" if args.out else "")
        print(f"mmmamba distill: {e}. Continue exactly from there with: {again}", file=sys.stderr)
        return e.exit_code
    return 0


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    from .teachers.hf import load_teacher, resolve_teacher

    path = resolve_teacher(args.model)
    model = load_teacher(path, dtype=_dtype(args.dtype)).to(args.device).eval()
    tok = _load_tokenizer(path)
    if tok is None:
        raise SystemExit(f"{args.model} has no tokenizer files; save one beside the weights")
    prompt = args.prompt
    pixel_values = None
    if args.image:
        from .models.image_processing import build_image_prompt

        prompt, pixel_values = build_image_prompt(
            model.config, tok, args.image, prompt, max_tiles=args.max_tiles, chat=args.chat
        )
    elif args.chat and getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=not args.chat)
    if pixel_values is not None:
        pixel_values = pixel_values.to(args.device, model.dtype)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    base = model
    use_engine = args.engine if args.engine is not None else args.device.startswith("cuda")
    if use_engine:  # static cache, fused weights, CUDA-graph decode; same tokens as the reference loop
        from .inference.engine import Engine

        model = Engine(model, share_weights=True)  # the model is ours: no second copy of its projections
    out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixel_values,
                         max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, streamer=streamer,
                         generator=gen)
    _say_if_stopped_at_once(out[0, enc["input_ids"].shape[1]:], tok, base)
    return 0


def _say_if_stopped_at_once(new, tok, model) -> None:
    """The model's first token was an end token: say so instead of printing nothing."""
    from .models.generate import eos_ids

    if new.numel() and int(new[0]) in eos_ids(model, None):
        first = tok.convert_ids_to_tokens(int(new[0]))
        print(f"mmmamba: the model ended its answer at once (its first token was the end token {first!r}); "
              "no text to show", file=sys.stderr)


def _chat_runner(args):
    """(model, tokenizer, what generates: the model or, on CUDA by default, its Engine) for chat and serve."""
    from .models.tokenizer import load_tokenizer
    from .teachers.hf import load_teacher, resolve_teacher

    path = resolve_teacher(args.model)
    model = load_teacher(path, dtype=_dtype(args.dtype)).to(args.device).eval()
    tok = load_tokenizer(path)
    use_engine = args.engine if args.engine is not None else args.device.startswith("cuda")
    if use_engine:
        from .inference.engine import Engine

        return model, tok, Engine(model, share_weights=True)  # the CLI's own model: one copy of its weights
    return model, tok, model


def _gen_kwargs(args) -> dict:
    kw = dict(do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_k=args.top_k,
              top_p=args.top_p)
    if args.repetition_penalty != 1.0:
        kw["repetition_penalty"] = args.repetition_penalty
    return kw


def _conversation(args):
    from .inference.chat import Conversation

    model, tok, runner = _chat_runner(args)
    return Conversation(model, tok, runner, max_new_tokens=args.max_new_tokens, max_context=args.max_context,
                        max_tiles=args.max_tiles, gen_kwargs=_gen_kwargs(args))


def _chat_image(conv, path) -> None:
    try:
        n = conv.add_image(path)
        print(f"[image {path} added ({n} tiles); it goes with your next message]")
    except (FileNotFoundError, ValueError) as e:
        print(f"[image not added: {e}]")


def cmd_chat(args) -> int:
    from transformers import TextStreamer

    conv = _conversation(args)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    streamer = TextStreamer(conv.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print("mmmamba chat: type a message; /image PATH adds an image, /reset starts over, /quit (or Ctrl-D) leaves")
    if args.image:
        _chat_image(conv, args.image)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not sys.stdin.isatty():  # piped input: echo it, so the transcript reads like the session
            print(line)
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            conv.reset()
            print("[conversation reset]")
        elif line.startswith("/image"):
            _chat_image(conv, line[len("/image"):].strip())
        elif line.startswith("/"):
            print(f"[unknown command {line.split()[0]}; commands: /image PATH, /reset, /quit]")
        elif line:
            _chat_turn(conv, line, streamer, gen)


def _chat_turn(conv, line, streamer, gen) -> None:
    print("model> ", end="", flush=True)
    try:
        r = conv.reply(line, streamer, gen)
    except ValueError as e:
        print(f"\n[error: {e}]")
        return
    if r.notice():
        print(r.notice())
    if r.dropped_turns:
        print(f"[{r.dropped_turns} oldest messages dropped to fit the context of {conv.max_context} tokens]")
    print(f"[{r.new_tokens} tokens in {r.seconds:.2f} s, {r.tokens_per_s:.1f} tokens/s]")


def cmd_serve(args) -> int:
    from pathlib import Path

    from .serve import create_app, serve

    model, tok, runner = _chat_runner(args)
    app = create_app(model, tok, runner, title=Path(str(args.model)).name, conversation_kwargs=dict(
        max_new_tokens=args.max_new_tokens, max_context=args.max_context, max_tiles=args.max_tiles,
        gen_kwargs=_gen_kwargs(args)))
    print(f"mmmamba serve: http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    serve(app, args.host, args.port)
    return 0


def cmd_bench(args) -> int:
    from .bench.run import options_from_args, run_bench

    run_bench(options_from_args(args))
    return 0


def cmd_bench_train(args) -> int:
    from .distill.throughput import options_from_args, run_train_bench

    run_train_bench(options_from_args(args))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, seq_len=args.seq_len, batch=args.batch, placement=args.placement,
             lr_scale=args.lr_scale)
    return 0


def _load_for_eval(spec, device: str, dtype: str):
    from .teachers.hf import load_teacher, resolve_teacher

    path = resolve_teacher(spec)
    model = load_teacher(path, dtype=_dtype(dtype)).to(device).eval()
    return model, path


def cmd_eval(args) -> int:
    from .eval import evaluate, markdown_table

    model, path = _load_for_eval(args.model, args.device, args.dtype)
    tok = _load_tokenizer(path)
    if tok is None:
        raise SystemExit(f"{args.model} has no tokenizer files; save one beside the weights")
    result = evaluate(model, tok, args.bench, limit=args.limit, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, mode=args.mode, max_tiles=args.max_tiles,
                      out_dir=args.out, progress=not args.no_progress, chat=args.chat, engine=args.engine)
    c = result["config"]
    print(markdown_table(result), end="")
    print(f"\n{result['n']} items in {c['seconds']:.1f} s ({c['items_per_s']:.2f} items/s, {c['mode']}, "
          f"batch {c['batch_size']}, {c['device']} {c['dtype']})" + (f"; results in {args.out}" if args.out else ""))
    return 0


def cmd_ppl(args) -> int:
    from .eval import read_text_tokens, text_metrics

    model, path = _load_for_eval(args.model, args.device, args.dtype)
    tok = _load_tokenizer(path)
    if tok is None:
        raise SystemExit(f"{args.model} has no tokenizer files; save one beside the weights")
    ids = read_text_tokens(args.file, tok, add_bos=args.add_bos, limit_tokens=args.limit_tokens)
    teacher = _load_for_eval(args.teacher, args.device, args.dtype)[0] if args.teacher else None
    r = text_metrics(model, ids, window=args.window, stride=args.stride, teacher=teacher,
                     batch_size=args.batch_size, progress=not args.no_progress)
    rows = [("perplexity", f"{r['perplexity']:.3f}"), ("tokens scored", r["tokens"]),
            ("method", f"{r['method']} (window {r['window']}, stride {r['stride']})")]
    if teacher is not None:
        rows += [("teacher perplexity", f"{r['teacher_perplexity']:.3f}"),
                 ("top-1 agreement with teacher", f"{100 * r['top1_agreement']:.2f} %"),
                 ("KL(teacher || model), nats/token", f"{r['kl_to_teacher']:.4f}")]
    print(f"| {args.model} on {args.file} | |\n|---|---|")
    print("\n".join(f"| {k} | {v} |" for k, v in rows))
    if args.out:
        from .io import atomic_write_text

        atomic_write_text(args.out, json.dumps(r, indent=2) + "\n")
    return 0


def _add_eval_parsers(sub) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    e = sub.add_parser("eval", help="score a model on a benchmark (VLMEvalKit TSV, JSONL or a built-in set)")
    e.add_argument("--model", required=True, help="mmmamba or transformers folder, or 'smollm2'")
    e.add_argument("--bench", required=True,
                   help="easy-vqa | fashion-mnist | fashion-mnist-open | a VLMEvalKit .tsv | a .jsonl")
    e.add_argument("--limit", type=POSITIVE, help="first N items only")
    e.add_argument("--batch-size", type=POSITIVE, default=16)
    e.add_argument("--mode", default="generate", choices=["generate", "loglik"],
                   help="greedy answers + answer extraction, or the best-scoring option (log-likelihood)")
    e.add_argument("--max-new-tokens", type=POSITIVE, help="default: 32 (16 for yes / no)")
    e.add_argument("--max-tiles", type=POSITIVE, help="image tiles (default: the model's vision_config, else 6)")
    e.add_argument("--out", help="folder for results.json, results.md and predictions.jsonl")
    e.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the tokenizer's chat template (default on)")
    e.add_argument("--engine", action=argparse.BooleanOptionalAction, default=None,
                   help="fast inference engine for generation; default: on for CUDA")
    e.add_argument("--device", type=_device, default=device)
    e.add_argument("--dtype", default="float32", choices=DTYPES)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    q = sub.add_parser("ppl", help="perplexity of a text file (sliding window, or recurrent for pure Mamba-2)")
    q.add_argument("file", help="UTF-8 text file")
    q.add_argument("--model", required=True, help="mmmamba or transformers folder, or 'smollm2'")
    q.add_argument("--teacher", help="also report top-1 agreement and KL(teacher || model) against this model")
    q.add_argument("--window", type=_number(int, 2, what="at least 2"), default=2048, help="tokens per forward")
    q.add_argument("--stride", type=POSITIVE, help="new tokens scored per window after the first (default window/2)")
    q.add_argument("--limit-tokens", type=_number(int, 2, what="at least 2"), help="first N tokens of the file only")
    q.add_argument("--add-bos", action="store_true", help="put the tokenizer's BOS before the text")
    q.add_argument("--batch-size", type=POSITIVE, default=8, help="windows per forward (sliding window)")
    q.add_argument("--out", help="also write the metrics as JSON to this file")
    q.add_argument("--device", type=_device, default=device)
    q.add_argument("--dtype", default="float32", choices=DTYPES)
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_ppl)
def _add_chat_arguments(c) -> None:
    c.add_argument("--model", required=True, help="mmmamba, transformers or HoVLE folder, or 'smollm2'")
    c.add_argument("--max-new-tokens", type=_number(int, 1, what="at least 1 token"), default=256,
                   help="longest answer")
    c.add_argument("--max-context", type=_number(int, 2, what="at least 2"), default=None,
                   help="tokens of history + answer; the oldest turns are dropped beyond it "
                        "(default: the model's max_position_embeddings)")
    c.add_argument("--max-tiles", type=_number(int, 1, what="at least 1 tile"), default=6)
    c.add_argument("--temperature", type=_number(float, 0, what="0 (greedy) or more"), default=0.0, help="0 = greedy")
    c.add_argument("--top-k", type=_number(int, 0, what="0 (off) or more"), default=0)
    c.add_argument("--top-p", type=_number(float, 0, 1, low_open=True, what="in (0, 1]"), default=1.0)
    c.add_argument("--repetition-penalty", type=_number(float, 0, low_open=True, what="above 0"), default=1.0)
    c.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--dtype", default="float32", choices=DTYPES)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--engine", action=argparse.BooleanOptionalAction, default=None,
                   help="fast engine (static cache, fused kernels, CUDA graph); default: on for CUDA")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmmamba", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("seed", help="create a Mamba-2 / hybrid student seeded from a teacher's attention")
    s.add_argument("--teacher", required=True, help="teacher folder (transformers, HoVLE or mmmamba) or 'smollm2'")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--attention-layers", help="comma-separated layers kept as attention, e.g. 0,4,8")
    s.add_argument("--placement", help="every:K | tail-interleaved:K | head-stacked:N | tail-stacked:N")
    s.add_argument("--init", default="mimic", choices=["mimic", "inherit", "scratch"],
                   help="Table 4 ablation: inherit Q,K,V + mimic (default), inherit only, or from scratch")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace an existing mmmamba model folder at --out")
    s.set_defaults(func=cmd_seed)

    d = sub.add_parser("distill", help="three-stage distillation from a YAML recipe (recipes/*.yaml)",
                       description="Run stage 1, 2, 3 or all of a recipe; several GPUs: "
                                   "accelerate launch -m mmmamba.cli distill RECIPE.yaml")
    d.add_argument("recipe", help="recipe YAML (teacher, data, stages, placement, output_dir)")
    d.add_argument("--stage", default="all", choices=["1", "2", "3", "all"])
    d.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint of an interrupted stage; skip completed stages")
    d.add_argument("--allow-changed", action="store_true",
                   help="with --resume: go on although the recipe's settings differ from the checkpoint's")
    d.add_argument("--out", help="output folder (overrides the recipe's output_dir)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_distill)

    m = sub.add_parser("demo", help="offline CPU demo: SmolLM2 -> hybrid student, three short stages, metrics")
    m.add_argument("--out", default="runs/demo", help="output folder (a previous demo there is replaced)")
    m.add_argument("--steps", type=POSITIVE, default=20,
                   help="optimizer steps of stages 1 and 2 (stage 3: 3/5 of it)")
    m.add_argument("--seq-len", type=_number(int, 2, what="at least 2"), default=256)
    m.add_argument("--batch", type=POSITIVE, default=4)
    m.add_argument("--placement", default="every:4", help="attention layers of the hybrid (every:K, list, none)")
    m.add_argument("--lr-scale", type=_number(float, 0, low_open=True, what="a positive factor"), default=1.0,
                   help="multiplies every stage's learning rate (6e-3, 3e-3, 1.2e-3)")
    m.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="generate text (optionally about an image) with a model folder")
    g.add_argument("--model", required=True, help="mmmamba or transformers folder, or 'smollm2'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", help="image file (models with a vision front)")
    g.add_argument("--max-tiles", type=_number(int, 1, what="at least 1 tile"), default=6)
    g.add_argument("--max-new-tokens", type=_number(int, 1, what="at least 1 token"), default=64)
    g.add_argument("--temperature", type=_number(float, 0, what="0 (greedy) or more"), default=0.0,
                   help="0 = greedy")
    g.add_argument("--top-k", type=_number(int, 0, what="0 (off) or more"), default=0)
    g.add_argument("--top-p", type=_number(float, 0, 1, low_open=True, what="in (0, 1]"), default=1.0)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the tokenizer's chat template (default on)")
    g.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default="float32", choices=DTYPES)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--engine", action=argparse.BooleanOptionalAction, default=None,
                   help="fast engine (static cache, fused kernels, CUDA graph); default: on for CUDA")
    g.set_defaults(func=cmd_generate)

    _add_eval_parsers(sub)

    c = sub.add_parser("chat", help="multi-turn chat with a model folder (streamed; /image PATH, /reset, /quit)")
    _add_chat_arguments(c)
    c.add_argument("--image", help="image for the first message (models with a vision front)")
    c.set_defaults(func=cmd_chat)

    w = sub.add_parser("serve", help="web demo: chat with a model in the browser (image upload, streamed answers)")
    _add_chat_arguments(w)
    w.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    w.add_argument("--port", type=_number(int, 1, 65535, what="1-65535"), default=8000)
    w.set_defaults(func=cmd_serve)

    from .bench.run import add_arguments as add_bench_arguments

    b = sub.add_parser("bench", help="speed and memory vs context (teacher, linear, hybrid; paper Fig. 1 / Table 2)")
    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)

    from .distill.throughput import add_arguments as add_bench_train_arguments

    t = sub.add_parser("bench-train", help="training throughput and MFU per distillation stage (random weights)")
    add_bench_train_arguments(t)
    t.set_defaults(func=cmd_bench_train)
    return p


def main(argv: list[str] | None = None) -> int:
    from .distill.trainer import NonFiniteError
    args = build_parser().parse_args(argv)
    # keep Triton's autotuning results on disk beside its compiled kernels: fla-core autotunes each of its SSD
    # kernels on first use (minutes for a training step's forward and backward), once per machine instead of per run
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    hang_s = os.environ.get("MMMAMBA_DUMP_STACKS_AFTER")
    if hang_s:  # diagnose a stuck (e.g. multi-process) run: print every thread's stack after that many seconds
        import faulthandler

        faulthandler.dump_traceback_later(float(hang_s), repeat=True)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, NonFiniteError) as e:
        print(f"mmmamba {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C outside the training loop, or a second one inside it
        print(f"\nmmmamba {args.cmd}: {e or 'interrupted'}; files are written atomically, nothing half-written "
              "is left", file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
