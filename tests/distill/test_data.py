"""Distillation data: chat templates and label masking, text chunking / packing, pydoc split, image rows,
bad rows (reported with file:line and skipped, or raising under strict), determinism and resume."""

from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from mmmamba.data import fashion_mnist_jsonl, heldout_keys, pydoc_documents, pydoc_topics, write_pydoc_corpus
from mmmamba.distill.data import (
    INTERNLM2_SYSTEM,
    BucketBatchSampler,
    DataError,
    build_dataloader,
    build_dataset,
    skip_first_batches,
)

IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]
VISION = {"image_size": 56, "patch_size": 14}  # 4 x 4 patches -> pixel shuffle 0.5 -> 4 tokens per tile


def conv(*turns, image=None, **extra):
    row = {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}
    if image is not None:
        row["image"] = image
    return row


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def spans(mask):
    """Contiguous runs of True as (start, end)."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.fixture
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture
def image_tok(smollm2_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(smollm2_dir))
    t.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    return t


@pytest.fixture
def vision_config(make_config, image_tok):
    return make_config(vocab_size=len(image_tok), vision_config=dict(VISION),
                       img_context_token_id=image_tok.convert_tokens_to_ids("<IMG_CONTEXT>"))


def png(path, size=(56, 56), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path.name


# ---------------------------------------------------------------------------------------------- conversations
def test_labels_on_assistant_turns_only(tmp_path, tok):
    answers = ["4, of course.", "Six.\nReally: six!", ""]
    rows = [conv(("human", "What is 2+2?"), ("gpt", answers[0]), ("human", "And 3+3?"), ("gpt", answers[1]),
                 ("human", "Say nothing."), ("gpt", answers[2]))]
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    ds = build_dataset({"sources": [{"path": str(f), "split": "all"}]}, tok)
    (s,) = ds.samples
    assert s.origin == f"{f}:1"
    full = tok.decode(s.input_ids)
    expected = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in
         [("user", "What is 2+2?"), ("assistant", answers[0]), ("user", "And 3+3?"), ("assistant", answers[1]),
          ("user", "Say nothing."), ("assistant", answers[2])]], tokenize=False)
    assert full == expected  # the tokenizer's own template, untouched
    target = s.labels != -100
    assert (s.labels[target] == s.input_ids[target]).all()
    runs = spans(target)
    assert [tok.decode(s.input_ids[a:b]) for a, b in runs] == [a + "<|im_end|>" for a in answers]
    # nothing of the system prompt, user turns or assistant headers is a target
    assert "user" not in tok.decode(s.input_ids[target]) and "SmolLM" not in tok.decode(s.input_ids[target])

    # through the loader: padding is -100 and masked out
    rows2 = rows + [conv(("human", "Hi"), ("gpt", "Hello"))]
    f2 = write_jsonl(tmp_path / "chat2.jsonl", rows2)
    batch = next(iter(build_dataloader({"sources": [{"path": str(f2), "split": "all"}]}, tok, None, 2, 0)))
    short = int(batch["attention_mask"].sum(1).argmin())
    n = int(batch["attention_mask"][short].sum())
    assert (batch["input_ids"][short, n:] == tok.pad_token_id).all()
    assert (batch["labels"][short, n:] == -100).all() and (batch["attention_mask"][short, n:] == 0).all()
    lab = batch["labels"][short]
    assert tok.decode(batch["input_ids"][short][lab != -100]) == "Hello<|im_end|>"


def test_internlm2_chat_template_when_tokenizer_has_none(tmp_path, tok):
    tok.chat_template = None
    f = write_jsonl(tmp_path / "c.jsonl", [conv(("human", "Q1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2"))])
    ds = build_dataset({"sources": [{"path": str(f), "split": "all"}]}, tok)
    (s,) = ds.samples
    assert s.input_ids[0] == tok.bos_token_id and s.labels[0] == -100  # BOS first, masked (InternVL)
    assert tok.decode(s.input_ids[1:]) == (
        f"<|im_start|>system\n{INTERNLM2_SYSTEM}<|im_end|>"
        "<|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\nA2<|im_end|>"
    )
    assert [tok.decode(s.input_ids[a:b]) for a, b in spans(s.labels != -100)] == ["A1<|im_end|>", "A2<|im_end|>"]
    # a row's own system turn and the config's system prompt replace the default
    f = write_jsonl(tmp_path / "d.jsonl", [conv(("system", "Be brief."), ("human", "Q"), ("gpt", "A"))])
    (s,) = build_dataset({"sources": [{"path": str(f), "split": "all"}], "add_bos": False}, tok).samples
    assert tok.decode(s.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nQ")
    from mmmamba.models.chat_prompt import INTERNLM2_CHAT_SYSTEM

    assert INTERNLM2_SYSTEM == INTERNLM2_CHAT_SYSTEM
    f = write_jsonl(tmp_path / "e.jsonl", [conv(("human", "Q"), ("gpt", "A"))])
    cfg = {"sources": [{"path": str(f), "split": "all"}], "template": "internlm2-chat", "system": "S"}
    (s,) = build_dataset(cfg, tok).samples
    assert "<|im_start|>system\nS<|im_end|>" in tok.decode(s.input_ids)
    # a HoVLE config (template: internlm2-chat) wins over a tokenizer's own chat template
    from types import SimpleNamespace

    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    cfg = {"sources": [{"path": str(f), "split": "all"}]}
    (s,) = build_dataset(cfg, tok, SimpleNamespace(template="internlm2-chat", vision_config=None)).samples
    assert "<|im_start|>assistant\nA<|im_end|>" in tok.decode(s.input_ids)


def test_messages_shape_and_system_override(tmp_path, tok):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    f = write_jsonl(tmp_path / "m.jsonl", [row])
    (s,) = build_dataset({"sources": [{"path": str(f), "split": "all"}], "system": "Custom."}, tok).samples
    text = tok.decode(s.input_ids)
    assert text.startswith("<|im_start|>system\nCustom.<|im_end|>") and "SmolLM" not in text
    assert tok.decode(s.input_ids[s.labels != -100]) == "Yo<|im_end|>"


# ---------------------------------------------------------------------------------------------- text
def test_text_chunking_and_packing(tmp_path, tok):
    a = " ".join(f"word{i}" for i in range(700))
    b = "Short second document.\nWith two lines."
    (tmp_path / "a.txt").write_text(a)
    (tmp_path / "b.txt").write_text(b)
    cfg = {"sources": [{"type": "text", "path": str(tmp_path / "*.txt"), "split": "all"}], "max_length": 64}
    ds = build_dataset(cfg, tok)
    ids_a = tok(a, add_special_tokens=False)["input_ids"]
    ids_b = tok(b, add_special_tokens=False)["input_ids"]
    wins = [s for s in ds.samples if s.origin.startswith(str(tmp_path / "a.txt"))]
    assert np.concatenate([w.input_ids for w in wins]).tolist() == ids_a  # nothing lost, nothing repeated
    assert all(len(w) == 64 for w in wins[:-1]) and 0 < len(wins[-1]) <= 64
    assert [s.input_ids.tolist() for s in ds.samples if "b.txt" in s.origin] == [ids_b]
    assert all(s.labels is None for s in ds.samples)  # plain text: every token is a target
    batch = next(iter(build_dataloader(cfg, tok, None, 64, 0)))
    am = batch["attention_mask"].bool()
    assert (batch["labels"][am] == batch["input_ids"][am]).all() and (batch["labels"][~am] == -100).all()

    packed = build_dataset({**cfg, "text_mode": "pack"}, tok)
    stream = np.concatenate([s.input_ids for s in packed.samples]).tolist()
    assert all(len(s) == 64 for s in packed.samples[:-1])
    assert stream == (ids_a + [tok.eos_token_id] + ids_b + [tok.eos_token_id])[: len(stream)]
    assert len(stream) == len(ids_a) + len(ids_b) + 2


def test_text_heldout_split_is_the_tail(tmp_path, tok):
    text = " ".join(f"w{i}" for i in range(1000))
    (tmp_path / "t.txt").write_text(text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cfg = {"sources": [{"type": "text", "path": str(tmp_path / "t.txt"), "heldout_fraction": 0.2}], "max_length": 512}
    tr = np.concatenate([s.input_ids for s in build_dataset(cfg, tok, split="train").samples]).tolist()
    he = np.concatenate([s.input_ids for s in build_dataset(cfg, tok, split="heldout").samples]).tolist()
    assert tr + he == ids and len(he) == round(0.2 * len(ids))


def test_pydoc_corpus_split(tmp_path, tok):
    topics = pydoc_topics()
    train, held = pydoc_documents("train"), pydoc_documents("heldout")
    assert {k for k, _ in train} | {k for k, _ in held} == set(topics)
    assert not {k for k, _ in train} & {k for k, _ in held}
    assert len(held) == round(0.1 * len(topics)) and pydoc_documents("heldout") == held  # fixed, no seed
    assert heldout_keys(range(10), 0.0) == set() and len(heldout_keys(range(10), 0.3)) == 3
    paths = write_pydoc_corpus(tmp_path)
    assert held[0][1].strip()[:50] in paths["heldout"].read_text()

    cfg = {"sources": ["pydoc"], "max_length": 128}
    ds_tr, ds_he = build_dataset(cfg, tok, split="train"), build_dataset(cfg, tok, split="eval")
    names = lambda ds: {s.origin.split("#")[0] for s in ds.samples}  # noqa: E731
    assert names(ds_he) == {f"pydoc:{k}" for k, _ in held} and not names(ds_tr) & names(ds_he)
    assert all(len(s) <= 128 for s in ds_tr.samples)
    # explicit held-out sources: the train split then keeps all of `sources`
    (tmp_path / "h.txt").write_text("held out text " * 20)
    cfg2 = {"sources": ["pydoc"], "heldout_sources": [str(tmp_path / "h.txt")], "max_length": 128}
    assert names(build_dataset(cfg2, tok, split="heldout")) == {str(tmp_path / "h.txt")}
    assert names(build_dataset(cfg2, tok, split="train")) == {f"pydoc:{k}" for k in topics}


# ---------------------------------------------------------------------------------------------- images
def test_image_rows(tmp_path, image_tok, vision_config, make_model):
    from mmmamba.models.image_processing import load_image

    (tmp_path / "img").mkdir()
    sq = png(tmp_path / "img" / "square.png")
    wide = png(tmp_path / "img" / "wide.png", size=(112, 56), color=(10, 200, 10))
    rows = [
        conv(("human", "<image>\nWhat colour?"), ("gpt", "Red."), image=f"img/{sq}"),
        conv(("human", "What shape?"), ("gpt", "A wide rectangle."), image=f"img/{wide}"),  # no placeholder
        conv(("human", "No image here."), ("gpt", "Fine.")),
        conv(("human", "<image> and <image>: same?"), ("gpt", "No."),
             image=[f"img/{sq}", str(tmp_path / "img" / wide)]),  # relative and absolute paths
    ]
    f = write_jsonl(tmp_path / "vqa.jsonl", rows)
    cfg = {"sources": [{"path": str(f), "split": "all"}], "shuffle": False, "bucket": False}
    ds = build_dataset(cfg, image_tok, vision_config)
    assert not ds.bad_rows and len(ds) == 4
    n_sq, n_wide = load_image(tmp_path / "img" / sq, 56).shape[0], load_image(tmp_path / "img" / wide, 56).shape[0]
    assert (n_sq, n_wide) == (1, 3)  # 2x1 grid + thumbnail
    assert [s.n_tiles for s in ds.samples] == [(1,), (3,), (), (1, 3)]
    ctx, start, end = (image_tok.convert_tokens_to_ids(t) for t in ("<IMG_CONTEXT>", "<img>", "</img>"))
    for s in ds.samples:
        assert int((s.input_ids == ctx).sum()) == 4 * sum(s.n_tiles)
        assert int((s.input_ids == start).sum()) == int((s.input_ids == end).sum()) == len(s.n_tiles)
        assert not ((s.labels == ctx) | (s.labels == start)).any()  # image tokens are never targets
    text1 = image_tok.decode(ds.samples[1].input_ids)
    assert "user\n<img>" + "<IMG_CONTEXT>" * 12 + "</img>\nWhat shape?" in text1  # "<image>\n" prepended

    loader = build_dataloader(cfg, image_tok, vision_config, batch_size=2, seed=0)
    batches = list(loader)
    assert [b["pixel_values"].shape[0] if "pixel_values" in b else 0 for b in batches] == [4, 4]
    b0, b1 = batches
    want = torch.cat([load_image(tmp_path / "img" / sq, 56), load_image(tmp_path / "img" / wide, 56)])
    assert torch.equal(b0["pixel_values"], want) and b0["pixel_values"].shape[1:] == (3, 56, 56)
    # the batch runs through a model with a vision front: <IMG_CONTEXT> count matches the tiles
    model = make_model(vocab_size=len(image_tok), vision_config=dict(VISION),
                       img_context_token_id=ctx)
    for b in batches:
        out = model(**b)
        assert torch.isfinite(out.loss)


def test_image_root_option(tmp_path, image_tok, vision_config):
    (tmp_path / "pics").mkdir()
    name = png(tmp_path / "pics" / "a.png")
    f = write_jsonl(tmp_path / "rows.jsonl", [conv(("human", "<image>\nQ"), ("gpt", "A"), image=name)])
    cfg = {"sources": [{"path": str(f), "split": "all"}]}
    with pytest.raises(DataError, match="no usable samples"):
        build_dataset(cfg, image_tok, vision_config)  # a.png is not next to the JSONL
    cfg["sources"][0]["image_root"] = str(tmp_path / "pics")
    assert build_dataset(cfg, image_tok, vision_config).samples[0].images == (str(tmp_path / "pics" / name),)
    # a tokenizer without the image tokens is a configuration error, not a bad row
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(image_tok.name_or_path)
    with pytest.raises(DataError, match="IMG_CONTEXT"):
        build_dataset(cfg, plain, vision_config)


def test_fashion_mnist_helper(tmp_path, image_tok, vision_config):
    root = tmp_path / "fm"
    root.mkdir()
    imgs = np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8)
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0" * 16 + imgs.tobytes())
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\0" * 8 + bytes([0, 1, 9, 3, 5]))
    path = fashion_mnist_jsonl(tmp_path / "out", split="heldout", limit=4, root=root, scale=2)
    ds = build_dataset({"sources": [{"path": str(path), "split": "all"}]}, image_tok, vision_config)
    assert len(ds) == 4 and not ds.bad_rows
    assert image_tok.decode(ds.samples[2].input_ids[ds.samples[2].labels != -100]) == "Ankle boot.<|im_end|>"


# ---------------------------------------------------------------------------------------------- bad rows
def test_bad_rows_reported_and_skipped(tmp_path, image_tok, vision_config, caplog):
    good = png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    long_q = "word " * 400
    rows = [
        conv(("human", "<image>\nfine"), ("gpt", "ok"), image=good),                 # 1 good
        '{"conversations": [ {"from": "human", "value": "unterminated',              # 2 malformed JSON
        {"id": 3},                                                                     # 3 no conversations
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},         # 4 turn without value
        {"conversations": [{"from": "alien", "value": "q"}, {"from": "gpt", "value": "x"}]},  # 5 unknown role
        conv(("human", "<image>\nq"), ("gpt", "a"), image="missing.png"),             # 6 missing image
        conv(("human", "<image>\nq"), ("gpt", "a"), image="broken.png"),              # 7 unreadable image
        conv(("human", long_q), ("gpt", "a")),                                         # 8 too long
        conv(("human", "<image> <image>"), ("gpt", "a"), image=good),                 # 9 placeholder mismatch
        conv(("human", "only a question")),                                            # 10 no assistant turn
        "[1, 2]",                                                                      # 11 not an object
        conv(("human", "text only, fine"), ("gpt", "ok")),                             # 12 good
        conv(("human", "<image>\nno image field"), ("gpt", "a")),                     # 13 placeholder, no image
    ]
    f = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = {"sources": [{"path": str(f), "split": "all"}], "max_length": 256}
    with caplog.at_level(logging.WARNING, logger="mmmamba.data"):
        ds = build_dataset(cfg, image_tok, vision_config)
    assert [s.origin for s in ds.samples] == [f"{f}:1", f"{f}:12"]
    got = {r.line: r.reason for r in ds.bad_rows}
    assert all(r.path == str(f) for r in ds.bad_rows)
    expect = {2: "malformed JSON", 3: "missing field 'conversations'", 4: "has no 'value'", 5: "unknown role",
              6: "does not exist", 7: "could not be read", 8: "too long", 9: "2 <image> placeholder(s) but 1",
              10: "no assistant", 11: "must be a JSON object", 13: "no 'image' field"}
    assert set(got) == set(expect)
    for line, words in expect.items():
        assert words in got[line], (line, got[line])
        assert f"{f}:{line}: " in caplog.text  # reported as file:line
    # an image row for a model without a vision front is a bad row too
    ds2 = build_dataset(cfg, image_tok, None)
    assert "no vision front" in {r.line: r.reason for r in ds2.bad_rows}[1]

    # strict: the first bad row raises, naming file and line
    with pytest.raises(DataError, match=rf"{f}:2: malformed JSON"):
        build_dataset({**cfg, "strict": True}, image_tok, vision_config)
    with pytest.raises(DataError, match=rf"{f}:2: "):
        build_dataloader(cfg, image_tok, vision_config, 2, 0, strict=True)


def test_bad_text_lines(tmp_path, tok):
    (tmp_path / "t.txt").write_bytes(b"good line one\nbad \xff\xfe line\ngood line three\n")
    ds = build_dataset({"sources": [{"type": "text", "path": str(tmp_path / "t.txt"), "split": "all"}]}, tok)
    assert [(r.line, "UTF-8" in r.reason) for r in ds.bad_rows] == [(2, True)]
    assert tok.decode(ds.samples[0].input_ids) == "good line one\ngood line three\n"


def test_image_failing_after_scan_never_crashes_collation(tmp_path, image_tok, vision_config, caplog):
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png")
    f = write_jsonl(tmp_path / "r.jsonl", [conv(("human", "<image>\nq"), ("gpt", "x"), image=a),
                                           conv(("human", "<image>\nq"), ("gpt", "y"), image=b)])
    cfg = {"sources": [{"path": str(f), "split": "all"}], "shuffle": False, "bucket": False}
    loader = build_dataloader(cfg, image_tok, vision_config, 2, 0)
    strict = build_dataloader(cfg, image_tok, vision_config, 2, 0, strict=True)
    (tmp_path / "b.png").write_bytes(b"garbage")  # readable when scanned, broken when loaded
    with caplog.at_level(logging.WARNING, logger="mmmamba.data"):
        (batch,) = list(loader)
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1
    assert f"{f}:2" in caplog.text
    with pytest.raises(DataError, match=f"{f}:2"):
        list(strict)


def test_config_errors(tmp_path, tok):
    with pytest.raises(DataError, match="unknown key"):
        build_dataset({"sources": ["pydoc"], "max_len": 5}, tok)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset({"sources": [str(tmp_path / "nope.txt")]}, tok)
    with pytest.raises(DataError, match="no file matches"):
        build_dataset({"sources": [str(tmp_path / "*.jsonl")]}, tok)
    with pytest.raises(DataError, match="sources"):
        build_dataset({}, tok)
    with pytest.raises(DataError, match="split"):
        build_dataset({"sources": ["pydoc"]}, tok, split="dev")


# ---------------------------------------------------------------------------------------------- order
def test_deterministic_bucketed_and_resumable(tok):
    cfg = {"sources": ["pydoc"], "max_length": 96}

    def ids(loader):
        return [b["input_ids"] for b in loader]

    a, b = build_dataloader(cfg, tok, None, 8, seed=3), build_dataloader(cfg, tok, None, 8, seed=3)
    first = ids(a)
    assert all(torch.equal(x, y) for x, y in zip(first, ids(b)))
    assert not all(torch.equal(x, y) for x, y in zip(first, ids(build_dataloader(cfg, tok, None, 8, seed=4))))
    a.batch_sampler.set_epoch(1)
    epoch1 = ids(a)
    assert not all(torch.equal(x, y) for x, y in zip(first, epoch1))
    a.batch_sampler.set_epoch(0)
    assert all(torch.equal(x, y) for x, y in zip(first, ids(a)))

    # resume after k batches of epoch 1: ours and accelerate's skip_first_batches
    k = 5
    resumed = ids(skip_first_batches(a, k, epoch=1))
    assert len(resumed) == len(epoch1) - k and all(torch.equal(x, y) for x, y in zip(resumed, epoch1[k:]))
    from accelerate import skip_first_batches as acc_skip

    a.batch_sampler.set_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(ids(acc_skip(a, k)), epoch1[k:]))


def test_bucket_sampler_covers_everything_once():
    lengths = np.random.default_rng(0).integers(1, 500, 203)
    s = BucketBatchSampler(lengths, batch_size=8, seed=0, mega_batch=4)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203)) and len(batches) == len(s) == 26
    for bt in batches:
        ls = lengths[bt]
        assert (np.diff(ls) <= 0).all()  # sorted inside each mega-batch, so inside every batch
    # bucketing cuts padding against plain shuffling
    pad = lambda bs: sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in bs)  # noqa: E731
    plain = list(BucketBatchSampler(lengths, 8, 0, bucket=False))
    assert pad(batches) < pad(plain) / 2
    assert len(list(BucketBatchSampler(lengths, 8, 0, drop_last=True))) == 25
    assert list(BucketBatchSampler(lengths, 8, 0, shuffle=False, bucket=False))[0] == list(range(8))
