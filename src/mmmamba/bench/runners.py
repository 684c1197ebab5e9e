"""One runner per implementation: ours (engine: static cache, fused decode step, CUDA graph), transformers'
LlamaForCausalLM (SDPA, DynamicCache: the default a user gets), and mamba_ssm (optional, same dims).

Every runner measures, at a context `ctx` and batch `b`:
* prefill: the prompt's wall time and the peak memory of prefill (weights and cache included);
* decode: per-step times of greedy steps and the peak memory while decoding.
When prefill is skipped (too long for a quadratic model within the time budget, or the batch sweep), the cache is
filled with random values of the right shape instead (`StaticCache.fill_random`): decode latency depends on the
cache's size, not its contents.
"""

from __future__ import annotations

import inspect
import time

import torch

from ..inference.cuda_graph import CapturedStep
from ..inference.engine import Engine, resolve_kernels
from .measure import GB, cleanup, decode_weight_bytes, param_bytes, param_count, peak_gb, reset_peak, summarize, sync
from .models import build_hf_llama, build_mamba_ssm, build_ours, build_vision_front, make_config
from .table2 import HFVisionSteps, OursVisionSteps, measure_vision_table2
from .vision_prompt import prompt_maker


def _rand_ids(vocab: int, b: int, n: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (b, n), generator=g).to(device)


