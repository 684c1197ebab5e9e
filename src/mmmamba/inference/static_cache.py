"""Static (pre-allocated) cache for the fast inference path.

Every buffer is allocated once, so a decode step touches fixed addresses and can be captured in a CUDA graph:

* attention layer i: ``k[i]``, ``v[i]`` of shape (b, kv, max_len, d) in the model dtype; slot t holds the t-th
  token of every row (rows are left-padded, so slots line up across the batch);
* Mamba-2 layer i: ``conv[i]`` (b, conv_dim, d_conv - 1) in the model dtype and ``ssm[i]`` (b, h, n, p) in fp32
  (the reference path's dtypes);
* ``key_valid`` (b, max_len) bool: slot holds a real (non-padding) token;
* ``length``: device scalar, number of filled slots (the slot the next token is written to);
* ``pos``: device (b,), each row's next RoPE position (= real tokens seen so far);
* ``host_length``: the same count mirrored on the host (the engine keeps it; no device sync needed).
"""

from __future__ import annotations

import torch

from ..models.config import ATTENTION


class StaticCache:
    def __init__(self, config, batch: int, max_len: int, device, dtype: torch.dtype,
                 ssm_dtype: torch.dtype = torch.float32):
        self.config, self.batch, self.max_len = config, batch, max_len
        self.device, self.dtype = torch.device(device), dtype
        kv, d, h = config.num_key_value_heads, config.head_dim, config.num_attention_heads
        conv_dim = config.mamba_conv_dim
        kc = config.mamba_d_conv
        n = len(config.layer_types)
        self.k: list[torch.Tensor | None] = [None] * n
        self.v: list[torch.Tensor | None] = [None] * n
        self.conv: list[torch.Tensor | None] = [None] * n
        self.ssm: list[torch.Tensor | None] = [None] * n
        for i, t in enumerate(config.layer_types):
            if t == ATTENTION:
                self.k[i] = torch.zeros(batch, kv, max_len, d, device=device, dtype=dtype)
                self.v[i] = torch.zeros(batch, kv, max_len, d, device=device, dtype=dtype)
            else:
                self.conv[i] = torch.zeros(batch, conv_dim, kc - 1, device=device, dtype=dtype)
                self.ssm[i] = torch.zeros(batch, h, d, d, device=device, dtype=ssm_dtype)
        self.has_attention = any(t == ATTENTION for t in config.layer_types)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.key_start = torch.zeros(batch, dtype=torch.int32, device=device)  # first real slot of each row
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.host_length = 0

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def reset(self, kv: bool = False) -> None:
        """Forget every sequence in place (nothing is reallocated). Key/value slots are only marked invalid: a slot
        is read only after it was written again (`kv=True` also zeroes them)."""
        for t in (*self.conv, *self.ssm, *((*self.k, *self.v) if kv else ())):
            if t is not None:
                t.zero_()
        self.key_valid.zero_()
        self.key_start.zero_()
        self.length.zero_()
        self.pos.zero_()
        self.host_length = 0

    def attention_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.k) if k is not None]

    def mamba_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.ssm) if s is not None]

    def nbytes(self) -> int:
        """Bytes allocated by the cache."""
        return sum(t.nbytes for t in (*self.k, *self.v, *self.conv, *self.ssm) if t is not None)

    def read_bytes(self, context: int | None = None) -> int:
        """Bytes one decode step must read at `context` filled slots: KV up to the context, all SSM/conv state."""
        ctx = self.host_length if context is None else context
        out = 0
        for k in self.k:
            if k is not None:
                b, kv, _, d = k.shape
                out += 2 * b * kv * ctx * d * k.element_size()
        for c, s in zip(self.conv, self.ssm):
            if s is not None:
                out += c.nbytes + s.nbytes
        return out

    def snapshot_state(self) -> dict:
        """Copies of everything a decode step mutates except KV slots beyond `host_length` (which a later step
        overwrites before reading). Used to undo warm-up steps before a CUDA graph capture. The recurrent states go
        to host memory: a device copy would double a linear model's largest state, and with it its peak memory
        at large batch (it is taken once per warm-up or capture, so the transfer does not matter)."""
        def host(t):
            return None if t is None else t.to("cpu", copy=True)

        return {
            "conv": [host(c) for c in self.conv],
            "ssm": [host(s) for s in self.ssm],
            "length": self.length.clone(), "pos": self.pos.clone(), "host_length": self.host_length,
        }

    def restore_state(self, snap: dict) -> None:
        for dst, src in zip(self.conv, snap["conv"]):
            if dst is not None:
                dst.copy_(src)
        for dst, src in zip(self.ssm, snap["ssm"]):
            if dst is not None:
                dst.copy_(src)
        self.length.copy_(snap["length"])
        self.pos.copy_(snap["pos"])
        self.host_length = snap["host_length"]
        self.key_valid[:, self.host_length:] = False

    @torch.no_grad()
    def fill_random(self, context: int, generator: torch.Generator | None = None, scale: float = 1.0) -> None:
        """Benchmark helper: pretend `context` tokens were prefilled, with random KV / state values of the right
        shape (no prefill needed to measure decode latency at a long context). Not a valid model state."""
        if context > self.max_len:
            raise ValueError(f"context {context} exceeds the cache's max_len {self.max_len}")
        self.reset()
        for k, v in zip(self.k, self.v):
            if k is not None:
                k[:, :, :context].normal_(0.0, scale, generator=generator)
                v[:, :, :context].normal_(0.0, scale, generator=generator)
        for c, s in zip(self.conv, self.ssm):
            if s is not None:
                c.normal_(0.0, scale, generator=generator)
                s.normal_(0.0, 0.02 * scale, generator=generator)
        self.key_valid[:, :context] = True
        self.length.fill_(context)
        self.pos.fill_(context)
        self.host_length = context
