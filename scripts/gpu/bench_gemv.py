"""Bandwidth of the decode step's matrix-vector kernel (`inference.triton_kernels.gemv`, one row) for every block
configuration the tuner may pick (the tiled kernel and the persistent whole-row one), at HoVLE-2.6B shapes, next
to cuBLAS (`F.linear`) and the copy bandwidth.

    PYTHONPATH=src python scripts/gpu/bench_gemv.py [--json F]

Each time is the tuner's own measurement (`triton_kernels._kernel_ms`: a CUDA graph of L2 clear + launch against
one of L2 clears alone, so neither L2-warm weights nor host launch cost enter; as in the graph-replayed decode
step). GB/s counts the weight bytes only (x, bias and outputs are tiny).
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from mmmamba.bench.measure import copy_bandwidth
from mmmamba.inference import triton_kernels as tk

H, I, V, HEADS, KV, D = 2048, 8192, 92553, 16, 8, 128
SHAPES = {  # name: (rows, K, gemv kwargs builder), the largest share of a decode step first
    "gate|up (dual, SiLU*up)": (I, H, "dual"),
    "down (residual)": (H, I, "res"),
    "in_proj (mamba2, RMSNorm prologue)": (2 * KV * D + HEADS * D + HEADS * D + HEADS, H, "pro1"),
    "o_proj (gated-norm prologue, residual)": (H, HEADS * D, "pro2"),
    "lm_head (argmax partials)": (V, H, "argmax"),
}


def run_gemv(kind, x, w, out, aux, o):
    if kind == "pro1":
        return tk.gemv(x, w, out, pro=1, nw=aux["nw"], eps=1e-5, opts=o)
    if kind == "pro2":
        return tk.gemv(x, w, out, pro=2, nw=aux["gw"], eps=1e-5, g=aux["g"], hd=D, res=out, epi=1, opts=o)
    if kind == "dual":
        return tk.gemv(x, w, out, pro=1, nw=aux["nw"], eps=1e-5, dual=True, opts=o)
    if kind == "res":
        return tk.gemv(x, w, out, res=out, epi=1, opts=o)
    return tk.gemv(x, w, out, epi=2, parts=aux["parts"], opts=o)


def allowed(kind, cfg, k) -> bool:
    bn, bk = cfg[0], cfg[1]
    if bk == 0:  # the persistent whole-row kernel: plain, residual and RMSNorm-prologue gemvs that fit registers
        return kind in ("pro1", "dual", "res") and tk.rows_fit(bn, cfg[2], k, kind == "dual")
    return not ((kind == "pro2" and bk % D) or (kind == "argmax" and bn < tk.EPI2_MIN_BLOCK_N))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    bw = copy_bandwidth(dev)
    res = {"device": torch.cuda.get_device_name(), "copy_GBs": bw / 1e9, "shapes": {}}
    print(f"{res['device']}  copy bandwidth {bw / 1e9:,.0f} GB/s")
    for name, (n, k, kind) in SHAPES.items():
        rows = 2 * n if kind == "dual" else n
        w = torch.randn(rows, k, device=dev, dtype=dt) * 0.02
        x = torch.randn(1, k, device=dev, dtype=dt)
        out = torch.zeros(1, n, device=dev, dtype=torch.float32 if kind == "argmax" else dt)
        aux = {"nw": torch.rand(k, device=dev, dtype=dt) + 0.5, "gw": torch.rand(D, device=dev, dtype=dt) + 0.5,
               "g": torch.randn(1, k, device=dev, dtype=dt),
               "parts": (torch.empty(1, tk.max_parts(n), device=dev), torch.empty(1, tk.max_parts(n), device=dev,
                                                                                  dtype=torch.long))}
        nbytes = w.numel() * w.element_size()
        rows_out = []
        for cfg in tk._B1_CONFIGS:
            if not allowed(kind, cfg, k):
                continue
            call = functools.partial(run_gemv, kind, x, w, out, aux, tk.DecodeOptions(gemv_config=tuple(cfg)))
            try:
                call()
                ms = tk._kernel_ms(call)
            except Exception as e:  # resources of this config on this device
                rows_out.append({"cfg": cfg, "error": f"{type(e).__name__}"})
                continue
            rows_out.append({"cfg": cfg, "us": ms * 1e3, "GBs": nbytes / ms / 1e6})
        mm = functools.partial(torch.matmul, x, w.T, out=torch.empty(1, rows, device=dev, dtype=dt))
        mm()  # cuBLAS' handle and workspace outside the capture
        cub = tk._kernel_ms(mm)
        ok = [r for r in rows_out if "us" in r]
        best = min(ok, key=lambda r: r["us"])
        floor_us = nbytes / bw * 1e6
        print(f"\n{name}: {rows} x {k} ({nbytes / 1e6:.1f} MB), floor {floor_us:.1f} us, "
              f"cuBLAS {cub * 1e3:.1f} us ({nbytes / cub / 1e6:,.0f} GB/s)")
        for r in sorted(ok, key=lambda r: r["us"]):
            mark = " <- best" if r is best else ""
            print(f"  {str(r['cfg']):>20} {r['us']:8.1f} us {r['GBs']:8,.0f} GB/s "
                  f"{100 * r['GBs'] * 1e9 / bw:5.1f} % of copy{mark}")
        res["shapes"][name] = {"rows": rows, "K": k, "bytes": nbytes, "floor_us": floor_us,
                               "cublas_us": cub * 1e3, "configs": rows_out}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