def _event_times(device, fn, n: int) -> list[float]:
    """Wall time (s) of each of n calls of fn, with CUDA events on GPU."""
    if torch.device(device).type == "cuda":
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        ev[0].record()
        for i in range(n):
            fn()
            ev[i + 1].record()
        torch.cuda.synchronize()
        return [ev[i].elapsed_time(ev[i + 1]) / 1e3 for i in range(n)]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class OursRunner:
    """Our decoder through `mmmamba.inference.engine.Engine`; with `vision` (HOVLE_VISION / TINY_VISION) the model
    also has the vision front, for Table 2's real path."""

    impl = "ours"

    def __init__(self, name: str, variant: str, dims: dict, device, dtype, kernels="auto", cuda_graph=None,
                 prefill_chunk: int = 8192, placement: str | None = None, vision: dict | None = None):
        self.name, self.variant, self.dims = name, variant, dims
        self.device, self.dtype = torch.device(device), dtype
        self.kernels, self.cuda_graph = kernels, cuda_graph
        self.prefill_chunk, self.placement, self.vision = prefill_chunk, placement, vision
        self.model = self.engine = None

    def build(self) -> dict:
        self.config = make_config(self.dims, self.variant, self.placement, vision=self.vision)
        self.model = build_ours(self.config, self.device, self.dtype)
        self.engine = Engine(self.model, kernels=self.kernels, cuda_graph=self.cuda_graph,
                             prefill_chunk=self.prefill_chunk, share_weights=True)  # a model of its own
        front = self.model.model.vision
        return {
            "impl": self.impl, "variant": self.variant, "params": param_count(self.model),
            "vision_front_params": None if front is None else param_count(front),
            "attention_layers": self.config.attention_layers, "kernels": self.engine.kernels,
            "cuda_graph": self.engine.use_graph, "prefill_chunk": self.prefill_chunk,
        }

    @property
    def has_vision(self) -> bool:
        return self.model is not None and self.model.model.vision is not None

    @property
    def vocab(self) -> int:
        return self.dims["vocab_size"]

    def weight_bytes(self, batch: int) -> int:
        """Weights one decode step reads (the vision front is read only by the prefill)."""
        front = param_bytes(self.model.model.vision) if self.has_vision else 0
        return decode_weight_bytes(self.model, self.engine.embed, batch, self.engine.lm_head) - front

    def held_bytes(self) -> int:
        """Bytes the runner holds now: weights, the static cache and the decode step's buffers."""
        eng = self.engine
        bufs = sum(t.nbytes for t in (eng._bufs or {}).values() if isinstance(t, torch.Tensor))
        return param_bytes(self.model) + (eng.cache.nbytes() if eng.cache is not None else 0) + bufs

    def state_bytes(self, ctx: int, batch: int) -> int:
        """Bytes of KV (up to ctx) and recurrent state one decode step reads."""
        cfg = self.config
        kv, d, h = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
        es = torch.empty((), dtype=self.dtype).element_size()
        n_attn, n_mamba = len(cfg.attention_layers), len(cfg.mamba_layers)
        conv_dim = cfg.mamba_conv_dim
        kv_bytes = n_attn * 2 * batch * kv * ctx * d * es
        ssm_bytes = n_mamba * batch * (conv_dim * (cfg.mamba_d_conv - 1) * es + h * d * d * 4)
        return kv_bytes + ssm_bytes

    def warm(self, lengths: list[int]) -> None:
        """Compile / autotune the prefill kernels (fla, SDPA) for every chunk shape the sweep will meet."""
        eng = self.engine
        for n in sorted(set(lengths)):
            eng.reserve(1, n + 1)
            eng.prefill(_rand_ids(self.vocab, 1, n, self.device))
            sync(self.device)
        eng.release()

    def self_check(self, ctx: int = 256) -> dict:
        """Triton step vs torch step (same state), each also against the fp32 step: relative max errors of the
        logits (`Engine.kernel_errors`)."""
        eng = self.engine
        eng.reserve(1, ctx + 8)
        logits = eng.prefill(_rand_ids(self.vocab, 1, ctx, self.device, seed=1))
        eng.set_tokens(logits.argmax(-1))
        errs = eng.kernel_errors()
        eng.release()
        return errs

    def run_point(self, ctx: int, batch: int, steps: int, warmup: int, prefill: bool, seed: int = 0, guard=None):
        """`guard(runner)`, if given, runs once the cache is reserved (the batch search's memory limit on a CPU)."""
        eng = self.engine
        eng.release()
        cleanup(self.device)
        reset_peak(self.device)
        eng.reserve(batch, ctx + warmup + steps + 4)
        if guard is not None:
            guard(self)
        pre = None
        if prefill:
            ids = _rand_ids(self.vocab, batch, ctx, self.device, seed)
            sync(self.device)
            t0 = time.perf_counter()
            logits = eng.prefill(ids)
            sync(self.device)
            dt = time.perf_counter() - t0
            pre = {"seconds": dt, "tokens_per_s": batch * ctx / dt, "peak_gb": peak_gb(self.device)}
            eng.set_tokens(logits.argmax(-1))
            del logits, ids
        else:
            eng.cache.fill_random(ctx)
            eng.set_tokens(_rand_ids(self.vocab, batch, 1, self.device, seed)[:, 0])
        reset_peak(self.device)
        times = eng.time_decode(steps, warmup)
        dec = summarize(times)
        dec.update(peak_gb=peak_gb(self.device), cache_gb=eng.cache.nbytes() / GB, filled="prefill" if prefill
                   else "random", kernels=eng.kernels, cuda_graph=eng.use_graph)
        eng.release()
        return pre, dec

    def table2(self, n_prompt: int, n_out: int, seed: int = 0) -> dict:
        eng = self.engine
        ids = _rand_ids(self.vocab, 1, n_prompt, self.device, seed)
        eng.generate(ids, max_new_tokens=n_out, eos_token_id=[])  # warm-up: capture, tune
        sync(self.device)
        t0 = time.perf_counter()
        eng.prefill(ids)
        sync(self.device)
        t_pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = eng.generate(ids, max_new_tokens=n_out, eos_token_id=[])
        sync(self.device)
        total = time.perf_counter() - t0
        assert out.shape[1] == n_prompt + n_out
        eng.release()
        return {"prompt_tokens": n_prompt, "out_tokens": n_out, "prefill_s": t_pre, "total_s": total,
                "tokens_per_s": n_out / total}

    def table2_vision(self, image, question: str, max_tiles: int, n_out: int, repeats: int = 3) -> dict:
        """Table 2 through the image pipeline and the model's vision front (`bench.table2`)."""
        make = prompt_maker(self.config, self.device, image, question, max_tiles)
        steps = OursVisionSteps(self.model, self.engine, n_out)
        return measure_vision_table2(self.device, make, steps, n_out, repeats)

    def set_kernels(self, kernels: str) -> None:
        self.engine.release()
        self.engine.kernels = resolve_kernels(kernels, self.device)
        self.engine._warm = False

    def free(self) -> None:
        if self.engine is not None:
            self.engine.release()
        self.model = self.engine = None
        cleanup(self.device, collect=True)


