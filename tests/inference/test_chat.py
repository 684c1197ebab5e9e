"""Conversation: chat template over the history, images at any turn, trimming to the context budget, clear image
errors, streaming, and the notice when the model ends its answer at once."""

from __future__ import annotations

import pytest
import torch
from chat_models import tiny_tokenizer, write_png, write_tiny_vlm

from mmmamba.inference.chat import Conversation
from mmmamba.io import load_model


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    d = write_tiny_vlm(tmp_path_factory.mktemp("vlm") / "m")
    return load_model(d), tiny_tokenizer()


def _conv(vlm, **kw):
    model, tok = vlm
    return Conversation(model, tok, **{"max_new_tokens": 4, "max_tiles": 2, **kw})


class Chunks:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, ids):
        self.chunks.append(ids.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_turns_accumulate_in_the_template_and_tokens_stream(vlm):
    conv = _conv(vlm)
    s = Chunks()
    r1 = conv.reply("hello what is this", s)
    assert s.ended and len(s.chunks) == 1 + r1.new_tokens  # the prompt, then one chunk per token
    assert r1.new_tokens == 4 and r1.text and not r1.stopped_at_once and r1.tokens_per_s > 0
    conv.reply("tell me more")
    ids, px, dropped = conv.prompt(conv.history)
    text = conv.tokenizer.decode(ids[0])
    assert text.count("<|im_start|>") == 5 and dropped == 0 and px is None  # 4 turns + the answer's
    assert [t.role for t in conv.history] == ["user", "assistant", "user", "assistant"]
    assert conv.history[1].text == r1.text
    conv.reset()
    assert conv.history == [] and conv.pending_image is None


def test_images_mid_conversation(vlm, tmp_path):
    conv = _conv(vlm)
    conv.reply("hello")
    assert conv.add_image(write_png(tmp_path / "a.png", 60, 28)) == 3  # 2 tiles + thumbnail
    conv.reply("describe this picture")
    assert conv.pending_image is None and conv.history[2].pixel_values.shape == (3, 3, 28, 28)
    conv.add_image(write_png(tmp_path / "b.png", 28, 28, seed=1))  # one tile
    conv.reply("and this")
    ids, px, _ = conv.prompt(conv.history)
    img_id = conv.model.config.img_context_token_id
    assert px.shape[0] == 4 and int((ids == img_id).sum()) == 4 * 4  # 4 tiles x 4 tokens, in order
    assert conv.tokenizer.decode(ids[0]).count("<img>") == 2


def test_missing_or_corrupt_image_leaves_the_conversation_as_it_was(vlm, tmp_path):
    conv = _conv(vlm)
    conv.reply("hello")
    before = list(conv.history)
    with pytest.raises(FileNotFoundError, match="nope.png does not exist"):
        conv.add_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="bad.png could not be read as an image"):
        conv.add_image(bad)
    assert conv.pending_image is None and conv.history == before
    assert conv.reply("yes").text is not None and len(conv.history) == 4


def test_text_only_model_refuses_images(make_model, tmp_path):
    conv = Conversation(make_model(["attention", "mamba2"] * 2), tiny_tokenizer(), max_new_tokens=2)
    with pytest.raises(ValueError, match="no vision front"):
        conv.add_image(write_png(tmp_path / "a.png"))


def test_history_is_trimmed_oldest_first_to_the_budget(vlm):
    conv = _conv(vlm, max_context=40, max_new_tokens=4)
    dropped = [conv.reply(words).dropped_turns for words in ["one two three", "red blue green", "cat dog mat",
                                                              "big small yes", "no more please"]]
    assert dropped[0] == 0 and sum(dropped) > 0 and all(d % 2 == 0 for d in dropped)  # whole exchanges go
    kept = [t.text for t in conv.history if t.role == "user"]
    assert kept[-1] == "no more please" and "one two three" not in kept
    assert conv.history[0].role == "user"
    ids, _, again = conv.prompt(conv.history[:-1])  # the prompt of the last answer fitted
    assert ids.shape[1] + 4 <= 40 and again == 0


def test_a_message_longer_than_the_budget_is_refused(vlm):
    conv = _conv(vlm, max_context=24, max_new_tokens=4)
    conv.reply("hello")
    before = list(conv.history)
    with pytest.raises(ValueError, match="the message is too long"):
        conv.reply(" ".join(["cat"] * 40))
    assert conv.history == before


def test_stopped_at_once_is_reported(tmp_path):
    d = write_tiny_vlm(tmp_path / "m", eos_first=True)
    conv = Conversation(load_model(d), tiny_tokenizer(), max_new_tokens=8)
    r = conv.reply("hello")
    assert r.stopped_at_once and r.text == "" and r.new_tokens == 1
    assert "ended its answer at once" in r.notice() and "<|im_" in r.notice()
    assert conv.history[-1].text == ""


def test_budget_must_leave_room():
    with pytest.raises(ValueError, match="leaves no room"):
        Conversation(torch.nn.Linear(1, 1), tiny_tokenizer(), max_new_tokens=64, max_context=64)


def test_engine_runner_gives_the_same_conversation(vlm, tmp_path):
    from mmmamba.inference.engine import Engine

    model, tok = vlm
    png = write_png(tmp_path / "a.png", 60, 28)
    replies = []
    for runner in (model, Engine(model, kernels="torch")):
        conv = Conversation(model, tok, runner, max_new_tokens=6, max_tiles=2,
                            gen_kwargs=dict(repetition_penalty=1.3))
        conv.add_image(png)
        replies.append([conv.reply("describe this picture").text, conv.reply("tell me more").text])
        if runner is not model:
            runner.unfuse()
    assert replies[0] == replies[1] and all(replies[0])
