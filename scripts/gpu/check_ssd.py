"""GPU check: fla-core SSD path vs the chunked torch reference, forward and backward, bf16.

Run on a CUDA machine with fla-core installed:
    python scripts/gpu/check_ssd.py [--lengths 4096 65536] [--modes native,bk32,bk128,torch] [--shapes 16x128,9x64]
Prints one row per (shape, length, backward mode): relative errors of y, final state and the input gradients, and
forward / forward+backward timings. Modes: ops/ssd_fla.py (native = fla's own backward, where fla allows it).
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from mmmamba.ops.ssd import fla_available, fla_backward_ok, ssd_fla
from mmmamba.ops.ssd_ref import ssd_chunked


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(L, h=16, p=128, n=128, dtype=torch.bfloat16, seed=0, b=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(b, L, h, p, device="cuda", generator=g).to(dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, L, h, device="cuda", generator=g) - 4).float()
    A = -torch.exp(torch.rand(h, device="cuda", generator=g))
    B = (torch.randn(b, L, h, n, device="cuda", generator=g) / n**0.5).to(dtype)
    C = (torch.randn(b, L, h, n, device="cuda", generator=g) / n**0.5).to(dtype)
    S0 = torch.randn(b, h, n, p, device="cuda", generator=g) * 0.1
    return x, dt, A, B, C, S0


def run(fn, x, dt, A, B, C, S0, gy, gS):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, dt, B, C)]
    y, S = fn(leaves[0], leaves[1], A, leaves[2], leaves[3], initial_state=S0)
    ((y.float() * gy).sum() + (S.float() * gS).sum()).backward()
    return y.detach(), S.detach(), [t.grad for t in leaves]


def timeit(f, reps=10):
    for _ in range(2):
        f()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        f()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


def check(L: int, h: int, d: int, modes: list[str], b: int = 1) -> list[dict]:
    x, dt, A, B, C, S0 = inputs(L, h=h, p=d, n=d, b=b)
    gy = torch.randn(x.shape, device="cuda")
    gS = torch.randn(S0.shape, device="cuda")

    def reference(*a, **k):  # the chunked torch algorithm in fp32 on the same (bf16-rounded) inputs
        return ssd_chunked(*a, **k, chunk_size=64)

    ref = run(reference, x.float(), dt, A, B.float(), C.float(), S0, gy, gS)
    rows = []
    for mode in modes:
        forced = functools.partial(ssd_fla, backward=mode)
        try:
            fla = run(forced, x, dt, A, B, C, S0, gy, gS)
        except Exception as e:  # e.g. fla's own refusal of its native backward on this Triton
            rows.append({"L": L, "b": b, "h": h, "d": d, "mode": mode, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        row = {"L": L, "b": b, "h": h, "d": d, "mode": mode, "y": rel(fla[0], ref[0]), "state": rel(fla[1], ref[1])}
        for name, a, r in zip(["dx", "ddt", "dB", "dC"], fla[2], ref[2]):
            row[name] = rel(a, r)
        row["fwd_ms"] = timeit(lambda: ssd_fla(x, dt, A, B, C, initial_state=S0))
        row["fwd_bwd_ms"] = timeit(lambda f=forced: run(f, x, dt, A, B, C, S0, gy, gS), reps=5)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 65536])
    ap.add_argument("--modes", default="native,bk32,bk128,torch")
    ap.add_argument("--shapes", default="16x128,9x64", help="heads x head dim (HoVLE 16x128, SmolLM2 9x64)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    assert fla_available(), "fla-core not importable on CUDA"
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"fla native backward allowed: {fla_backward_ok()}")
    rows = []
    for shape in args.shapes.split(","):
        h, d = (int(v) for v in shape.split("x"))
        for L in args.lengths:
            rows += check(L, h, d, args.modes.split(","), b=args.batch)
            torch.cuda.empty_cache()
    keys = ("y", "state", "dx", "ddt", "dB", "dC")
    print("| b | L | heads x d | backward | y | state | dx | ddt | dB | dC | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['b']} | {r['L']} | {r['h']}x{r['d']} | {r['mode']} | {r['error']} |")
            continue
        errs = " | ".join(f"{r[k]:.2e}" for k in keys)
        print(f"| {r['b']} | {r['L']} | {r['h']}x{r['d']} | {r['mode']} | {errs} | {r['fwd_ms']:.2f} | "
              f"{r['fwd_bwd_ms']:.2f} |")
    ok = all(max(r[k] for k in keys) <= 1e-2 for r in rows if "error" not in r)
    print("PASS" if ok else "FAIL", "(all relative errors <= 1e-2 where the mode ran)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
