"""`evaluate`: run a model over a benchmark (greedy generation or option log-likelihoods) and score it.

Prompts: the benchmark's question text (`prompts.question_text`), wrapped in the tokenizer's chat template when
it has one (or HoVLE's internlm2-chat template), with the image expanded into `<img><IMG_CONTEXT>...</img>` by
the code path of `mmmamba generate --image` (`build_image_prompt`). Items are sorted by prompt length and run
in left-padded batches; each batch's prompts and pixel tiles are prepared on a worker thread while the model
runs the previous batch.

mode="generate": greedy decoding until an end token or `max_new_tokens` (default: 32 for multiple choice and
short answers, 16 for yes / no), then the standard answer extraction (`metrics`).
mode="loglik": each candidate answer (option letters, Yes / No, or the benchmark's closed answer set) is scored
by the sum of its tokens' log-probabilities after the prompt, as lm-eval's `acc`; the best one is the
prediction. When every candidate is one token, one forward of the prompt scores them all.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .builtin import load_bench
from .prompts import question_text
from .score import score_predictions
from .tsv import Bench

DEFAULT_NEW_TOKENS = {"mc": 32, "yesno": 16, "short": 32}


def evaluate(model, tokenizer, bench: Bench | str, *, limit: int | None = None, batch_size: int = 16,
             max_new_tokens: int | None = None, mode: str = "generate", max_tiles: int | None = None,
             device: str | torch.device | None = None, out_dir: str | Path | None = None, progress: bool = True,
             chat: bool = True, engine: bool | None = None) -> dict:
    """Evaluate `model` on `bench` (a Bench, a built-in name or a .tsv / .jsonl path).

    Returns {"bench", "task", "metric", "n", "metrics": {...}, "predictions": [per-item records],
    "config": {...}}; with `out_dir`, also writes results.json, results.md and predictions.jsonl there (each
    atomically). `engine` (generate mode): the fast inference engine, default on for CUDA."""
    if mode not in ("generate", "loglik"):
        raise ValueError(f"mode must be 'generate' or 'loglik', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(bench, str | Path):
        bench = load_bench(str(bench), limit)
    elif limit is not None:
        bench = Bench(bench.name, bench.task, bench.metric, bench.items[:limit], bench.choices)
    if device is not None:
        model = model.to(device)
    model.eval()
    prep = Prompter(model, tokenizer, bench, max_tiles, chat)
    new_tokens = max_new_tokens or DEFAULT_NEW_TOKENS[bench.task]
    t0 = time.perf_counter()
    if mode == "generate":
        preds = _run_generate(model, prep, batch_size, new_tokens, progress, engine)
    else:
        preds = _run_loglik(model, prep, batch_size, progress)
    seconds = time.perf_counter() - t0
    metrics, records = score_predictions(bench, [p["text"] for p in preds])
    for rec, p in zip(records, preds):
        rec.update({k: v for k, v in p.items() if k != "text"})
    config = {"mode": mode, "batch_size": batch_size, "max_new_tokens": new_tokens if mode == "generate" else None,
              "max_tiles": prep.max_tiles, "chat": prep.chat_template_used, "device": str(model.device),
              "dtype": str(model.dtype).replace("torch.", ""), "model": getattr(model.config, "_name_or_path", ""),
              "seconds": round(seconds, 3), "items_per_s": round(len(records) / max(seconds, 1e-9), 3)}
    result = {"bench": bench.name, "task": bench.task, "metric": bench.metric, "n": len(records),
              "metrics": metrics, "predictions": records, "config": config}
    if out_dir is not None:
        write_results(result, out_dir)
    return result


class Prompter:
    """Token ids (and pixel tiles) of each item's prompt, plus the stop tokens and pad id of `tokenizer`."""

    def __init__(self, model, tokenizer, bench: Bench, max_tiles: int | None, chat: bool):
        if tokenizer is None:
            raise ValueError("evaluate needs the model's tokenizer (save one beside the weights)")
        self.model, self.tok, self.bench, self.chat = model, tokenizer, bench, chat
        vc = getattr(model.config, "vision_config", None)
        if bench.has_images and vc is None:
            raise ValueError(f"benchmark {bench.name!r} has images but this model has no vision front "
                             "(config.vision_config is None); use a text benchmark")
        self.max_tiles = max_tiles or (int(vc.get("max_tiles", 6)) if vc is not None else None)
        self.chat_template_used = bool(chat and (getattr(tokenizer, "chat_template", None)
                                                 or getattr(model.config, "template", None) == "internlm2-chat"))
        self.texts = [question_text(bench, it) for it in bench.items]
        self.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        self.stop_ids = _stop_ids(model, tokenizer)

    def prompt(self, i: int) -> tuple[str, torch.Tensor | None]:
        """(prompt text, pixel tiles (n_tiles, 3, S, S) or None) of item i."""
        item, text = self.bench.items[i], self.texts[i]
        if item.image is not None:
            from ..models.image_processing import build_image_prompt

            return build_image_prompt(self.model.config, self.tok, item.image, text, max_tiles=self.max_tiles,
                                      chat=self.chat)
        if self.chat and getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
        elif self.chat and getattr(self.model.config, "template", None) == "internlm2-chat":
            from ..models.chat_prompt import internlm2_chat_prompt

            text = internlm2_chat_prompt(text)
        return text, None

    def encode(self, text: str) -> list[int]:
        # a chat template writes its own special tokens (as `mmmamba generate` does)
        return self.tok(text, add_special_tokens=not self.chat)["input_ids"]

    def order(self) -> list[int]:
        """Items longest question first: batches of similar length, and an out-of-memory shows at once."""
        return sorted(range(len(self.texts)), key=lambda i: -len(self.texts[i]))


