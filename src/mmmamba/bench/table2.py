"""The paper's Table 2 with the real vision front: an image through the image pipeline (`vision_prompt`), the vision
front (patch embedding + position table -> pixel shuffle -> MLP; its tokens replace the `<IMG_CONTEXT>` slots),
then the 32 decoder layers (the first 8 are HoVLE's holistic-embedding layers) prefill and greedy decode.

Reported per model (after one untimed warm-up request):
* preprocess_s, vision_s, prefill_s: each stage on its own (median of `repeats`); prefill_s runs the decoder over
  the same ids with the image slots left as text embeddings (the same work minus the vision front);
* ttft_s: image preprocessing + vision front + prefill + first greedy token, end to end (median of `repeats`);
* decode_tokens_per_s: the next out - 1 greedy tokens after that first one (transformers: the next 64);
* total_s and tokens_per_s = out / total_s: one whole request through `generate` (the paper's "speed");
* peak_gb: peak GPU memory over the timed requests (None on CPU).
"""

from __future__ import annotations

import statistics
import time

import torch

from .measure import peak_gb, reset_peak, sync


def _timed(device, fn, repeats: int) -> float:
    """Median wall time (s) of `repeats` calls of fn, synchronised."""
    ts = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.no_grad()
def measure_vision_table2(device, make_prompt, steps, n_out: int, repeats: int = 3) -> dict:
    """Table 2 record for one model; `steps` is its adapter (`OursVisionSteps` / `HFVisionSteps`)."""
    p = make_prompt()
    steps.warm(p, n_out)  # compile, tune, capture
    rec = {"vision": "real", "tiles": p.tiles, "visual_tokens": p.visual_tokens,
           "vision_tokens_out": steps.vision(p).shape[:2].numel(), "text_tokens": p.text_tokens,
           "prompt_tokens": p.input_ids.shape[1]}
    rec["vision_s"] = _timed(device, lambda: steps.vision(p), repeats)
    rec["prefill_s"] = _timed(device, lambda: steps.prefill_text(p), repeats)
    reset_peak(device)
    tok = _ttft(device, make_prompt, steps, repeats, rec)
    n_dec = min(n_out - 1, steps.decode_cap)
    rec["decode_tokens"] = n_dec
    rec["decode_tokens_per_s"] = n_dec / _timed(device, lambda: steps.decode(tok, n_dec), 1) if n_dec else None
    sync(device)
    t0 = time.perf_counter()
    n = steps.generate(make_prompt(), n_out)
    sync(device)
    rec["total_s"] = time.perf_counter() - t0
    rec["out_tokens"], rec["tokens_per_s"] = n, n / rec["total_s"]
    rec["peak_gb"] = peak_gb(device)
    steps.release()
    return rec


def _ttft(device, make_prompt, steps, repeats: int, rec: dict) -> torch.Tensor:
    """Median time from the image to the first greedy token (and of its preprocessing) into `rec`; returns the
    first token of the last request (its state stays in the model's cache)."""
    ttft, pre = [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        q = make_prompt()
        tok = steps.first_token(q)
        sync(device)
        ttft.append(time.perf_counter() - t0)
        pre.append(q.preprocess_s)
    rec["ttft_s"], rec["preprocess_s"] = statistics.median(ttft), statistics.median(pre)
    return tok


class OursVisionSteps:
    """Our model through `Engine`: the vision front runs inside `Engine.prefill(ids, pixel_values=...)`."""

    decode_cap = 1 << 30  # decode rate over all out - 1 tokens

    def __init__(self, model, engine, n_out: int):
        self.model, self.engine, self.n_out = model, engine, n_out

    def warm(self, p, n_out: int) -> None:
        self.generate(p, n_out)  # the whole request: the cache (and its CUDA graph) the timed requests reuse

    def vision(self, p) -> torch.Tensor:
        return self.model.model.vision(p.pixel_values)

    def _reserve(self, p) -> None:
        self.engine.reserve(1, p.input_ids.shape[1] + self.n_out + 8)

    def prefill_text(self, p) -> None:
        self._reserve(p)
        self.engine.prefill(p.input_ids)

    def first_token(self, p) -> torch.Tensor:
        self._reserve(p)
        return self.engine.prefill(p.input_ids, pixel_values=p.pixel_values).argmax(-1)

    def decode(self, tok: torch.Tensor, n: int) -> None:
        self.engine.set_tokens(tok)
        self.engine.decode(n)

    def generate(self, p, n: int) -> int:
        out = self.engine.generate(p.input_ids, pixel_values=p.pixel_values, max_new_tokens=n, eos_token_id=[])
        return int(out.shape[1] - p.input_ids.shape[1])

    def release(self) -> None:
        self.engine.release()


class HFVisionSteps:
    """transformers' LlamaForCausalLM (the 32 decoder layers) fed by a `VisionFront` through `inputs_embeds`:
    transformers has no HoVLE model class, so the vision front is ours and the decoder is theirs. Its decode
    rate is taken over `decode_cap` tokens (an eager step is slow; the rate does not change along 256 tokens)."""

    decode_cap = 64

    def __init__(self, model, front, img_token_id: int, cache_kw: str, out_cache):
        self.model, self.front, self.img_id = model, front, img_token_id
        self.cache_kw, self.out_cache = cache_kw, out_cache
        self.cache = None

    def warm(self, p, n_out: int) -> None:
        self.generate(p, min(n_out, 8))

    def vision(self, p) -> torch.Tensor:
        return self.front(p.pixel_values)

    def embeds(self, p, with_image: bool = True) -> torch.Tensor:
        emb = self.model.get_input_embeddings()(p.input_ids)
        if not with_image:
            return emb
        img = self.vision(p).reshape(-1, emb.shape[-1]).to(emb.dtype)
        return emb.masked_scatter((p.input_ids == self.img_id)[..., None], img)

    def prefill_text(self, p) -> None:
        self.model(inputs_embeds=self.embeds(p, with_image=False), use_cache=True, logits_to_keep=1)

    def first_token(self, p) -> torch.Tensor:
        out = self.model(inputs_embeds=self.embeds(p), use_cache=True, logits_to_keep=1)
        self.cache = self.out_cache(out)
        return out.logits[:, -1].argmax(-1)

    def decode(self, tok: torch.Tensor, n: int) -> None:
        for _ in range(n):
            out = self.model(input_ids=tok[:, None], use_cache=True, **{self.cache_kw: self.cache})
            tok = out.logits[:, -1].argmax(-1)

    def generate(self, p, n: int) -> int:
        out = self.model.generate(inputs_embeds=self.embeds(p), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0)
        return int(out.shape[1])  # from inputs_embeds alone, generate returns only the new tokens

    def release(self) -> None:
        self.cache = None
