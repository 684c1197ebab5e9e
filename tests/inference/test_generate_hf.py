"""generate() against transformers' own generate: a tiny Llama teacher and its all-attention mmmamba conversion get
the same calls (min_new_tokens, repetition_penalty, eos lists, scores / logits, sampling); the Engine too."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.utils import GenerateDecoderOnlyOutput

from mmmamba.inference.engine import Engine
from mmmamba.teachers.hf import convert_hf_model

V = 101


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():  # spread logits so greedy choices are far from ties
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else torch.randn(p.shape, generator=g) * 0.15)
    hf.eval()
    return hf, convert_hf_model(hf).eval()


def _ids(b=1, n=6, seed=1):
    return torch.randint(3, V, (b, n), generator=torch.Generator().manual_seed(seed))


def _both(pair, ids, **kw):
    hf, ours = pair
    with torch.no_grad():
        ref = hf.generate(ids, **kw)
    return ref, ours.generate(ids, **kw)


def _same(ref, got, tol=1e-4):
    assert isinstance(got, GenerateDecoderOnlyOutput)
    assert torch.equal(got.sequences, ref.sequences), (got.sequences, ref.sequences)
    for name in ("scores", "logits"):
        r, g = getattr(ref, name), getattr(got, name)
        assert (r is None) == (g is None), name
        if r is not None:
            assert len(r) == len(g), name
            for a, b in zip(r, g):
                fin = torch.isfinite(a)
                assert torch.equal(fin, torch.isfinite(b)), name
                assert (a[fin] - b[fin]).abs().max() <= tol, name


def test_greedy_with_processors_scores_and_eos_list(pair):
    ids = _ids()
    free = pair[0].generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:]
    stops = [int(free[1]), int(free[6])]  # the first one comes before min_new_tokens and must be suppressed
    kw = dict(max_new_tokens=12, do_sample=False, min_new_tokens=4, repetition_penalty=1.3, eos_token_id=stops,
              pad_token_id=0, return_dict_in_generate=True, output_scores=True, output_logits=True)
    ref, got = _both(pair, ids, **kw)
    _same(ref, got)
    assert got.scores[0][0, stops].isinf().all()  # min_new_tokens at work
    assert not torch.equal(got.scores[1], got.logits[1])  # repetition penalty at work


def test_left_padded_batch_pads_finished_rows_like_transformers(pair):
    ids = _ids(3, 8, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    free = pair[0].generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                            eos_token_id=None)[:, 8:]
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=[int(free[0, 2]), int(free[2, 4])],
              pad_token_id=0, repetition_penalty=1.2, return_dict_in_generate=True, output_scores=True)
    ref, got = _both(pair, ids, **kw)
    _same(ref, got)


def test_sampling_matches_transformers_with_the_same_seed(pair):
    ids = _ids(2, 5, seed=3)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, eos_token_id=[5],
              pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    torch.manual_seed(11)
    ref = pair[0].generate(ids, **kw)
    torch.manual_seed(11)
    got = pair[1].generate(ids, **kw)
    _same(ref, got)


def test_plain_tensor_by_default_and_max_length(pair):
    ids = _ids()
    ref, got = _both(pair, ids, max_length=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert isinstance(got, torch.Tensor) and got.shape == (1, 10) and torch.equal(got, ref)


def test_refusals_are_clear(pair):
    ids = _ids()
    with pytest.raises(NotImplementedError, match="beam search is not implemented"):
        pair[1].generate(ids, num_beams=2)
    with pytest.raises(TypeError, match=r"unsupported arguments \['output_attentions'\]"):
        pair[1].generate(ids, output_attentions=True)
    with pytest.raises(ValueError, match="repetition_penalty"):
        pair[1].generate(ids, repetition_penalty=0.0)


def test_engine_takes_the_same_arguments(pair):
    ours = pair[1]
    ids = _ids(2, 7, seed=4)
    kw = dict(max_new_tokens=9, min_new_tokens=3, repetition_penalty=1.4, eos_token_id=[7, 9], pad_token_id=0,
              return_dict_in_generate=True, output_scores=True, output_logits=True)
    ref = ours.generate(ids, **kw)
    eng = Engine(ours, kernels="torch")
    got = eng.generate(ids, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(ref.scores + ref.logits, got.scores + got.logits):
        fin = torch.isfinite(a)
        assert torch.equal(fin, torch.isfinite(b)) and (a[fin] - b[fin]).abs().max() <= 1e-4
    plain = dict(max_new_tokens=9, eos_token_id=[], do_sample=False)
    assert torch.equal(eng.generate(ids, **plain), ours.generate(ids, **plain))
    with pytest.raises(NotImplementedError, match="beam search"):
        eng.generate(ids, num_beams=3)
    with pytest.raises(TypeError, match="unsupported arguments"):
        eng.generate(ids, no_repeat_ngram_size=2)
    eng.unfuse()