def _stop_ids(model, tok) -> list[int]:
    ids = []
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), getattr(model.config, "eos_token_id", None), tok.eos_token_id):
        ids += [src] if isinstance(src, int) else list(src or [])
    for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tok.convert_tokens_to_ids(special) if special in tok.get_vocab() else None
        if tid is not None:
            ids.append(tid)
    return sorted(set(ids))


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (b, n) and attention mask (b, n), padded on the left."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, n - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, n - len(s):] = 1
    return ids, mask


def _batches(order: list[int], batch_size: int, per_item, collate, progress: bool, desc: str, workers: int):
    """Yield (batch indices, collate([per_item(i) for i in batch])) while the next batch is prepared: its items
    on `workers` threads (image resizing and normalisation, tokenisation and torch release the GIL)."""
    chunks = [order[a:a + batch_size] for a in range(0, len(order), batch_size)]
    bar = tqdm(total=len(order), desc=desc, unit="item", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as batcher, ThreadPoolExecutor(max_workers=workers) as pool:
        def make(chunk):
            return collate(list(pool.map(per_item, chunk)))

        nxt = batcher.submit(make, chunks[0]) if chunks else None
        for k, chunk in enumerate(chunks):
            ready = nxt.result()
            nxt = batcher.submit(make, chunks[k + 1]) if k + 1 < len(chunks) else None
            yield chunk, ready
            bar.update(len(chunk))
    bar.close()


def _workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _pixels(tiles: list[torch.Tensor | None], model) -> torch.Tensor | None:
    tiles = [t for t in tiles if t is not None]
    if not tiles:
        return None
    return torch.cat(tiles).to(model.device, model.dtype, non_blocking=True)


@torch.no_grad()  # not inference_mode: the engine's fused weights must stay ordinary tensors of the model
def _run_generate(model, prep: Prompter, batch_size: int, max_new_tokens: int, progress: bool,
                  engine: bool | None) -> list[dict]:
    use_engine = model.device.type == "cuda" if engine is None else engine
    if not use_engine:
        return _generate_batches(model, model, prep, batch_size, max_new_tokens, progress)
    from ..inference.engine import Engine

    runner = Engine(model)
    try:
        return _generate_batches(model, runner, prep, batch_size, max_new_tokens, progress)
    finally:  # the model leaves as it came: own weight storage per projection (trainable, savable), no cache
        runner.unfuse()
        runner.release()


def _generate_batches(model, runner, prep: Prompter, batch_size: int, max_new_tokens: int,
                      progress: bool) -> list[dict]:

    def per_item(i):
        text, tiles = prep.prompt(i)
        return prep.encode(text), tiles

    def collate(items):
        ids, mask = left_pad([x[0] for x in items], prep.pad_id)
        return ids, mask, [x[1] for x in items]

    new: list[list[int]] = [[] for _ in prep.texts]
    stops = set(prep.stop_ids)
    for chunk, (ids, mask, tiles) in _batches(prep.order(), batch_size, per_item, collate, progress,
                                                      f"eval {prep.bench.name}", _workers()):
        gen = runner.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                              pixel_values=_pixels(tiles, model), max_new_tokens=max_new_tokens,
                              eos_token_id=prep.stop_ids or None)
        for i, toks in zip(chunk, gen[:, ids.shape[1]:].tolist()):
            new[i] = toks[:next((k for k, t in enumerate(toks) if t in stops), len(toks))]
    # decoded after the loop, when no worker uses the tokenizer any more
    return [{"text": prep.tok.decode(t, skip_special_tokens=True).strip(), "new_tokens": len(t)} for t in new]


