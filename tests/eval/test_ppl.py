"""Long-text perplexity: sliding window against a per-token brute force, the carried Mamba-2 state against one
pass, teacher agreement / KL, `mmmamba ppl`, and `kl_to_teacher` on image batches."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from eval_helpers import byte_tokenizer, make_model

from mmmamba.cli import main
from mmmamba.eval import kl_to_teacher, read_text_tokens, text_metrics
from mmmamba.eval.ppl import segments
from mmmamba.io import save_model

HYBRID = ["attention", "mamba2", "attention", "mamba2"]


def test_segments_cover_each_target_once():
    segs = segments(23, window=8, stride=3)
    assert segs == [(1, 9), (9, 12), (12, 15), (15, 18), (18, 21), (21, 23)]
    assert segments(5, 8, 4) == [(1, 5)]
    with pytest.raises(ValueError, match="stride"):
        segments(10, 4, 5)


def _brute_force(model, ids, window, stride, teacher=None):
    """Score each target t of segment [s, e) by its own forward over tokens [max(0, e - 1 - window), t)."""
    nll, kl, agree, n = 0.0, 0.0, 0, 0
    for s, e in segments(len(ids), window, stride):
        for t in range(s, e):
            ctx = ids[max(0, e - 1 - window): t][None]
            with torch.no_grad():
                lp = torch.log_softmax(model(ctx).logits[0, -1].double(), -1)
                if teacher is not None:
                    lt = torch.log_softmax(teacher(ctx).logits[0, -1].double(), -1)
                    kl += float((lt.exp() * (lt - lp)).sum())
                    agree += int(lt.argmax() == lp.argmax())
            nll -= float(lp[ids[t]])
            n += 1
    return math.exp(nll / n), kl / n, agree / n, n


@pytest.mark.parametrize("window, stride", [(8, 4), (8, 8), (7, 3)])
def test_sliding_window_matches_brute_force(window, stride):
    model = tiny_model(HYBRID, seed=0)
    teacher = tiny_model(["attention"] * 4, seed=1)
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(0))
    r = text_metrics(model, ids, window=window, stride=stride, teacher=teacher, batch_size=3)
    ppl, kl, agree, n = _brute_force(model, ids, window, stride, teacher)
    assert r["method"] == "sliding" and r["tokens"] == n == 29
    assert r["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert r["kl_to_teacher"] == pytest.approx(kl, rel=1e-4) and r["kl_to_teacher"] > 0
    assert r["top1_agreement"] == pytest.approx(agree)


def test_mamba_carried_state_equals_one_pass():
    model = tiny_model(["mamba2"] * 4, seed=2)
    ids = torch.randint(0, 97, (45,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = torch.log_softmax(model(ids[None]).logits[0, :-1].double(), -1)
    one_pass = math.exp(-float(lp.gather(-1, ids[1:, None]).mean()))
    for window, stride in [(8, 4), (16, 5), (64, 32)]:
        r = text_metrics(model, ids, window=window, stride=stride)
        assert r["method"] == "recurrent" and r["tokens"] == 44
        assert r["perplexity"] == pytest.approx(one_pass, rel=1e-5)
    # a hybrid with the same short window sees less context, so its sliding result differs from one pass
    hybrid = tiny_model(HYBRID, seed=2)
    with torch.no_grad():
        lph = torch.log_softmax(hybrid(ids[None]).logits[0, :-1].double(), -1)
    one_pass_h = math.exp(-float(lph.gather(-1, ids[1:, None]).mean()))
    assert text_metrics(hybrid, ids, window=8, stride=4)["perplexity"] != pytest.approx(one_pass_h, rel=1e-5)
    assert text_metrics(hybrid, ids, window=64)["perplexity"] == pytest.approx(one_pass_h, rel=1e-5)


def test_teacher_vocabulary_must_match():
    with pytest.raises(ValueError, match="vocabulary"):
        text_metrics(tiny_model(HYBRID), torch.arange(10), window=8, teacher=tiny_model(HYBRID, vocab_size=50))


def test_read_text_tokens_and_ppl_cli(tmp_path, capsys):
    tok = byte_tokenizer()
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    ids = read_text_tokens(text, tok)
    assert ids.tolist() == tok(text.read_text(), add_special_tokens=False)["input_ids"]  # no BOS by default
    assert read_text_tokens(text, tok, add_bos=True, limit_tokens=5)[0] == tok.bos_token_id
    d = tmp_path / "m"
    save_model(make_model(tok, False, HYBRID), d, tok)
    t = tmp_path / "t"
    save_model(make_model(tok, False, ["attention"] * 4, seed=3), t, tok)
    capsys.readouterr()
    rc = main(["ppl", str(text), "--model", str(d), "--teacher", str(t), "--window", "32", "--stride", "16",
               "--limit-tokens", "100", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "| tokens scored | 99 |" in out and "| KL(teacher || model), nats/token |" in out
    assert "| method | sliding (window 32, stride 16) |" in out
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text_tokens(tmp_path / "missing.txt", tok)


def test_kl_to_teacher_uses_pixel_values():
    """On an image batch the KL must come from the image tokens the vision fronts write, not from the raw
    <IMG_CONTEXT> embeddings."""
    tok = byte_tokenizer()
    student = make_model(tok, True, HYBRID, seed=0)
    teacher = make_model(tok, True, ["attention"] * 4, seed=1)
    img = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    n_img = student.model.vision.tokens_per_tile
    ids = torch.tensor([[5, 6] + [img] * n_img + [7, 8, 9], [10] + [img] * n_img + [11, 12, 13, 14]])
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    px = torch.randn(2, 3, 28, 28)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": px}
    with torch.no_grad():
        ls = torch.log_softmax(student(ids, attention_mask=mask, pixel_values=px).logits.double(), -1)
        lt = torch.log_softmax(teacher(ids, attention_mask=mask, pixel_values=px).logits.double(), -1)
    ok = mask.bool()
    want = float((lt.exp() * (lt - ls)).sum(-1)[ok].mean())
    assert kl_to_teacher(student, teacher, [batch]) == pytest.approx(want, rel=1e-4)
    without = kl_to_teacher(student, teacher, [{"input_ids": ids, "attention_mask": mask}])
    assert without != pytest.approx(want, rel=1e-4)
