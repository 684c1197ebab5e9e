"""The Triton decode / prefill kernels compile for Hopper (sm_90) without a GPU (Triton's own ptxas), with no
register spills in the matrix-vector kernels. Skipped without Triton."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tempfile

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _compile(fn, sig: dict, const: dict, num_warps: int = 4):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: ("constexpr" if n in const else sig.get(n, "i32")) for n in names}
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def _local_bytes(kernel) -> int | None:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    m = re.search(r"STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return None if m is None else int(m.group(1)) + int(m.group(2))


@pytest.fixture(scope="module")
def tk():
    from mmmamba.inference import triton_kernels

    if triton_kernels.interpreting():
        pytest.skip("TRITON_INTERPRET is set: kernels are interpreted functions")
    return triton_kernels


@pytest.mark.parametrize("variant", [
    dict(PRO=1, EPI=0, DUAL=False, CONV_UPD=False),  # fused in-projection with the RMSNorm prologue
    dict(PRO=2, EPI=1, DUAL=False, CONV_UPD=True),  # o-projection: gated norm, residual, conv-state shift
    dict(PRO=0, EPI=1, DUAL=False, CONV_UPD=False),  # down projection + residual
    dict(PRO=1, EPI=0, DUAL=True, CONV_UPD=False),  # gate|up with SiLU * up
    dict(PRO=1, EPI=2, DUAL=False, CONV_UPD=False),  # LM head with argmax partials
])
def test_gemv_compiles_without_spills(tk, variant):
    dt = "bf16"
    sig = {n: f"*{dt}" for n in ("x_ptr", "w_ptr", "bias_ptr", "nw_ptr", "g_ptr", "res_ptr", "out_ptr", "pv_ptr",
                                   "pi_ptr", "cs_src_ptr", "cs_dst_ptr")}
    sig.update(eps="fp32")
    if variant["EPI"] == 2:
        sig.update(out_ptr="*fp32", pv_ptr="*fp32", pi_ptr="*i64")
    plain = [c for c in tk._B1_CONFIGS if c[1] and not c[3]]
    per_lane = [c for c in tk._B1_CONFIGS if c[1] and c[3]]
    for use_dot, (bn, bk, nw, acc2d), bb, gdc in (
        (False, plain[0], 1, False), (False, plain[-1], 1, False), (False, per_lane[0], 1, True),
        (False, per_lane[-1], 1, False), (True, tk._DOT_CONFIGS[0], 16, False),
    ):
        if variant["EPI"] == 2 and bn < tk.EPI2_MIN_BLOCK_N:
            continue
        const = dict(**variant, HAS_BIAS=True, KC=2, CSB=16, HD=128, BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk,
                     USE_DOT=use_dot, DOT_PREC="tf32", ACC2D=bool(acc2d), GDC=gdc, PREFETCH=gdc)
        k = _compile(tk._gemv_kernel, sig, const, nw)
        spill = _local_bytes(k)
        assert spill in (None, 0), f"{variant} {bn}x{bk} acc2d={acc2d}: {spill} bytes of local memory"
        assert ("griddepcontrol.wait" in k.asm["ptx"]) == gdc  # programmatic dependent launch only when asked


@pytest.mark.parametrize("variant", [
    dict(PRO=1, EPI=0, DUAL=False, BLOCK_K=2048),  # in-projection with the RMSNorm prologue
    dict(PRO=1, EPI=0, DUAL=True, BLOCK_K=2048),  # gate|up with SiLU * up
    dict(PRO=0, EPI=1, DUAL=False, BLOCK_K=8192),  # down projection + residual (K = 8192)
])
def test_gemv_rows_compiles_without_spills(tk, variant):
    sig = {n: "*bf16" for n in ("x_ptr", "w_ptr", "bias_ptr", "nw_ptr", "res_ptr", "out_ptr")} | {"eps": "fp32"}
    k_, dual = variant["BLOCK_K"], variant["DUAL"]
    for bn, _, nw, _ in (c for c in tk._B1_CONFIGS if c[1] == 0 and tk.rows_fit(c[0], c[2], k_, dual)):
        for gdc in (False, True):
            k = _compile(tk._gemv_rows_kernel, sig, dict(**variant, HAS_BIAS=True, BLOCK_N=bn, GDC=gdc), nw)
            spill = _local_bytes(k)
            assert spill in (None, 0), f"{variant} rows {bn} warps {nw}: {spill} bytes of local memory"
            assert ("griddepcontrol.wait" in k.asm["ptx"]) == gdc


def test_other_kernels_compile(tk):
    dt = "bf16"
    for gdc in (False, True):  # the decode-step kernels with and without programmatic dependent launch
        decode = [
            _compile(tk._ssm_step_kernel, {"z_ptr": f"*{dt}", "conv_ptr": f"*{dt}", "cw_ptr": f"*{dt}",
                                           "cb_ptr": f"*{dt}", "dtb_ptr": "*fp32", "na_ptr": "*fp32", "s_ptr": "*fp32",
                                           "y_ptr": f"*{dt}"},
                     dict(N=128, P=128, BLOCK_P=16, KC=2, HAS_CB=True, GDC=gdc)),
            _compile(tk._rope_append_kernel, {"qkv_ptr": f"*{dt}", "pos_ptr": "*i64", "len_ptr": "*i64",
                                              "inv_ptr": "*fp32", "q_ptr": f"*{dt}", "k_ptr": f"*{dt}",
                                              "v_ptr": f"*{dt}", "kvalid_ptr": "*u8"}, dict(D=128, GDC=gdc), 1),
        ]
        bt, nw = tk._ATTN_CONFIGS[0]
        k = _compile(tk._attn_split_kernel, {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}",
                                             "len_ptr": "*i64", "kstart_ptr": "*i32", "po_ptr": "*fp32",
                                             "pm_ptr": "*fp32", "pl_ptr": "*fp32", "scale": "fp32"},
                     dict(D=128, REPP=16, BT=bt, DOT_PREC="tf32", GDC=gdc), nw)
        assert _local_bytes(k) in (None, 0)
        decode += [
            k,
            _compile(tk._attn_reduce_kernel, {"po_ptr": "*fp32", "pm_ptr": "*fp32", "pl_ptr": "*fp32",
                                              "o_ptr": f"*{dt}"}, dict(D=128, BS=128, SB=16, GDC=gdc)),
            _compile(tk._finish_kernel, {"pv_ptr": "*fp32", "pi_ptr": "*i64", "tok_ptr": "*i64", "ids_ptr": "*i64",
                                         "len_ptr": "*i64", "pos_ptr": "*i64"}, dict(BP=1024, GDC=gdc)),
        ]
        assert all(("griddepcontrol.wait" in d.asm["ptx"]) == gdc for d in decode)
    from mmmamba.ops import add_norm  # the fused residual add + RMSNorm (prefill, frozen teacher streams)

    _compile(add_norm._add_rmsnorm_kernel, {n: f"*{dt}" for n in ("x_ptr", "d_ptr", "h_ptr", "w_ptr", "y_ptr")} |
             {"eps": "fp32"}, dict(HAS_DELTA=True, BLOCK=2048))
    for block in (1024, 2048):  # the RMSNorm backward (training) at SmolLM2's and HoVLE's widths
        for xdt in (dt, "fp32"):
            k = _compile(add_norm._rmsnorm_bwd_kernel, {n: f"*{xdt}" for n in ("x_ptr", "w_ptr", "dy_ptr", "dx_ptr")} |
                         {"dw_ptr": "*fp32", "eps": "fp32"}, dict(BLOCK=block, BR=16))
            assert _local_bytes(k) in (None, 0), f"RMSNorm backward {block} {xdt}: spills"
    from mmmamba.ops import conv_silu as cs  # the fused conv + SiLU (training)
    from mmmamba.ops import gated_norm as gn  # the fused gated RMSNorm (prefill and training)

    for kc in (2, 3, 4):
        sig = {n: f"*{dt}" for n in ("x_ptr", "o_ptr", "dy_ptr", "dx_ptr")} | {n: "*fp32" for n in ("w_ptr", "b_ptr",
                                                                                                   "dw_ptr", "db_ptr")}
        _compile(cs._conv_silu_fwd_kernel, sig, dict(KC=kc, HAS_B=True, BT=cs.BT, BC=cs.BC))
        k = _compile(cs._conv_silu_bwd_kernel, sig, dict(KC=kc, HAS_B=True, BT=cs._bwd_bt(kc), BC=cs.BC))
        assert _local_bytes(k) in (None, 0), f"conv+SiLU backward k={kc}: spills"

    _compile(gn._gated_norm_fwd_kernel,
             {n: f"*{dt}" for n in ("x_ptr", "g_ptr", "o_ptr")} | {"w_ptr": "*fp32", "eps": "fp32"}, dict(D=128, BH=16))
    for d, bh in ((64, 32), (128, 16)):  # SmolLM2 and HoVLE heads
        _compile(gn._fwd_mse_kernel, {n: f"*{dt}" for n in ("x_ptr", "g_ptr", "t_ptr")} |
                 {n: "*fp32" for n in ("w_ptr", "rw_ptr", "part_ptr")} | {"eps": "fp32"}, dict(D=d, BH=bh, HAS_RW=True))
        for loss in (False, True):  # from dy, or with the masked MSE's gradient formed in the kernel
            sig = {n: f"*{dt}" for n in ("x_ptr", "g_ptr", "dy_ptr", "dx_ptr", "dg_ptr", "t_ptr")}
            sig |= {n: "*fp32" for n in ("w_ptr", "dw_ptr", "rw_ptr", "coef_ptr")} | {"eps": "fp32"}
            k = _compile(gn._gated_norm_bwd_kernel, sig, dict(D=d, BH=bh, BR=16, LOSS=loss, HAS_RW=loss))
            assert _local_bytes(k) in (None, 0), f"gated-norm backward d={d} loss={loss}: spills"
    from mmmamba.ops import gla_prep  # fla's inputs from the conv output (training)

    for d, h, kv in ((64, 9, 3), (128, 16, 8)):  # SmolLM2 and HoVLE heads
        sig = {n: f"*{dt}" for n in ("xc_ptr", "q_ptr", "k_ptr", "v_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "dxc_ptr")}
        sig |= {"dt_ptr": "*fp32", "ddt_ptr": "*fp32"}
        _compile(gla_prep._gla_prep_fwd_kernel, sig, dict(H=h, KV=kv, D=d, BT=gla_prep.BT))
        k = _compile(gla_prep._gla_prep_bwd_kernel, sig, dict(H=h, KV=kv, D=d, BT=gla_prep.BT))
        assert _local_bytes(k) in (None, 0), f"SSD input preparation backward d={d}: spills"
    from mmmamba.ops import swiglu  # the gated MLP's SiLU product (training, frozen teacher streams)

    for xdt in (dt, "fp32"):
        _compile(swiglu._silu_mul_kernel, {n: f"*{xdt}" for n in ("g_ptr", "u_ptr", "y_ptr")},
                 dict(BLOCK=swiglu.BLOCK), 8)
        _compile(swiglu._silu_mul_bwd_kernel, {n: f"*{xdt}" for n in ("g_ptr", "u_ptr", "dy_ptr", "dg_ptr", "du_ptr")},
                 dict(BLOCK=swiglu.BLOCK), 8)
    from mmmamba.ops import rope  # fused RoPE (prefill, frozen teacher streams)

    for d2, bh in ((32, 16), (64, 16)):
        _compile(rope._rope_kernel, {n: f"*{dt}" for n in ("x_ptr", "c_ptr", "s_ptr", "o_ptr")}, dict(D2=d2, BH=bh))
    from mmmamba.ops import conv_silu  # the engine's prefill conv + SiLU

    for split in (False, True):  # plain output, or straight into the SSD's (q, k, dt * v) layout
        k = _compile(conv_silu._conv_silu_prefill_kernel,
                     {n: f"*{dt}" for n in ("z_ptr", "st_ptr", "w_ptr", "b_ptr", "m_ptr", "o_ptr", "q_ptr", "k_ptr",
                                            "v_ptr")} | {"dt_ptr": "*fp32"},
                     dict(KC=4, HAS_STATE=True, HAS_MASK=True, HAS_BIAS=True, BT=16, BC=128, SPLIT=split, D=128,
                          REP=2))
        assert _local_bytes(k) in (None, 0), f"conv + SiLU prefill split={split}: spills"
