"""Score a benchmark's predictions: per-item extraction and correctness, then the benchmark's metric."""

from __future__ import annotations

from . import metrics as M
from .tsv import Bench


def score_predictions(bench: Bench, predictions: list[str]) -> tuple[dict, list[dict]]:
    """(metrics, per-item records) for `predictions[i]` answering `bench.items[i]`.

    Each record: index, answer, prediction, extracted (the letter / Yes / No read from the prediction, or the
    normalised short answer), score (1/0, or the VQA accuracy), category."""
    if len(predictions) != len(bench.items):
        raise ValueError(f"{len(predictions)} predictions for {len(bench.items)} items")
    records = []
    for it, pred in zip(bench.items, predictions):
        rec = {"index": it.index, "question": it.question, "answer": it.answer, "prediction": pred,
               "category": it.category,
               "group": it.group}
        if bench.task == "mc":
            rec["extracted"] = M.extract_option(pred, it.options)
            rec["score"] = float(rec["extracted"] == it.answer)
        elif bench.task == "yesno":
            rec["extracted"] = M.extract_yes_no(pred)
            rec["score"] = float(rec["extracted"] == it.answer)
        else:
            rec["extracted"] = M.normalize_answer(pred)
            fn = M.match_any if bench.metric == "match_any" else M.vqa_accuracy
            rec["score"] = fn(pred, it.answer)
        records.append(rec)
    return _metrics(bench, records), records


def _metrics(bench: Bench, records: list[dict]) -> dict:
    if bench.task == "mc":
        return M.mc_scores([dict(r, correct=bool(r["score"])) for r in records])
    if bench.task == "yesno":
        rows = [{"pred": r["extracted"], "answer": r["answer"], "category": r["category"], "group": r["group"]}
                for r in records]
        if bench.metric == "mme":
            return M.mme_scores(rows)
        if bench.metric == "pope":
            return M.pope_scores(rows)
        return M.yes_no_scores(rows)
    n = len(records)
    key = "accuracy" if bench.metric == "match_any" else "vqa_accuracy"
    out = {key: sum(r["score"] for r in records) / n}
    cats: dict[str, list[float]] = {}
    for r in records:
        if r["category"]:
            cats.setdefault(r["category"], []).append(r["score"])
    if len(cats) > 1:
        out["per_category"] = {c: sum(v) / len(v) for c, v in sorted(cats.items())}
    return out
