"""HybridCache: full-sequence forward == prefill (whole or in pieces) + token-by-token decoding; left padding."""

from __future__ import annotations

import pytest
import torch
from conftest import left_pad

from mmmamba import HybridCache
from mmmamba.distill.seed import seed_student
from mmmamba.layers.attention import KVState
from mmmamba.layers.mamba2 import SSMState

STUDENTS = {"linear": None, "hybrid": [0, 3], "teacher": "all"}


@pytest.fixture(params=list(STUDENTS))
def student(request, tiny_teacher, randomize):
    if request.param == "teacher":
        return tiny_teacher
    return randomize(seed_student(tiny_teacher, STUDENTS[request.param]), seed=7).eval()


def _decode(model, ids, pieces, mask=None):
    """Prefill ids[:, :pieces[0]], then ids[:, pieces[0]:pieces[1]], ..., then one token at a time."""
    cache = HybridCache(model.config)
    logits, start = [], 0
    bounds = list(pieces) + list(range(pieces[-1] + 1, ids.shape[1] + 1))
    with torch.no_grad():
        for end in bounds:
            m = None if mask is None else mask[:, :end]
            out = model(ids[:, start:end], attention_mask=m, cache=cache, use_cache=True)
            assert out.cache is cache
            logits.append(out.logits)
            start = end
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("pieces", [(1,), (7,), (5, 12)], ids=["token-by-token", "prefill", "two-piece-prefill"])
def test_full_forward_equals_cached_decoding(student, pieces):
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = student(ids).logits
    got, cache = _decode(student, ids, pieces)
    err = (got - full).abs().max().item()
    assert err <= 1e-4, f"max abs error {err:.3g}"
    assert cache.get_seq_length() == 24
    assert cache.next_position.tolist() == [24, 24]


def test_cache_layout(tiny_teacher):
    student = seed_student(tiny_teacher, [0, 3])
    cache = HybridCache(student.config)
    assert [type(s) for s in cache.layers] == [KVState, SSMState, SSMState, KVState] and len(cache) == 4
    with torch.no_grad():
        student(torch.randint(0, 97, (3, 10)), cache=cache, use_cache=True)
    cfg = student.config
    ssm = cache.layers[1]
    assert ssm.conv.shape == (3, 2 * 2 * 8 + 6 * 8, cfg.mamba_d_conv - 1)
    assert ssm.ssm.shape == (3, 6, 8, 8) and ssm.ssm.dtype == torch.float32
    assert cache.layers[0].k.shape == (3, 2, 10, 8)


def test_mamba_state_is_constant_size(tiny_teacher):
    student = seed_student(tiny_teacher, None)
    cache = HybridCache(student.config)
    sizes = []
    with torch.no_grad():
        student(torch.randint(0, 97, (1, 5)), cache=cache, use_cache=True)
        sizes.append(cache.nbytes())
        for _ in range(20):
            student(torch.randint(0, 97, (1, 1)), cache=cache, use_cache=True)
        sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1] > 0


def test_use_cache_creates_cache(student):
    with torch.no_grad():
        out = student(torch.randint(0, 97, (1, 4)), use_cache=True)
    assert isinstance(out.cache, HybridCache) and out.cache.get_seq_length() == 4


def test_select_rows(student):
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(5))
    cache = HybridCache(student.config)
    with torch.no_grad():
        student(ids[:, :8], cache=cache, use_cache=True)
        cache.select(torch.tensor([2, 0]))
        got = student(ids[[2, 0], 8:], cache=cache, use_cache=True).logits
        ref = student(ids[[2, 0]]).logits[:, -1:]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_equals_one_at_a_time(student):
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (13, 6, 9, 1)]
    ids, mask = left_pad(seqs, pad_id=5)
    with torch.no_grad():
        batch = student(ids, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            single = student(torch.tensor([s])).logits[0]
            torch.testing.assert_close(batch[i, ids.shape[1] - len(s) :], single, rtol=1e-4, atol=1e-5)


def test_left_padded_prefill_then_decode(student):
    """Padded prefill + cached steps with a growing mask equals each row's unpadded full forward."""
    g = torch.Generator().manual_seed(12)
    seqs = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (10, 4)]
    extra = torch.randint(1, 97, (2, 5), generator=g)
    ids, mask = left_pad(seqs)
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    got, _ = _decode(student, full_ids, (ids.shape[1],), mask=full_mask)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            ref = student(torch.cat([torch.tensor(s), extra[i]])[None]).logits[0]
            torch.testing.assert_close(got[i, ids.shape[1] - len(s) :], ref, rtol=1e-4, atol=1e-4)


def test_gqa_9q_3kv_hybrid_decoding(make_model):
    """SmolLM2's head layout (9 query / 3 key-value heads) in a hybrid: cached decoding == full forward."""
    model = make_model(["mamba2", "attention", "mamba2", "mamba2"], hidden_size=72, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=8)
    ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        full = model(ids).logits
    got, _ = _decode(model, ids, (4, 9))
    assert (got - full).abs().max().item() <= 1e-4
