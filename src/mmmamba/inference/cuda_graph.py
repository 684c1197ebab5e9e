"""Capture a zero-argument step function (static input/output buffers) in a CUDA graph."""

from __future__ import annotations

from collections.abc import Callable

import torch


class CapturedStep:
    """`fn` must read and write only tensors whose addresses stay fixed (static buffers). `before_warmup` /
    `after_warmup` let the caller save and restore the state that the warm-up calls mutate (a warm-up call runs
    the step for real: Triton compiles and tunes, cuBLAS picks its kernels, the allocator settles)."""

    def __init__(self, fn: Callable[[], None], warmup: int = 2, pool=None,
                 before_warmup: Callable[[], object] | None = None,
                 after_warmup: Callable[[object], None] | None = None):
        self.fn = fn
        snap = before_warmup() if before_warmup is not None else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        if after_warmup is not None:
            after_warmup(snap)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            fn()
        torch.cuda.synchronize()

    def replay(self) -> None:
        self.graph.replay()

    def pool(self):
        return self.graph.pool()

    def reset(self) -> None:
        self.graph.reset()
