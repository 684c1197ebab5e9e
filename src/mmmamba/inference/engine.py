"""Fast inference for `MMMambaForCausalLM`: chunked prefill, a static cache, a lean decode step (CUDA-graph
captured on GPU), greedy / sampling on the device, streaming.

Same tokens as `mmmamba.models.generate` (the reference path): the engine only reorganises the computation.

* **Fused weights.** At build time the projections that read the same input are concatenated into one matrix:
  attention q|k|v, Mamba-2 v|k|q|g|dt, MLP gate|up. By default the engine owns these copies and leaves the
  caller's model as it was (same parameter objects, own storage: it trains and saves as before), at the cost of a
  second copy of those weights. `share_weights=True` stores them once: the modules' weights become views into the
  fused buffers (same Parameter objects and values) until `close()`, or the end of `with Engine(...) as engine:`,
  gives each its own storage again. Use it where the engine owns the model (the CLI, the benchmark).
* **Knobs** of the decode kernels are `options` (`triton_kernels.DecodeOptions`); when none are given the
  constructor reads their environment overrides (MMMAMBA_PDL, MMMAMBA_TRITON_TUNE, ...) once, here.
* **Prefill** runs token chunks of `prefill_chunk` through all layers, carrying the conv / SSM states and
  appending keys / values to the static cache, so a linear model's peak memory does not grow with the context.
  Mamba-2 layers use the chunked SSD (`mmmamba.ops.ssd`: fla-core on CUDA), attention layers SDPA (lower-right
  causal for later chunks).
* **Decode step** (one token per row): `kernels="triton"` runs ~5 kernels per layer (fused norm + projection
  matrix-vector products, one conv + SSM update kernel, split-K flash decoding for attention), see
  `triton_kernels.py`; `kernels="torch"` is the same step in plain PyTorch ops (CPU, or GPUs without Triton).
  On CUDA the step is captured once in a CUDA graph and replayed.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.rope import rope_inv_freq
from ..models.config import ATTENTION
from ..models.generate import decode_loop, resolve_options, sample_next
from ..ops import kernel_report
from ..ops.add_norm import add_rmsnorm, rmsnorm_ref
from ..ops.checked import cuda_index
from ..ops.conv_silu import fused_prefill, split_ok
from ..ops.gated_norm import fused_forward, gated_rmsnorm_ref
from ..ops.rope import apply_rope, apply_rope_ref
from ..ops.ssd import resolve_backend, ssd_gla
from ..ops.swiglu import fused_forward_packed
from . import triton_kernels as tk
from .cuda_graph import CapturedStep
from .static_cache import StaticCache
from .triton_kernels import DecodeOptions


# ---------------------------------------------------------------------------------------------------------------
# weight fusion (shared storage)
def _fuse_linears(linears: list[nn.Linear], share: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases) of `linears` concatenated along the output dim into one buffer: a new one, or, with
    `share`, one whose slices then back each module's weight (`.data` swapped: the same Parameter objects). Weights
    that already lie end to end in one storage (a sharing engine built them) are viewed, not copied."""
    ws = [lin.weight for lin in linears]
    K = ws[0].shape[1]
    sizes = [w.shape[0] for w in ws]
    es = ws[0].element_size()
    chained = all(w.is_contiguous() and w.shape[1] == K and w.dtype == ws[0].dtype for w in ws) and all(
        ws[i].untyped_storage().data_ptr() == ws[0].untyped_storage().data_ptr()
        and ws[i].data_ptr() == ws[i - 1].data_ptr() + ws[i - 1].numel() * es
        for i in range(1, len(ws))
    )
    if chained:
        W = torch.empty(0, dtype=ws[0].dtype, device=ws[0].device)
        W.set_(ws[0].untyped_storage(), ws[0].storage_offset(), (sum(sizes), K), (K, 1))
    else:
        with torch.no_grad():
            W = torch.cat([w.detach() for w in ws], dim=0)
        off = 0
        for lin, n in zip(linears, sizes):
            if share:
                lin.weight.data = W[off:off + n]
            off += n
    bias = None
    if any(lin.bias is not None for lin in linears):
        with torch.no_grad():
            bias = torch.cat([lin.bias.detach() if lin.bias is not None else W.new_zeros(n)
                              for lin, n in zip(linears, sizes)])
    return W, bias


def _unfuse_linears(linears: list[nn.Linear]) -> None:
    """Each module's weight in its own storage again (same Parameter objects and values)."""
    for lin in linears:
        lin.weight.data = lin.weight.data.clone()


