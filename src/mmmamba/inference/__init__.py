"""Fast serving: the engine (chunked prefill, static cache, fused projections, CUDA-graph decode). The reference
generation loop it matches is `mmmamba.models.generate`."""
