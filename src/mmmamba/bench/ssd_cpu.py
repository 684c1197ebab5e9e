"""CPU timing of the chunked SSD op: linear in L (time ratio 16K / 2K close to 8, not 64).

    python -m mmmamba.bench.ssd_cpu [--lengths 2048 16384] [--heads 4] [--dim 64] [--chunk 64] [--repeats 7]
                                    [--threads 1]

Prints the best-of-`repeats` wall time of `ssd_chunked` (fp32, b = 1, h heads, p = n = dim) at each length,
the ratio of the longest to the shortest, and the naive sequential reference at the shortest length.
One intra-op thread by default: on a busy machine OpenMP's thread hand-offs (~10 ms each when a core is taken)
swamp the short runs; pass --threads 0 for torch's default.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from ..ops.ssd_ref import ssd_chunked, ssd_naive


def make_inputs(length: int, heads: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, length, heads, dim, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(1, length, heads, generator=g) - 2)
    A = -torch.exp(torch.randn(heads, generator=g) * 0.5)
    B = torch.randn(1, length, heads, dim, generator=g) / dim**0.5
    C = torch.randn(1, length, heads, dim, generator=g) / dim**0.5
    return x, dt, A, B, C


@torch.no_grad()
def time_interleaved(fns: dict, repeats: int) -> dict:
    """Best-of-`repeats` seconds per entry; rounds alternate between entries so that load drift on a shared
    machine hits every length alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mmmamba.bench.ssd_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="head dim p = state size n")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--naive-repeats", type=int, default=1)
    p.add_argument("--no-naive", action="store_true")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    print(f"SSD on CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or '?'}; "
          f"fp32, b=1, h={args.heads}, p=n={args.dim}, chunk={args.chunk}, best of {args.repeats}")
    inputs = {length: make_inputs(length, args.heads, args.dim) for length in args.lengths}
    chunked = time_interleaved(
        {n: (lambda inp=inp: ssd_chunked(*inp, chunk_size=args.chunk)) for n, inp in inputs.items()}, args.repeats
    )
    for length in args.lengths:
        t = chunked[length]
        print(f"  ssd_chunked L={length:>6}: {t * 1e3:9.1f} ms  ({t / length * 1e6:.2f} us/token)")
    lo, hi = min(args.lengths), max(args.lengths)
    result = {"chunked_s": chunked}
    if hi > lo:
        ratio = chunked[hi] / chunked[lo]
        result["ratio"] = ratio
        print(f"  ratio L={hi} / L={lo}: {ratio:.2f}  (linear: {hi / lo:.0f}, quadratic: {(hi / lo) ** 2:.0f})")
    if not args.no_naive:
        naive = time_interleaved({lo: lambda: ssd_naive(*inputs[lo])}, args.naive_repeats)[lo]
        result["naive_s"] = naive
        print(f"  ssd_naive   L={lo:>6}: {naive * 1e3:9.1f} ms  (chunked is {naive / chunked[lo]:.1f}x faster)")
    return result


if __name__ == "__main__":
    main()