@dataclass
class LayerPlan:
    """What the fast path needs of one decoder layer (views of the model's parameters)."""

    idx: int
    attention: bool
    layer: nn.Module
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps1: float
    eps2: float
    w_in: torch.Tensor  # attention: q|k|v ; mamba: v|k|q|g|dt
    b_in: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    w_gu: torch.Tensor  # gate|up
    b_gu: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    # attention
    inv_freq: torch.Tensor | None = None
    # mamba
    conv_w: torch.Tensor | None = None  # (C, k) contiguous
    conv_b: torch.Tensor | None = None
    dt_bias: torch.Tensor | None = None  # fp32
    neg_A: torch.Tensor | None = None  # fp32, -exp(A_log)
    gnorm_w: torch.Tensor | None = None
    gnorm_eps: float = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# reference-semantics helpers (identical rounding to the modules of mmmamba.layers)
def _chunk_attention(q, k, v, past: int, key_valid: torch.Tensor | None, sdpa: dict) -> torch.Tensor:
    """q (b, h, l, d) for positions past..past+l-1; k, v (b, kv, past+l, d). Causal; `key_valid` (b, past+l)
    marks real keys (None: all real). A padded query still sees itself (no NaN), as in the reference. `sdpa`: the
    engine's record of what this torch's SDPA accepts (`gqa_lower_right`: flash with unequal head counts and a
    lower-right causal mask; learnt from the first refusal)."""
    l, t = q.shape[2], k.shape[2]
    if key_valid is None:
        if past == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=l > 1, enable_gqa=True)
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(l, t)
            if sdpa.get("gqa_lower_right", True):
                try:
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
                except RuntimeError:  # this torch's flash path refuses unequal head counts: expand K/V
                    sdpa["gqa_lower_right"] = False
            rep = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                  attn_mask=bias)
    qpos = torch.arange(past, t, device=q.device)[:, None]
    kpos = torch.arange(t, device=q.device)[None, :]
    allowed = (kpos <= qpos)[None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    allowed = (allowed | (kpos == qpos)[None])[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


def _rel_max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float(), ref.float()
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-6))


def _rope_inv_freq_fp32(rot, device) -> torch.Tensor:
    """fp32 inverse frequencies (model.to(bf16) also casts the buffer; positions need fp32, as in RotaryEmbedding)."""
    inv = rot.inv_freq
    if inv.dtype != torch.float32 and hasattr(rot, "theta"):
        inv = rope_inv_freq(rot.head_dim, rot.theta, rot.scaling)
    return inv.float().to(device).contiguous()


def resolve_kernels(kernels: str, device: torch.device) -> str:
    if kernels not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels={kernels!r}: choose 'auto', 'triton' or 'torch'")
    if kernels == "auto":
        if device.type != "cuda":
            return "torch"
        return "triton" if tk.available() else "torch"
    return kernels