class HFRunner:
    """transformers LlamaForCausalLM (SDPA, default DynamicCache), driven like `generate` drives it."""

    impl = "transformers"

    def __init__(self, name: str, dims: dict, device, dtype, vision: dict | None = None):
        self.name, self.dims, self.device, self.dtype = name, dims, torch.device(device), dtype
        self.model = self.front = None
        self.variant, self.vision = "teacher", vision

    @property
    def has_vision(self) -> bool:
        return self.front is not None

    @property
    def vocab(self) -> int:
        return self.dims["vocab_size"]

    def build(self) -> dict:
        import transformers

        self.model = build_hf_llama(self.dims, self.device, self.dtype)
        if self.vision is not None:
            self.config = make_config(self.dims, "teacher", vision=self.vision)
            self.front = build_vision_front(self.config, self.device, self.dtype)
        return {"impl": self.impl, "variant": "teacher", "params": param_count(self.model),
                "attention_layers": list(range(self.dims["num_hidden_layers"])), "kernels": "transformers",
                "attn_implementation": self.model.config._attn_implementation,
                "transformers": transformers.__version__, "cuda_graph": False}

    def weight_bytes(self, batch: int) -> int:
        m = self.model
        return decode_weight_bytes(m, m.get_input_embeddings().weight, batch, m.get_output_embeddings().weight)

    def state_bytes(self, ctx: int, batch: int) -> int:
        d = self.dims
        es = torch.empty((), dtype=self.dtype).element_size()
        return d["num_hidden_layers"] * 2 * batch * d["num_key_value_heads"] * ctx * d["head_dim"] * es

    def warm(self, lengths: list[int]) -> None:
        for n in sorted(set(lengths))[:2]:
            self.model(input_ids=_rand_ids(self.vocab, 1, n, self.device), use_cache=True, logits_to_keep=1)
        sync(self.device)

    def _cache_kw(self) -> str:
        """transformers >= 5.2x names the cache argument `cache`, earlier 5.x `past_key_values`."""
        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @staticmethod
    def _out_cache(out):
        c = getattr(out, "cache", None)
        return c if c is not None else out.past_key_values

    def _random_cache(self, ctx: int, batch: int):
        from transformers import DynamicCache

        d = self.dims
        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:
            cache = DynamicCache()
        for i in range(d["num_hidden_layers"]):
            shape = (batch, d["num_key_value_heads"], ctx, d["head_dim"])
            k = torch.randn(shape, device=self.device, dtype=self.dtype)
            v = torch.randn(shape, device=self.device, dtype=self.dtype)
            cache.update(k, v, i)
            del k, v
        return cache

    @torch.no_grad()
    def run_point(self, ctx: int, batch: int, steps: int, warmup: int, prefill: bool, seed: int = 0):
        m = self.model
        cleanup(self.device, collect=True)
        reset_peak(self.device)
        pre = None
        if prefill:
            ids = _rand_ids(self.vocab, batch, ctx, self.device, seed)
            sync(self.device)
            t0 = time.perf_counter()
            out = m(input_ids=ids, use_cache=True, logits_to_keep=1)
            sync(self.device)
            dt = time.perf_counter() - t0
            pre = {"seconds": dt, "tokens_per_s": batch * ctx / dt, "peak_gb": peak_gb(self.device)}
            cache, tok = self._out_cache(out), out.logits[:, -1].argmax(-1)
            del out, ids
        else:
            cache = self._random_cache(ctx, batch)
            tok = _rand_ids(self.vocab, batch, 1, self.device, seed)[:, 0]
        reset_peak(self.device)
        state = {"tok": tok}

        kw = self._cache_kw()

        def step():
            o = m(input_ids=state["tok"][:, None], use_cache=True, **{kw: cache})
            state["tok"] = o.logits[:, -1].argmax(-1)

        _event_times(self.device, step, warmup)
        times = _event_times(self.device, step, steps)
        dec = summarize(times)
        dec.update(peak_gb=peak_gb(self.device), filled="prefill" if prefill else "random", kernels="transformers",
                   cuda_graph=False)
        state.clear()
        return pre, dec

    @torch.no_grad()
    def table2(self, n_prompt: int, n_out: int, seed: int = 0) -> dict:
        m = self.model
        ids = _rand_ids(self.vocab, 1, n_prompt, self.device, seed)
        kw = dict(max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False, pad_token_id=0)
        m.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        sync(self.device)
        t0 = time.perf_counter()
        m(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync(self.device)
        t_pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = m.generate(ids, **kw)
        sync(self.device)
        total = time.perf_counter() - t0
        return {"prompt_tokens": n_prompt, "out_tokens": int(out.shape[1] - n_prompt), "prefill_s": t_pre,
                "total_s": total, "tokens_per_s": (out.shape[1] - n_prompt) / total}

    def table2_vision(self, image, question: str, max_tiles: int, n_out: int, repeats: int = 3) -> dict:
        """Table 2 with our vision front feeding transformers' decoder through `inputs_embeds`."""
        make = prompt_maker(self.config, self.device, image, question, max_tiles)
        steps = HFVisionSteps(self.model, self.front, self.config.img_context_token_id, self._cache_kw(),
                              self._out_cache)
        rec = measure_vision_table2(self.device, make, steps, n_out, repeats)
        return {**rec, "note": "vision front: ours (transformers has no HoVLE class); decoder: transformers"}

    def free(self) -> None:
        self.model = self.front = None
        cleanup(self.device, collect=True)


class MambaSSMRunner:
    """mamba_ssm's MambaLMHeadModel (pure Mamba-2 + MLP) with a CUDA-graph decode step, like its `decode(cg=True)`."""

    impl = "mamba_ssm"

    def __init__(self, name: str, dims: dict, device, dtype):
        self.name, self.dims, self.device, self.dtype = name, dims, torch.device(device), dtype
        self.model = None
        self.variant = "linear"

    @property
    def vocab(self) -> int:
        return self.dims["vocab_size"]

    def build(self) -> dict:
        import mamba_ssm

        self.model = build_mamba_ssm(self.dims, self.device, self.dtype)
        try:  # without it mamba_ssm falls back to torch ops for the conv (more kernels per decode step)
            import causal_conv1d  # noqa: F401

            conv = "causal_conv1d CUDA"
        except Exception:
            conv = "torch fallback, causal_conv1d not installed"
        return {"impl": self.impl, "variant": "linear", "params": param_count(self.model), "attention_layers": [],
                "kernels": f"mamba_ssm (Triton SSD + selective_state_update; conv: {conv})", "cuda_graph": True,
                "mamba_ssm": getattr(mamba_ssm, "__version__", "?")}

    def weight_bytes(self, batch: int) -> int:
        m = self.model
        emb = m.backbone.embedding.weight
        return decode_weight_bytes(m, emb, batch, m.lm_head.weight)

    def _params(self, max_seqlen: int, batch: int):
        try:
            from mamba_ssm.utils.generation import InferenceParams
        except Exception:  # pragma: no cover
            from dataclasses import dataclass, field

            @dataclass
            class InferenceParams:  # same fields as mamba_ssm's
                max_seqlen: int
                max_batch_size: int
                seqlen_offset: int = 0
                batch_size_offset: int = 0
                key_value_memory_dict: dict = field(default_factory=dict)
                lengths_per_sample: torch.Tensor | None = None
        return InferenceParams(max_seqlen=max_seqlen, max_batch_size=batch)

    def state_bytes(self, ctx: int, batch: int) -> int:
        cache = self.model.allocate_inference_cache(batch, 16, dtype=self.dtype)
        n = sum(t.nbytes for pair in cache.values() for t in pair)
        del cache
        return n

    def warm(self, lengths: list[int]) -> None:
        for n in sorted(set(lengths))[:2]:
            p = self._params(n + 1, 1)
            self.model(_rand_ids(self.vocab, 1, n, self.device), inference_params=p, num_last_tokens=1)
        sync(self.device)

    @torch.no_grad()
    def run_point(self, ctx: int, batch: int, steps: int, warmup: int, prefill: bool, seed: int = 0):
        m = self.model
        cleanup(self.device)
        reset_peak(self.device)
        params = self._params(ctx + warmup + steps + 4, batch)
        pre = None
        if prefill:
            ids = _rand_ids(self.vocab, batch, ctx, self.device, seed)
            sync(self.device)
            t0 = time.perf_counter()
            out = m(ids, inference_params=params, num_last_tokens=1)
            sync(self.device)
            dt = time.perf_counter() - t0
            pre = {"seconds": dt, "tokens_per_s": batch * ctx / dt, "peak_gb": peak_gb(self.device)}
            tok = out.logits[:, -1].argmax(-1)
            del out, ids
        else:
            params.key_value_memory_dict = m.allocate_inference_cache(batch, params.max_seqlen, dtype=self.dtype)
            for pair in params.key_value_memory_dict.values():
                for t in pair:
                    t.normal_(0.0, 0.02)
            tok = _rand_ids(self.vocab, batch, 1, self.device, seed)[:, 0]
        params.seqlen_offset = ctx
        if params.lengths_per_sample is None:
            params.lengths_per_sample = torch.full((batch,), ctx, dtype=torch.int32, device=self.device)
        ids_buf = tok[:, None].clone()
        pos_buf = torch.full((batch, 1), ctx, dtype=torch.long, device=self.device)

        def fwd():
            logits = m(ids_buf, position_ids=pos_buf, inference_params=params, num_last_tokens=1).logits
            ids_buf.copy_(logits[:, -1].argmax(-1, keepdim=True))

        reset_peak(self.device)
        if self.device.type == "cuda":
            graph = CapturedStep(fwd, warmup=2)
            run = graph.replay
        else:
            run = fwd
        _event_times(self.device, run, warmup)
        times = _event_times(self.device, run, steps)
        dec = summarize(times)
        dec.update(peak_gb=peak_gb(self.device), filled="prefill" if prefill else "random", kernels="mamba_ssm",
                   cuda_graph=self.device.type == "cuda")
        return pre, dec

    @torch.no_grad()
    def table2(self, n_prompt: int, n_out: int, seed: int = 0) -> dict:
        from mamba_ssm.utils.generation import decode

        m = self.model
        ids = _rand_ids(self.vocab, 1, n_prompt, self.device, seed)
        cg = self.device.type == "cuda"
        decode(ids, m, n_prompt + n_out, top_k=1, cg=cg)  # warm-up (captures the graph)
        sync(self.device)
        t0 = time.perf_counter()
        m(ids, inference_params=self._params(n_prompt + 1, 1), num_last_tokens=1)
        sync(self.device)
        t_pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = decode(ids, m, n_prompt + n_out, top_k=1, cg=cg)
        sync(self.device)
        total = time.perf_counter() - t0
        n = int(out.sequences.shape[1] - n_prompt)
        return {"prompt_tokens": n_prompt, "out_tokens": n, "prefill_s": t_pre, "total_s": total,
                "tokens_per_s": n / total}

    def free(self) -> None:
        self.model = None
        cleanup(self.device, collect=True)
