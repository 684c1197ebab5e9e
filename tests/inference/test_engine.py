"""The fast inference engine (static cache, fused decode step, chunked prefill) gives the reference path's tokens."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmmamba.inference.engine import Engine
from mmmamba.inference.static_cache import StaticCache
from mmmamba.models.generate import generate

LINEAR = ["mamba2"] * 4
HYBRID = ["attention", "mamba2", "mamba2", "mamba2"]
TEACHER = ["attention"] * 4
KINDS = {"linear": LINEAR, "hybrid": HYBRID, "teacher": TEACHER}


def _ids(b, n, seed=0, vocab=97):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("chunk", [4096, 5])
def test_greedy_matches_reference(make_model, kind, chunk):
    model = make_model(KINDS[kind])
    ids = _ids(1, 21)
    ref = generate(model, ids, max_new_tokens=40)
    eng = Engine(model, kernels="torch", prefill_chunk=chunk)
    assert torch.equal(eng.generate(ids, max_new_tokens=40), ref)
    # building the engine did not change the reference path (weights are shared views, same values)
    assert torch.equal(generate(model, ids, max_new_tokens=40), ref)


@pytest.mark.parametrize("kind", list(KINDS))
def test_left_padded_batch_matches_reference(make_model, kind):
    model = make_model(KINDS[kind])
    ids = _ids(3, 17, seed=1)
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ref = generate(model, ids, attention_mask=mask, max_new_tokens=24)
    for chunk in (4096, 6):
        eng = Engine(model, kernels="torch", prefill_chunk=chunk)
        assert torch.equal(eng.generate(ids, attention_mask=mask, max_new_tokens=24), ref)


def test_non_left_padding_rejected(make_model):
    eng = Engine(make_model(HYBRID), kernels="torch")
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 3] = 0
    with pytest.raises(ValueError, match="left padding"):
        eng.generate(_ids(1, 8), attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("kind", ["linear", "hybrid"])
def test_sampling_matches_reference_with_same_generator(make_model, kind):
    model = make_model(KINDS[kind])
    ids = _ids(2, 12, seed=3)
    kw = dict(max_new_tokens=25, do_sample=True, temperature=0.8, top_k=30, top_p=0.9)
    ref = generate(model, ids, generator=torch.Generator().manual_seed(7), **kw)
    out = Engine(model, kernels="torch").generate(ids, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(out, ref)


def test_eos_and_streaming(make_model):
    model = make_model(HYBRID)
    ids = _ids(1, 10, seed=4)
    free = generate(model, ids, max_new_tokens=30)[0, 10:]
    eos = int(free[7])  # a token the model emits: generation stops there (or earlier, if it appears earlier)
    ref = generate(model, ids, max_new_tokens=30, eos_token_id=eos)

    class Sink:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, t):
            self.chunks.append(t.clone())

        def end(self):
            self.ended = True

    sink = Sink()
    eng = Engine(model, kernels="torch")
    out = eng.generate(ids, max_new_tokens=30, eos_token_id=eos, streamer=sink)
    assert torch.equal(out, ref)
    assert int(out[0, -1]) == eos and out.shape[1] < 40
    assert sink.ended and torch.equal(torch.cat([c.reshape(-1) for c in sink.chunks]), out[0])
    streamed = torch.stack(list(eng.stream(ids, max_new_tokens=30, eos_token_id=eos)), dim=1)
    assert torch.equal(streamed, ref[:, 10:])


def test_engine_reuse_across_prompts(make_model):
    model = make_model(HYBRID)
    eng = Engine(model, kernels="torch")
    for n, seed in ((15, 0), (9, 1), (30, 2)):
        ids = _ids(1, n, seed=seed)
        assert torch.equal(eng.generate(ids, max_new_tokens=12), generate(model, ids, max_new_tokens=12))


def test_engine_leaves_the_model_unchanged(make_model, tmp_path):
    """Engine(model) owns its fused copies: after generating, the model has the same parameter objects, values and
    storages and its train mode, and it trains and saves (safetensors) with no `unfuse()`."""
    from mmmamba.io import load_model, save_model

    model = make_model(HYBRID).train()
    before = {n: (p, p.detach().clone(), p.untyped_storage().data_ptr()) for n, p in model.named_parameters()}
    ids = _ids(1, 9)
    Engine(model, kernels="torch").generate(ids, max_new_tokens=5)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and model.training
    for n, (obj, value, ptr) in before.items():
        assert after[n] is obj and torch.equal(after[n], value) and after[n].untyped_storage().data_ptr() == ptr, n
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    save_model(model, tmp_path / "m")
    reloaded = load_model(tmp_path / "m")
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, after[n].detach()), n


def test_shared_weights_stored_once_and_restored_on_exit(make_model):
    model = make_model(HYBRID)
    params = dict(model.named_parameters())
    values = {n: p.detach().clone() for n, p in params.items()}
    storages_before = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = _ids(1, 9)
    ref = generate(model, ids, max_new_tokens=6)
    with Engine(model, kernels="torch", share_weights=True) as eng:
        # q|k|v (attention), v|k|q|g|dt (Mamba-2) and gate|up now live in one buffer each: fewer storages
        assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) < len(storages_before)
        mixer = model.model.layers[1].mixer
        assert mixer.v_proj.weight.untyped_storage().data_ptr() == mixer.g_proj.weight.untyped_storage().data_ptr()
        Engine(model, kernels="torch", share_weights=True)  # building twice re-uses the fused buffers
        assert torch.equal(eng.generate(ids, max_new_tokens=6), ref)
        assert torch.equal(generate(model, ids, max_new_tokens=6), ref)  # the reference path reads the views
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs) - (1 if model.config.tie_word_embeddings else 0)
    assert all(model.get_parameter(n) is p and torch.equal(p, values[n]) for n, p in params.items())


def test_prefill_logits_match_reference_forward(make_model):
    model = make_model(HYBRID)
    ids = _ids(2, 19, seed=5)
    ref = model(input_ids=ids).logits[:, -1]
    eng = Engine(model, kernels="torch", prefill_chunk=7)
    eng.reserve(2, 32)
    torch.testing.assert_close(eng.prefill(ids), ref, rtol=1e-5, atol=1e-5)


def test_decode_loop_feeds_greedy_token_back(make_model):
    model = make_model(LINEAR)
    ids = _ids(1, 11, seed=6)
    ref = generate(model, ids, max_new_tokens=9)[0, 11:]
    eng = Engine(model, kernels="torch")
    eng.reserve(1, 32)
    eng.set_tokens(eng.prefill(ids).argmax(-1))
    got = [int(eng._bufs["ids"][0])]
    for _ in range(8):
        eng.decode_step()
        got.append(int(eng.next_token[0]))
    assert got == ref.tolist()
    assert eng.cache.host_length == 11 + 8 and int(eng.cache.length) == 19


def test_time_decode_returns_step_times(make_model):
    eng = Engine(make_model(HYBRID), kernels="torch")
    eng.reserve(1, 64)
    eng.cache.fill_random(20)
    eng.set_tokens(torch.tensor([3]))
    times = eng.time_decode(steps=5, warmup=2)
    assert len(times) == 5 and all(t > 0 for t in times)
    assert eng.cache.host_length == 27


def test_static_cache_shapes_and_snapshot(make_config):
    cfg = make_config(layer_types=HYBRID)
    c = StaticCache(cfg, batch=2, max_len=40, device="cpu", dtype=torch.float32)
    kv, d, h = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
    assert c.k[0].shape == (2, kv, 40, d) and c.k[1] is None
    assert c.ssm[1].shape == (2, h, d, d) and c.ssm[1].dtype == torch.float32
    assert c.conv[1].shape == (2, 2 * kv * d + h * d, cfg.mamba_d_conv - 1)
    c.fill_random(10)
    assert c.host_length == 10 and int(c.length) == 10 and bool(c.key_valid[:, :10].all())
    assert not bool(c.key_valid[:, 10:].any())
    snap = c.snapshot_state()
    assert all(t is None or (t.device.type == "cpu" and t.data_ptr() != c.ssm[i].data_ptr())
               for i, t in enumerate(snap["ssm"]))  # host copies: a device copy would double the peak at large batch
    s0 = c.ssm[1].clone()
    c.ssm[1].add_(1.0)
    c.length.add_(3)
    c.key_valid[:, 10:12] = True
    c.restore_state(snap)
    assert torch.equal(c.ssm[1], s0) and int(c.length) == 10 and not bool(c.key_valid[:, 10:].any())
    # KV for 10 tokens of 1 attention layer + the state of 3 Mamba-2 layers
    expect = 2 * 2 * kv * 10 * d * 4 + sum(c.conv[i].nbytes + c.ssm[i].nbytes for i in (1, 2, 3))
    assert c.read_bytes() == expect
    with pytest.raises(ValueError):
        c.fill_random(41)


def test_cache_full_raises(make_model):
    eng = Engine(make_model(LINEAR), kernels="torch", max_len_multiple=1)
    eng.reserve(1, 6)
    eng.prefill(_ids(1, 5))
    eng.decode_step()
    with pytest.raises(RuntimeError, match="cache full"):
        eng.decode_step()


def test_cuda_graph_needs_cuda(make_model):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError):
        Engine(make_model(LINEAR), cuda_graph=True)


# ---- Triton kernels on the CPU (Triton's interpreter), in a subprocess so TRITON_INTERPRET stays local --------
_CASES = Path(__file__).with_name("triton_cases.py")


def _run_case(case: str, timeout: int = 600):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, str(_CASES), case], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{case} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r.stdout


triton_missing = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@triton_missing
def test_decode_kernels_first_use_check():
    assert "decode check ok" in _run_case("decode_check")


def test_engine_falls_back_when_the_decode_kernels_fail_their_check(make_model, monkeypatch):
    """On CUDA a failed `decode_ok` turns the engine to the torch step with a warning (the device is faked here;
    nothing runs on it)."""
    from mmmamba.inference import engine as engine_mod

    eng = Engine(make_model(LINEAR), kernels="torch")
    eng.kernels, eng.device = "triton", torch.device("cuda", 0)
    monkeypatch.setattr(engine_mod.tk, "decode_ok", lambda dtype, index: False)
    with pytest.warns(UserWarning, match="decode kernels failed their check"):
        eng._check_decode_kernels()
    assert eng.kernels == "torch" and "failed their check" in eng.fallback_reason


@triton_missing
def test_triton_kernels_match_torch_semantics():
    out = _run_case("kernels")
    assert "kernels ok" in out


@triton_missing
def test_triton_engine_matches_reference():
    out = _run_case("engine")
    assert "engine ok" in out


@triton_missing
def test_triton_hybrid_step_matches_torch_and_reference():
    out = _run_case("hybrid")
    assert "hybrid ok" in out


@triton_missing
def test_triton_prefill_feeds_fla_directly():
    out = _run_case("split")
    assert "split ok" in out


def test_self_check_verdict_allows_low_precision_noise():
    from mmmamba.bench.run import self_check_failure

    # H100 bf16 HoVLE-2.6B numbers: the hybrid's 5.2e-2 sits at the bf16 torch step's own distance from fp32
    assert self_check_failure({"triton_vs_torch": 5.19e-2, "triton_vs_fp32": 4.5e-2, "torch_vs_fp32": 4.8e-2},
                              5e-2) is None
    assert self_check_failure({"triton_vs_torch": 4e-2, "triton_vs_fp32": 4e-2, "torch_vs_fp32": 0.0}, 5e-2) is None
    assert "off by" in self_check_failure({"triton_vs_torch": 0.9, "triton_vs_fp32": 0.9, "torch_vs_fp32": 5e-2},
                                          5e-2)
    assert "off by" in self_check_failure({"triton_vs_torch": 6e-2, "triton_vs_fp32": 6e-2, "torch_vs_fp32": 0.0},
                                          5e-2)
    assert "NaN" in self_check_failure({"triton_vs_torch": float("nan"), "triton_vs_fp32": 0.0,
                                        "torch_vs_fp32": 0.0}, 5e-2)
