"""generate(): greedy == argmax of full forwards, left-padded batches, seeded sampling, stop tokens, streaming."""

from __future__ import annotations

import pytest
import torch
from conftest import left_pad

from mmmamba.distill.seed import seed_student
from mmmamba.models.generate import generate, sample_next

STUDENTS = {"linear": None, "hybrid": "every:2"}


@pytest.fixture(params=list(STUDENTS))
def student(request, tiny_teacher, randomize):
    return randomize(seed_student(tiny_teacher, STUDENTS[request.param]), seed=3).eval()


def _greedy_reference(model, ids, n):
    """Greedy decoding by re-running the full sequence each step (no cache)."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


def test_greedy_equals_uncached_argmax(student):
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    out = student.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert out.shape == (2, 19) and torch.equal(out[:, :7], ids)
    assert torch.equal(out, _greedy_reference(student, ids, 12))


def test_teacher_greedy(tiny_teacher):
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    out = generate(tiny_teacher, ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(out, _greedy_reference(tiny_teacher, ids, 8))


def test_left_padded_batch_equals_one_at_a_time(student):
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (9, 3, 6)]
    ids, mask = left_pad(seqs, pad_id=7)
    batch = student.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    for i, s in enumerate(seqs):
        single = student.generate(torch.tensor([s]), max_new_tokens=10, eos_token_id=[])
        assert torch.equal(batch[i, ids.shape[1] :], single[0, len(s) :]), i


def test_left_padded_sampling_equals_one_at_a_time_per_row(student):
    """Sampling a batch of one padded row gives the same tokens as the unpadded row with the same seed."""
    s = torch.randint(1, 97, (5,), generator=torch.Generator().manual_seed(4))
    ids, mask = left_pad([s.tolist(), [1] * 8])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, eos_token_id=[])
    padded = student.generate(ids[:1], attention_mask=mask[:1], generator=torch.Generator().manual_seed(9), **kw)
    plain = student.generate(s[None], generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(padded[0, ids.shape[1] :], plain[0, 5:])


def test_sampling_is_reproducible_with_a_seeded_generator(student):
    ids = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, eos_token_id=[])
    a = student.generate(ids, generator=torch.Generator().manual_seed(0), **kw)
    b = student.generate(ids, generator=torch.Generator().manual_seed(0), **kw)
    c = student.generate(ids, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stop_tokens_stop(student):
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(6))
    free = student.generate(ids, max_new_tokens=10, eos_token_id=[])
    stop = int(free[0, 6 + 3])  # the 4th generated token
    first = (free[0, 6:] == stop).nonzero()[0].item()
    out = student.generate(ids, max_new_tokens=10, eos_token_id=stop)
    assert out.shape[1] == 6 + first + 1 and int(out[0, -1]) == stop
    assert torch.equal(out, free[:, : out.shape[1]])
    out_list = student.generate(ids, max_new_tokens=10, eos_token_id=[1000, stop])
    assert torch.equal(out_list, out)


def test_finished_rows_repeat_their_stop_token(student):
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 97, (2, 5), generator=g)
    free = student.generate(ids, max_new_tokens=10, eos_token_id=[])
    stop = int(free[0, 5 + 1])  # row 0 stops after 2 tokens (or earlier)
    out = student.generate(ids, max_new_tokens=10, eos_token_id=stop)
    row0 = out[0, 5:]
    k = (row0 == stop).nonzero()[0].item()
    assert (row0[k:] == stop).all()
    row1 = free[1, 5:]
    if (row1 == stop).any():  # row 1 may stop too; up to there it is unchanged
        j = (row1 == stop).nonzero()[0].item()
        assert torch.equal(out[1, 5 : 5 + j + 1], row1[: j + 1])
    else:
        assert torch.equal(out[1], free[1, : out.shape[1]])


def test_eos_from_generation_config(student):
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(6))
    free = student.generate(ids, max_new_tokens=6, eos_token_id=[])
    student.generation_config.eos_token_id = int(free[0, 6])
    out = student.generate(ids, max_new_tokens=6)
    assert out.shape[1] == 7


class ListStreamer:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, ids):
        self.chunks.append(ids.clone())

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_each_token(student):
    ids = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(7))
    s = ListStreamer()
    out = student.generate(ids, max_new_tokens=5, eos_token_id=[], streamer=s)
    assert s.ended and len(s.chunks) == 6
    assert torch.equal(s.chunks[0], ids)
    assert torch.equal(torch.cat([c.reshape(-1) for c in s.chunks[1:]]), out[0, 4:])


def test_text_streamer_prints(student, smollm2_tokenizer, capsys):
    from transformers import TextStreamer

    ids = torch.tensor([[10, 20, 30]])
    student.generate(ids, max_new_tokens=4, eos_token_id=[], streamer=TextStreamer(smollm2_tokenizer))
    assert capsys.readouterr().out.strip()


def test_max_new_tokens_and_1d_input(student):
    out = student.generate(torch.tensor([1, 2, 3]), max_new_tokens=1, eos_token_id=[])
    assert out.shape == (1, 4)


def test_unsupported_kwargs(student):
    with pytest.raises(TypeError, match="num_return_sequences"):
        student.generate(torch.tensor([[1, 2]]), num_return_sequences=2)


def test_sample_next():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits).tolist() == [1, 0]
    assert sample_next(logits, do_sample=True, temperature=0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, do_sample=True, top_k=1, generator=g).tolist() == [1, 0]
        assert sample_next(logits, do_sample=True, top_p=1e-3, generator=g).tolist() == [1, 0]
        assert sample_next(logits, do_sample=True, top_k=2, generator=g)[0].item() in (1, 3)
    # top_p keeps the smallest prefix whose mass reaches p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    seen = {sample_next(probs, do_sample=True, top_p=0.7, generator=g).item() for _ in range(200)}
    assert seen == {0, 1}