def _candidates(bench: Bench, item) -> list[str]:
    if bench.task == "mc":
        return list(item.options)
    if bench.task == "yesno":
        return ["Yes", "No"]
    if not bench.choices:
        raise ValueError(f"benchmark {bench.name!r} has open answers and no closed answer set: "
                         "log-likelihood scoring needs candidates; use mode='generate'")
    return list(bench.choices)


def _continuations(prep: Prompter, context: str, cands: list[str]) -> tuple[list[int], list[list[int]]]:
    """Context ids and each candidate's continuation ids, split from the encoding of context + candidate (lm-eval's
    way, so the tokenizer sees the joint text); a candidate whose joint encoding does not start with the
    context's is encoded on its own."""
    ctx = prep.encode(context)
    conts = []
    for c in cands:
        whole = prep.encode(context + c)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else prep.tok(c, add_special_tokens=False)["input_ids"]
        if not cont:
            raise ValueError(f"candidate {c!r} encodes to no tokens")
        conts.append(cont)
    return ctx, conts


@torch.inference_mode()
def _run_loglik(model, prep: Prompter, batch_size: int, progress: bool) -> list[dict]:
    """Rows = (item, ids, tiles, [(candidate, continuation ids, offset of the continuation in ids)]): one row per
    item when every continuation is a single token (scored from the prompt's last logits), else one per candidate."""
    bench = prep.bench

    def per_item(i):
        cands = _candidates(bench, bench.items[i])
        text, tiles = prep.prompt(i)
        ctx, conts = _continuations(prep, text, cands)
        if all(len(c) == 1 for c in conts):
            return [(i, ctx, tiles, [(c, t, len(ctx)) for c, t in zip(cands, conts)])]
        return [(i, ctx + t, tiles, [(c, t, len(ctx))]) for c, t in zip(cands, conts)]

    def collate(items):
        rows = [r for rs in items for r in rs]
        ids, mask = left_pad([r[1] for r in rows], prep.pad_id)
        return rows, ids, mask

    scores: dict[int, dict[str, float]] = {}
    for _, (rows, ids, mask) in _batches(prep.order(), batch_size, per_item, collate, progress,
                                         f"loglik {bench.name}", _workers()):
        L = ids.shape[1]
        # logits at positions offset-1 .. offset+len-2 of each row; kept from the end (rows end together)
        keep = max(len(r[1]) - off + 1 for r in rows for _, _, off in r[3])
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       pixel_values=_pixels([r[2] for r in rows], model), logits_to_keep=keep).logits
        where, owners = [], []  # (row, kept position, token) of every scored token, and its (item, candidate)
        for b, (i, seq, _, cands) in enumerate(rows):
            pad = L - len(seq)
            for cand, cont, off in cands:
                where += [(b, keep - L + pad + off - 1 + j, t) for j, t in enumerate(cont)]
                owners += [(i, cand)] * len(cont)
        bs, ps, ts = torch.tensor(where, device=logits.device).T
        lp = (logits[bs, ps, ts].float() - torch.logsumexp(logits[bs, ps].float(), dim=-1)).tolist()
        for (i, cand), v in zip(owners, lp):
            item = scores.setdefault(i, {})
            item[cand] = item.get(cand, 0.0) + v
    out = []
    for i in range(len(bench.items)):
        best = max(scores[i], key=scores[i].get)
        out.append({"text": best, "logliks": scores[i]})
    return out


def markdown_table(result: dict) -> str:
    """A markdown table of the scalar metrics (and per-category values) of an `evaluate` result."""
    lines = ["| bench | task | n | metric | value |", "|---|---|---|---|---|"]
    for k, v in result["metrics"].items():
        if isinstance(v, int | float):
            lines.append(f"| {result['bench']} | {result['task']} | {result['n']} | {k} | {_fmt(k, v)} |")
    per = result["metrics"].get("per_category")
    if per:
        lines += ["", "| category | " + " | ".join(_per_keys(per)) + " |", "|---" * (len(_per_keys(per)) + 1) + "|"]
        for c, v in per.items():
            vals = [_fmt(k, v[k]) for k in _per_keys(per)] if isinstance(v, dict) else [_fmt("accuracy", v)]
            lines.append(f"| {c} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _per_keys(per: dict) -> list[str]:
    first = next(iter(per.values()))
    return [k for k in first if k != "n"] if isinstance(first, dict) else ["accuracy"]


def _fmt(key: str, v) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return f"{v:.2f}" if key in ("perception", "cognition", "acc", "acc_plus", "score") else f"{100 * v:.2f} %"


def write_results(result: dict, out_dir: str | Path) -> Path:
    """results.json (everything but the predictions), results.md and predictions.jsonl, each written atomically."""
    from ..io import atomic_write_text

    out = Path(out_dir)
    summary = {k: v for k, v in result.items() if k != "predictions"}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "results.md", markdown_table(result))
    atomic_write_text(out / "predictions.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result["predictions"]))
    return out
