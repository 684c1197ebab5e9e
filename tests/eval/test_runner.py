"""`mmmamba eval` end to end on tiny random models: VLMEvalKit TSV with base64 PNGs, text TSV in loglik mode."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import byte_tokenizer, make_model, png_b64, write_tsv

from mmmamba.cli import main
from mmmamba.eval import Bench, Item, evaluate, load_file
from mmmamba.eval.prompts import question_text
from mmmamba.eval.score import score_predictions
from mmmamba.io import save_model

HEADER = ["index", "question", "A", "B", "C", "answer", "image", "category", "hint"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("eval") / "vlm"
    save_model(make_model(tok, True, ["attention", "mamba2", "attention", "mamba2"]), out, tok)
    return out


@pytest.fixture(scope="module")
def mc_tsv(tmp_path_factory):
    """4 image questions; row 3 reuses row 1's image by index, as VLMEvalKit stores repeated images; C empty on
    row 2 (a two-option question)."""
    path = tmp_path_factory.mktemp("tsv") / "tiny_MMB.tsv"
    write_tsv(path, HEADER, [
        [1, "What colour is it?", "red", "green", "blue", "B", png_b64(1), "colour", ""],
        [2, "Is it big?", "yes", "no", "", "A", png_b64(2, (40, 12)), "size", "Look closely."],
        [3, "What shape?", "round", "square", "flat", "C", "1", "shape", ""],
        [4, "Count them.", "one", "two", "three", "A", png_b64(4), "count", ""],
    ])
    return path


def test_tsv_loader(mc_tsv):
    b = load_file(mc_tsv)
    assert (b.name, b.task, b.metric, len(b.items)) == ("tiny_MMB", "mc", "mc", 4)
    assert b.items[1].options == {"A": "yes", "B": "no"} and b.items[1].hint == "Look closely."
    assert b.items[2].image is b.items[0].image  # the reference resolved to row 1's image
    assert b.items[0].image.size == (20, 14) and [it.answer for it in b.items] == ["B", "A", "C", "A"]
    assert question_text(b, b.items[1]) == ("Look closely.\nIs it big?\nA. yes\nB. no\n"
                                            "Answer with the option's letter from the given choices directly.")


def test_tsv_loader_errors(tmp_path):
    bad = tmp_path / "bad.tsv"
    write_tsv(bad, ["index", "question", "A", "B", "answer"], [[1, "q", "x", "y", "E"]])
    with pytest.raises(ValueError, match="not one of its options"):
        load_file(bad)
    write_tsv(bad, ["index", "question", "answer", "image"], [[1, "q", "yes", "bm90IGFuIGltYWdl" * 6]])
    with pytest.raises(ValueError, match="row 1: the image column is not a base64-encoded image"):
        load_file(bad)
    write_tsv(bad, ["index", "question", "answer", "image"], [[1, "q", "yes", "7"]])
    with pytest.raises(ValueError, match="refers to row '7'"):
        load_file(bad)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="must end in .tsv"):
        load_file(tmp_path / "x.csv")


def test_task_detection_and_scoring(tmp_path):
    """Yes/no files become MME or POPE by category; short answers use VQA accuracy (list literals parsed)."""
    p = tmp_path / "x.tsv"
    write_tsv(p, ["index", "question", "answer", "category", "image_path"], [
        [1, "Is there a dog? Please answer yes or no.", "Yes", "existence", "a.jpg"],
        [2, "Is there a cat? Please answer yes or no.", "No", "existence", "a.jpg"],
        [3, "Is it red? Please answer yes or no.", "yes", "color", "b.jpg"],
        [4, "Is it blue? Please answer yes or no.", "no", "color", "b.jpg"]])
    mme = load_file(p)
    assert (mme.task, mme.metric) == ("yesno", "mme")
    assert question_text(mme, mme.items[0]).endswith("yes or no. Answer the question using a single word or phrase.")
    m, recs = score_predictions(mme, ["Yes.", "no", "Yes", "yes, it is"])
    # existence: both right -> 100 + 100; color: 1 of 2, image b not all right -> 50 + 0
    assert m["perception"] == pytest.approx(250.0)
    assert [r["extracted"] for r in recs] == ["Yes", "No", "Yes", "Yes"]
    write_tsv(p, ["index", "question", "answer", "category"], [
        [1, "Is there a dog in the image? Please answer yes or no.", "yes", "random"],
        [2, "Is there a cat in the image? Please answer yes or no.", "no", "popular"]])
    pope = load_file(p)
    assert pope.metric == "pope"
    assert question_text(pope, pope.items[0]) == ("Is there a dog in the image?\n"
                                                  "Answer the question using a single word or phrase.")
    j = tmp_path / "vqa.jsonl"
    j.write_text(json.dumps({"index": 1, "question": "How many?", "answer": "two"}) + "\n"
                 + json.dumps({"index": 2, "question": "Which?", "answer": "['2', 'two', '3']"}) + "\n")
    vqa = load_file(j)
    assert (vqa.task, vqa.metric) == ("short", "vqa")
    m, _ = score_predictions(vqa, ["Two.", "2"])
    # item 1: "Two." -> "2" vs "two" -> "2": right. Item 2 (a TextVQA-style list literal): answers normalise to
    # 2, 2, 3; the leave-one-out subsets hold 1, 1 and 2 matches -> (1/3 + 1/3 + 2/3) / 3
    assert m["vqa_accuracy"] == pytest.approx((1.0 + 4 / 9) / 2)


def _eval_cli(model_dir, bench, out, *flags):
    return main(["eval", "--model", str(model_dir), "--bench", str(bench), "--out", str(out), "--device", "cpu",
                 "--no-progress", *flags])


def test_eval_cli_on_image_tsv(vlm_dir, mc_tsv, tmp_path, capsys, tok):
    capsys.readouterr()
    assert _eval_cli(vlm_dir, mc_tsv, tmp_path / "r", "--batch-size", "3", "--max-new-tokens", "5") == 0
    printed = capsys.readouterr().out
    assert "| tiny_MMB | mc | 4 | accuracy |" in printed
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    preds = [json.loads(x) for x in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    assert res["n"] == 4 and len(preds) == 4 and res["config"]["chat"] is True
    assert (tmp_path / "r" / "results.md").read_text().startswith("| bench |")
    # batched, left-padded generation (3 + 1 items, images of 1 and 2 tiles) equals one item at a time
    from mmmamba.io import load_model
    from mmmamba.models.image_processing import build_image_prompt

    model = load_model(vlm_dir).eval()
    bench = load_file(mc_tsv)
    for it, p in zip(bench.items, preds):
        text, px = build_image_prompt(model.config, tok, it.image, question_text(bench, it), max_tiles=6)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, pixel_values=px, max_new_tokens=5, eos_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert p["prediction"] == tok.decode(new, skip_special_tokens=True).strip()
    m, _ = score_predictions(bench, [p["prediction"] for p in preds])
    assert res["metrics"] == json.loads(json.dumps(m))
    # the right answers, written as a model might, score 100 %
    m, _ = score_predictions(bench, ["The answer is (B).", "A. yes", "flat", "A"])
    assert m["accuracy"] == 1.0


def test_image_bench_needs_vision_front(tmp_path, mc_tsv, tok):
    model = make_model(tok, False, ["attention"] * 4)
    with pytest.raises(ValueError, match="no vision front"):
        evaluate(model, tok, str(mc_tsv), progress=False)


def _loglik_reference(model, tok, context: str, cand: str) -> float:
    """Sum log p(continuation | context) from one unpadded forward of context + candidate."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + cand, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return float(sum(logp[p - 1, whole[p]] for p in range(len(ctx), len(whole))))


