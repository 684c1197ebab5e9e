"""Which layers stay softmax attention in a hybrid (METHOD.md §4): the placement specs that need no data.

"auto:N" is chosen from data after stage 2: `mmmamba.distill.sensitivity.resolve_placement`.
"""

from __future__ import annotations


def parse_placement(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """Attention-layer indices from a placement spec.

    "every:K" / "head-interleaved:K": first layer of each block of K (paper default K = 4)
    "tail-interleaved:K": last layer of each block of K (a shorter last block too, so both interleavings keep
        the same count: 30 layers, K = 4 -> 3, 7, ..., 27, 29 as head-interleaved gives 0, 4, ..., 28)
    "head-stacked:N" / "tail-stacked:N": the first / last N layers
    "0,4,8" or a list: explicit indices; "none" or None: no attention (mmMamba-linear).
    "auto:N" needs models and held-out data: see `mmmamba.distill.sensitivity.resolve_placement`.
    """
    if auto_count(spec) is not None:
        raise ValueError(
            f"placement {spec!r} is chosen from data after stage 2: call "
            "mmmamba.distill.sensitivity.resolve_placement(spec, num_layers, student=..., teacher=..., batches=...) "
            "or mmmamba.distill.sensitivity.auto_placement(student, teacher, batches, n)"
        )
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "linear")):
        return []
    if isinstance(spec, (list, tuple)):
        layers = [int(i) for i in spec]
    elif ":" in spec:
        kind, _, arg = spec.partition(":")
        kind = kind.strip().lower()
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"placement {spec!r}: {arg!r} is not an integer") from None
        if k <= 0:
            raise ValueError(f"placement {spec!r}: the number must be positive")
        if kind in ("every", "head-interleaved"):
            layers = list(range(0, num_layers, k))
        elif kind == "tail-interleaved":
            layers = list(range(k - 1, num_layers, k)) + ([num_layers - 1] if num_layers % k else [])
        elif kind == "head-stacked":
            layers = list(range(min(k, num_layers)))
        elif kind == "tail-stacked":
            layers = list(range(max(0, num_layers - k), num_layers))
        else:
            raise ValueError(
                f"placement kind {kind!r} unknown; use every:K, head-interleaved:K, tail-interleaved:K, "
                "head-stacked:N, tail-stacked:N, auto:N or a comma-separated list"
            )
    else:
        try:
            layers = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"placement {spec!r} is not a list of layer indices like '0,4,8'") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"attention layers {bad} out of range for a {num_layers}-layer model")
    return sorted(set(layers))


def layer_types_for(attention_layers: list[int], num_layers: int) -> list[str]:
    keep = set(attention_layers)
    return ["attention" if i in keep else "mamba2" for i in range(num_layers)]


def auto_count(spec) -> int | None:
    """N for an "auto:N" spec, else None."""
    if not isinstance(spec, str):
        return None
    kind, sep, arg = spec.partition(":")
    if not sep or kind.strip().lower() != "auto":
        return None
    try:
        n = int(arg)
    except ValueError:
        raise ValueError(f"placement {spec!r}: {arg!r} is not an integer") from None
    if n < 0:
        raise ValueError(f"placement {spec!r}: the number must be >= 0")
    return n
