"""Benchmark metrics with the standard answer extraction (VQA v2 evaluation, VLMEvalKit's rule-based matching).

Every score here is a fraction in [0, 1] except the MME scores, which are on MME's own scale (x100 per sub-task).
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

from .normalize import normalize_answer, strip_punctuation

# VLMEvalKit's MME categories: perception (10 sub-tasks, 2000 points) and cognition (4 sub-tasks, 800 points)
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
POPE_CATEGORIES = ("adversarial", "popular", "random")
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")


# -- VQA ----------------------------------------------------------------------------------------------------------
def vqa_accuracy(prediction: str, answers: str | list[str]) -> float:
    """VQA accuracy of one prediction against its human answers, both normalised (`normalize_answer`).

    With n >= 2 answers: mean over the n leave-one-out subsets of min(#answers in the subset equal to the
    prediction / 3, 1) -- for VQA's 10 answers, the average over the 10-choose-9 subsets. With one answer: exact
    match after normalisation."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    scores = []
    for others in combinations(gts, len(gts) - 1):
        scores.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(scores) / len(scores)


def match_any(prediction: str, answers: str | list[str]) -> float:
    """1 if the normalised prediction equals any normalised accepted answer (aliases of one answer)."""
    answers = [answers] if isinstance(answers, str) else answers
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


# -- multiple choice ----------------------------------------------------------------------------------------------
def _option_letter(text: str, letters) -> str | None:
    """A letter that stands alone in `text` (after '.()[],:;!*#{}' become spaces), if exactly one of the options'
    letters does; "Z" for a known refusal; None otherwise (VLMEvalKit's `can_infer_option`)."""
    if any(r in text for r in _REFUSALS):
        return "Z"
    for c in ".()[],:;!*#{}":
        text = text.replace(c, " ")
    words = set(text.split())
    found = [c for c in letters if c in words]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in words:
        return "Z"
    return None


def _option_text(text: str, options: dict[str, str]) -> str | None:
    """The option whose text occurs (case-insensitive) in `text`, if exactly one does (`can_infer_text`)."""
    low = text.lower()
    found = [k for k, v in options.items() if str(v).lower() in low]
    return found[0] if len(found) == 1 else None


def extract_option(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text answer names, or None (no match, or ambiguous), before any judge model.

    First a lone option letter ("The answer is (B)." -> "B"; "A or B" -> ambiguous), then the one option whose
    text the answer contains ("It is a cat." with options {A: cat, B: dog} -> "A")."""
    letter = _option_letter(str(prediction), list(options))
    if letter is not None:
        return letter
    return _option_text(str(prediction), options)


def mc_scores(records: list[dict]) -> dict:
    """records: {"correct": bool, "extracted": letter or None, "category": str|None, "group": key or None}.

    accuracy; no_match (share of answers with no extractable letter); accuracy per category; and, when some rows
    share a group (VLMEvalKit's circular copies of one question with the options rotated), circular_accuracy:
    a question counts only if every copy is right."""
    n = len(records)
    out = {"accuracy": sum(r["correct"] for r in records) / n,
           "no_match": sum(r["extracted"] is None for r in records) / n}
    out.update(_per_category(records, "correct"))
    groups = defaultdict(list)
    for r in records:
        if r.get("group") is not None:
            groups[r["group"]].append(r["correct"])
    if groups and any(len(v) > 1 for v in groups.values()):
        out["circular_accuracy"] = sum(all(v) for v in groups.values()) / len(groups)
    return out


def _per_category(records: list[dict], key: str) -> dict:
    cats = defaultdict(list)
    for r in records:
        if r.get("category"):
            cats[r["category"]].append(float(r[key]))
    if len(cats) < 2:
        return {}
    return {"per_category": {c: sum(v) / len(v) for c, v in sorted(cats.items())}}


# -- yes / no -----------------------------------------------------------------------------------------------------
def extract_yes_no(prediction: str) -> str | None:
    """"Yes" / "No" when the answer's words (punctuation stripped, lower-cased) contain exactly one of yes / no,
    else None ("Yes." -> "Yes"; "yes, it is" -> "Yes"; "yes and no" -> None). VLMEvalKit's `YOrN_Extraction`."""
    words = strip_punctuation(str(prediction).lower()).split()
    yes, no = "yes" in words, "no" in words
    if yes and not no:
        return "Yes"
    if no and not yes:
        return "No"
    return None


def yes_no_scores(records: list[dict]) -> dict:
    """records: {"pred": "Yes"/"No"/None, "answer": "Yes"/"No", "category"}: accuracy, unknown share, per category."""
    recs = [dict(r, correct=r["pred"] == r["answer"]) for r in records]
    out = {"accuracy": sum(r["correct"] for r in recs) / len(recs),
           "no_match": sum(r["pred"] is None for r in recs) / len(recs)}
    out.update(_per_category(recs, "correct"))
    return out


def pope_scores(records: list[dict]) -> dict:
    """POPE: per category accuracy, precision, recall, F1 ("yes" is the positive class; an answer that is neither
    yes nor no counts as "no") and yes-ratio; their unweighted means over the categories (the paper's POPE number
    is the mean F1 over adversarial / popular / random)."""
    cats = defaultdict(list)
    for r in records:
        cats[r.get("category") or "all"].append(r)
    per = {c: _binary_scores(rs) for c, rs in sorted(cats.items())}
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    out = {k: sum(p[k] for p in per.values()) / len(per) for k in keys}
    out["per_category"] = per
    return out


def _binary_scores(records: list[dict]) -> dict:
    tp = sum(r["answer"] == "Yes" and r["pred"] == "Yes" for r in records)
    fp = sum(r["answer"] != "Yes" and r["pred"] == "Yes" for r in records)
    fn = sum(r["answer"] == "Yes" and r["pred"] != "Yes" for r in records)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(records)
    return {"accuracy": sum(r["answer"] == r["pred"] for r in records) / n, "precision": precision,
            "recall": recall, "f1": f1, "yes_ratio": sum(r["pred"] == "Yes" for r in records) / n, "n": n}


def mme_scores(records: list[dict]) -> dict:
    """MME: per sub-task acc = 100 * share of right answers and acc+ = 100 * share of images (records sharing
    "group") with every question right; score = acc + acc+; perception = sum of the perception sub-tasks' scores
    (max 2000), cognition likewise (max 800)."""
    cats = defaultdict(list)
    for r in records:
        cats[r["category"]].append(r)
    per = {}
    for c, rs in sorted(cats.items()):
        images = defaultdict(list)
        for r in rs:
            images[r["group"]].append(r["pred"] == r["answer"])
        acc = 100 * sum(r["pred"] == r["answer"] for r in rs) / len(rs)
        acc_plus = 100 * sum(all(v) for v in images.values()) / len(images)
        per[c] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    out = {"perception": sum(v["score"] for c, v in per.items() if c in MME_PERCEPTION),
           "cognition": sum(v["score"] for c, v in per.items() if c in MME_COGNITION),
           "accuracy": sum(r["pred"] == r["answer"] for r in records) / len(records)}
    other = sorted(set(per) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if other:
        out["unscored_categories"] = other
    out["per_category"] = per
    return out
