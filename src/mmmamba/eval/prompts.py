"""Question text per benchmark type, as mmMamba's VLMEvalKit wrapper (`eval/mmMamba.py` of the paper's code)
builds it.

* multiple choice: [hint + "\\n"] question, then "\\nA. option" per option, then
  "\\nAnswer with the option's letter from the given choices directly."
* MME: question + " Answer the question using a single word or phrase."
* POPE and other yes / no sets: " Please answer yes or no." removed, then
  "\\nAnswer the question using a single word or phrase."
* short answer (VQA): question + "\\nAnswer the question using a single word or phrase."
"""

from __future__ import annotations

from .tsv import Bench, Item

SHORT = "Answer the question using a single word or phrase."
MC = "Answer with the option's letter from the given choices directly."


def question_text(bench: Bench, item: Item) -> str:
    q = item.question
    if bench.task == "mc":
        if item.hint:
            q = f"{item.hint}\n{q}"
        q += "".join(f"\n{k}. {v}" for k, v in item.options.items())
        return f"{q}\n{MC}"
    if bench.metric == "mme":
        return f"{q} {SHORT}"
    if bench.task == "yesno":
        return f"{q.replace(' Please answer yes or no.', '')}\n{SHORT}"
    return f"{q}\n{SHORT}"