@pytest.mark.parametrize("layer_types", [["attention", "mamba2", "attention", "mamba2"], ["mamba2"] * 4])
def test_loglik_on_text_tsv(tmp_path, tok, layer_types):
    p = tmp_path / "text_mc.tsv"
    write_tsv(p, ["index", "question", "A", "B", "C", "D", "answer"], [
        [1, "2 + 2 = ?", "3", "4", "5", "22", "B"],
        [2, "Capital of France?", "Paris", "Rome", "Oslo", "", "A"],
        [3, "A long question about the colour of the sky at noon on a clear day?", "blue", "red", "", "", "A"]])
    model = make_model(tok, False, layer_types)
    res = evaluate(model, tok, str(p), mode="loglik", batch_size=2, progress=False, out_dir=tmp_path / "o")
    bench = load_file(p)
    for it, rec in zip(bench.items, res["predictions"]):
        ctx = tok.apply_chat_template([{"role": "user", "content": question_text(bench, it)}], tokenize=False,
                                      add_generation_prompt=True)
        ref = {c: _loglik_reference(model, tok, ctx, c) for c in it.options}
        assert rec["logliks"] == pytest.approx(ref, abs=1e-4)
        assert rec["prediction"] == max(ref, key=ref.get)
    assert res["metrics"]["accuracy"] == pytest.approx(
        sum(r["prediction"] == it.answer for r, it in zip(res["predictions"], bench.items)) / 3)


def test_loglik_multi_token_candidates(tok):
    """Open answers with a closed answer set: each candidate (several tokens) scored in its own padded row."""
    items = [Item(index=str(i), question=q, answer=[a]) for i, (q, a) in
             enumerate([("Colour?", "red"), ("Shape of a ball?", "circle"), ("Sky?", "blue")])]
    bench = Bench("toy", "short", "vqa", items, choices=["red", "blue", "circle", "dark green"])
    model = make_model(tok, False, ["attention", "mamba2"] * 2)
    res = evaluate(model, tok, bench, mode="loglik", batch_size=3, progress=False, chat=False)
    for it, rec in zip(items, res["predictions"]):
        ref = {c: _loglik_reference(model, tok, question_text(bench, it), c) for c in bench.choices}
        assert rec["logliks"] == pytest.approx(ref, abs=1e-4)
    with pytest.raises(ValueError, match="no closed answer set"):
        evaluate(model, tok, Bench("open", "short", "vqa", items), mode="loglik", progress=False)
