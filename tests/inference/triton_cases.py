"""Checks of the Triton decode kernels, run by test_engine.py in a subprocess under TRITON_INTERPRET=1 (CPU).

    TRITON_INTERPRET=1 python tests/inference/triton_cases.py kernels|engine
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmmamba.inference import triton_kernels as tk  # noqa: E402
from mmmamba.ops.add_norm import fused_add_rmsnorm  # noqa: E402
from mmmamba.ops.add_norm import rmsnorm_ref as _rmsnorm  # noqa: E402
from mmmamba.ops.conv_silu import fused_prefill  # noqa: E402
from mmmamba.ops.gated_norm import fused_forward, gated_rmsnorm_ref  # noqa: E402
from mmmamba.ops.swiglu import fused_forward_packed  # noqa: E402


def close(a, b, tol=1e-5):
    err = float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def case_kernels():
    torch.manual_seed(0)
    for B in (1, 3, 12):  # 12 rows: the tl.dot path
        K, N, hd = 96, 40, 16
        x, w, nw = torch.randn(B, K), torch.randn(N, K), torch.rand(K) + 0.5
        out = torch.empty(B, N)
        tk.gemv(x, w, out, pro=1, nw=nw, eps=1e-6)
        close(out, F.linear(_rmsnorm(x, nw, 1e-6), w))
        w2, b2 = torch.randn(2 * N, K), torch.randn(2 * N)
        tk.gemv(x, w2, out, pro=1, nw=nw, eps=1e-6, dual=True, bias=b2)
        g, u = F.linear(_rmsnorm(x, nw, 1e-6), w2, b2).chunk(2, -1)
        close(out, F.silu(g) * u)
        y, gg, gw = torch.randn(B, K), torch.randn(B, K), torch.rand(hd) + 0.5
        res = torch.randn(B, N)
        r0 = res.clone()
        conv_state = torch.randn(B, 10, 1)
        z = torch.randn(B, 30)
        tk.gemv(y, w, res, pro=2, nw=gw, eps=1e-5, g=gg, hd=hd, res=res, epi=1, conv=(z, conv_state))
        close(res, r0 + F.linear(gated_rmsnorm_ref(y, gg, gw, 1e-5, hd), w))
        assert torch.equal(conv_state[..., 0], z[:, :10])  # conv state shifted by the side job
        pv = torch.empty(B, tk.max_parts(N))
        pi = torch.zeros(B, tk.max_parts(N), dtype=torch.long)
        logits = torch.empty(B, N)
        n = tk.gemv(x, w, logits, epi=2, parts=(pv, pi))
        close(logits, x @ w.T)
        tok, ids = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
        length, pos = torch.tensor(5), torch.arange(B)
        tk.finish(pv, pi, n, tok, ids, length, pos)
        assert torch.equal(tok, (x @ w.T).argmax(-1)) and torch.equal(ids, tok)
        assert int(length) == 6 and torch.equal(pos, torch.arange(B) + 1)

    # one row, K spanning 3 tiles of 32: the per-tile reduction and the per-lane accumulation (ACC2D) variants
    K, N, hd = 96, 40, 16
    x, w, nw = torch.randn(1, K), torch.randn(N, K), torch.rand(K) + 0.5
    w2, b2 = torch.randn(2 * N, K), torch.randn(2 * N)
    y, gg, gw = torch.randn(1, K), torch.randn(1, K), torch.rand(hd) + 0.5
    for forced, prefetch in (("8,32,4,0", "0"), ("8,32,4,1", "0"), ("8,32,4,0", "1"), ("8,32,4,1", "1"),
                             ("8,0,4,1", "0"), ("16,0,4,1", "0")):  # persistent whole rows: 4 programs, 5 / 3 tiles
        # the pinned config and the register double buffer of the W tiles, as the environment would set them
        o = tk.DecodeOptions.from_env({"MMMAMBA_GEMV_CONFIG": forced, "MMMAMBA_GEMV_PREFETCH": prefetch})
        out = torch.empty(1, N)
        tk.gemv(x, w, out, pro=1, nw=nw, eps=1e-6, opts=o)
        close(out, F.linear(_rmsnorm(x, nw, 1e-6), w))
        tk.gemv(x, w2, out, pro=1, nw=nw, eps=1e-6, dual=True, bias=b2, opts=o)
        g, u = F.linear(_rmsnorm(x, nw, 1e-6), w2, b2).chunk(2, -1)
        close(out, F.silu(g) * u)
        res = torch.randn(1, N)
        r0 = res.clone()
        tk.gemv(y, w, res, pro=2, nw=gw, eps=1e-5, g=gg, hd=hd, res=res, epi=1, opts=o)
        close(res, r0 + F.linear(gated_rmsnorm_ref(y, gg, gw, 1e-5, hd), w))
        r0 = res.clone()
        tk.gemv(y, w, res, bias=b2[:N], res=res, epi=1, opts=o)  # the down projection's residual epilogue
        close(res, r0 + F.linear(y, w, b2[:N]))

    # conv + SSM step vs the reference recurrence (GQA: 4 heads, 2 groups)
    B, h, kv, d, kc = 2, 4, 2, 16, 3
    C = 2 * kv * d + h * d
    z = torch.randn(B, C + h * d + h)
    conv_state, cw, cb = torch.randn(B, C, kc - 1), torch.randn(C, kc), torch.randn(C)
    dtb, negA = torch.randn(h), -torch.rand(h) - 0.1
    S = torch.randn(B, h, d, d)
    S_ref = S.clone()
    y = torch.empty(B, h * d)
    tk.ssm_step(z, conv_state, cw, cb, dtb, negA, S, y, h, kv, d)
    xBC = z[:, :C]
    window = torch.cat([conv_state, xBC[..., None]], -1)
    xc = F.silu((window * cw).sum(-1) + cb)
    v, k, q = xc.split([kv * d, kv * d, h * d], -1)
    v = v.view(B, kv, d).repeat_interleave(h // kv, 1)
    k = k.view(B, kv, d).repeat_interleave(h // kv, 1)
    q = q.view(B, h, d)
    dt = F.softplus(z[:, C + h * d:] + dtb)
    from mmmamba.ops.ssd_ref import ssd_step

    y_ref, S_ref = ssd_step(S_ref, v, dt, negA, k, q)
    close(S, S_ref)
    close(y, y_ref.reshape(B, -1))

    # rope + append + split-K flash decoding vs SDPA over the valid keys (left padding via key_start)
    B, h, kv, d, max_len, L = 2, 4, 2, 16, 40, 23
    qkv = torch.randn(B, (h + 2 * kv) * d)
    kc_, vc_ = torch.randn(B, kv, max_len, d), torch.randn(B, kv, max_len, d)
    kvalid = torch.zeros(B, max_len, dtype=torch.bool)
    kvalid[:, :L] = True
    kstart = torch.tensor([0, 5], dtype=torch.int32)
    kvalid[1, :5] = False
    pos = torch.tensor([L, L - 5])
    length = torch.tensor(L)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    qb = torch.empty(B, h, d)
    tk.rope_append(qkv, pos, length, inv, qb, kc_, vc_, kvalid.view(torch.uint8), h, kv, d)
    from mmmamba.layers.rope import apply_rope

    freqs = pos.float()[:, None] * inv
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    q_ref = apply_rope(qkv[:, :h * d].view(B, h, 1, d), cos, sin)[:, :, 0]
    k_ref = apply_rope(qkv[:, h * d:(h + kv) * d].view(B, kv, 1, d), cos, sin)[:, :, 0]
    close(qb, q_ref)
    close(kc_[:, :, L], k_ref)
    assert torch.equal(vc_[:, :, L], qkv[:, (h + kv) * d:].view(B, kv, d)) and bool(kvalid[:, L].all())
    for ns in (1, 3, 8):
        po = torch.zeros(B, kv, ns, h // kv, d)
        pm, pl = torch.zeros(B, kv, ns, h // kv), torch.zeros(B, kv, ns, h // kv)
        o = torch.empty(B, h * d)
        tk.attn_decode(qb, kc_, vc_, length, kstart, o, po, pm, pl, d ** -0.5, block_t=16)
        mask = kvalid[:, None, None, :L + 1]
        o_ref = F.scaled_dot_product_attention(qb.view(B, kv, h // kv, d), kc_[:, :, :L + 1], vc_[:, :, :L + 1],
                                               attn_mask=mask)
        close(o, o_ref.reshape(B, -1))

    # prefill kernels: residual add + RMSNorm, gated per-head norm, SiLU * up, conv + SiLU with state and padding
    x, dlt, w = torch.randn(2, 5, 48), torch.randn(2, 5, 48), torch.rand(48) + 0.5
    hh, yy = fused_add_rmsnorm(x, w, 1e-6, dlt)
    close(hh, x + dlt)
    close(yy, _rmsnorm(x + dlt, w, 1e-6))
    _, y0 = fused_add_rmsnorm(x, w, 1e-6)
    close(y0, _rmsnorm(x, w, 1e-6))
    z = torch.randn(2, 5, 3 * 64 + 7)
    yv, gv = torch.randn(2, 5, 64), z[..., 64:128]
    gw = torch.rand(16) + 0.5
    close(fused_forward(yv, gv, gw, 1e-5, 16), gated_rmsnorm_ref(yv, gv, gw, 1e-5, 16))
    gu = torch.randn(2, 5, 2 * 40)
    close(fused_forward_packed(gu), F.silu(gu[..., :40]) * gu[..., 40:])
    from mmmamba.ops.conv import causal_conv1d

    for kc in (2, 4):
        C, L = 24, 19
        zz = torch.randn(2, L, C + 9)
        xBC = zz[..., :C]
        cw, cb = torch.randn(C, kc), torch.randn(C)
        st = torch.randn(2, C, kc - 1)
        mask = torch.ones(2, L, dtype=torch.bool)
        mask[1, :6] = False
        for state, m in ((None, None), (st, None), (None, mask), (st, mask)):
            out, new_state = fused_prefill(xBC, cw, cb, state, m)
            xm = xBC if m is None else xBC * m[..., None].float()
            ref, ref_state = causal_conv1d(xm, cw, cb, state)
            ref = F.silu(ref)
            if m is not None:
                ref = ref * m[..., None].float()
            close(out, ref)
            close(new_state, ref_state)
    # the same conv written straight into the SSD's simple-GLA inputs (GQA: 4 heads in 2 groups, head dim 16)
    from mmmamba.ops.ssd_fla import gla_inputs

    h, kv, d, L = 4, 2, 16, 19
    C = (2 * kv + h) * d
    zz = torch.randn(2, L, C + 5)
    cw, cb, st = torch.randn(C, 4), torch.randn(C), torch.randn(2, C, 3)
    dt = F.softplus(torch.randn(2, L, h))
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[0, :4] = False
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):  # the interpreter truncates bf16 casts
        xBC = zz[..., :C].to(dtype)
        (q, k, v), new_state = fused_prefill(xBC, cw.to(dtype), cb.to(dtype), st.to(dtype), mask,
                                                    split=(dt, h, kv, d))
        xc, ref_state = fused_prefill(xBC, cw.to(dtype), cb.to(dtype), st.to(dtype), mask)
        xv, xk, xq = xc.split([kv * d, kv * d, h * d], -1)
        rep = lambda t: t.reshape(2, L, kv, d).repeat_interleave(h // kv, 2)  # noqa: E731
        want = gla_inputs(rep(xv), dt, -torch.ones(h), rep(xk), xq.reshape(2, L, h, d))
        for got, ref in zip((q, k, v), want[:3]):
            assert got.is_contiguous() and got.dtype == dtype
            close(got, ref, tol)
        assert torch.equal(new_state, ref_state)
    print("kernels ok")


def case_engine():
    from conftest import tiny_model

    from mmmamba.inference.engine import Engine
    from mmmamba.models.generate import generate

    for lt in (["mamba2", "mamba2"], ["attention", "mamba2"]):
        model = tiny_model(lt, head_dim=16, num_hidden_layers=2)
        ids = torch.randint(0, 97, (1, 13), generator=torch.Generator().manual_seed(0))
        ref = generate(model, ids, max_new_tokens=6)
        eng = Engine(model, kernels="triton")
        out = eng.generate(ids, max_new_tokens=6)
        assert eng.kernels == "triton" and eng.fallback_reason is None, eng.fallback_reason
        assert torch.equal(out, ref), (out, ref)
        eng.reserve(1, 32)
        eng.set_tokens(eng.prefill(ids).argmax(-1))
        err = eng.compare_kernels()
        assert err < 1e-5, err
    # left-padded batch of 2 through the hybrid
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    ref = generate(model, ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(eng.generate(ids, attention_mask=mask, max_new_tokens=4), ref)
    eng_c = Engine(model, kernels="triton", prefill_chunk=4)  # chunked prefill through the fused kernels
    assert torch.equal(eng_c.generate(ids, attention_mask=mask, max_new_tokens=4), ref)
    print("engine ok")


def _torch_simple_gla(q, k, v, g, scale, initial_state, output_final_state):
    """fla's chunk_simple_gla by its recurrence (state (b, h, K, V)): S_t = exp(g_t) S_{t-1} + k_t v_t^T,
    o_t = scale q_t S_t."""
    b, L, h, n = q.shape
    S = torch.zeros(b, h, n, v.shape[-1]) if initial_state is None else initial_state.clone()
    out = []
    for t in range(L):
        S = S * g[:, t].exp()[..., None, None] + k[:, t, :, :, None].float() * v[:, t, :, None, :].float()
        out.append(scale * torch.einsum("bhn,bhnp->bhp", q[:, t].float(), S))
    return torch.stack(out, 1).to(v.dtype), S


def case_split():
    """The Triton prefill's fla route (conv + SiLU written straight into fla's q, k, dt * v), with fla's kernel
    replaced by its recurrence: prefill logits and the carried states equal the reference path's, in one chunk and
    in chunks of 4 (state carried), with left padding, GQA (4 heads in 2 groups)."""
    from conftest import tiny_model

    from mmmamba.inference import engine as engine_mod
    from mmmamba.inference.engine import Engine
    from mmmamba.models.cache import HybridCache
    from mmmamba.ops import ssd_fla

    used = []
    ssd_fla.simple_gla = lambda: lambda **kw: used.append(1) or _torch_simple_gla(**kw)
    engine_mod.resolve_backend = lambda backend, x: "fla"
    model = tiny_model(["mamba2", "attention", "mamba2"], head_dim=16, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, cache=HybridCache(model.config)).logits[:, -1]
    for chunk in (64, 4):
        eng = Engine(model, kernels="triton", cuda_graph=False, prefill_chunk=chunk)
        eng.reserve(2, 16)
        close(eng.prefill(ids, attention_mask=mask), ref, 1e-5)
        tor = Engine(model, kernels="torch", cuda_graph=False, prefill_chunk=chunk)
        tor.reserve(2, 16)
        tor.prefill(ids, attention_mask=mask)
        for i in (0, 2):
            close(eng.cache.ssm[i], tor.cache.ssm[i], 1e-5)
            close(eng.cache.conv[i], tor.cache.conv[i], 1e-6)
    assert len(used) == 2 + 2 * 3, len(used)  # 2 mamba2 layers x (1 chunk, then 3 chunks of 4)
    print("split ok")


def case_hybrid():
    """Bench-shaped hybrid (attention every 4 layers, GQA, head_dim 64), fp32: Triton step == torch step == the
    reference path, after a real prefill and after `StaticCache.fill_random` (the bench's two decode contexts);
    plus the noise-aware bf16 self-check (`Engine.kernel_errors`) on a linear model (bf16 attention is not run:
    Triton's interpreter mis-evaluates bf16 `tl.dot`)."""
    from conftest import randomize_ssm

    from mmmamba.bench.models import make_config
    from mmmamba.bench.run import self_check_failure
    from mmmamba.inference.engine import Engine
    from mmmamba.models.cache import HybridCache
    from mmmamba.models.decoder import MMMambaForCausalLM

    for hq, kvh in ((4, 2), (8, 4)):
        dims = dict(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                    num_attention_heads=hq, num_key_value_heads=kvh, head_dim=64, rms_norm_eps=1e-5,
                    rope_theta=1_000_000.0, max_position_embeddings=4096, mamba_d_conv=2, mamba_chunk_size=16)
        cfg = make_config(dims, "hybrid")
        assert cfg.attention_layers == [0, 4], cfg.attention_layers
        torch.manual_seed(0)
        model = randomize_ssm(MMMambaForCausalLM(cfg).eval(), 0)
        ids = torch.randint(0, 300, (1, 37), generator=torch.Generator().manual_seed(1))
        eng = Engine(model, kernels="triton", cuda_graph=False)
        eng.reserve(1, 48)
        tok = eng.prefill(ids).argmax(-1)
        eng.set_tokens(tok)
        errs = eng.kernel_errors()
        assert errs["triton_vs_torch"] < 1e-5 and self_check_failure(errs, 5e-2) is None, errs
        eng.decode_step()  # Triton step vs the reference path (full forward over prompt + token)
        with torch.no_grad():
            ref = model(input_ids=torch.cat([ids, tok[:, None]], 1), cache=HybridCache(cfg)).logits[:, -1]
        close(eng.logits, ref, tol=1e-4)
        eng.reserve(1, 48)
        eng.cache.fill_random(30, generator=torch.Generator().manual_seed(2))
        eng.set_tokens(tok)
        assert eng.compare_kernels() < 1e-5
    torch.manual_seed(0)
    lin = randomize_ssm(MMMambaForCausalLM(make_config(dims, "linear")).eval(), 0).to(torch.bfloat16)
    eng = Engine(lin, kernels="triton", cuda_graph=False)
    eng.reserve(1, 48)
    eng.set_tokens(eng.prefill(ids).argmax(-1))
    errs = eng.kernel_errors()
    assert errs["torch_vs_fp32"] > 0 and self_check_failure(errs, 5e-2) is None, errs
    print("hybrid ok", errs)


def case_decode_check():
    """The engine's first-use check of the decode kernels (`triton_kernels.decode_errors`) passes in fp32 (bf16
    `tl.dot` is mis-evaluated by the interpreter), and fails for a kernel that computes something else."""
    errs = tk.decode_errors(torch.float32, "cpu")
    assert max(errs.values()) < tk.CHECK_TOLERANCE[torch.float32], errs
    good = tk.ssm_step
    tk.ssm_step = lambda z, cs, cw, cb, dtb, negA, S, y, *a, **k: good(z, cs, cw, cb, dtb, 2 * negA, S, y, *a, **k)
    bad = tk.decode_errors(torch.float32, "cpu")
    tk.ssm_step = good
    assert bad["ssm_y"] > 1e-2 and bad["ssm_state"] > 1e-2, bad
    print("decode check ok", errs)


if __name__ == "__main__":
    {"kernels": case_kernels, "engine": case_engine, "hybrid": case_hybrid, "split": case_split,
     "decode_check": case_decode_check}[sys.argv[1]]()
