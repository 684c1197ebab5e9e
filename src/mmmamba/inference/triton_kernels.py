"""Triton kernels of the fused decode step (one token per row; memory-bound work).

Per Mamba-2 layer the step is 5 kernels, per attention layer 7:

* `gemv`: y = epilogue(prologue(x) @ W^T) for a few rows x. Prologues: RMSNorm of the row (`pro=1`, the layer
  norm folded into the matrix-vector product) or the per-head gated RMSNorm of the SSM output (`pro=2`).
  Epilogues: plain store, residual add in place (`epi=1`), per-block max / argmax partials for greedy decoding
  (`epi=2`); `dual=True` reads gate and up rows of a fused gate|up matrix and stores SiLU(gate) * up.
  Optionally also shifts the Mamba-2 conv state (a side job done after the SSM kernel has read it).
  Two kernels, chosen per shape by the tuner: tiles of (rows, K block) per program, or, for one row with the
  RMSNorm or no prologue and a plain or residual epilogue, persistent programs that load x once and stream whole
  rows of W (`_gemv_rows_kernel`).
* `ssm_step`: causal conv update + SiLU + softplus(dt) + SSM state update + C.S for one head and a block of the
  head dim per program (state in fp32, read and written once).
* `rope_append` + `attn_decode` (split-K flash decoding reading the length from the device) for attention.
* `finish`: argmax over the partials, token fed back, position counters advanced.

Prefill (many rows) uses fused kernels of `ops`, each checked once against its reference: conv + SiLU with the
carried state (optionally written straight into fla's simple-GLA inputs, `ops.conv_silu.fused_prefill`),
SiLU(gate) * up (`ops.swiglu.fused_forward_packed`), the gated RMSNorm and `ops.add_norm`'s residual add + RMSNorm.

Rounding follows the reference modules (`mmmamba.layers`): values are rounded to the model dtype where the
reference rounds them. Every kernel has a fixed grid given the buffers, so the whole step can live in a CUDA
graph. Block sizes of `gemv` are tuned once per shape on the device (outside graph capture); on CPU (Triton's
interpreter, TRITON_INTERPRET=1, for tests) the first configuration is used.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.add_norm import rmsnorm_ref
from ..ops.checked import cuda_index, passes_check, rel_error
from ..ops.conv import causal_conv1d_step
from ..ops.gated_norm import gated_rmsnorm_ref
from ..ops.gla_prep import split_heads
from ..ops.rope import apply_rope_ref
from ..ops.ssd_ref import ssd_step

try:  # Triton is optional: CPU-only installs run the torch step
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None
try:  # grid dependency control (programmatic dependent launch, sm_90+)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except Exception:  # pragma: no cover - older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None


def available() -> bool:
    return triton is not None


@dataclass(frozen=True)
class DecodeOptions:
    """Knobs of the decode kernels, passed down from the engine. `from_env` reads their environment overrides; only
    the engine's constructor (the edge) calls it, the kernels never read the environment.

    pdl: programmatic dependent launch between the step's kernels (sm_90+; MMMAMBA_PDL=1).
    gemv_prefetch: the register double buffer of gemv's W tiles; None: on with pdl (MMMAMBA_GEMV_PREFETCH=0|1).
    gemv_config: (BLOCK_N, BLOCK_K, num_warps, ACC2D) pinned for every gemv; BLOCK_K = 0: the persistent whole-row
      kernel, ACC2D then giving its programs per SM (MMMAMBA_GEMV_CONFIG="8,256,4,1").
    tune: time each block configuration once per shape (MMMAMBA_TRITON_TUNE=0 turns it off: first candidate)."""

    pdl: bool = False
    gemv_prefetch: bool | None = None
    gemv_config: tuple[int, int, int, int] | None = None
    tune: bool = True

    @classmethod
    def from_env(cls, env=None) -> DecodeOptions:
        env = os.environ if env is None else env
        prefetch = {"1": True, "0": False}.get(env.get("MMMAMBA_GEMV_PREFETCH", ""))
        return cls(pdl=env.get("MMMAMBA_PDL") == "1", gemv_prefetch=prefetch,
                   gemv_config=parse_gemv_config(env.get("MMMAMBA_GEMV_CONFIG")),
                   tune=env.get("MMMAMBA_TRITON_TUNE") != "0")


DEFAULT_OPTIONS = DecodeOptions()


def parse_gemv_config(v: str | None) -> tuple[int, int, int, int] | None:
    """"BLOCK_N,BLOCK_K,num_warps,ACC2D" (MMMAMBA_GEMV_CONFIG) -> a tuple, None for unset."""
    if not v:
        return None
    try:
        cfg = tuple(int(t) for t in v.split(","))
    except ValueError:
        cfg = ()
    if len(cfg) != 4:
        raise ValueError(f"MMMAMBA_GEMV_CONFIG={v!r}: expected four integers BLOCK_N,BLOCK_K,num_warps,ACC2D")
    return cfg


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_compat() -> None:
    """Triton's CPU interpreter turns scalars into 1-element arrays and calls int() on them, which numpy >= 2.4
    refuses; teach it `.item()` (only used under TRITON_INTERPRET=1, i.e. in CPU tests)."""
    try:
        from triton.runtime import interpreter as _ti
    except Exception:
        return
    if getattr(_ti, "_mmmamba_patched", False):
        return
    orig = _ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _ti._patch_lang_tensor = patched
    _ti._mmmamba_patched = True


if triton is not None and interpreting():
    _interpreter_compat()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def attn_num_splits(max_len: int) -> int:
    """Number of key splits of flash decoding (fixed per cache so the grid is static)."""
    return int(min(128, max(1, math.ceil(max_len / 256))))


EPI2_MIN_BLOCK_N = 8  # the argmax epilogue uses row blocks of at least 8 (fewer partials for `finish` to scan)


def max_parts(n: int) -> int:
    """Largest number of argmax partials `gemv(epi=2)` may write for n outputs."""
    return math.ceil(n / EPI2_MIN_BLOCK_N)


# ---------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, stride_xb,
        w_ptr, stride_wn, w2_off,
        bias_ptr,
        nw_ptr, g_ptr, stride_gb,
        res_ptr, stride_rb,
        out_ptr, stride_ob,
        pv_ptr, pi_ptr, n_parts,
        cs_src_ptr, stride_csb, cs_dst_ptr, cs_C,
        B, N, K, eps,
        PRO: tl.constexpr, EPI: tl.constexpr, DUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
        CONV_UPD: tl.constexpr, KC: tl.constexpr, CSB: tl.constexpr, HD: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, ACC2D: tl.constexpr, GDC: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        pid = tl.program_id(0)
        XDT = x_ptr.dtype.element_ty
        ODT = out_ptr.dtype.element_ty
        rb = tl.arange(0, BLOCK_B)
        bm = rb < B
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = rn < N
        if GDC:  # programmatic dependent launch: the next kernel may launch once every program got here
            gdc_launch_dependents()
        if PREFETCH:  # W is never written during a step: its first tile streams in before (and while) we wait
            rk0 = tl.arange(0, BLOCK_K)
            wm0 = nm[:, None] & (rk0 < K)[None, :]
            w_nxt = tl.load(w_ptr + rn[:, None] * stride_wn + rk0[None, :], mask=wm0, other=0.0)
            if DUAL:
                w2_nxt = tl.load(w_ptr + w2_off + rn[:, None] * stride_wn + rk0[None, :], mask=wm0, other=0.0)
        if GDC:  # the previous kernel's writes (x, residual, states) are visible after this
            gdc_wait()
        if PRO == 1:  # RMSNorm of each row: needs the row's mean square first (summed per lane, reduced once)
            ss = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                xv = tl.load(x_ptr + rb[:, None] * stride_xb + rk[None, :],
                             mask=bm[:, None] & (rk < K)[None, :], other=0.0).to(tl.float32)
                ss += xv * xv
            rs = tl.rsqrt(tl.sum(ss, axis=1) / K + eps)
        acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
        acc2 = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
        if ACC2D:  # one row (BLOCK_B = 1): products summed per lane over the K loop, in W's own layout (no
            # shared-memory transposition of the W tile), reduced across lanes once after the loop
            acc3 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            if DUAL:
                acc4 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            km = rk < K
            xm = bm[:, None] & km[None, :]
            xv = tl.load(x_ptr + rb[:, None] * stride_xb + rk[None, :], mask=xm, other=0.0).to(tl.float32)
            if PRO == 1:
                nw = tl.load(nw_ptr + rk, mask=km, other=0.0).to(tl.float32)
                xv = (xv * rs[:, None]).to(XDT).to(tl.float32) * nw[None, :]
                xv = xv.to(XDT).to(tl.float32)
            if PRO == 2:
                gv = tl.load(g_ptr + rb[:, None] * stride_gb + rk[None, :], mask=xm, other=0.0).to(tl.float32)
                x3 = tl.reshape(xv, (BLOCK_B, BLOCK_K // HD, HD))
                ms = tl.sum(x3 * x3, axis=2) / HD
                x3 = x3 * tl.rsqrt(ms + eps)[:, :, None]
                nw = tl.load(nw_ptr + (rk % HD)).to(tl.float32)
                xv = tl.reshape(x3, (BLOCK_B, BLOCK_K)) * nw[None, :] * (gv * tl.sigmoid(gv))
                xv = xv.to(XDT).to(tl.float32)
            wm = nm[:, None] & km[None, :]
            if PREFETCH:  # register double buffer: the next tile's load is in flight during this tile's math
                w = w_nxt
                rkn = rk + BLOCK_K
                wmn = nm[:, None] & (rkn < K)[None, :]
                w_nxt = tl.load(w_ptr + rn[:, None] * stride_wn + rkn[None, :], mask=wmn, other=0.0)
            else:
                w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=wm, other=0.0)
            if USE_DOT:
                acc += tl.dot(xv.to(w.dtype), tl.trans(w), input_precision=DOT_PREC)
            elif ACC2D:
                acc3 += w.to(tl.float32) * tl.sum(xv, axis=0)[None, :]
            else:
                acc += tl.sum(xv[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            if DUAL:
                if PREFETCH:
                    w2 = w2_nxt
                    w2_nxt = tl.load(w_ptr + w2_off + rn[:, None] * stride_wn + rkn[None, :], mask=wmn, other=0.0)
                else:
                    w2 = tl.load(w_ptr + w2_off + rn[:, None] * stride_wn + rk[None, :], mask=wm, other=0.0)
                if USE_DOT:
                    acc2 += tl.dot(xv.to(w2.dtype), tl.trans(w2), input_precision=DOT_PREC)
                elif ACC2D:
                    acc4 += w2.to(tl.float32) * tl.sum(xv, axis=0)[None, :]
                else:
                    acc2 += tl.sum(xv[:, None, :] * w2.to(tl.float32)[None, :, :], axis=2)
        if ACC2D:
            acc += tl.sum(acc3, axis=1)[None, :]
            if DUAL:
                acc2 += tl.sum(acc4, axis=1)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
            if DUAL:
                acc2 += tl.load(bias_ptr + N + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
        y = acc
        if DUAL:  # SiLU(gate) * up, rounded like the reference MLP
            a = acc.to(ODT).to(tl.float32)
            a = (a * tl.sigmoid(a)).to(ODT).to(tl.float32)
            y = a * acc2.to(ODT).to(tl.float32)
        om = bm[:, None] & nm[None, :]
        if EPI == 1:
            r = tl.load(res_ptr + rb[:, None] * stride_rb + rn[None, :], mask=om, other=0.0).to(tl.float32)
            y = y.to(ODT).to(tl.float32) + r
        if EPI == 2:
            yv = tl.where(om, y, float("-inf"))
            mx = tl.max(yv, axis=1)
            am = tl.argmax(yv, axis=1) + pid * BLOCK_N
            tl.store(pv_ptr + rb * n_parts + pid, mx, mask=bm)
            tl.store(pi_ptr + rb * n_parts + pid, am.to(tl.int64), mask=bm)
        tl.store(out_ptr + rb[:, None] * stride_ob + rn[None, :], y.to(ODT), mask=om)
        if CONV_UPD:  # shift the conv state by one token (after the SSM kernel has read it)
            rc = pid * CSB + tl.arange(0, CSB)
            cm = rc < cs_C
            for bb in range(0, B):
                xnew = tl.load(cs_src_ptr + bb * stride_csb + rc, mask=cm, other=0.0)
                base = cs_dst_ptr + (bb * cs_C + rc) * (KC - 1)
                for j in tl.static_range(KC - 2):
                    tl.store(base + j, tl.load(base + j + 1, mask=cm, other=0.0), mask=cm)
                tl.store(base + (KC - 2), xnew, mask=cm)

    @triton.jit
    def _gemv_rows_kernel(
        x_ptr, w_ptr, stride_wn, w2_off, bias_ptr, nw_ptr, res_ptr, out_ptr, N, K, eps,
        PRO: tl.constexpr, EPI: tl.constexpr, DUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GDC: tl.constexpr,
    ):
        """One row x (K,), persistent programs: each loads x and its RMSNorm prologue once, then streams whole
        rows of W (BLOCK_N x K tiles, BLOCK_K >= K) for tiles pid, pid + nprog, ..., the next tile's load in flight
        while it reduces the current one. Epilogues as `_gemv_kernel` (plain store, residual add, SiLU(gate) * up)."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        XDT = x_ptr.dtype.element_ty
        ODT = out_ptr.dtype.element_ty
        rk = tl.arange(0, BLOCK_K)
        km = rk < K
        n_tiles = tl.cdiv(N, BLOCK_N)
        if GDC:
            gdc_launch_dependents()
        # W is never written during a step: the first tile streams in before (and while) x is read
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        wm = (rn < N)[:, None] & km[None, :]
        w_nxt = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=wm, other=0.0)
        if DUAL:
            w2_nxt = tl.load(w_ptr + w2_off + rn[:, None] * stride_wn + rk[None, :], mask=wm, other=0.0)
        if GDC:
            gdc_wait()
        xv = tl.load(x_ptr + rk, mask=km, other=0.0).to(tl.float32)
        if PRO == 1:  # the row's RMSNorm, rounded like the reference module
            rs = tl.rsqrt(tl.sum(xv * xv, axis=0) / K + eps)
            nw = tl.load(nw_ptr + rk, mask=km, other=0.0).to(tl.float32)
            xv = ((xv * rs).to(XDT).to(tl.float32) * nw).to(XDT).to(tl.float32)
        for t in range(pid, n_tiles, nprog):
            rn = t * BLOCK_N + tl.arange(0, BLOCK_N)
            nm = rn < N
            rnn = rn + nprog * BLOCK_N
            wmn = (rnn < N)[:, None] & km[None, :]
            w = w_nxt
            w_nxt = tl.load(w_ptr + rnn[:, None] * stride_wn + rk[None, :], mask=wmn, other=0.0)
            acc = tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
            if DUAL:
                w2 = w2_nxt
                w2_nxt = tl.load(w_ptr + w2_off + rnn[:, None] * stride_wn + rk[None, :], mask=wmn, other=0.0)
                acc2 = tl.sum(w2.to(tl.float32) * xv[None, :], axis=1)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=nm, other=0.0).to(tl.float32)
                if DUAL:
                    acc2 += tl.load(bias_ptr + N + rn, mask=nm, other=0.0).to(tl.float32)
            y = acc
            if DUAL:
                a = acc.to(ODT).to(tl.float32)
                a = (a * tl.sigmoid(a)).to(ODT).to(tl.float32)
                y = a * acc2.to(ODT).to(tl.float32)
            if EPI == 1:
                y = y.to(ODT).to(tl.float32) + tl.load(res_ptr + rn, mask=nm, other=0.0).to(tl.float32)
            tl.store(out_ptr + rn, y.to(ODT), mask=nm)

    @triton.jit
    def _conv_silu(zb, cst, cw_ptr, cb_ptr, ch, XDT: tl.constexpr, KC: tl.constexpr, HAS_CB: tl.constexpr):
        x = tl.load(zb + ch).to(tl.float32)
        acc = x * tl.load(cw_ptr + ch * KC + (KC - 1)).to(XDT).to(tl.float32)
        acc = acc.to(XDT).to(tl.float32)
        for j in tl.static_range(KC - 1):
            t = tl.load(cst + ch * (KC - 1) + j).to(tl.float32) * tl.load(cw_ptr + ch * KC + j).to(XDT).to(tl.float32)
            acc += t.to(XDT).to(tl.float32)
        acc = acc.to(XDT).to(tl.float32)
        if HAS_CB:
            acc = (acc + tl.load(cb_ptr + ch).to(XDT).to(tl.float32)).to(XDT).to(tl.float32)
        return (acc * tl.sigmoid(acc)).to(XDT).to(tl.float32)

    @triton.jit
    def _ssm_step_kernel(
        z_ptr, stride_zb, conv_ptr, cw_ptr, cb_ptr, dtb_ptr, na_ptr, s_ptr, y_ptr, stride_yb,
        H, REP, KVD, HDALL,
        N: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr, KC: tl.constexpr, HAS_CB: tl.constexpr,
        GDC: tl.constexpr,
    ):
        if GDC:
            gdc_launch_dependents()
            gdc_wait()
        pid = tl.program_id(0)
        pp = tl.program_id(1)
        b = pid // H
        hh = pid % H
        g = hh // REP
        XDT = z_ptr.dtype.element_ty
        C = 2 * KVD + HDALL
        rn = tl.arange(0, N)
        rp = pp * BLOCK_P + tl.arange(0, BLOCK_P)
        zb = z_ptr + b * stride_zb
        cst = conv_ptr + b * C * (KC - 1)
        xv = _conv_silu(zb, cst, cw_ptr, cb_ptr, g * P + rp, XDT, KC, HAS_CB)
        xk = _conv_silu(zb, cst, cw_ptr, cb_ptr, KVD + g * N + rn, XDT, KC, HAS_CB)
        xq = _conv_silu(zb, cst, cw_ptr, cb_ptr, 2 * KVD + hh * N + rn, XDT, KC, HAS_CB)
        dtr = tl.load(zb + C + HDALL + hh).to(tl.float32) + tl.load(dtb_ptr + hh).to(tl.float32)
        e = tl.exp(tl.minimum(dtr, 20.0))
        u = 1.0 + e
        lp = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))  # log1p(e), accurate for small e
        dt = tl.where(dtr > 20.0, dtr, lp)
        decay = tl.exp(dt * tl.load(na_ptr + hh))
        sp = s_ptr + ((b * H + hh) * N + rn[:, None]) * P + rp[None, :]
        S = tl.load(sp)
        S = decay * S + xk[:, None] * (dt * xv)[None, :]
        tl.store(sp, S)
        y = tl.sum(xq[:, None] * S, axis=0)
        tl.store(y_ptr + b * stride_yb + hh * P + rp, y.to(y_ptr.dtype.element_ty))

    @triton.jit
    def _rope_append_kernel(
        qkv_ptr, stride_qb, pos_ptr, len_ptr, inv_ptr, q_ptr, k_ptr, v_ptr, kvalid_ptr,
        H, KVH, max_len, D: tl.constexpr, GDC: tl.constexpr,
    ):
        if GDC:
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0)
        j = tl.program_id(1)
        XDT = qkv_ptr.dtype.element_ty
        half: tl.constexpr = D // 2
        ri = tl.arange(0, half)
        slot = tl.load(len_ptr)
        base = qkv_ptr + b * stride_qb + j * D
        x1 = tl.load(base + ri).to(tl.float32)
        x2 = tl.load(base + half + ri).to(tl.float32)
        if j < H + KVH:
            p = tl.load(pos_ptr + b).to(tl.float32)
            f = p * tl.load(inv_ptr + ri)
            c = tl.cos(f).to(XDT).to(tl.float32)
            s = tl.sin(f).to(XDT).to(tl.float32)
            o1 = ((x1 * c).to(XDT).to(tl.float32) + (-x2 * s).to(XDT).to(tl.float32)).to(XDT)
            o2 = ((x2 * c).to(XDT).to(tl.float32) + (x1 * s).to(XDT).to(tl.float32)).to(XDT)
            if j < H:
                dst = q_ptr + (b * H + j) * D
            else:
                dst = k_ptr + ((b * KVH + (j - H)) * max_len + slot) * D
            tl.store(dst + ri, o1)
            tl.store(dst + half + ri, o2)
        else:
            dst = v_ptr + ((b * KVH + (j - H - KVH)) * max_len + slot) * D
            tl.store(dst + ri, x1.to(XDT))
            tl.store(dst + half + ri, x2.to(XDT))
        if j == 0:
            tl.store(kvalid_ptr + b * max_len + slot, 1)

    @triton.jit
    def _attn_split_kernel(
        q_ptr, k_ptr, v_ptr, len_ptr, kstart_ptr, po_ptr, pm_ptr, pl_ptr,
        KVH, max_len, NS, REP, scale,
        D: tl.constexpr, REPP: tl.constexpr, BT: tl.constexpr, DOT_PREC: tl.constexpr, GDC: tl.constexpr,
    ):
        if GDC:
            gdc_launch_dependents()
            gdc_wait()
        bg = tl.program_id(0)
        sp = tl.program_id(1)
        b = bg // KVH
        g = bg % KVH
        L = tl.load(len_ptr) + 1  # the new token sits at slot `length`
        ks = tl.load(kstart_ptr + b)
        per = tl.cdiv(tl.cdiv(L, NS), BT) * BT
        t0 = sp * per
        t1 = tl.minimum(t0 + per, L)
        rr = tl.arange(0, REPP)
        rm = rr < REP
        rd = tl.arange(0, D)
        q = tl.load(q_ptr + ((b * KVH + g) * REP + rr)[:, None] * D + rd[None, :], mask=rm[:, None], other=0.0)
        m = tl.full((REPP,), float("-inf"), tl.float32)
        lsum = tl.zeros((REPP,), tl.float32)
        acc = tl.zeros((REPP, D), tl.float32)
        kb = k_ptr + (b * KVH + g) * max_len * D
        vb = v_ptr + (b * KVH + g) * max_len * D
        for t in range(t0, t1, BT):
            rt = t + tl.arange(0, BT)
            tm = (rt < t1) & (rt >= ks)
            k = tl.load(kb + rt[:, None] * D + rd[None, :], mask=tm[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
            s = tl.where(tm[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            lsum = lsum * alpha + tl.sum(p, axis=1)
            v = tl.load(vb + rt[:, None] * D + rd[None, :], mask=tm[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m = m_new
        ob = ((b * KVH + g) * NS + sp) * REP + rr
        tl.store(po_ptr + ob[:, None] * D + rd[None, :], acc, mask=rm[:, None])
        tl.store(pm_ptr + ob, m, mask=rm)
        tl.store(pl_ptr + ob, lsum, mask=rm)

    @triton.jit
    def _attn_reduce_kernel(
        po_ptr, pm_ptr, pl_ptr, o_ptr, stride_ob, KVH, NS, REP,
        D: tl.constexpr, BS: tl.constexpr, SB: tl.constexpr, GDC: tl.constexpr,
    ):
        if GDC:
            gdc_launch_dependents()
            gdc_wait()
        bh = tl.program_id(0)
        HQ = KVH * REP
        b = bh // HQ
        hq = bh % HQ
        g = hq // REP
        r = hq % REP
        rs = tl.arange(0, BS)
        sm = rs < NS
        rd = tl.arange(0, D)
        base = (b * KVH + g) * NS
        m_all = tl.load(pm_ptr + (base + rs) * REP + r, mask=sm, other=float("-inf"))
        l_all = tl.load(pl_ptr + (base + rs) * REP + r, mask=sm, other=0.0)
        M = tl.max(m_all, axis=0)
        den = tl.sum(tl.where(sm & (m_all > float("-inf")), tl.exp(m_all - M), 0.0) * l_all, axis=0)
        acc = tl.zeros((D,), tl.float32)
        for s0 in range(0, NS, SB):  # combine the split outputs a block of splits at a time (few registers)
            rb = s0 + tl.arange(0, SB)
            bm = rb < NS
            m = tl.load(pm_ptr + (base + rb) * REP + r, mask=bm, other=float("-inf"))
            w = tl.where(bm & (m > float("-inf")), tl.exp(m - M), 0.0)
            po = tl.load(po_ptr + ((base + rb) * REP + r)[:, None] * D + rd[None, :], mask=bm[:, None], other=0.0)
            acc += tl.sum(w[:, None] * po, axis=0)
        tl.store(o_ptr + b * stride_ob + hq * D + rd, (acc / den).to(o_ptr.dtype.element_ty))

    @triton.jit
    def _finish_kernel(pv_ptr, pi_ptr, stride_p, n_parts, tok_ptr, ids_ptr, len_ptr, pos_ptr, BP: tl.constexpr,
                       GDC: tl.constexpr):
        if GDC:
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0)
        best_v = tl.full([], float("-inf"), tl.float32)
        best_i = tl.full([], 0, tl.int64)
        for p0 in range(0, n_parts, BP):
            rp = p0 + tl.arange(0, BP)
            msk = rp < n_parts
            v = tl.load(pv_ptr + b * stride_p + rp, mask=msk, other=float("-inf"))
            ii = tl.load(pi_ptr + b * stride_p + rp, mask=msk, other=0)
            mx = tl.max(v, axis=0)
            a = tl.argmax(v, axis=0)
            ia = tl.sum(tl.where(tl.arange(0, BP) == a, ii, 0), axis=0)
            take = mx > best_v
            best_i = tl.where(take, ia, best_i)
            best_v = tl.where(take, mx, best_v)
        tl.store(tok_ptr + b, best_i)
        tl.store(ids_ptr + b, best_i)
        tl.store(pos_ptr + b, tl.load(pos_ptr + b) + 1)
        if b == 0:
            tl.store(len_ptr, tl.load(len_ptr) + 1)


# ---------------------------------------------------------------------------------------------------------------
# launchers
_B1_CONFIGS = [  # (BLOCK_N, BLOCK_K, num_warps, ACC2D) for one row: wide K tiles, all loads of a tile in flight
    (8, 512, 4, 0), (4, 1024, 4, 0), (16, 256, 4, 0), (8, 1024, 8, 0), (16, 512, 8, 0), (4, 2048, 8, 0),
    (32, 256, 8, 0), (2, 2048, 4, 0), (1, 2048, 4, 0),
    # per-lane accumulation over the K loop (no cross-lane reduction per tile): matters when K spans several tiles
    (8, 256, 4, 1), (16, 256, 8, 1), (4, 512, 4, 1), (8, 512, 8, 1), (4, 1024, 4, 1), (8, 1024, 8, 1),
    (16, 512, 8, 1),
    # long K (the MLP's down projection, K = 8192): whole rows per program, few or no loop iterations
    (1, 4096, 8, 0), (2, 4096, 8, 1),
    # persistent programs streaming whole rows (`_gemv_rows_kernel`): (BLOCK_N, 0, num_warps, programs per SM)
    (1, 0, 4, 4), (1, 0, 4, 8), (2, 0, 4, 2), (2, 0, 4, 4), (2, 0, 8, 2), (4, 0, 4, 2), (4, 0, 4, 4),
    (4, 0, 8, 1), (4, 0, 8, 2), (8, 0, 8, 1), (8, 0, 8, 2),
]

_DOT_CONFIGS = [(32, 128, 4, 0), (16, 256, 4, 0)]
_TUNED: dict = {}
_FAILED: set = set()


def rows_fit(bn: int, nwarps: int, K: int, dual: bool) -> bool:
    """Whether the persistent whole-row kernel's two W tiles (and x) fit in registers without spilling: at most 128
    W elements per thread and tile, and at most 2 rows of 8192 (checked at sm_90 by tests/inference)."""
    k = _pow2(K)
    return bn * k <= 16384 and bn * k * (2 if dual else 1) <= 4096 * nwarps


@functools.cache
def _pdl_device(index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(t: torch.Tensor, opts: DecodeOptions = DEFAULT_OPTIONS) -> bool:
    """Programmatic dependent launch for the decode-step kernels (opt in: `opts.pdl`; sm_90+, not under the
    interpreter). Each kernel then lets the next one launch once all its programs have started and waits (gdc_wait)
    for its predecessor before touching memory, so launch and ramp-up overlap the previous kernel's tail; kernels
    launched without it (torch's) keep full stream order."""
    if not opts.pdl or interpreting() or not t.is_cuda:
        return False
    return _pdl_device(cuda_index(t.device))


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def gemv(x, w, out, *, bias=None, pro=0, nw=None, eps=0.0, g=None, hd=0, res=None, epi=0, dual=False,
         parts=None, conv=None, opts: DecodeOptions = DEFAULT_OPTIONS) -> int:
    """out (B, N) = epilogue(prologue(x) @ w[:N]^T) (see the module docstring). `dual`: w holds gate rows then up
    rows (2N, K). `conv=(z, conv_state)`: also shift conv_state by z[:, :C]. Returns the number of argmax partials
    written (epi=2)."""
    B, K = x.shape
    N = w.shape[0] // 2 if dual else w.shape[0]
    assert out.shape[0] == B and out.shape[1] == N and w.stride(1) == 1 and x.stride(1) == 1 and out.stride(1) == 1
    use_dot = B > 1  # several rows: tensor-core tiles, rows padded to 16 (one compiled kernel for 2..16 rows)
    block_b = max(16, _pow2(B)) if use_dot else 1
    cands = _DOT_CONFIGS if use_dot else _B1_CONFIGS
    rows_ok = not use_dot and pro in (0, 1) and epi in (0, 1) and conv is None
    cands = [c for c in cands if c[1] or (rows_ok and rows_fit(c[0], c[2], K, dual))]
    narrow = min(c[1] for c in cands if c[1])  # no K tile wider than K itself (K below every tile: the narrowest)
    cands = [c for c in cands if c[1] <= max(narrow, _pow2(K))]
    if pro == 2:
        cands = [c for c in cands if c[1] % hd == 0] or [(c[0], max(hd, c[1]), *c[2:]) for c in cands]
    if epi == 2:
        cands = [c for c in cands if c[0] >= EPI2_MIN_BLOCK_N]
    key = (pro, epi, dual, bias is not None, conv is not None, N, K, block_b, x.dtype, w.dtype, out.dtype)
    pdl = use_pdl(x, opts)
    prefetch = pdl if opts.gemv_prefetch is None else opts.gemv_prefetch

    def launch(cfg, out, res, parts, conv):
        bn, bk, nwarps, acc2d = cfg
        if bk == 0:  # persistent whole-row programs; acc2d holds the programs per SM
            return _launch_rows(x, w, out, N, K, bias, pro, nw, eps, res, epi, dual, bn, nwarps, acc2d, pdl)
        grid = triton.cdiv(N, bn)
        csb, cs = 1, None
        if conv is not None:
            cs = conv[1]
            csb = _pow2(triton.cdiv(cs.shape[1], grid))
        dummy = out
        _gemv_kernel[(grid,)](
            x, x.stride(0),
            w, w.stride(0), N * w.stride(0),
            bias if bias is not None else dummy,
            nw if nw is not None else dummy, g if g is not None else x, g.stride(0) if g is not None else 0,
            res if res is not None else dummy, res.stride(0) if res is not None else 0,
            out, out.stride(0),
            parts[0] if parts is not None else dummy, parts[1] if parts is not None else dummy,
            parts[0].shape[1] if parts is not None else 0,
            conv[0] if conv is not None else x, conv[0].stride(0) if conv is not None else 0,
            cs if cs is not None else dummy, cs.shape[1] if cs is not None else 0,
            B, N, K, float(eps),
            PRO=pro, EPI=epi, DUAL=dual, HAS_BIAS=bias is not None, CONV_UPD=conv is not None,
            KC=cs.shape[2] + 1 if cs is not None else 2, CSB=csb, HD=max(hd, 1),
            BLOCK_B=block_b, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot, DOT_PREC=_dot_prec(x.dtype),
            ACC2D=bool(acc2d) and not use_dot, GDC=pdl, PREFETCH=prefetch, launch_pdl=pdl, num_warps=nwarps,
        )
        return grid

    cfg = opts.gemv_config
    if cfg is None or (cfg[1] == 0 and not rows_ok):  # a pinned whole-row config applies where that kernel can
        cfg = _TUNED.get(key)
    if cfg is None:
        # tune on scratch copies of everything the kernel writes, so tuning has no side effect
        out_s = out.clone()
        res_s = None if res is None else (out_s if res.data_ptr() == out.data_ptr() else res)
        parts_s = None if parts is None else (parts[0].clone(), parts[1].clone())
        conv_s = None if conv is None else (conv[0], conv[1].clone())
        cfg = _tune(key, cands, lambda c: launch(c, out_s, res_s, parts_s, conv_s), x, opts.tune)
        del out_s, res_s, parts_s, conv_s
    return launch(cfg, out, res, parts, conv)


def _launch_rows(x, w, out, N, K, bias, pro, nw, eps, res, epi, dual, bn, nwarps, per_sm, pdl) -> int:
    tiles = triton.cdiv(N, bn)
    sms = 4 if interpreting() else _sm_count(cuda_index(x.device))  # few programs: several tiles each
    grid = min(tiles, sms * per_sm)
    dummy = out
    _gemv_rows_kernel[(grid,)](
        x, w, w.stride(0), N * w.stride(0), bias if bias is not None else dummy, nw if nw is not None else dummy,
        res if res is not None else dummy, out, N, K, float(eps),
        PRO=pro, EPI=epi, DUAL=dual, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=_pow2(K), GDC=pdl,
        launch_pdl=pdl, num_warps=nwarps,
    )
    return grid


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tune(key, cands, launch, x, tune: bool = True):
    """Time each candidate (compile errors skip it) and keep the fastest. Only on CUDA, outside graph capture
    (`launch` writes scratch buffers) and with `tune`; otherwise the first candidate."""
    if interpreting():  # few, large programs: the interpreter runs programs one after another
        if len(cands[0]) == 4:  # gemv
            return (max(c[0] for c in cands), max(c[1] for c in cands if c[1] <= 256), 4, 0)
        return cands[0]
    if not tune or not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return cands[0]
    best, best_t = None, float("inf")
    try:
        for cfg in cands:
            try:
                launch(cfg)  # compile
                torch.cuda.synchronize()
                t = _kernel_ms(functools.partial(launch, cfg))
            except Exception:  # resource limits of this config on this device
                _FAILED.add((key, cfg))
                continue
            if t < best_t:
                best, best_t = cfg, t
    finally:
        _FLUSH.clear()
    if best is None:
        raise RuntimeError(f"no gemv configuration compiled for {key}")
    _TUNED[key] = best
    return best


_FLUSH: list = []  # the L2-clearing buffer, held only while a tuning runs (it would count in peak memory)


def _kernel_ms(fn, reps: int = 20) -> float:
    """Time of one launch as the graph-replayed decode step sees it: from a cold L2 (in a step each weight comes
    from HBM once; back-to-back repeats would find a matrix of up to ~50 MB in L2) and without the host's launch
    cost (Python and Triton's launcher take tens of microseconds per call, more than many of these kernels). A CUDA
    graph of `reps` x (clear L2, launch) is timed against one of `reps` x (clear L2); falls back to
    `triton.testing.do_bench` where capture fails. `fn` must have run once already (compiled, outside capture)."""
    try:
        if not _FLUSH:
            _FLUSH.append(torch.empty(128 << 20, dtype=torch.int8, device="cuda"))  # > any L2 (H100/H200: 50 MB)
        flush = _FLUSH[0]
        with_fn, alone = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(with_fn):
            for _ in range(reps):
                flush.zero_()
                fn()
        with torch.cuda.graph(alone):
            for _ in range(reps):
                flush.zero_()
        return max(_replay_ms(with_fn) - _replay_ms(alone), 0.0) / reps
    except Exception:  # capture unsupported here: host-launched timing
        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def _replay_ms(graph, n: int = 5) -> float:
    """Median wall time of `n` replays of `graph` (ms)."""
    graph.replay()  # warm
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[n // 2]


def ssm_step(z, conv_state, conv_w, conv_b, dt_bias, neg_A, ssm, y, h, kv, d, block_p: int | None = None,
             opts: DecodeOptions = DEFAULT_OPTIONS):
    """z (B, C + h*d + h) = [v | k | q | g | dt]; conv_state (B, C, k-1) read only (the o-projection gemv shifts
    it); ssm (B, h, d, d) fp32 updated in place; y (B, h*d) <- C . S (before the gated norm)."""
    B = z.shape[0]
    bp = block_p or (d if interpreting() else min(d, 16))
    pdl = use_pdl(z, opts)
    _ssm_step_kernel[(B * h, d // bp)](
        z, z.stride(0), conv_state, conv_w, conv_b if conv_b is not None else conv_w, dt_bias, neg_A, ssm,
        y, y.stride(0), h, h // kv, kv * d, h * d,
        N=d, P=d, BLOCK_P=bp, KC=conv_w.shape[1], HAS_CB=conv_b is not None, GDC=pdl, launch_pdl=pdl,
        num_warps=4,
    )


def rope_append(qkv, pos, length, inv_freq, q_out, k_cache, v_cache, kvalid_u8, h, kv, d,
                opts: DecodeOptions = DEFAULT_OPTIONS):
    B = qkv.shape[0]
    pdl = use_pdl(qkv, opts)
    _rope_append_kernel[(B, h + 2 * kv)](
        qkv, qkv.stride(0), pos, length, inv_freq, q_out, k_cache, v_cache, kvalid_u8,
        h, kv, k_cache.shape[2], D=d, GDC=pdl, launch_pdl=pdl, num_warps=1,
    )


_ATTN_CONFIGS = [(32, 4), (64, 8), (32, 8), (16, 4)]  # (keys per block, num_warps); 64 x 4 warps spills


def attn_decode(q, k_cache, v_cache, length, key_start, out, po, pm, pl, scale, block_t: int | None = None,
                opts: DecodeOptions = DEFAULT_OPTIONS):
    """q (B, h, d) roped; caches (B, kv, max_len, d) with the new token already at slot `length`. Split-K flash
    decoding: every split of the keys writes partial (max, sum, output) rows to po/pm/pl, then one program per
    query head combines them. The key range comes from the device (`length`, `key_start`), so the grid is fixed."""
    B, kv, max_len, d = k_cache.shape
    h = q.shape[1]
    ns = po.shape[2]
    rep = h // kv
    pdl = use_pdl(q, opts)

    def launch(cfg):
        bt, nw = cfg
        _attn_split_kernel[(B * kv, ns)](
            q, k_cache, v_cache, length, key_start, po, pm, pl, kv, max_len, ns, rep, float(scale),
            D=d, REPP=max(16, _pow2(rep)), BT=bt, DOT_PREC=_dot_prec(q.dtype), GDC=pdl, launch_pdl=pdl,
            num_warps=nw,
        )

    if block_t is not None:
        cfg = (block_t, 4)
    else:
        key = ("attn", B, kv, rep, d, ns, q.dtype)
        cfg = _TUNED.get(key)
        if cfg is None:  # the split kernel only writes the partial buffers: tuning in place has no side effect
            cfg = _tune(key, _ATTN_CONFIGS, launch, q, opts.tune)
    launch(cfg)
    _attn_reduce_kernel[(B * h,)](po, pm, pl, out, out.stride(0), kv, ns, rep, D=d, BS=max(2, _pow2(ns)),
                                  SB=min(16, max(2, _pow2(ns))), GDC=pdl, launch_pdl=pdl, num_warps=4)


def finish(pv, pi, n_parts, tok, ids, length, pos, opts: DecodeOptions = DEFAULT_OPTIONS):
    B = tok.shape[0]
    pdl = use_pdl(tok, opts)
    _finish_kernel[(B,)](pv, pi, pv.stride(0), n_parts, tok, ids, length, pos, BP=4096, GDC=pdl, launch_pdl=pdl,
                         num_warps=8)


# -- references and the first-use check ------------------------------------------------------------------------
CHECK_TOLERANCE = {torch.float32: 1e-3}  # relative (norm); half types: HALF_TOLERANCE (each op rounds differently)
HALF_TOLERANCE = 5e-2


def ssm_step_ref(z, conv_state, conv_w, conv_b, dt_bias, neg_A, ssm, h, kv, d):
    """What `ssm_step` computes, in the torch ops of `Mamba2Mixer.step`: (y (B, h d), new SSM state); conv_state
    (B, C, k-1) is only read (the o-projection gemv shifts it)."""
    C = (2 * kv + h) * d
    xc, _ = causal_conv1d_step(z[:, :C], conv_w, conv_b, conv_state)
    v, k, q = split_heads(F.silu(xc)[:, None], h, kv, d)
    dt = F.softplus(z[:, C + h * d:C + h * d + h].float() + dt_bias)
    y, S = ssd_step(ssm, v[:, 0], dt, neg_A, k[:, 0], q[:, 0])
    return y.reshape(z.shape[0], -1), S


def decode_errors(dtype: torch.dtype, device, B: int = 2, h: int = 4, kv: int = 2, d: int = 64) -> dict[str, float]:
    """Relative errors of the decode kernels against their torch references on random inputs in `dtype`: the
    in-projection gemv with its RMSNorm prologue, the conv + SSM step, the o-projection gemv with the gated norm
    and the conv-state shift, RoPE + append and split-K attention over a left-padded cache."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    H, C, kc, T = 256, (2 * kv + h) * d, 2, 40
    x, nw, w_in = rnd(B, H), rnd(H, scale=0.1) + 1, rnd(C + h * d + h, H, scale=H ** -0.5)
    z = torch.empty(B, w_in.shape[0], dtype=dtype, device=device)
    gemv(x, w_in, z, pro=1, nw=nw, eps=1e-5)
    errs = {"gemv": rel_error(z, F.linear(rmsnorm_ref(x, nw, 1e-5), w_in))}
    conv_state, cw, cb = rnd(B, C, kc - 1), rnd(C, kc, scale=0.5), rnd(C, scale=0.1)
    dtb = torch.randn(h, device=device, generator=gen) - 1
    negA = -torch.rand(h, device=device, generator=gen) - 0.1
    S0 = torch.randn(B, h, d, d, device=device, generator=gen) * 0.1
    y, S = torch.empty(B, h * d, dtype=dtype, device=device), S0.clone()
    ssm_step(z, conv_state, cw, cb, dtb, negA, S, y, h, kv, d)
    y_ref, S_ref = ssm_step_ref(z, conv_state, cw, cb, dtb, negA, S0, h, kv, d)
    errs.update(ssm_y=rel_error(y, y_ref), ssm_state=rel_error(S, S_ref))
    w_o, gw, res = rnd(H, h * d, scale=(h * d) ** -0.5), rnd(d, scale=0.1) + 1, rnd(B, H)
    want = res.float() + F.linear(gated_rmsnorm_ref(y, z[:, C:C + h * d], gw, 1e-5, d), w_o).float()
    cs = conv_state.clone()
    gemv(y, w_o, res, pro=2, nw=gw, eps=1e-5, g=z[:, C:], hd=d, res=res, epi=1, conv=(z, cs))
    errs["gemv_gated"] = rel_error(res, want)
    errs["conv_shift"] = rel_error(cs[..., -1], z[:, :C])
    errs.update(_attention_errors(rnd, dtype, device, B, h, kv, d, T, gen))
    return errs


def _attention_errors(rnd, dtype, device, B, h, kv, d, T, gen) -> dict[str, float]:
    """RoPE + append of one token at slot L, then split-K attention over slots key_start..L, against SDPA."""
    L = T - 7
    qkv, kc, vc = rnd(B, (h + 2 * kv) * d), rnd(B, kv, T, d), rnd(B, kv, T, d)
    kvalid = torch.zeros(B, T, dtype=torch.bool, device=device)
    kvalid[:, :L] = True
    kvalid[1, :5] = False
    kstart = torch.tensor([0, 5], dtype=torch.int32, device=device)[:B]
    pos, length = torch.tensor([L, L - 5], device=device)[:B], torch.tensor(L, device=device)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    q = torch.empty(B, h, d, dtype=dtype, device=device)
    rope_append(qkv, pos, length, inv, q, kc, vc, kvalid.view(torch.uint8), h, kv, d)
    emb = torch.cat([pos.float()[:, None] * inv] * 2, -1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    q_ref = apply_rope_ref(qkv[:, :h * d].view(B, h, 1, d), cos, sin)[:, :, 0]
    errs = {"rope_q": rel_error(q, q_ref)}
    ns = attn_num_splits(T)
    po = torch.zeros(B, kv, ns, h // kv, d, device=device)
    pm, pl = (torch.zeros(B, kv, ns, h // kv, device=device) for _ in range(2))
    o = torch.empty(B, h * d, dtype=dtype, device=device)
    attn_decode(q, kc, vc, length, kstart, o, po, pm, pl, d ** -0.5)
    o_ref = F.scaled_dot_product_attention(q.view(B, kv, h // kv, d), kc[:, :, :L + 1], vc[:, :, :L + 1],
                                           attn_mask=kvalid[:, None, None, :L + 1])
    errs["attention"] = rel_error(o, o_ref.reshape(B, -1))
    return errs


@functools.cache
def decode_ok(dtype: torch.dtype, device_index: int) -> bool:
    """Whether the engine may run the Triton decode step on this CUDA device in `dtype` (checked once)."""
    tol = CHECK_TOLERANCE.get(dtype, HALF_TOLERANCE)
    return triton is not None and passes_check(
        "Triton decode kernels", lambda: decode_errors(dtype, torch.device("cuda", device_index)), tol,
        "the torch decode step")
