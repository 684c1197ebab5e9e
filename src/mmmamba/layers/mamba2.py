"""The mmMamba student mixer (METHOD.md §2) and its seeding from an attention layer (§2.2).

u -> q = W_Q u, k = W_K u, v = W_V u -> causal depthwise conv over [v | k | q] -> SiLU
  -> SSD with x = v, B = k, C = q (k, v repeated to the query heads for GQA),
     Delta = softplus(W_gamma u + dt_bias), A = -exp(A_log)
  -> per-head RMSNorm(y) * SiLU(W_G u) -> W_O.
No RoPE and no 1/sqrt(d) scaling on the student path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import causal_conv1d, causal_conv1d_step, causal_conv1d_step_, ssd_step, ssd_step_
from ..ops.conv_silu import conv_silu
from ..ops.gla_prep import split_heads
from ..ops.ssd import ssd_packed
from .norm import GatedRMSNorm

SEED_MODES = ("mimic", "inherit", "scratch")


class Mamba2Mixer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        H, h, kv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = layer_idx, h, kv, d
        self.chunk_size = config.mamba_chunk_size
        self.q_proj = nn.Linear(H, h * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(H, kv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(H, kv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(h * d, H, bias=config.o_bias)
        self.conv_dim = config.mamba_conv_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.mamba_d_conv, groups=self.conv_dim, bias=True)
        self.dt_proj = nn.Linear(H, h, bias=False)  # W_gamma
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.ones(h))
        self.g_proj = nn.Linear(H, h * d, bias=False)  # W_G
        self.g_norm = GatedRMSNorm(d, eps=config.mamba_gate_norm_eps)
        self.ssd_backend = "auto"
        self.ssd_backward: str | None = None  # fla's backward (`ops.kernel_report`); None: chosen on first use

    # -- parameters ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_ssm_parameters(self, mimic: bool = True, generator: torch.Generator | None = None):
        """Initial values of the new parameters (METHOD.md §2.2). mimic=True: identity conv, W_gamma = 0,
        dt = softplus(dt_bias) ~ logU[1e-3, 1e-1], A_log = 1; else PyTorch defaults, dt_bias = 0 and
        A_log = log U(1, 16). W_G: xavier_uniform(gain 2^-2.5); gate norm weight 1 (both modes)."""
        if mimic:
            self.conv1d.weight.zero_()
            self.conv1d.weight[:, 0, -1] = 1.0  # the current token's tap: identity conv
            self.conv1d.bias.zero_()
            self.dt_proj.weight.zero_()
            u = torch.rand(self.num_heads, generator=generator)
            dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-3)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.A_log.fill_(1.0)
        else:
            _default_reset(self.conv1d, generator)
            _default_reset(self.dt_proj, generator)
            self.dt_bias.zero_()
            self.A_log.copy_(torch.log(torch.empty(self.num_heads).uniform_(1, 16, generator=generator)))
        w = torch.empty(self.g_proj.weight.shape)  # drawn on the CPU so a CPU generator also seeds CUDA params
        nn.init.xavier_uniform_(w, gain=2**-2.5, generator=generator)
        self.g_proj.weight.copy_(w)
        self.g_norm.weight.fill_(1.0)

    @torch.no_grad()
    def init_from_attention(self, attn: nn.Module, mode: str = "mimic", generator: torch.Generator | None = None):
        """Seed from a teacher attention layer: C <- W_Q, B <- W_K, x <- W_V, output <- W_O.

        mode: "mimic" (inherit Q, K, V + attention-mimicking SSM values; the paper's choice),
        "inherit" (inherit Q, K, V, default SSM values) or "scratch" (fresh Q, K, V). W_O is inherited in
        every mode, as in the authors' code (Table 4)."""
        if mode not in SEED_MODES:
            raise ValueError(f"seed mode {mode!r} unknown; choose one of {SEED_MODES}")
        names = ("q_proj", "k_proj", "v_proj", "o_proj") if mode != "scratch" else ("o_proj",)
        for name in names:
            src, dst = getattr(attn, name), getattr(self, name)
            if src.weight.shape != dst.weight.shape:
                raise ValueError(f"{name}: teacher weight {tuple(src.weight.shape)} != {tuple(dst.weight.shape)}")
            dst.weight.copy_(src.weight)
            if dst.bias is not None:
                dst.bias.copy_(src.bias)
        if mode == "scratch":
            for name in ("q_proj", "k_proj", "v_proj"):
                _default_reset(getattr(self, name), generator)
        self.reset_ssm_parameters(mimic=mode == "mimic", generator=generator)

    # -- forward ------------------------------------------------------------------------------------------
    def in_proj(self, u):
        """xBC = [v | k | q] (the conv input), g = W_G u, W_gamma u. One matmul over the concatenated weights
        (u read once, no concatenation of activations), or two when only one group trains (stage 1: g and
        W_gamma), so that no weight gradient is computed for frozen rows."""
        conv_mods, gate_mods = (self.v_proj, self.k_proj, self.q_proj), self.gate_projections
        if _trains(conv_mods) == _trains(gate_mods):
            return self.split_proj(_linear_cat(u, conv_mods + gate_mods))
        return (_linear_cat(u, conv_mods), *_linear_cat(u, gate_mods).split(self.proj_sizes[1:], dim=-1))

    def heads(self, u, mask=None, state=None):
        """Per-head output before W_O: (b, l, h, d). mask (b, l): 0 marks (left) padding, whose inputs are
        zeroed before and after the conv so that padded rows equal unpadded ones. state: SSMState or None."""
        return self.g_norm(*self.ssm_heads(u, mask, state))

    def heads_mse(self, u, target, mask=None, loss_mask=None):
        """masked_mse(heads(u, mask), target, loss_mask) (the stage 1-2 loss, target (b, l, h, d)); on CUDA the
        gated norm and the loss run as one kernel each way (`ops.gated_norm.gated_rmsnorm_mse`)."""
        return self.g_norm.mse(*self.ssm_heads(u, mask), target, loss_mask)

    def ssm_heads(self, u, mask=None, state=None):
        """What the gated norm takes: the SSD output y and the gate W_G u, each (b, l, h, d). With a `state` that
        already holds a sequence and one token, the decode `step`; otherwise `conv` and `scan` over the sequence."""
        b, l, _ = u.shape
        xBC, g, dt_raw = self.in_proj(u)
        dt, A = self.discretize(dt_raw)
        if state is not None and state.ssm is not None and l == 1:
            m = None if mask is None else mask[:, 0]
            y, state.conv, state.ssm = self.step(xBC[:, 0], dt[:, 0], A, state.conv, state.ssm, m)
            y = y[:, None]
        else:
            xc, conv_state = self.conv(xBC, mask, None if state is None else state.conv, carry=state is not None)
            y, final = self.scan(xc, dt, A, None if state is None else state.ssm)
            if state is not None:
                state.conv, state.ssm = conv_state, final.float()
        return y, g.reshape(b, l, self.num_heads, self.head_dim)

    # -- the layer's math; training, the reference decode and the inference engine all compose these ----------
    @property
    def gate_projections(self) -> tuple[nn.Linear, nn.Linear]:
        return self.g_proj, self.dt_proj

    @property
    def in_projections(self) -> tuple[nn.Linear, ...]:
        """The projections of u in the order of `split_proj`: W_V, W_K, W_Q (the conv input), W_G, W_gamma."""
        return (self.v_proj, self.k_proj, self.q_proj, *self.gate_projections)

    @property
    def proj_sizes(self) -> list[int]:
        return [self.conv_dim, self.num_heads * self.head_dim, self.num_heads]

    def split_proj(self, z):
        """z = u [W_V; W_K; W_Q; W_G; W_gamma]^T (..., conv_dim + h d + h) -> xBC = [v | k | q], g = W_G u,
        W_gamma u (views)."""
        return z.split(self.proj_sizes, dim=-1)

    def discretize(self, dt_raw):
        """Delta = softplus(W_gamma u + dt_bias) (..., h) and A = -exp(A_log) (h,), both fp32."""
        return F.softplus(dt_raw.float() + self.dt_bias.float()), -torch.exp(self.A_log.float())

    def conv(self, xBC, mask=None, conv_state=None, carry: bool = False):
        """SiLU(causal depthwise conv of xBC) (b, l, conv_dim) and the new conv state (b, conv_dim, k - 1): the last
        k - 1 inputs, returned when `carry` or a `conv_state` (the inputs before xBC) is given, else None. mask (b, l):
        0 marks (left) padding, whose inputs are zeroed before and after the conv so padded rows equal unpadded ones.
        A whole sequence from a zero state runs fused on CUDA (`ops.conv_silu`)."""
        m = None if mask is None else mask[..., None].to(xBC.dtype)
        if m is not None:
            xBC = xBC * m
        w, cb = self.conv1d.weight[:, 0], self.conv1d.bias
        if conv_state is None and not carry:
            xc, new_state = conv_silu(xBC, w, cb), None
        else:
            xc, new_state = causal_conv1d(xBC, w, cb, conv_state)
            xc = F.silu(xc)
        if m is not None:
            xc = xc * m
        return xc, new_state

    def scan(self, xc, dt, A, initial_state=None):
        """The SSD over the conv output xc (b, l, conv_dim) with x = v, B = k, C = q: (y (b, l, h, d), final state
        (b, h, d, d)); fla-core on CUDA (`ops.ssd.ssd_packed`)."""
        return ssd_packed(xc, dt, A, self.num_heads, self.num_kv_heads, self.head_dim, initial_state=initial_state,
                          backend=self.ssd_backend, chunk_size=self.chunk_size, backward=self.ssd_backward)

    def step(self, xBC, dt, A, conv_state, ssm_state, mask=None, inplace: bool = False):
        """One token: xBC (b, conv_dim), dt (b, h) fp32, conv_state (b, conv_dim, k - 1), ssm_state (b, h, d, d)
        fp32, mask (b,) or None -> (y (b, h, d), new conv state, new SSM state). The recurrence is `ops.ssd_step`:
        S' = exp(dt A) S + k^T (dt v), y = q S'. `inplace` (the decode cache) updates and returns the given states
        and reads k, v per KV group instead of repeating them to h heads."""
        m = None if mask is None else mask[:, None].to(xBC.dtype)
        if m is not None:
            xBC = xBC * m
        w, cb = self.conv1d.weight[:, 0], self.conv1d.bias
        if inplace:
            xc = causal_conv1d_step_(xBC, w, cb, conv_state)
        else:
            xc, conv_state = causal_conv1d_step(xBC, w, cb, conv_state)
        xc = F.silu(xc)
        if m is not None:
            xc = xc * m
        if inplace:
            b, (h, kv, d) = xc.shape[0], (self.num_heads, self.num_kv_heads, self.head_dim)
            v, k, q = (t.view(b, -1, d) for t in xc.split([kv * d, kv * d, h * d], dim=-1))
            return ssd_step_(ssm_state, v, dt, A, k, q), conv_state, ssm_state
        v, k, q = split_heads(xc[:, None], self.num_heads, self.num_kv_heads, self.head_dim)
        y, ssm_state = ssd_step(ssm_state, v[:, 0], dt, A, k[:, 0], q[:, 0])
        return y, conv_state, ssm_state

    def forward(self, u, mask=None, state=None):
        y = self.heads(u, mask, state)
        return self.o_proj(y.reshape(*u.shape[:2], -1))


def set_ssd_backward(model: nn.Module, mode: str | None) -> None:
    """Every Mamba-2 mixer of `model` trains with SSD backward `mode` (`ops.ssd_fla.MODE_NOTES`; None: its own)."""
    for m in model.modules():
        if isinstance(m, Mamba2Mixer):
            m.ssd_backward = mode


class SSMState:
    """Recurrent state of one Mamba-2 layer: conv (b, conv_dim, d_conv-1) and ssm (b, h, n, p) in fp32."""

    def __init__(self):
        self.conv = self.ssm = None

    def select(self, idx):
        if self.ssm is not None:
            self.conv, self.ssm = self.conv[idx], self.ssm[idx]

    def nbytes(self) -> int:
        return 0 if self.ssm is None else self.conv.nbytes + self.ssm.nbytes


def _trains(mods) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for m in mods for p in m.parameters())


def _linear_cat(u, mods, align: int = 16):
    """u @ [W_1; W_2; ...]^T (+ biases; a missing bias counts as zeros). The stacked weight gets zero rows up to a
    multiple of `align`, so that the output rows start 16-element aligned: with an odd width (e.g. 2313 for
    SmolLM2) cuBLAS falls back to unaligned GEMM kernels and the slices are not vectorizable."""
    w = torch.cat([m.weight for m in mods])
    bias = None
    if any(m.bias is not None for m in mods):
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods])
    n = w.shape[0]
    pad = (-n) % align
    if pad:
        w = torch.cat([w, w.new_zeros(pad, w.shape[1])])
        bias = None if bias is None else torch.cat([bias, bias.new_zeros(pad)])
    return F.linear(u, w, bias)[..., :n]


def _default_reset(module: nn.Module, generator=None):
    """PyTorch's default Linear/Conv init (kaiming_uniform a=sqrt(5)), optionally from a generator."""
    w = module.weight
    bound = 1 / math.sqrt(w[0].numel())
    w.copy_(torch.empty(w.shape).uniform_(-bound, bound, generator=generator))
    if module.bias is not None:
        module.bias.copy_(torch.empty(module.bias.shape).uniform_(-bound, bound, generator=generator))
