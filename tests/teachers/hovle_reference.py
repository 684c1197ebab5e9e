"""Independent, deliberately plain reference forward of HoVLE (and of the authors' released Mamba-2 layers) that
reads the raw checkpoint tensors by their original names. Shares no code with `mmmamba`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_cos_sin(d, theta, L):
    """InternLM2RotaryEmbedding: fp32 inv_freq, emb = [freqs, freqs]."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    f = torch.einsum("i,j->ij", torch.arange(L, dtype=torch.float32), inv)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    d = x.shape[-1]
    return torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)


def pixel_shuffle_loops(x):
    """(n, s*s, c) row-major patch tokens -> (n, (s/2)^2, 4c): output token (a, b) holds the 2x2 block
    [(2a, 2b), (2a, 2b+1), (2a+1, 2b), (2a+1, 2b+1)] concatenated in that order (InternVL pixel shuffle v2)."""
    n, l, c = x.shape
    s = int(round(l**0.5))
    grid = x.reshape(n, s, s, c)
    out = torch.empty(n, s // 2, s // 2, 4 * c, dtype=x.dtype)
    for a in range(s // 2):
        for b in range(s // 2):
            for m in range(2):
                for k in range(2):
                    j = 2 * m + k
                    out[:, a, b, j * c : (j + 1) * c] = grid[:, 2 * a + m, 2 * b + k]
    return out.reshape(n, -1, 4 * c)


def attention_block(x, T, pre, heads, kv, theta, eps):
    b, L, H = x.shape
    d, g = H // heads, heads // kv
    u = rms(x, T[pre + "attention_norm.weight"], eps)
    qkv = u @ T[pre + "attention.wqkv.weight"].T
    if pre + "attention.wqkv.bias" in T:  # InternLM2's `bias` option
        qkv = qkv + T[pre + "attention.wqkv.bias"]
    qkv = qkv.view(b, L, kv, g + 2, d)  # per kv head: g queries, k, v
    q = qkv[:, :, :, :g].reshape(b, L, heads, d).transpose(1, 2)
    k = qkv[:, :, :, g].transpose(1, 2)
    v = qkv[:, :, :, g + 1].transpose(1, 2)
    cos, sin = rope_cos_sin(d, theta, L)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k = k[:, :, None].expand(b, kv, g, L, d).reshape(b, heads, L, d)
    v = v[:, :, None].expand(b, kv, g, L, d).reshape(b, heads, L, d)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    o = (torch.softmax(s.float(), dim=-1) @ v).transpose(1, 2).reshape(b, L, heads * d)
    return x + o @ T[pre + "attention.wo.weight"].T + T.get(pre + "attention.wo.bias", 0.0)


def mamba_block(x, T, pre, heads, kv, eps, gate_eps=1e-5):
    """Released mmMamba layer: fused v|k|q|g|dt projection, causal conv over [v|k|q] + SiLU, sequential SSD
    S_t = exp(dt*A) S_{t-1} + dt * x_t B_t^T, y_t = S_t C_t, per-head RMSNorm gated by SiLU(g), o_proj."""
    b, L, H = x.shape
    d = H // heads
    a = pre + "attention."
    u = rms(x, T[pre + "attention_norm.weight"], eps)
    W = T[a + "wvkqgdt.weight"]
    kvd, hd = kv * d, heads * d
    conv_dim = 2 * kvd + hd
    xbc = u @ W[:conv_dim].T
    gate = u @ W[conv_dim : conv_dim + hd].T
    dt_raw = u @ W[conv_dim + hd :].T
    cw, cb = T[a + "conv1d.weight"][:, 0], T[a + "conv1d.bias"]
    K = cw.shape[-1]
    pad = torch.cat([xbc.new_zeros(b, K - 1, conv_dim), xbc], dim=1)
    conv = torch.stack([cb + sum(cw[:, j] * pad[:, t + j] for j in range(K)) for t in range(L)], dim=1)
    conv = F.silu(conv)
    xv, B, C = conv[..., :kvd], conv[..., kvd : 2 * kvd], conv[..., 2 * kvd :]
    rep = heads // kv
    xv = xv.reshape(b, L, kv, d).repeat_interleave(rep, dim=2)
    B = B.reshape(b, L, kv, d).repeat_interleave(rep, dim=2)
    C = C.reshape(b, L, heads, d)
    dt = F.softplus(dt_raw + T[a + "dt_bias"])  # (b, L, h)
    A = -torch.exp(T[a + "A_log_bias"])
    S = torch.zeros(b, heads, d, d)  # (p = value dim, n = state dim)
    ys = []
    for t in range(L):
        S = torch.exp(dt[:, t] * A)[..., None, None] * S + dt[:, t, :, None, None] * (
            xv[:, t, :, :, None] * B[:, t, :, None, :]
        )
        ys.append((S @ C[:, t, :, :, None])[..., 0])
    y = torch.stack(ys, dim=1)  # (b, L, h, d)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + gate_eps) * T[a + "g_norm_swish_gate.weight"]
    y = y * F.silu(gate.reshape(b, L, heads, d))
    return x + y.reshape(b, L, hd) @ T[a + "o_proj.weight"].T


def mlp_block(x, T, pre, eps):
    u = rms(x, T[pre + "ffn_norm.weight"], eps)
    w1, w2, w3 = (T[pre + f"feed_forward.w{i}.weight"] for i in (1, 2, 3))
    return x + (F.silu(u @ w1.T) * (u @ w3.T)) @ w2.T


def image_tokens(raw, T, pixel_values):
    """HoVLE VisionEmbeddings (no CLS, position table resized to the grid) -> pixel shuffle -> MLP."""
    emb = raw["embedding_config"]
    ve = "embedding_model.vision_embeddings."
    p = emb["patch_size"]
    pe = F.conv2d(pixel_values, T[ve + "patch_embedding.weight"], T[ve + "patch_embedding.bias"], stride=p)
    n, C, gh, gw = pe.shape
    pe = pe.flatten(2).transpose(1, 2)
    table = T[ve + "position_embedding"][:, 1:]
    s = int(round(table.shape[1] ** 0.5))
    pos = table.reshape(1, s, s, C).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False).reshape(1, C, gh * gw).permute(0, 2, 1)
    v = pixel_shuffle_loops(pe + pos)
    v = F.gelu(v @ T["embedding_model.pixel_shuffle_proj.0.weight"].T + T["embedding_model.pixel_shuffle_proj.0.bias"])
    return v @ T["embedding_model.pixel_shuffle_proj.2.weight"].T + T["embedding_model.pixel_shuffle_proj.2.bias"]


@torch.no_grad()
def hovle_logits(raw, T, input_ids, pixel_values=None):
    """Logits of HoVLE (or a released mmMamba model when the tensors hold `wvkqgdt` layers), batch without padding."""
    emb, llm = raw["embedding_config"], raw["llm_config"]
    text = T["embedding_model.llm_text_embeddings.weight"]
    V = text.shape[0]
    x = text[input_ids.clamp(max=V - 1)].clone()
    special = T.get("embedding_model.special_text_embeddings.weight")
    if special is not None:
        m = input_ids >= V
        x[m] = special[input_ids[m] - V]
    if pixel_values is not None:
        x[input_ids == emb["img_context_token_id"]] = image_tokens(raw, T, pixel_values).reshape(-1, x.shape[-1])
    heads, kv = emb["num_attention_heads"], emb["num_key_value_heads"]
    layers = [(f"embedding_model.encoder.{i}.", emb) for i in range(emb["num_hidden_layers"])]
    layers += [(f"language_model.model.layers.{j}.", llm) for j in range(llm["num_hidden_layers"])]
    for pre, cfg in layers:
        if pre + "attention.wqkv.weight" in T:
            x = attention_block(x, T, pre, heads, kv, cfg["rope_theta"], cfg["rms_norm_eps"])
        else:
            x = mamba_block(x, T, pre, heads, kv, cfg["rms_norm_eps"])
        x = mlp_block(x, T, pre, cfg["rms_norm_eps"])
    x = rms(x, T["language_model.model.norm.weight"], llm["rms_norm_eps"])
    return x @ T["language_model.output.weight"].T