# ---------------------------------------------------------------------------------------------------------------
class Engine:
    """Fast inference for one `MMMambaForCausalLM` (eval mode, any mix of attention and Mamba-2 layers).

    engine = Engine(model)                       # kernels / CUDA graph chosen from the device
    out = engine.generate(ids, max_new_tokens=64)   # same arguments and output as mmmamba.models.generate
    for tok in engine.stream(ids): ...          # one (b,) tensor per step

    with Engine(model, share_weights=True) as engine:   # no second copy of the projections; restored on exit
        ...

    The caller's model is only read (every pass runs without autograd; its train / eval mode is left as it is).
    """

    def __init__(self, model, kernels: str = "auto", cuda_graph: bool | None = None, prefill_chunk: int = 8192,
                 max_len_multiple: int = 256, share_weights: bool = False, options: DecodeOptions | None = None):
        self.model = model
        self.share_weights = bool(share_weights)
        self.options = DecodeOptions.from_env() if options is None else options
        self._sdpa: dict = {}
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.kernels = resolve_kernels(kernels, self.device)
        self.use_graph = (self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.use_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs a CUDA model")
        self.prefill_chunk = int(prefill_chunk)
        self.max_len_multiple = max_len_multiple
        self.fallback_reason: str | None = None
        if self.config.hidden_act not in ("silu", "swish") and self.kernels == "triton":
            self._fall_back(f"hidden_act {self.config.hidden_act!r} has no Triton epilogue")
        self.fast_paths: dict | None = None  # the fused prefill kernels that passed their check (`_fused`)
        if self.kernels == "triton":
            self._fused("gated RMSNorm")
        self._build_plans()
        self.cache: StaticCache | None = None
        self._graph = None
        self._warm = False
        self.steps_run = 0

    # -- build ----------------------------------------------------------------------------------------------
    def _build_plans(self) -> None:
        m = self.model.model
        cfg = self.config
        self.embed = m.embed_tokens.weight
        self.final_norm, self.final_eps = m.norm.weight, m.norm.eps
        self.lm_head = self.model.lm_head.weight
        self.plans: list[LayerPlan] = []
        self._fused_groups: list[list[nn.Linear]] = []
        for i, layer in enumerate(m.layers):
            mix, mlp = layer.mixer, layer.mlp
            group_mlp = [mlp.gate_proj, mlp.up_proj]
            w_gu, b_gu = _fuse_linears(group_mlp, self.share_weights)
            common = dict(
                idx=i, layer=layer, ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                eps1=layer.input_layernorm.eps, eps2=layer.post_attention_layernorm.eps,
                w_o=mix.o_proj.weight, b_o=mix.o_proj.bias, w_gu=w_gu, b_gu=b_gu,
                w_down=mlp.down_proj.weight, b_down=mlp.down_proj.bias,
            )
            if cfg.layer_types[i] == ATTENTION:
                group = [mix.q_proj, mix.k_proj, mix.v_proj]
                w_in, b_in = _fuse_linears(group, self.share_weights)
                inv = _rope_inv_freq_fp32(m.rotary[layer.rope_index], self.device)
                plan = LayerPlan(attention=True, w_in=w_in, b_in=b_in, inv_freq=inv, **common)
            else:
                group = list(mix.in_projections)
                w_in, b_in = _fuse_linears(group, self.share_weights)
                plan = LayerPlan(
                    attention=False, w_in=w_in, b_in=b_in, **common,
                    conv_w=mix.conv1d.weight[:, 0].detach().contiguous(),
                    conv_b=None if mix.conv1d.bias is None else mix.conv1d.bias.detach(),
                    dt_bias=mix.dt_bias.detach().float().contiguous(),
                    neg_A=(-torch.exp(mix.A_log.detach().float())).contiguous(),
                    gnorm_w=mix.g_norm.weight.detach(), gnorm_eps=mix.g_norm.eps,
                )
            if self.share_weights:
                self._fused_groups += [group, group_mlp]
            self.plans.append(plan)

    def unfuse(self) -> None:
        """With `share_weights`: give every projection of the model its own storage again (the engine then needs
        `refresh()` before it runs again). Nothing to do for an engine that owns its copies."""
        for g in self._fused_groups:
            _unfuse_linears(g)
        self._fused_groups = []
        self.plans = []
        self._graph = None

    def close(self) -> None:
        """Free the cache and the CUDA graph and hand the model's weights back (`unfuse`)."""
        self.release()
        self.unfuse()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def refresh(self) -> None:
        """Re-read the model's parameters (after they changed)."""
        self._build_plans()
        self._graph = None
        self._warm = False

    # -- buffers --------------------------------------------------------------------------------------------
    def reserve(self, batch: int, max_len: int) -> StaticCache:
        """Allocate (or keep) a static cache for `batch` rows of up to `max_len` tokens."""
        need = int(math.ceil(max_len / self.max_len_multiple) * self.max_len_multiple)
        c = self.cache
        if c is not None and c.batch == batch and c.max_len >= max_len:
            return c
        self.release()
        self.cache = StaticCache(self.config, batch, need, self.device, self.dtype)
        self._alloc_step_buffers(batch)
        return self.cache

    def release(self) -> None:
        """Free the cache, the step buffers and the CUDA graph."""
        if self._graph is not None:
            self._graph = None
        self.cache = None
        self._bufs = None
        self._warm = False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _alloc_step_buffers(self, b: int) -> None:
        cfg, dev, dt = self.config, self.device, self.dtype
        H, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        V = self.lm_head.shape[0]
        width_in = max([p.w_in.shape[0] for p in self.plans] + [1])
        inter = max(p.w_down.shape[1] for p in self.plans) if self.plans else cfg.intermediate_size
        bufs = {
            "ids": torch.zeros(b, dtype=torch.long, device=dev),
            "next": torch.zeros(b, dtype=torch.long, device=dev),
            "logits": torch.zeros(b, V, dtype=torch.float32, device=dev),
            "h": torch.zeros(b, H, dtype=dt, device=dev),
            "z": torch.zeros(b, width_in, dtype=dt, device=dev),
            "y": torch.zeros(b, h * d, dtype=dt, device=dev),
            "q": torch.zeros(b, h, d, dtype=dt, device=dev),
            "act": torch.zeros(b, inter, dtype=dt, device=dev),
        }
        if self.kernels == "triton":
            ns = tk.attn_num_splits(self.cache.max_len)
            bufs["ns"] = ns
            bufs["po"] = torch.zeros(b, kv, ns, h // kv, d, dtype=torch.float32, device=dev)
            bufs["pm"] = torch.zeros(b, kv, ns, h // kv, dtype=torch.float32, device=dev)
            bufs["pl"] = torch.zeros(b, kv, ns, h // kv, dtype=torch.float32, device=dev)
            n_parts = tk.max_parts(V)
            bufs["pv"] = torch.zeros(b, n_parts, dtype=torch.float32, device=dev)
            bufs["pi"] = torch.zeros(b, n_parts, dtype=torch.long, device=dev)
        self._bufs = bufs

    # -- prefill --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
        """Run the prompt through the model into the (already reserved) static cache; returns the last
        position's logits (b, V) in the model dtype. `attention_mask` (b, L): 0 = left padding."""
        model = self.model.model
        b, L = input_ids.shape
        if self.cache is None or self.cache.batch != b or self.cache.max_len < L:
            self.reserve(b, L + 1)
        c = self.cache
        c.reset()
        dev, dt = self.device, self.dtype
        input_ids = input_ids.to(dev)
        mask = None
        if attention_mask is not None:
            am = attention_mask.to(dev).bool()
            if not bool(am.all()):
                mask = am
                if bool((am[:, 1:].long() < am[:, :-1].long()).any()):
                    raise ValueError("the engine needs left padding: attention_mask rows must be 0...0 1...1")
        if mask is None:
            positions = torch.arange(L, device=dev)[None].expand(b, L)
        else:
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)
            c.key_start.copy_((~mask).sum(1).to(torch.int32))
        c.key_valid[:, :L] = True if mask is None else mask
        emb_full = model.embed(input_ids, pixel_values) if pixel_values is not None else None
        C = chunk_size or self.prefill_chunk
        last = None
        for s in range(0, L, C):
            e = min(L, s + C)
            h = emb_full[:, s:e] if emb_full is not None else model.embed_tokens(input_ids[:, s:e])
            pm = None if mask is None else mask[:, s:e]
            if pm is not None and bool(pm.all()):
                pm = None
            kv_valid = None if mask is None else c.key_valid[:, :e]
            if kv_valid is not None and bool(kv_valid.all()):
                kv_valid = None
            rope = {}
            pending = None  # the previous MLP's output, added to h inside the next norm
            for p in self.plans:
                layer = p.layer
                h, r = add_rmsnorm(h, pending, p.ln1, p.eps1, fused=self._fused("add + RMSNorm"))
                if p.attention:
                    ri = layer.rope_index
                    if ri not in rope:
                        rope[ri] = model.rotary[ri](positions[:, s:e], dt)
                    mixed = self._attn_prefill(p, r, rope[ri], s, e, kv_valid)
                else:
                    mixed = self._mamba_prefill(p, r, pm, first=s == 0)
                h, u = add_rmsnorm(h, mixed, p.ln2, p.eps2, fused=self._fused("add + RMSNorm"))
                del mixed, r
                gu = F.linear(u, p.w_gu, p.b_gu)
                pending = F.linear(self._act_mul(layer, gu), p.w_down, p.b_down)
                del gu, u
            h = h + pending
            last = h[:, -1:]
        logits = self.model.lm_head(model.norm(last))[:, -1]
        c.length.fill_(L)
        c.host_length = L
        if mask is None:
            c.pos.fill_(L)
        else:
            c.pos.copy_(mask.long().sum(1))
        return logits

    def _attn_prefill(self, p: LayerPlan, r, rope, s, e, kv_valid):
        cfg = self.config
        b, l, _ = r.shape
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = F.linear(r, p.w_in, p.b_in)
        q, k, v = qkv.split([h * d, kv * d, kv * d], dim=-1)
        q = q.view(b, l, h, d).transpose(1, 2)
        k = k.view(b, l, kv, d).transpose(1, 2)
        v = v.view(b, l, kv, d).transpose(1, 2)
        cos, sin = rope
        rot = apply_rope if self._fast_prefill else apply_rope_ref  # kernels="torch": torch ops throughout
        q, k = rot(q, cos, sin), rot(k, cos, sin)
        kc, vc = self.cache.k[p.idx], self.cache.v[p.idx]
        kc[:, :, s:e] = k
        vc[:, :, s:e] = v
        o = _chunk_attention(q, kc[:, :, :e], vc[:, :, :e], s, kv_valid, self._sdpa)
        return F.linear(o.transpose(1, 2).reshape(b, l, h * d), p.w_o, p.b_o)

    def _mamba_prefill(self, p: LayerPlan, r, pm, first: bool):
        """The mixer's own `split_proj` / `discretize` / `conv` / `scan` on the fused projection, from the cached
        states (none for the first chunk); on Triton the conv (+ fla's input layout) is one kernel."""
        mix = p.layer.mixer
        b, l, _ = r.shape
        h, kv, d = mix.num_heads, mix.num_kv_heads, mix.head_dim
        z = F.linear(r, p.w_in, p.b_in)
        xBC, g, dt_raw = mix.split_proj(z)
        dt, A = mix.discretize(dt_raw)
        cs = None if first else self.cache.conv[p.idx]
        ss = None if first else self.cache.ssm[p.idx]
        if self._fused("conv + SiLU (prefill)"):
            if resolve_backend(mix.ssd_backend, z) == "fla" and self._fused("conv + SiLU into the SSD inputs"):
                # the conv writes fla's (q, k, dt * x) directly: no split copies, no GQA repeat, no dt * x pass
                (q, k, v), conv_new = fused_prefill(xBC, p.conv_w, p.conv_b, cs, pm, split=(dt, h, kv, d))
                y, final = ssd_gla(q, k, v, dt * A, initial_state=ss)
                return self._mamba_out(p, y, g, conv_new, final, b, l)
            xc, conv_new = fused_prefill(xBC, p.conv_w, p.conv_b, cs, pm)
        else:
            xc, conv_new = mix.conv(xBC, pm, cs, carry=True)
        y, final = mix.scan(xc, dt, A, initial_state=ss)
        del xc
        return self._mamba_out(p, y, g, conv_new, final, b, l)

    def _mamba_out(self, p: LayerPlan, y, g, conv_new, final, b, l):
        """Store the carried states; gated RMSNorm of y (b, l, h, d) and the output projection."""
        self.cache.conv[p.idx].copy_(conv_new)
        self.cache.ssm[p.idx].copy_(final)
        d = self.config.head_dim
        norm = fused_forward if self._fused("gated RMSNorm") else gated_rmsnorm_ref
        y = norm(y.reshape(b, l, -1), g, p.gnorm_w, p.gnorm_eps, d)
        return F.linear(y, p.w_o, p.b_o)

    @property
    def _fast_prefill(self) -> bool:
        """Fused Triton elementwise kernels in prefill (same kernels family as the decode step)."""
        return self.kernels == "triton"

    def _fused(self, path: str) -> bool:
        """Whether the prefill runs fused kernel `path` (`ops.kernel_report`'s name): Triton kernels chosen and, on
        CUDA, the path's check passed on this device (asked once). Under Triton's CPU interpreter (tests) all run."""
        if not self._fast_prefill:
            return False
        if path == "conv + SiLU into the SSD inputs" and not split_ok(self.config.head_dim):
            return False
        if self.device.type != "cuda":
            return True
        if self.fast_paths is None:
            self.fast_paths = kernel_report(self.config, self.dtype, self.device, inference=True)["fused"]
        return self.fast_paths.get(path, False)

    def _act_mul(self, layer, gu):
        if self.config.hidden_act in ("silu", "swish") and self._fused("MLP SiLU product"):
            return fused_forward_packed(gu)
        gate, up = gu.chunk(2, dim=-1)
        return layer.mlp.act(gate) * up

    # -- decode step ----------------------------------------------------------------------------------------
    def _step(self) -> None:
        """One token for every row: reads bufs['ids'], writes bufs['logits'] / bufs['next'], advances the cache,
        and feeds the greedy token back into bufs['ids']."""
        with torch.no_grad():
            if self.kernels == "triton":
                self._step_triton()
            else:
                self._step_torch()

    def _step_torch(self) -> None:
        cfg, c, B = self.config, self.cache, self._bufs
        b = c.batch
        h_, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rep = h_ // kv
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        T = c.max_len if (capturing or self.use_graph) else c.host_length + 1
        h = F.embedding(B["ids"], self.embed)
        if c.has_attention:
            c.key_valid.index_fill_(1, c.length.view(1), True)
        rope_cache = {}
        for p in self.plans:
            u = rmsnorm_ref(h, p.ln1, p.eps1)
            z = F.linear(u, p.w_in, p.b_in)
            if p.attention:
                q, k, v = z.split([h_ * d, kv * d, kv * d], dim=-1)
                key = p.layer.rope_index
                if key not in rope_cache:
                    freqs = c.pos.float()[:, None] * p.inv_freq
                    emb = torch.cat([freqs, freqs], dim=-1)
                    rope_cache[key] = (emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None])
                cos, sin = rope_cache[key]
                q = apply_rope_ref(q.view(b, h_, 1, d), cos, sin)  # (b, h, 1, d)
                k = apply_rope_ref(k.view(b, kv, 1, d), cos, sin)
                kc, vc = c.k[p.idx], c.v[p.idx]
                kc.index_copy_(2, c.length.view(1), k)
                vc.index_copy_(2, c.length.view(1), v.view(b, kv, 1, d))
                mask = c.key_valid[:, None, None, :T]
                o = F.scaled_dot_product_attention(q.view(b, kv, rep, d), kc[:, :, :T], vc[:, :, :T], attn_mask=mask)
                h = h + F.linear(o.reshape(b, h_ * d), p.w_o, p.b_o)
            else:
                mix = p.layer.mixer
                xBC, g, dt_raw = mix.split_proj(z)
                dt, A = mix.discretize(dt_raw)
                y = mix.step(xBC, dt, A, c.conv[p.idx], c.ssm[p.idx], inplace=True)[0]
                y = gated_rmsnorm_ref(y.reshape(b, h_ * d), g, p.gnorm_w, p.gnorm_eps, d)
                h = h + F.linear(y, p.w_o, p.b_o)
            u = rmsnorm_ref(h, p.ln2, p.eps2)
            gate, up = F.linear(u, p.w_gu, p.b_gu).chunk(2, dim=-1)
            h = h + F.linear(p.layer.mlp.act(gate) * up, p.w_down, p.b_down)
        hn = rmsnorm_ref(h, self.final_norm, self.final_eps)
        B["logits"].copy_(F.linear(hn, self.lm_head))
        torch.argmax(B["logits"], dim=-1, out=B["next"])
        B["ids"].copy_(B["next"])
        c.length.add_(1)
        c.pos.add_(1)

    def _step_triton(self) -> None:
        cfg, c, B, o = self.config, self.cache, self._bufs, self.options
        h_, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        conv_dim = cfg.mamba_conv_dim
        hbuf, z, y, act = B["h"], B["z"], B["y"], B["act"]
        torch.index_select(self.embed, 0, B["ids"], out=hbuf)
        kvalid = c.key_valid.view(torch.uint8)
        for p in self.plans:
            n_in = p.w_in.shape[0]
            zz = z[:, :n_in]
            tk.gemv(hbuf, p.w_in, zz, bias=p.b_in, pro=1, nw=p.ln1, eps=p.eps1, opts=o)
            if p.attention:
                tk.rope_append(zz, c.pos, c.length, p.inv_freq, B["q"], c.k[p.idx], c.v[p.idx], kvalid, h_, kv, d,
                               opts=o)
                tk.attn_decode(B["q"], c.k[p.idx], c.v[p.idx], c.length, c.key_start, y,
                               B["po"], B["pm"], B["pl"], 1.0 / math.sqrt(d), opts=o)
                tk.gemv(y, p.w_o, hbuf, bias=p.b_o, res=hbuf, epi=1, opts=o)
            else:
                tk.ssm_step(zz, c.conv[p.idx], p.conv_w, p.conv_b, p.dt_bias, p.neg_A, c.ssm[p.idx], y, h_, kv, d,
                            opts=o)
                tk.gemv(y, p.w_o, hbuf, bias=p.b_o, pro=2, nw=p.gnorm_w, eps=p.gnorm_eps, g=zz[:, conv_dim:],
                        hd=d, res=hbuf, epi=1, conv=(zz, c.conv[p.idx]), opts=o)
            inter = p.w_down.shape[1]
            tk.gemv(hbuf, p.w_gu, act[:, :inter], bias=p.b_gu, pro=1, nw=p.ln2, eps=p.eps2, dual=True, opts=o)
            tk.gemv(act[:, :inter], p.w_down, hbuf, bias=p.b_down, res=hbuf, epi=1, opts=o)
        n_parts = tk.gemv(hbuf, self.lm_head, B["logits"], pro=1, nw=self.final_norm, eps=self.final_eps, epi=2,
                          parts=(B["pv"], B["pi"]), opts=o)
        tk.finish(B["pv"], B["pi"], n_parts, B["next"], B["ids"], c.length, c.pos, opts=o)

    # -- running steps --------------------------------------------------------------------------------------
    def _fall_back(self, reason: str) -> None:
        warnings.warn(f"mmmamba Engine: falling back to kernels='torch': {reason}", stacklevel=3)
        self.fallback_reason = reason
        self.kernels = "torch"
        self._graph = None
        self._warm = False

    def _check_decode_kernels(self) -> None:
        """Before the Triton decode step first runs on CUDA, its kernels pass their check against the torch
        references (`triton_kernels.decode_ok`, once per device and dtype), or the engine falls back to the torch
        step with a warning."""
        if self.kernels == "triton" and self.device.type == "cuda" and not tk.decode_ok(
                self.dtype, cuda_index(self.device)):
            self._fall_back("the Triton decode kernels failed their check against the torch references")

    @torch.no_grad()
    def _warmup(self) -> None:
        """Run one step on a snapshot of the state (Triton compiles and tunes here), then restore it."""
        self._check_decode_kernels()
        snap = self.cache.snapshot_state()
        ids = self._bufs["ids"].clone()
        try:
            self._step()
        except Exception as e:  # a Triton kernel failed to compile or launch on this device
            if self.kernels != "triton":
                raise
            self.cache.restore_state(snap)
            self._fall_back(f"{type(e).__name__}: {e}")
            self._alloc_step_buffers(self.cache.batch)
            self._bufs["ids"].copy_(ids)
            snap = self.cache.snapshot_state()
            self._step()
        self.cache.restore_state(snap)
        self._bufs["ids"].copy_(ids)
        self._warm = True

    @torch.no_grad()
    def capture(self) -> None:
        """(Re)capture the decode step in a CUDA graph for the current cache."""
        if not self._warm:
            self._warmup()
        ids = self._bufs["ids"]

        def save():
            return self.cache.snapshot_state(), ids.clone()

        def restore(snap):
            self.cache.restore_state(snap[0])
            ids.copy_(snap[1])

        self._graph = None
        self._graph = CapturedStep(self._step, warmup=1, before_warmup=save, after_warmup=restore)

    @torch.no_grad()
    def decode_step(self) -> None:
        """Advance every row by one token (input: bufs['ids']; output: `logits`, `next_token`)."""
        if self.cache.host_length >= self.cache.max_len:
            raise RuntimeError(f"static cache full ({self.cache.max_len} tokens); reserve a longer one")
        if not self._warm:
            self._warmup()
        if self.use_graph:
            if self._graph is None:
                self.capture()
            self._graph.replay()
        else:
            self._step()
        self.cache.host_length += 1
        self.steps_run += 1

    def decode(self, n: int) -> None:
        """n greedy steps, each feeding its token back on the device (no host synchronisation)."""
        for _ in range(n):
            self.decode_step()

    @property
    def logits(self) -> torch.Tensor:
        return self._bufs["logits"]

    @property
    def next_token(self) -> torch.Tensor:
        return self._bufs["next"]

    def set_tokens(self, tokens: torch.Tensor) -> None:
        self._bufs["ids"].copy_(tokens)

    # -- self check -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _both_steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of one Triton step and of one torch step from the current state (state restored afterwards)."""
        snap, ids = self.cache.snapshot_state(), self._bufs["ids"].clone()
        self._step_triton()
        a = self._bufs["logits"].clone()
        self.cache.restore_state(snap)
        self._bufs["ids"].copy_(ids)
        graph_flag, self.use_graph = self.use_graph, True  # full-buffer attention, as in a graph
        try:
            self._step_torch()
        finally:
            self.use_graph = graph_flag
        ref = self._bufs["logits"].clone()
        self.cache.restore_state(snap)
        self._bufs["ids"].copy_(ids)
        return a, ref

    @torch.no_grad()
    def compare_kernels(self) -> float:
        """Relative max error of one Triton decode step's logits against the torch step on the current state
        (state restored afterwards). 0.0 when the engine runs torch kernels."""
        if self.kernels != "triton":
            return 0.0
        a, ref = self._both_steps()
        return _rel_max_err(a, ref)

    @torch.no_grad()
    def kernel_errors(self) -> dict:
        """`compare_kernels` plus its noise floor: the Triton step and the torch step on the current state, each
        against the same step in fp32 arithmetic (torch kernels on an fp32 copy of these weights and of the state).
        In bf16 / fp16 both steps round at every layer, so their difference alone is no verdict: at HoVLE-2.6B dims
        the bf16 torch step is itself ~5e-2 (relative max) off the fp32 step. Keys: `triton_vs_torch`,
        `triton_vs_fp32`, `torch_vs_fp32` (for an fp32 model: the torch step is the fp32 step)."""
        if self.kernels != "triton":
            return {"triton_vs_torch": 0.0, "triton_vs_fp32": 0.0, "torch_vs_fp32": 0.0}
        a, t = self._both_steps()
        err = _rel_max_err(a, t)
        if self.dtype == torch.float32:
            return {"triton_vs_torch": err, "triton_vs_fp32": err, "torch_vs_fp32": 0.0}
        c = self.cache
        twin = Engine(copy.deepcopy(self.model).float(), kernels="torch", cuda_graph=False,
                      max_len_multiple=c.max_len, share_weights=True, options=self.options)
        tc = twin.reserve(c.batch, c.max_len)
        for name in ("k", "v", "conv", "ssm"):
            for dst, src in zip(getattr(tc, name), getattr(c, name)):
                if dst is not None:
                    dst.copy_(src)
        for name in ("key_valid", "key_start", "length", "pos"):
            getattr(tc, name).copy_(getattr(c, name))
        tc.host_length = c.host_length
        twin.set_tokens(self._bufs["ids"])
        twin.use_graph = True  # full-buffer attention, as the two steps above
        twin._step_torch()
        ref = twin.logits.clone()
        del twin, tc
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"triton_vs_torch": err, "triton_vs_fp32": _rel_max_err(a, ref), "torch_vs_fp32": _rel_max_err(t, ref)}

    # -- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               pixel_values: torch.Tensor | None = None, generator: torch.Generator | None = None, **kwargs):
        """Yield one (b,) tensor of new tokens per step (finished rows are padded as in `generate`). Greedy or
        sampling (max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id); the logits
        processors and score outputs are `generate`'s only."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        opts = resolve_options(self.model, None, kwargs, input_ids.shape[-1])
        extra = [k for k in ("min_new_tokens", "min_length", "return_dict_in_generate", "output_scores",
                             "output_logits") if getattr(opts, k)] + (["repetition_penalty"]
                                                                      if opts.repetition_penalty != 1.0 else [])
        if extra:
            raise NotImplementedError(f"Engine.stream does not take {extra}; use Engine.generate")
        input_ids = input_ids.to(self.device)
        b, L = input_ids.shape
        self.reserve(b, L + opts.max_new_tokens)
        stops = torch.tensor(opts.eos_token_id, device=self.device, dtype=torch.long)
        logits = self.prefill(input_ids, attention_mask, pixel_values)
        nxt = sample_next(logits, opts.do_sample, opts.temperature, opts.top_k, opts.top_p, generator)
        unfinished = torch.ones(b, dtype=torch.bool, device=self.device)
        for step in range(opts.max_new_tokens):
            if stops.numel():
                nxt = torch.where(unfinished, nxt, opts.pad_token_id)
            yield nxt
            if stops.numel():
                unfinished = unfinished & ~torch.isin(nxt, stops)
                if not bool(unfinished.any()):
                    return
            if step == opts.max_new_tokens - 1:
                return
            self._bufs["ids"].copy_(nxt)
            self.decode_step()
            nxt = self._bufs["next"].clone() if opts.greedy else sample_next(
                self._bufs["logits"], opts.do_sample, opts.temperature, opts.top_k, opts.top_p, generator)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, streamer=None, generator: torch.Generator | None = None,
                 generation_config=None, **kwargs):
        """Same contract and arguments as `mmmamba.models.generate` (the same token loop, `decode_loop`, over
        the engine's prefill and decode step): (b, prompt + new) ids or a `GenerateDecoderOnlyOutput`."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        opts = resolve_options(self.model, generation_config, kwargs, input_ids.shape[-1])
        input_ids = input_ids.to(self.device)
        b, L = input_ids.shape
        if streamer is not None:
            streamer.put(input_ids.cpu())
        if opts.max_new_tokens <= 0:
            if streamer is not None:
                streamer.end()
            return decode_loop(opts, input_ids, attention_mask, None, None)
        self.reserve(b, L + opts.max_new_tokens)
        first = self.prefill(input_ids, attention_mask, pixel_values)

        def step(nxt: torch.Tensor, need_logits: bool = True) -> torch.Tensor | None:
            self._bufs["ids"].copy_(nxt)
            self.decode_step()
            return self._bufs["logits"] if need_logits else None

        return decode_loop(opts, input_ids, attention_mask, first, step, streamer, generator,
                           greedy_next=lambda: self._bufs["next"])

    # -- timing helpers (benchmarks) ------------------------------------------------------------------------
    @torch.no_grad()
    def time_decode(self, steps: int = 32, warmup: int = 4) -> list[float]:
        """Per-step wall times (seconds) of `steps` graph-replayed greedy steps after `warmup` ones."""
        self.decode(warmup)
        times = []
        if self.device.type == "cuda":
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            ev[0].record()
            for i in range(steps):
                self.decode_step()
                ev[i + 1].record()
            torch.cuda.synchronize()
            times = [ev[i].elapsed_time(ev[i + 1]) / 1e3 for i in range(steps)]
        else:
            for _ in range(steps):
                t0 = time.perf_counter()
                self.decode_step()
                times.append(time.perf_counter() - t0)
        return times
