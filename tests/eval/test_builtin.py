"""Built-in offline benchmarks: easy-VQA test split and Fashion-MNIST test images."""

from __future__ import annotations

import importlib.util

import pytest
from eval_helpers import byte_tokenizer, make_model

from mmmamba.data.corpora import FASHION_MNIST_DIR
from mmmamba.eval import Bench, Item, evaluate, load_bench
from mmmamba.eval.prompts import question_text

needs_easy_vqa = pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="pip install easy-vqa")
needs_fashion = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                                   reason="apt-get install dataset-fashion-mnist")


@needs_easy_vqa
def test_easy_vqa_test_split():
    b = load_bench("easy-vqa")
    assert (b.task, b.metric, len(b.items)) == ("short", "vqa", 9673)
    assert len(b.choices) == 13 and "yes" in b.choices
    assert len({id(it.image) for it in b.items}) == 1000  # one decoded image per picture, shared by its questions
    assert b.items[0].image.size == (64, 64)
    assert question_text(b, b.items[0]).endswith("?\nAnswer the question using a single word or phrase.")


@needs_fashion
def test_fashion_mnist_both_forms():
    mc = load_bench("fashion-mnist", limit=5)
    assert (mc.task, len(mc.items)) == ("mc", 5)
    assert list(mc.items[0].options.values())[0] == "T-shirt/top" and len(mc.items[0].options) == 10
    assert mc.items[0].answer == "J"  # the first test image is an ankle boot (label 9)
    assert len(load_bench("fashion-mnist").items) == 10_000
    op = load_bench("fashion-mnist-open", limit=5)
    assert op.metric == "match_any" and op.items[0].answer == ["Ankle boot", "boot"]


@needs_fashion
def test_tiny_vlm_on_fashion_mnist_with_and_without_engine():
    tok = byte_tokenizer()
    model = make_model(tok, True, ["attention", "mamba2", "attention", "mamba2"])
    a = evaluate(model, tok, "fashion-mnist", limit=6, batch_size=4, max_new_tokens=4, progress=False)
    b = evaluate(model, tok, "fashion-mnist", limit=6, batch_size=4, max_new_tokens=4, progress=False, engine=True)
    assert a["n"] == 6 and [p["prediction"] for p in a["predictions"]] == [p["prediction"] for p in b["predictions"]]
    assert a["config"]["max_tiles"] == 6


def test_unknown_bench():
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        load_bench("nope")


def test_engine_leaves_the_model_unfused():
    """After an engine run every projection owns its storage again (the model can be trained and saved)."""
    tok = byte_tokenizer()
    model = make_model(tok, False, ["attention", "mamba2"] * 2)
    items = [Item(index="0", question="Colour?", answer=["red"])]
    evaluate(model, tok, Bench("toy", "short", "vqa", items), max_new_tokens=2, progress=False, engine=True)
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs)
    assert not any(p.is_inference() for p in model.parameters())
