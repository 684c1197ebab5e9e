"""Answer normalisation, extraction and the benchmark metrics against hand-computed values."""

from __future__ import annotations

import pytest

from mmmamba.eval.metrics import (
    extract_option,
    extract_yes_no,
    match_any,
    mc_scores,
    mme_scores,
    pope_scores,
    vqa_accuracy,
    yes_no_scores,
)
from mmmamba.eval.normalize import normalize_answer


@pytest.mark.parametrize("raw, norm", [
    ("Two dogs.", "2 dogs"),            # number word, final period
    ("The Cat", "cat"),                 # article, case
    ("an apple, a pear", "apple pear"),  # comma next to a space: deleted
    ("red,blue", "red blue"),           # comma between letters: becomes a space
    ("1,000", "1000"),                  # digit,digit: punctuation deleted
    ("3.5", "3.5"),                     # a period before a digit stays
    ("yes!", "yes"),
    ("dont", "don't"),                  # contraction restored
    ("couldntve", "couldn't've"),
    ("its", "its"),                     # a word of its own, left alone
    ("none", "0"),
    ("T-shirt/top", "t shirt top"),
    ("  multi\nline\tanswer ", "multi line answer"),
    ("(b)", "b"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_ten_answers():
    # 10 answers: "2" x 2 (one written "two"), "3" x 8. For prediction "two": a subset of 9 answers holds both
    # "2"s when the left-out one is a "3" (8 subsets: min(2/3, 1)) and one "2" otherwise (2 subsets: 1/3).
    answers = ["2", "two"] + ["3"] * 8
    assert vqa_accuracy("two", answers) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy("Three.", answers) == pytest.approx(1.0)  # 7 or 8 matches in every subset -> 1
    # exactly 3 matching answers: subsets keeping all 3 (7 of them) give 1, those losing one (3) give 2/3
    answers3 = ["cat"] * 3 + ["dog"] * 7
    assert vqa_accuracy("a cat", answers3) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)
    assert vqa_accuracy("bird", answers3) == 0.0


def test_vqa_accuracy_single_answer_is_exact_match_after_normalisation():
    assert vqa_accuracy("The triangle.", ["triangle"]) == 1.0
    assert vqa_accuracy("triangles", "triangle") == 0.0
    assert vqa_accuracy("Yes.", "yes") == 1.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


def test_match_any_aliases():
    assert match_any("A T-shirt.", ["T-shirt/top", "T-shirt"]) == 1.0
    assert match_any("shirt", ["T-shirt/top", "T-shirt"]) == 0.0


OPTS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("pred, letter", [
    ("B", "B"),
    ("The answer is (B).", "B"),            # letter buried in a sentence
    ("B. dog", "B"),
    ("Answer: [C]", "C"),
    ("I think it's D, because", "D"),
    ("A or B", None),                       # two letters: ambiguous, then text match finds nothing
    ("It is a dog.", "B"),                  # no letter: the one option text it contains
    ("a dog or a cat", None),               # two option texts: ambiguous
    ("b", None),                            # lower-case letters are not option letters, nor is "b" a text
    ("Cannot determine the answer", "Z"),   # a refusal
    ("hmm", None),
])
def test_extract_option(pred, letter):
    assert extract_option(pred, OPTS) == letter


def test_extract_option_letter_wins_over_text():
    # "A" stands alone (VLMEvalKit does not guard against the article without its verbose flag)
    assert extract_option("A bird", OPTS) == "A"
    assert extract_option("bird", OPTS) == "C"


@pytest.mark.parametrize("pred, label", [
    ("Yes.", "Yes"), ("yes", "Yes"), ("yes, it is", "Yes"), ("NO!", "No"), ("No, there is not.", "No"),
    ("yes and no", None), ("maybe", None), ("Yesterday", None),
])
def test_extract_yes_no(pred, label):
    assert extract_yes_no(pred) == label


def test_mc_scores_categories_and_circular():
    recs = [
        {"correct": True, "extracted": "A", "category": "x", "group": "q1"},
        {"correct": False, "extracted": None, "category": "x", "group": "q1"},  # circular copy of q1, wrong
        {"correct": True, "extracted": "B", "category": "y", "group": "q2"},
        {"correct": True, "extracted": "C", "category": "y", "group": "q2"},
    ]
    out = mc_scores(recs)
    assert out["accuracy"] == 0.75 and out["no_match"] == 0.25
    assert out["per_category"] == {"x": 0.5, "y": 1.0}
    assert out["circular_accuracy"] == 0.5


def test_mme_scores_by_hand():
    # existence: image i1 both right, i2 one right -> acc 3/4 = 75, acc+ 1/2 = 50 -> 125
    # OCR: image i3 both right -> 100 + 100 = 200; code_reasoning (cognition): 1 of 2 -> 50 + 0 = 50
    rows = [("existence", "i1", "Yes", "Yes"), ("existence", "i1", "No", "No"),
            ("existence", "i2", "Yes", "Yes"), ("existence", "i2", "No", None),
            ("OCR", "i3", "Yes", "Yes"), ("OCR", "i3", "No", "No"),
            ("code_reasoning", "i4", "Yes", "No"), ("code_reasoning", "i4", "No", "No")]
    out = mme_scores([{"category": c, "group": g, "answer": a, "pred": p} for c, g, a, p in rows])
    assert out["per_category"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert out["perception"] == pytest.approx(325.0)
    assert out["cognition"] == pytest.approx(50.0)
    assert out["accuracy"] == 6 / 8


def test_pope_scores_by_hand():
    # random: answers Y Y N N, preds Y N Y N -> tp 1 fp 1 fn 1: acc .5, P .5, R .5, F1 .5, yes-ratio .5
    # popular: answers Y Y N N, preds Y Y N None (unknown counts as "no") -> acc 3/4, P 1, R 1, F1 1, yes .5
    rows = [("random", "Yes", "Yes"), ("random", "Yes", "No"), ("random", "No", "Yes"), ("random", "No", "No"),
            ("popular", "Yes", "Yes"), ("popular", "Yes", "Yes"), ("popular", "No", "No"), ("popular", "No", None)]
    out = pope_scores([{"category": c, "answer": a, "pred": p} for c, a, p in rows])
    assert out["per_category"]["random"]["f1"] == pytest.approx(0.5)
    assert out["per_category"]["popular"]["accuracy"] == pytest.approx(0.75)
    assert out["per_category"]["popular"]["f1"] == pytest.approx(1.0)
    assert out["f1"] == pytest.approx(0.75) and out["accuracy"] == pytest.approx(0.625)
    assert out["yes_ratio"] == pytest.approx(0.5)


def test_yes_no_scores_by_hand():
    recs = [{"pred": "Yes", "answer": "Yes", "category": None}, {"pred": None, "answer": "No", "category": None},
            {"pred": "No", "answer": "No", "category": None}, {"pred": "Yes", "answer": "No", "category": None}]
    assert yes_no_scores(recs) == {"accuracy": 0.5, "no_match": 0.25}
