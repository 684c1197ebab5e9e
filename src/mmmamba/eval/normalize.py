"""Answer normalisation of the standard VQA evaluation (VQA v2 `vqaEval.py`, as VLMEvalKit's `process_answer`).

normalize_answer(s): newlines / tabs -> spaces, strip; punctuation; then per lower-cased word: number words ->
digits ("two" -> "2", "none" -> "0"), articles (a, an, the) dropped, apostrophe-less contractions restored
("dont" -> "don't").

Punctuation: each of `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !` is deleted when it touches a space (or the
text contains a digit,digit group such as "1,000"), otherwise replaced by a space; then every "." not followed
by a digit is deleted (so "3.5" keeps its point).
"""

from __future__ import annotations

import itertools
import re

PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")

# The contractions the VQA script restores, written with their apostrophes; its table maps every spelling with
# one or more apostrophes left out to the full form (e.g. "couldnt've", "couldn've", "couldntve" -> "couldn't've").
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she'd she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we'd we'll we're we've weren't what'll what're "
    "what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't "
    "would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
# words of their own that the VQA table leaves alone; its "I'm", "I'd've" keys keep a capital I, so they never match
# the lower-cased words either
_KEPT = ("its", "well", "were", "wed", "hell", "shell", "shed", "lets")


def _contraction_table() -> dict[str, str]:
    table = {}
    for full in _CONTRACTIONS:
        cuts = [i for i, c in enumerate(full) if c == "'"]
        for r in range(1, len(cuts) + 1):
            for drop in itertools.combinations(cuts, r):
                table["".join(c for i, c in enumerate(full) if i not in drop)] = full
    for word in _KEPT:
        table.pop(word, None)
    return table


CONTRACTIONS = _contraction_table()


def strip_punctuation(text: str) -> str:
    out = text
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCT:
        if glued or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The VQA evaluation's normalised form of an answer (see the module docstring)."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return digits_articles(strip_punctuation(text))
