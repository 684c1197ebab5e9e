"""Replay a micro-batch's forward + backward from a CUDA graph: the recipe option `cuda_graph`.

A distillation step of a small model is bound by the host, not the GPU: on an H200, SmolLM2-135M's stage-1 step
(16 x 2048 tokens, ~3,000 kernels) took 142 ms to issue and 94 ms of GPU time. A captured graph issues all those
kernels in one call.

What a graph needs, and how it is met here:
- fixed shapes: one graph per batch signature (names, shapes, dtypes), at most `max_graphs`; others run eagerly;
- no host syncs inside: batches with an `attention_mask` run eagerly (padding checks read the mask on the host);
  the trainer drops all-ones masks on the host before a batch reaches the GPU, and stage 3 selects its KL
  positions by weights instead of boolean indexing (`EndToEndDistill(gather_rows=False)`);
- static gradient tensors: the backward accumulates into `.grad` tensors that exist before the capture and keep
  their storage, so the caller zeroes them in place (`zero_grad(set_to_none=False)`) and never replaces them;
- memory: the graphs share one pool, so activations take the memory of one step, not one per graph; that is
  safe because a replay's outputs (loss, metrics) are consumed before any other replay;
- warm-up: the first `warmup` occurrences of a signature run eagerly on a side stream (fla's autotuning, the
  one-off kernel checks, cuBLAS workspaces), as torch.cuda.graphs asks; they are real steps, counted once.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import torch


def batch_signature(batch: dict) -> tuple:
    """The names, shapes and dtypes of a batch's tensors: one graph serves one signature."""
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()) if torch.is_tensor(v))


class GraphedSteps:
    """fn(batch) -> (loss, metrics) runs forward and backward of one micro-batch; calls replay it from a graph.
    fn returns detached tensors: a loss still holding its autograd graph would keep the last eager step's
    gradient-accumulation nodes (and their stream) alive into the capture.

    The returned loss and metrics of a replay are the graph's static tensors: read (or copy) them before the next
    call. `log` gets one line when a graph is captured, and when a batch cannot be graphed (first time only)."""

    def __init__(self, fn: Callable[[dict], tuple], params: list[torch.Tensor], *, warmup: int = 2,
                 max_graphs: int = 3, log: Callable[[str], None] = print):
        self.fn, self.params, self.warmup, self.max_graphs, self.log = fn, params, warmup, max_graphs, log
        self.graphs: dict[tuple, tuple] = {}
        self.seen: dict[tuple, int] = {}
        self.failed = False
        self._told: set[str] = set()
        self._side = torch.cuda.Stream()
        self._ptrs: list[int] = []
        self._pool = None  # one memory pool for all graphs: each replay's outputs are read before the next

    def _tell(self, why: str, msg: str) -> None:
        if why not in self._told:
            self._told.add(why)
            self.log(msg)

    def __call__(self, batch: dict):
        if self.failed:
            return self.fn(batch)
        if batch.get("attention_mask") is not None:
            self._tell("mask", "cuda_graph: batches with padding (an attention_mask) run eagerly")
            return self._eager(batch)
        key = batch_signature(batch)
        entry = self.graphs.get(key)
        if entry is None:
            n = self.seen[key] = self.seen.get(key, 0) + 1
            if n <= self.warmup:
                return self._eager_side(batch)
            if len(self.graphs) >= self.max_graphs:
                self._tell("many", f"cuda_graph: more than {self.max_graphs} batch shapes; new shapes run eagerly")
                return self._eager(batch)
            entry = self._capture(key, batch)
            if entry is None:
                return self.fn(batch)
        static, graph, out = entry
        for k, v in static.items():
            v.copy_(batch[k], non_blocking=True)
        graph.replay()
        return out

    def _eager(self, batch: dict):
        """An eager micro-step between replays: it must add into the graphs' gradient tensors, not replace them."""
        out = self.fn(batch)
        if self.graphs and [p.grad.data_ptr() for p in self.params] != self._ptrs:
            raise RuntimeError("cuda_graph: an eager step replaced the gradient tensors the graphs write into; "
                               "set cuda_graph: false for this data (mixed padded and unpadded batches)")
        return out

    def _eager_side(self, batch: dict):
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            out = self.fn(batch)
        torch.cuda.current_stream().wait_stream(self._side)
        return out

    def _capture(self, key: tuple, batch: dict):
        for p in self.params:  # the graph adds into these tensors; they must exist first and keep their storage
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ptrs = [p.grad.data_ptr() for p in self.params]
        static = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.fn({**batch, **static})
        except Exception as e:  # an op that syncs with the host, or a library that does not allow capture
            self.failed = True
            torch.cuda.synchronize()
            where = traceback.extract_tb(e.__traceback__)[-1]
            self.log(f"cuda_graph: capture failed ({type(e).__name__}: {str(e).splitlines()[0]} at "
                     f"{where.filename}:{where.lineno}); running eagerly")
            return None
        if [p.grad.data_ptr() for p in self.params] != ptrs:
            # the backward replaced a .grad instead of adding into it: replays would not accumulate
            self.failed = True
            self.log("cuda_graph: the captured backward did not accumulate in place; running eagerly")
            return None
        self._ptrs, self._pool = ptrs, self._pool or graph.pool()
        self.graphs[key] = entry = (static, graph, out)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in static.items())
        self.log(f"cuda_graph: captured forward + backward for {shapes}")
        return entry
