"""The distillation loop on `accelerate`: one process (CPU or GPU), DDP or FSDP over several GPUs
(`accelerate launch -m mmmamba.cli distill RECIPE.yaml`).

Per stage k the run writes, under the recipe's output_dir:

    stage{k}/                 final HF folder: config + safetensors + tokenizer + mmmamba_manifest.json,
                              metrics.jsonl and loss.png (written atomically when the stage ends)
    stage{k}-checkpoints/step-NNNNNNNN/   HF folder + trainer/ (optimizer.pt, scheduler.json, state.json,
                              rng_{rank}.json / .safetensors): everything needed to continue exactly
    logs/stage{k}.jsonl, logs/stage{k}_loss.png
    seed/                     the seeded student (when stage 1 seeds it from the teacher)

Nothing is unpickled: optimizer state is read with torch.load(weights_only=True), RNG states are JSON +
safetensors, the rest JSON. `resume=True` continues from the newest complete checkpoint so that the final
weights are bit-identical to an uninterrupted run (same machine / software; tests/distill/test_trainer.py); a
damaged newest checkpoint is reported and the previous one used, and one made from another teacher or with other
settings (`Recipe.settings`, recorded in every manifest) is refused unless `allow_changed`. SIGINT / SIGTERM save a
checkpoint at the next step boundary (`Interrupted`, exit 130 / 143 in the CLI; a second signal aborts at once). A
nan / inf loss or gradient norm stops before that update (`NonFiniteError`), so no checkpoint ever holds its weights.

Data across processes: the micro-batches form one global sequence over epochs; process r of n takes every n-th
(`DataStream`), so a run with n processes and accumulation k takes the same samples per optimizer step as one
process with accumulation n * k (same global batch): their loss curves match (bit-identical on CPU / gloo,
tests/distill/test_trainer.py::test_two_processes_match_one_process_with_accumulation).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..io import atomic_dir, atomic_write_text, json_text, load_model
from ..models import MAMBA2
from .compile import compile_layers, compile_mixers
from .manifest import (
    ChainError,
    chain_after,
    check_input,
    make_manifest,
    read_manifest,
    teacher_identity,
    write_manifest,
)
from .recipe import Recipe, StageConfig, settings_diff, settings_sha256
from .stages import (
    EndToEndDistill,
    LayerwiseDistill,
    apply_placement,
    check_shared_weights,
    enable_checkpointing,
    set_trainable,
)

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")


class StopTraining(Exception):
    """Raised by `stop_after` (tests: simulate an interruption)."""


class Interrupted(Exception):
    """SIGINT / SIGTERM during a stage: a checkpoint (or the finished stage) was saved at the step boundary, and
    `--resume` continues exactly. `exit_code`: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int, saved: Path, step: int):
        self.signum, self.saved, self.step, self.exit_code = signum, saved, step, 128 + signum
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step}; saved {saved}")


class Aborted(KeyboardInterrupt):
    """A second SIGINT / SIGTERM: stop at once, without saving."""

    def __init__(self, signum: int):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(f"{signal.Signals(signum).name} again: aborted without saving")


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became nan / inf: the run stopped before that update."""


# --------------------------------------------------------------------------------------------- optimisation
def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norm weights, A_log and dt_bias get no weight decay (METHOD.md §3.0)."""
    last = name.rsplit(".", 1)[-1]
    return name.endswith(".bias") or last in ("A_log", "dt_bias") or "norm" in name or p.ndim < 2


def no_decay_ids(module: nn.Module) -> set[int]:
    """ids of the parameters that get no weight decay, decided on the unwrapped module: FSDP keeps the parameter
    objects but shows them flattened (1-D shards), which would put every weight matrix among the `p.ndim < 2`."""
    return {id(p) for name, p in module.named_parameters() if no_weight_decay(name, p)}


def build_optimizer(module: nn.Module, cfg: StageConfig, fused: bool | None = None,
                    no_decay: set[int] | None = None) -> torch.optim.AdamW:
    """AdamW, weight decay on all but `no_decay` (ids from `no_decay_ids` before wrapping; None: decided here)."""
    no_decay = no_decay_ids(module) if no_decay is None else no_decay
    decay, plain = [], []
    for p in module.parameters():
        if p.requires_grad:
            (plain if id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kw)


def wsd_steps(cfg: StageConfig) -> tuple[int, int, int]:
    """(warmup, stable, decay) optimizer steps; warmup / decay < 1 are fractions of `steps`."""
    total = cfg.steps
    warm = int(round(cfg.warmup * total)) if cfg.warmup < 1 else int(cfg.warmup)
    dec = int(round(cfg.decay * total)) if cfg.decay < 1 else int(cfg.decay)
    if warm + dec > total:
        raise ValueError(f"stage {cfg.stage}: warmup {warm} + decay {dec} steps exceed the {total} steps")
    return warm, total - warm - dec, dec


def _wsd_lambda(step, warm, stable, dec, decay_type, min_lr_ratio):
    if step < warm:
        return step / max(1, warm)
    if step < warm + stable:
        return 1.0
    if step < warm + stable + dec:
        x = (step - warm - stable) / max(1, dec)
        if decay_type == "linear":
            f = 1.0 - x
        elif decay_type == "1-sqrt":
            f = 1.0 - math.sqrt(x)
        else:
            f = 0.5 * (1.0 + math.cos(math.pi * x))
        return min_lr_ratio + (1.0 - min_lr_ratio) * f
    return min_lr_ratio


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: StageConfig):
    """Warmup-stable-decay (10 % / 80 % / 10 % by default): transformers.get_wsd_schedule when present."""
    warm, stable, dec = wsd_steps(cfg)
    try:
        from transformers import get_wsd_schedule

        return get_wsd_schedule(optimizer, num_warmup_steps=warm, num_decay_steps=dec, num_stable_steps=stable,
                                decay_type=cfg.decay_type, min_lr_ratio=cfg.min_lr_ratio)
    except (ImportError, TypeError):
        from functools import partial

        fn = partial(_wsd_lambda, warm=warm, stable=stable, dec=dec, decay_type=cfg.decay_type,
                     min_lr_ratio=cfg.min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# --------------------------------------------------------------------------------------------- RNG state
def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of this process's RNG states."""
    py = random.getstate()
    npst = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    return js, tensors


def set_rng_state(js: dict, tensors: dict[str, torch.Tensor]) -> None:
    v, state, gauss = js["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])


# --------------------------------------------------------------------------------------------- data
def _set_epoch(obj, epoch: int) -> None:
    """set_epoch on a batch sampler and the sampler under it (a torch DataLoader's own epoch is not used)."""
    for o in (obj, getattr(obj, "sampler", None)):
        if o is not None and hasattr(o, "set_epoch"):
            o.set_epoch(epoch)


def _indexable(loader) -> bool:
    return isinstance(loader, torch.utils.data.DataLoader) and not isinstance(
        loader.dataset, torch.utils.data.IterableDataset)


class _EpochIndex:
    """The batches of a map-style torch DataLoader as one global sequence over epochs: epoch e is its batch
    sampler's (or, without auto-batching, its sampler's) output after set_epoch(e), drawn under a torch RNG seeded
    with (seed, e) so that a sampler drawing from the global RNG (RandomSampler) is a function of (seed, e) too.
    Only indices are produced here; nothing is loaded."""

    def __init__(self, loader, seed: int):
        self.sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
        self.seed = seed
        self.lengths: dict[int, int] = {}
        self._cache: dict[int, list] = {}

    def epoch(self, e: int) -> list:
        if e not in self._cache:
            _set_epoch(self.sampler, e)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + e)
                items = list(self.sampler)
            if not items:
                raise ValueError(f"the data loader yields no batch in epoch {e}")
            self.lengths[e] = len(items)
            self._cache = {k: v for k, v in self._cache.items() if k >= e - 1}  # the current and previous epoch
            self._cache[e] = items
        return self._cache[e]

    def length(self, e: int) -> int:
        if e not in self.lengths:
            self.epoch(e)
        return self.lengths[e]

    def locate(self, g: int) -> tuple[int, int]:
        """(epoch, index in that epoch) of global batch g."""
        e = 0
        while g >= self.length(e):
            g -= self.length(e)
            e += 1
        return e, g


class _RankBatches(torch.utils.data.Sampler):
    """Endless batch sampler of one process: global batches start + rank, start + rank + n, ... (their index lists)."""

    def __init__(self, index: _EpochIndex, start: int, rank: int, n_proc: int):
        self.index, self.start, self.rank, self.n = index, start, rank, n_proc

    def __iter__(self):
        g = self.start + self.rank
        e, p = self.index.locate(g)
        while True:
            yield self.index.epoch(e)[p]
            p += self.n
            while p >= self.index.length(e):
                p -= self.index.length(e)
                e += 1


class DataStream:
    """Endless stream of micro-batches with a resumable position that does not depend on the process count.

    The data form one global sequence of micro-batches running across epochs (epoch e: set_epoch(e), then its
    batches; then epoch e + 1, ...). Process r of n takes the global batches g with g % n == r, in order, so with
    accumulation k per process an optimizer step consumes global batches [s * k * n, (s + 1) * k * n) whatever n
    is: 1 process with accumulation k * n and n processes with accumulation k see the same samples per step, also
    across epoch boundaries (a partial last batch of an epoch is just one more batch of the sequence).

    * A map-style torch DataLoader is not prepared by accelerate: each process walks its batch sampler's index
      lists and loads and collates only its own batches (dataset[i] + collate_fn), through a DataLoader over the
      same dataset / collate_fn / num_workers / pin_memory whose batch sampler yields just those index lists (the
      workers, if any, load only this process's batches; a sampler is iterated in the main process). Resuming
      advances the sampler (index lists only; nothing is loaded or collated).
    * Any other iterable of batch dicts (a list, an IterableDataset loader, ...) is re-iterated each epoch; every
      process iterates all of it and keeps its own share; skipping consumes batches.

    Batches are moved to the accelerator's device here. The position is the global counter of consumed batches
    (`state()["global_batch"]`, all processes together); "epoch" / "batch_in_epoch" say where the last consumed
    batch lies (informational, and the resume position of checkpoints from before the global counter)."""

    def __init__(self, source, accelerator, seed: int):
        self.source, self.acc, self.seed = source, accelerator, seed
        self.n, self.rank = max(1, accelerator.num_processes), accelerator.process_index
        self.indexed = _indexable(source)
        self.index = _EpochIndex(source, seed) if self.indexed else None
        self._start = 0  # the global batch start() positioned the stream at
        self._mine = 0  # batches this process took since start()
        self._it = None
        self._walk = None  # plain iterables: [epoch, index in epoch, global index, iterator]
        self._last = (0, 0)

    @property
    def consumed(self) -> int:
        """Global batches consumed by all processes together (exact between optimizer steps, when every process
        has taken as many batches as the others)."""
        return self._start + self._mine * self.n

    @property
    def epoch(self) -> int:
        return self.state()["epoch"]

    def state(self) -> dict:
        g = self.consumed
        if g == 0:
            e, p = 0, 0
        elif self.indexed:
            e, p = self.index.locate(g - 1)
            p += 1
        else:
            self._advance(g)  # never past this process's next batch (>= g)
            e, p = self._last
        return {"epoch": e, "batch_in_epoch": p, "global_batch": g}

    def start(self, epoch: int = 0, skip: int = 0, global_batch: int | None = None) -> None:
        """Position the stream at global batch `global_batch` (from `state()`), or, for older checkpoints, after
        `skip` batches of `epoch`."""
        if global_batch is None:
            global_batch = self._global_of(epoch, skip)
        self._start, self._mine = int(global_batch), 0
        if self.indexed:
            src = self.source
            sampler = _RankBatches(self.index, self.consumed, self.rank, self.n)
            if src.batch_sampler is not None:
                kw = dict(batch_sampler=sampler)
            else:
                kw = dict(sampler=sampler, batch_size=None)
            extra = dict(prefetch_factor=src.prefetch_factor, persistent_workers=False) if src.num_workers else {}
            loader = torch.utils.data.DataLoader(
                src.dataset, collate_fn=src.collate_fn, num_workers=src.num_workers, pin_memory=src.pin_memory,
                timeout=src.timeout, worker_init_fn=src.worker_init_fn,
                multiprocessing_context=src.multiprocessing_context, **kw, **extra)
            with torch.random.fork_rng(devices=[]):  # the loader's base seed for workers: a function of (seed, g)
                torch.manual_seed(self.seed * 1_000_003 + self.consumed)
                self._it = iter(loader)
        else:
            self._walk = None
            self._last = (0, 0)
            self._advance(self.consumed)

    def _global_of(self, epoch: int, skip: int) -> int:
        if self.indexed:
            return sum(self.index.length(e) for e in range(epoch)) + skip
        g = 0
        for e in range(epoch):
            g += sum(1 for _ in self._epoch_iter(e))
        return g + skip

    # -- plain iterables
    def _epoch_iter(self, e: int):
        with torch.random.fork_rng(devices=[]):  # a source drawing from the global RNG gets a (seed, epoch) stream
            torch.manual_seed(self.seed * 1_000_003 + e)
            return iter(self.source)

    def _pull(self):
        """The next batch of the global sequence: (global index, batch)."""
        if self._walk is None:
            self._walk = [0, 0, 0, self._epoch_iter(0)]
        w = self._walk
        b = next(w[3], None)
        if b is None:
            if w[1] == 0:
                raise ValueError(f"the data yielded no batch in epoch {w[0]} (empty, or a one-shot iterator that "
                                 "is exhausted; pass a re-iterable such as a list or a DataLoader)")
            w[0], w[1], w[3] = w[0] + 1, 0, self._epoch_iter(w[0] + 1)
            b = next(w[3], None)
            if b is None:
                raise ValueError(f"the data yielded no batch in epoch {w[0]} (empty, or a one-shot iterator that "
                                 "is exhausted; pass a re-iterable such as a list or a DataLoader)")
        g = w[2]
        w[1] += 1
        w[2] += 1
        self._last = (w[0], w[1])
        return g, b

    def _advance(self, g: int) -> None:
        """Walk (without keeping them) the global batches before g."""
        while (self._walk[2] if self._walk is not None else 0) < g:
            self._pull()

    # -- consuming
    def next(self) -> dict:
        if self._it is None and self._walk is None:
            self.start(0)
        want = self._start + self.rank + self._mine * self.n
        if self.indexed:
            b = next(self._it)
        else:
            self._advance(want)
            g, b = self._pull()
            assert g == want
        self._mine += 1
        return self._to_device(b)

    def _to_device(self, batch: dict) -> dict:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError(f"a batch must be a dict with input_ids (and attention_mask, labels), got {type(batch)}")
        dev = self.acc.device
        am = batch.get("attention_mask")
        if torch.is_tensor(am) and am.device.type == "cpu" and bool(am.all()):
            # no padding: the mask changes nothing, and without it the step needs no host sync (CUDA graphs)
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items() if k in BATCH_KEYS}


# --------------------------------------------------------------------------------------------- logging
def plot_loss(jsonl: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    for line in jsonl.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(steps, losses, lw=1.2)
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)


def _truncate_jsonl(path: Path, max_step: int) -> None:
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


# --------------------------------------------------------------------------------------------- the run
def _load_tokenizer(path):
    """The teacher's tokenizer (saved with each stage's model); None only for a folder without tokenizer files."""
    from ..models.tokenizer import load_tokenizer

    return load_tokenizer(path, required=False)


def _precision(recipe: Recipe) -> str:
    p = recipe.precision
    if p == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return "no" if p in ("fp32", "no") else p


def _teacher_dtype(recipe: Recipe, precision: str) -> torch.dtype:
    t = recipe.teacher_dtype
    if t == "auto":
        t = "bf16" if precision == "bf16" else "fp32"
    if t == "bf16" and precision != "bf16":
        raise ValueError("teacher_dtype bf16 needs precision bf16 (autocast); use teacher_dtype fp32 or auto")
    return torch.bfloat16 if t == "bf16" else torch.float32


_CPU_RATE: list[float] = []


def cpu_matmul_rate(n: int = 512, repeat: int = 5) -> float:
    """FLOP/s of an fp32 n x n matmul on this CPU (best of `repeat`; measured once per process)."""
    if not _CPU_RATE:
        a = torch.randn(n, n)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        _CPU_RATE.append(2 * n**3 / max(best, 1e-9))
    return _CPU_RATE[0]


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.1f} s"


def check_placement(spec, num_layers: int, source: str | None = None) -> None:
    """Raise ValueError before the first step when the recipe's placement does not fit the teacher's layers
    (an index out of range, more stacked or auto-chosen layers than it has), instead of at stage 3."""
    from ..models.placement import auto_count, parse_placement

    where = f"{source or 'recipe'}: placement {spec!r}"
    n = auto_count(spec)
    kind, _, arg = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    count = n if n is not None else (int(arg) if kind.strip().lower() in ("head-stacked", "tail-stacked")
                                     and arg.strip().isdigit() else None)
    if count is not None and count > num_layers:
        raise ValueError(f"{where} asks for {count} attention layers; the teacher has {num_layers}")
    if n is None:
        try:
            parse_placement(spec, num_layers)
        except ValueError as e:
            raise ValueError(f"{where}: {e} (the teacher has layers 0-{num_layers - 1})") from None


def latest_checkpoint(folder: Path, log: Callable | None = None) -> Path | None:
    """The newest checkpoint in `folder` whose files are intact (given `log`: checked, and each damaged newer
    one reported and passed over), or None."""
    if not folder.is_dir():
        return None
    done = sorted((p for p in folder.glob("step-*") if (p / "trainer" / "state.json").exists()), reverse=True)
    if log is None:
        return done[0] if done else None
    for i, p in enumerate(done):
        problem = checkpoint_problem(p)
        if problem is None:
            return p
        after = f"using the previous one, {done[i + 1].name}" if i + 1 < len(done) else "no older one is left"
        log(f"warning: checkpoint {p} is damaged ({problem}); {after}")
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why checkpoint `ckpt` cannot be resumed from (a missing, truncated or corrupt file), or None."""
    import zipfile

    from ..io import check_model_folder

    try:
        check_model_folder(ckpt)
        t = ckpt / "trainer"
        rng = sorted(t.glob("rng_*.json"))
        if not rng:
            return f"{t} has no RNG state (rng_0.json)"
        for f in [t / "state.json", t / "scheduler.json", *rng]:
            json.loads(f.read_text())
        read_manifest(ckpt)
        with zipfile.ZipFile(t / "optimizer.pt") as z:  # torch.save writes a zip archive: check every CRC
            bad = z.testzip()
        if bad is not None:
            return f"{t / 'optimizer.pt'}: {bad} is corrupt"
        from safetensors.torch import load_file

        for f in rng:
            load_file(str(f.with_suffix(".safetensors")))
    except Exception as e:  # any unreadable part: json, zip, safetensors and the model checks raise their own types
        return str(e)
    return None


def remove_stale_temporaries(*folders: Path) -> list[Path]:
    """Clean up after atomic writes (io.atomic_dir) that were interrupted: delete their `.NAME.tmp-*` folders, and
    a `.NAME.old-*` folder where NAME exists again (if NAME is missing, the old folder is its only copy: it is
    renamed back). Returns the paths handled."""
    gone = []
    for f in folders:
        if not f.is_dir():
            continue
        for p in f.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
        for p in f.glob(".*.old-*"):
            name = f / p.name[1:].rsplit(".old-", 1)[0]
            if name.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, name)
            gone.append(p)
    return gone


@dataclass
class Progress:
    """What a checkpoint keeps of the loop (step, tokens, elapsed seconds, the recent losses) and the current
    logging window (sums since the last log record)."""

    keep_recent: int = 1
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    recent: list = field(default_factory=list)
    window: dict = field(default_factory=lambda: {"loss": 0.0, "n": 0, "tokens": 0, "t": 0.0, "extra": {}})
    last: dict = field(default_factory=dict)  # the last log record
    last_rate: float = 0.0  # tokens/s of the last step

    def add(self, loss: float, tokens: int, dt: float, extra: dict) -> None:
        self.tokens += tokens
        self.elapsed += dt
        self.recent = (self.recent + [loss])[-self.keep_recent:]
        self.last_rate = tokens / max(dt, 1e-9)
        w = self.window
        w["loss"], w["n"], w["tokens"], w["t"] = w["loss"] + loss, w["n"] + 1, w["tokens"] + tokens, w["t"] + dt
        for k, v in extra.items():
            w["extra"][k] = w["extra"].get(k, 0.0) + v

    def record(self, lr: float, grad_norm, epoch: int) -> dict:
        """The log record of the window (means over its steps), which then restarts."""
        w = self.window
        rec = {"step": self.step, "loss": w["loss"] / w["n"], "lr": lr,
               "grad_norm": None if grad_norm is None else float(grad_norm), "tokens": self.tokens,
               "tokens_per_s": w["tokens"] / max(w["t"], 1e-9), "elapsed_s": self.elapsed, "epoch": epoch}
        for k, v in w["extra"].items():
            v = v / w["n"]
            rec[k] = v.tolist() if v.dim() else float(v)
        self.last = rec
        self.window = {"loss": 0.0, "n": 0, "tokens": 0, "t": 0.0, "extra": {}}
        return rec

    def state(self, data: dict) -> dict:
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed, "recent_losses": self.recent,
                "data": data}


class StageRunner:
    """One stage of a recipe. `data`: None (build from the recipe with `build_dataloader`), an iterable of batch
    dicts, or a callable (stage_cfg, tokenizer, model_config, micro_batch_size, seed) -> iterable."""

    def __init__(self, recipe: Recipe, stage: int, *, resume: bool = False, data=None, progress: bool = True,
                 stop_after: int | None = None, teacher_spec: str | None = None, allow_changed: bool = False,
                 log: Callable = print):
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, not {stage!r}")
        self.recipe, self.stage, self.cfg = recipe, stage, recipe.stages[stage]
        self.resume, self.data, self.progress, self.stop_after = resume, data, progress, stop_after
        self.out = Path(recipe.output_dir)
        self.final_dir = self.out / f"stage{stage}"
        self.ckpt_dir = self.out / f"stage{stage}-checkpoints"
        self.jsonl = self.out / "logs" / f"stage{stage}.jsonl"
        self.png = self.out / "logs" / f"stage{stage}_loss.png"
        self.teacher_spec = teacher_spec or recipe.teacher
        self._log = log
        self.acc = None
        self.signum = None  # a SIGINT / SIGTERM received during the loop
        self.allow_changed = allow_changed  # resume with settings that differ from the checkpoint's
        self.settings = json.loads(json.dumps(recipe.settings(stage), default=str))  # as a manifest holds them
        self._tid = None
        self.changed: list[str] = []  # settings that differ from the resumed checkpoint's (allow_changed)

    # -- helpers ----------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.acc is None or self.acc.is_main_process:
            self._log(msg)

    def _input_dir(self) -> tuple[Path, list[str]]:
        if self.cfg.input:
            path = Path(self.cfg.input)
        elif self.stage == 1:
            path = Path(self.recipe.student) if self.recipe.student else self.out / "seed"
        else:
            path = self.out / f"stage{self.stage - 1}"
        if self.cfg.input_stage is not None:
            expected = [str(self.cfg.input_stage)]
        else:
            expected = ["seed"] if self.stage == 1 else [str(self.stage - 1)]
        return path, expected

    def _choose_kernels(self, student, device, dtype: torch.dtype, stream_dtype: torch.dtype | None = None) -> None:
        """On CUDA, pick (and check, once) the mixer's kernels here, before DDP wraps the module, and say which
        ones train: the SSD backward (`ops.ssd_fla`) and its inputs (`ops.gla_prep`), the fused gated RMSNorm
        (`ops.gated_norm`) and conv + SiLU (`ops.conv_silu`); given `stream_dtype` (stages 1-2), also the per-head
        loss fused into the gated norm and the teacher stream's fused add + RMSNorm (`ops.add_norm`), RoPE
        (`ops.rope`) and SiLU product (`ops.swiglu`); without (stage 3), the RMSNorm and SiLU product the student
        trains through."""
        if device.type != "cuda" or not student.config.mamba_layers:
            return
        from ..layers.mamba2 import set_ssd_backward
        from ..ops import kernel_report, ssd_fla

        # stage 3: the whole student trains through its norms (in its parameters' dtype) and MLPs
        report = kernel_report(student.config, dtype, device, stream_dtype=stream_dtype,
                               norm_dtype=next(student.parameters()).dtype,
                               ssd_backward=os.environ.get("MMMAMBA_SSD_BACKWARD") or None)  # the override's edge
        mode, fused = report["ssd_backward"], report["fused"]
        if mode is not None:
            if self.acc is not None and self.acc.num_processes > 1:  # timed per process: all take the first's
                from accelerate.utils import broadcast_object_list

                mode = broadcast_object_list([mode])[0]
            set_ssd_backward(student, mode)
            self.log(f"SSD: fla-core forward, backward {ssd_fla.MODE_NOTES[mode]}. The first steps tune and compile "
                     "fla's kernels: minutes on a new machine, kept on disk for later runs")
        else:
            self.log("SSD: chunked torch implementation (fla-core not importable)")
        self.log("; ".join(f"{name}: " + ("fused Triton kernels (checked against torch)" if ok else "torch ops")
                           for name, ok in fused.items()))

    def _seed(self, teacher, tid, tokenizer) -> Path:
        """Stage 1 without an explicit student: seed one from the teacher (all layers Mamba-2, PAPER §4.5)."""
        from .seed import save_seed, seed_student

        path = self.out / "seed"
        m = read_manifest(path) if path.is_dir() else None
        # every process has looked before the main one may write: all take the same branch below (a process that
        # looked after the seed appeared would skip the barrier the others wait in, and the run would hang)
        self.acc.wait_for_everyone()
        if m is not None:
            if m.get("init") != self.recipe.init or m.get("seed") != self.recipe.seed:
                raise ChainError(f"{path} was seeded with init={m.get('init')!r}, seed={m.get('seed')!r}; this recipe "
                                 f"asks for init={self.recipe.init!r}, seed={self.recipe.seed!r}: remove the folder")
            return path
        if self.acc.is_main_process:
            student = seed_student(teacher, None, mode=self.recipe.init, seed=self.recipe.seed)
            save_seed(student, path, tid, tokenizer, recipe=self.recipe.to_dict(), init=self.recipe.init,
                      seed=self.recipe.seed)
            self.log(f"seeded student ({self.recipe.init}) -> {path}")
        self.acc.wait_for_everyone()
        return path

    def _build_data(self, tokenizer, model_config, split="train"):
        cfg = self.cfg
        if self.data is not None:
            if callable(self.data):
                return self.data(cfg, tokenizer, model_config, cfg.micro_batch_size, self.recipe.seed)
            return self.data
        from .data import build_dataloader

        self._need_tokenizer(tokenizer)
        data_cfg = {**self.recipe.data, **(cfg.data or {})}
        if cfg.seq_len is not None:
            data_cfg.setdefault("max_length", cfg.seq_len)
        if not data_cfg.get("sources"):
            raise ValueError("the recipe's data section has no sources (e.g. data: {sources: [{type: pydoc}]})")
        return build_dataloader(data_cfg, tokenizer, model_config, cfg.micro_batch_size, self.recipe.seed, split)

    def _need_tokenizer(self, tokenizer) -> None:
        if tokenizer is None:
            raise ValueError(f"teacher folder {self.teacher_path} has no tokenizer (tokenizer.json / "
                             "tokenizer_config.json), which the recipe's data needs: save the teacher's tokenizer "
                             "beside its weights (AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(TEACHER))")

    # -- main -------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Set up, build the student and the stage module, restore a checkpoint when resuming, train, save."""
        self._setup()
        if self._already_complete():
            return self.final_dir
        ckpt = self._checkpoint_to_resume()
        teacher, tid, tokenizer = self._load_teacher()
        student, state, links = self._build_student(ckpt, teacher, tid, tokenizer)
        run = self._build_stage(student, teacher, tokenizer, tid, links)
        prog = self._restore(run, ckpt, state)
        with self._signals_caught():
            self._loop(run, prog)
            return self._finish(run, prog)

    def _setup(self) -> None:
        """The stage's Accelerator (its own precision / FSDP settings) and seed."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs, set_seed

        recipe, cfg, stage = self.recipe, self.cfg, self.stage
        self.precision = _precision(recipe)
        plugin = None
        if recipe.distributed == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if not torch.cuda.is_available():
                raise ValueError("distributed: fsdp needs GPUs (accelerate's FSDP has no CPU backend); use "
                                 "distributed: ddp for several CPU processes")
            if stage == 3:
                plugin = _fsdp_plugin()
            else:  # the layer-wise walk reads sub-modules of each layer directly, which FSDP units do not allow
                self._log(f"stage {stage}: FSDP applies to stage 3 only; stages 1-2 use DDP")
        AcceleratorState._reset_state()  # each stage its own precision / FSDP settings (keeps the process group)
        self.acc = Accelerator(
            cpu=not torch.cuda.is_available(),  # several CPU processes (torchrun) then form a gloo group
            mixed_precision=self.precision,
            # a captured graph must cast the fp32 weights itself on every replay: no autocast weight cache
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False),
                             AutocastKwargs(cache_enabled=not cfg.cuda_graph)],
            fsdp_plugin=plugin,
        )
        set_seed(recipe.seed * 10 + stage)  # fresh runs are reproducible; a resumed run restores its RNG states

    def _already_complete(self) -> bool:
        """True when this stage's output is complete and --resume skips it (after checking that it came from this
        recipe's teacher and settings); without --resume, refuse."""
        final_manifest = read_manifest(self.final_dir) if self.final_dir.is_dir() else None
        if final_manifest is None or not final_manifest.get("complete"):
            return False
        if not self.resume:
            raise ChainError(f"stage {self.stage} output {self.final_dir} already exists; pass --resume to skip it, "
                             "or choose another --out")
        self._check_same_run(final_manifest, self.final_dir)
        self.log(f"stage {self.stage}: already complete at {self.final_dir}; skipping")
        return True

    def _teacher_id(self) -> dict:
        if self._tid is None:
            from ..teachers.hf import resolve_teacher

            self._tid = teacher_identity(resolve_teacher(self.teacher_spec), spec=str(self.teacher_spec))
        return self._tid

    def _check_same_run(self, man: dict, where: Path) -> None:
        """Refuse to continue (or skip) `where` when it came from another teacher, or, unless allow_changed, when
        this recipe's settings for the stage differ from those it recorded, naming the fields."""
        t = man.get("teacher") or {}
        if t.get("sha256") != self._teacher_id()["sha256"]:
            raise ChainError(f"{where} belongs to another teacher ({t.get('spec')!r}, sha256 "
                             f"{str(t.get('sha256'))[:12]}…) than this recipe's {self.teacher_spec!r}; use another "
                             "--out")
        old = (man.get("settings") or {}).get("values")
        if old is None:
            return  # written before settings were recorded
        changed = settings_diff(old, self.settings)
        if not changed:
            return
        what = "; ".join(changed)
        if not self.allow_changed:
            raise ChainError(f"stage {self.stage}: {where} was made with other settings than this recipe's ({what}). "
                             "Restore them, use another --out, or pass --allow-changed to go on with the new ones")
        self.log(f"warning: stage {self.stage}: going on from {where} with changed settings ({what}); the "
                 "manifest records them")
        self.changed = changed

    def _checkpoint_to_resume(self) -> Path | None:
        """The newest intact checkpoint (damaged newer ones are reported and passed over); first the temporary
        folders of interrupted writes are removed."""
        if self.acc.is_main_process:
            for p in remove_stale_temporaries(self.ckpt_dir, self.out):
                self.log(f"stage {self.stage}: cleaned up {p}, left by an interrupted write")
        self.acc.wait_for_everyone()
        ckpt = latest_checkpoint(self.ckpt_dir, log=self.log)
        if ckpt is not None and not self.resume:
            raise ChainError(f"stage {self.stage} has checkpoints in {self.ckpt_dir}; pass --resume to continue "
                             f"from {ckpt.name}, or delete that folder to start over")
        return ckpt

    def _load_teacher(self):
        """(teacher in fp32, frozen; its identity; its tokenizer or None)."""
        from ..teachers.hf import load_teacher, resolve_teacher

        self.teacher_path = teacher_path = resolve_teacher(self.teacher_spec)
        tid = self._teacher_id()
        tokenizer = _load_tokenizer(teacher_path)
        teacher = load_teacher(teacher_path, dtype=torch.float32).eval().requires_grad_(False)
        check_placement(self.recipe.placement, teacher.config.num_hidden_layers, self.recipe.source)
        return teacher, tid, tokenizer

    def _build_student(self, ckpt, teacher, tid, tokenizer):
        """The student: from a checkpoint to resume, else the previous stage's output (checked); stage 3 places
        attention layers. Returns (student, trainer state or None, {"chain", "placement"})."""
        stage, recipe, cfg = self.stage, self.recipe, self.cfg
        state = None
        if ckpt is not None:
            man = read_manifest(ckpt) or {}
            self._check_same_run(man, ckpt)
            student = load_model(ckpt)  # safetensors only, every tensor present
            state = json.loads((ckpt / "trainer" / "state.json").read_text())
            links = {"chain": man.get("chain", []), "placement": man.get("placement")}
            self.log(f"stage {stage}: resuming from {ckpt} (step {state['step']})")
        else:
            in_dir, expected = self._input_dir()
            if stage == 1 and not recipe.student and not cfg.input:
                in_dir = self._seed(teacher, tid, tokenizer)
            hint = (f"Run `mmmamba distill {recipe.source or 'RECIPE.yaml'} --stage {stage - 1}` first."
                    if stage > 1 and not cfg.input else "")
            in_man = check_input(in_dir, expected, tid, for_stage=stage, hint=hint)
            student = load_model(in_dir)
            if list(student.config.layer_types) != list(in_man.get("layer_types", student.config.layer_types)):
                raise ChainError(f"{in_dir}: config layer_types differ from its manifest's")
            links = {"chain": chain_after(in_man, in_dir), "placement": None}
            self.log(f"stage {stage}: starting from {in_dir} ({in_man['stage']})")
        check_shared_weights(student, teacher)
        if stage == 3 and ckpt is None:
            student, links["placement"] = self._place(student, teacher, tokenizer)
        return student, state, links

    def _build_stage(self, student, teacher, tokenizer, tid, links) -> dict:
        """The stage module (student + teacher + loss), prepared by accelerate, with its optimizer, scheduler and
        data stream: the run's context `ctx` for the loop and the checkpoints."""
        stage, recipe, cfg, acc = self.stage, self.recipe, self.cfg, self.acc
        names = set_trainable(student, stage, cfg.train_a if stage == 3 else False, cfg.trainable)
        n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in student.parameters())
        self.log(f"stage {stage}: {len(names)} trainable tensors, {n_train:,} of {n_all:,} parameters "
                 f"({100 * n_train / n_all:.2f} %); layers (A attention, M Mamba-2): "
                 + "".join("M" if t == MAMBA2 else "A" for t in student.config.layer_types))
        if acc.device.type == "cpu":
            self._warn_if_meant_for_gpu(student, teacher)
        tdtype = _teacher_dtype(recipe, self.precision)
        module, teacher = self._stage_module(student, teacher, tdtype)
        self._choose_kernels(student, acc.device, torch.bfloat16 if self.precision == "bf16" else torch.float32,
                             tdtype if stage in (1, 2) else None)
        no_decay = no_decay_ids(module)
        module = acc.prepare(module)
        optimizer = build_optimizer(module, cfg, fused=acc.device.type == "cuda", no_decay=no_decay)
        optimizer = acc.prepare(optimizer)
        scheduler = build_scheduler(getattr(optimizer, "optimizer", optimizer), cfg)
        # not prepared by accelerate: DataStream shards one global batch sequence (same samples per step for any
        # process count) and moves the batches to the device
        stream = DataStream(self._build_data(tokenizer, student.config), acc, recipe.seed)
        trainable = [p for p in module.parameters() if p.requires_grad]
        accum = cfg.accumulation(acc.num_processes)
        return dict(module=module, optimizer=optimizer, scheduler=scheduler, stream=stream, tid=tid, names=names,
                    chain=links["chain"], tokenizer=tokenizer, placement=links["placement"], accum=accum,
                    trainable=trainable, micro_step=self._micro_step(module, accum, trainable))

    def _warn_if_meant_for_gpu(self, student, teacher) -> None:
        """On the CPU, warn when the recipe looks meant for a GPU (cuda_graph, compile, bf16) or a step would take
        over a minute, with the expected time per step: FLOPs from parameter counts (2 per parameter and token
        forward, 6 forward + backward; attention and SSD terms left out) over a matmul rate measured here."""
        cfg, acc = self.cfg, self.acc
        tokens = (cfg.micro_batch_size * cfg.accumulation(acc.num_processes) * (cfg.seq_len or 2048))
        emb = student.config.vocab_size * student.config.hidden_size
        body_t = sum(p.numel() for p in teacher.parameters()) - emb * (1 if teacher.config.tie_word_embeddings else 2)
        if self.stage == 3:  # teacher forward with its head; student forward + backward, head included
            per_token = 2 * (body_t + emb) + 6 * (sum(p.numel() for p in student.parameters()) - emb)
        else:  # the teacher's stream (no head) and the trained mixers
            per_token = 2 * body_t + 6 * sum(p.numel() for p in student.parameters() if p.requires_grad)
        flops = per_token * tokens
        seconds = flops / cpu_matmul_rate()
        hints = [h for h, on in (("cuda_graph: true", cfg.cuda_graph), ("compile: true", cfg.compile),
                                 ("precision: bf16", self.recipe.precision == "bf16")) if on]
        if not hints and seconds < 60:
            return
        why = f"it sets {', '.join(hints)}" if hints else "its steps are large"
        self.log(f"WARNING: stage {self.stage}: this recipe looks meant for a GPU ({why}) but runs on the CPU: "
                 f"{tokens:,} tokens per step, about {flops:.2g} FLOPs, so roughly {_duration(seconds)} per step and "
                 f"{_duration(seconds * cfg.steps)} for its {cfg.steps:,} steps (an estimate from parameter counts "
                 f"and this CPU's measured matmul rate, {cpu_matmul_rate() / 1e9:.0f} GFLOP/s)")

    def _stage_module(self, student, teacher, tdtype):
        """(LayerwiseDistill for stages 1-2 (the teacher moves into its stream) or EndToEndDistill, teacher or
        None); compiled per layer under `compile`."""
        stage, cfg, loss_cfg = self.stage, self.cfg, self.cfg.loss
        if stage in (1, 2):
            module = LayerwiseDistill(student, teacher.to(tdtype), target=loss_cfg["target"],
                                      factor=loss_cfg["factor"], gradient_checkpointing=cfg.gradient_checkpointing,
                                      compile=cfg.compile)
            teacher = None
        else:
            if cfg.gradient_checkpointing:
                enable_checkpointing(student)
            teacher = teacher.to(self.acc.device, tdtype)
            module = EndToEndDistill(student, teacher, temperature=loss_cfg["temperature"],
                                     positions=loss_cfg["positions"], ce_weight=loss_cfg["ce_weight"],
                                     chunk_size=loss_cfg["chunk_size"], gather_rows=not cfg.cuda_graph)
        module.train()
        if cfg.compile:
            if stage == 3:
                n = compile_layers(student) + compile_layers(teacher)
                self.log(f"stage {stage}: torch.compile on {n} student and teacher layers (first steps compile)")
            else:
                n = compile_mixers(student)
                self.log(f"stage {stage}: torch.compile on the teacher's layer step and {n} Mamba-2 mixers "
                         "(first steps compile)")
        return module, teacher

    def _restore(self, ctx, ckpt, state) -> Progress:
        """Progress at the start: a checkpoint's (optimizer, scheduler, data position, RNG states, log) or zero."""
        acc, stream = self.acc, ctx["stream"]
        prog = Progress(keep_recent=max(1, self.cfg.steps // 10))
        if state is not None:
            prog.step, prog.tokens, prog.elapsed = state["step"], state["tokens"], state["elapsed_s"]
            prog.recent = state["recent_losses"]
            osd = torch.load(ckpt / "trainer" / "optimizer.pt", map_location="cpu", weights_only=True)
            _load_optimizer_state(acc, ctx["module"], ctx["optimizer"], osd)
            ctx["scheduler"].load_state_dict(json.loads((ckpt / "trainer" / "scheduler.json").read_text()))
            d = state["data"]
            stream.start(d["epoch"], d["batch_in_epoch"], d.get("global_batch"))
            from safetensors.torch import load_file

            r = acc.process_index
            rng_js = json.loads((ckpt / "trainer" / f"rng_{r}.json").read_text())
            set_rng_state(rng_js, load_file(str(ckpt / "trainer" / f"rng_{r}.safetensors")))
            if acc.is_main_process:
                _truncate_jsonl(self.jsonl, prog.step)
        else:
            stream.start(0, 0)
            if acc.is_main_process and self.jsonl.exists():
                self.jsonl.unlink()
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        return prog

    # -- the loop -----------------------------------------------------------------------------------------
    def _loop(self, ctx, prog: Progress) -> None:
        """Optimizer steps until cfg.steps: accumulate the micro-batches, step, log, checkpoint. On SIGINT /
        SIGTERM: checkpoint at the step boundary and raise Interrupted (after the last step `_finish` does)."""
        cfg, stream = self.cfg, ctx["stream"]
        bar = self._bar(prog.step)
        try:
            while prog.step < cfg.steps:
                t0 = time.perf_counter()
                loss, tokens, extra = self._accumulate(ctx)
                grad_norm = self._clip(ctx)
                loss, tokens, extra = self._reduce(loss, tokens, extra)
                self._check_finite(prog.step + 1, loss, grad_norm, ctx)
                lr = self._optimizer_step(ctx)
                prog.step += 1
                prog.add(loss, tokens, time.perf_counter() - t0, extra)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{prog.last_rate:,.0f}")
                if prog.step % cfg.log_every == 0 or prog.step in (1, cfg.steps):
                    self._write_log(prog.record(lr, grad_norm, stream.epoch))
                stop = self._stop_requested()
                if prog.step < cfg.steps and (prog.step % cfg.save_every == 0 or stop):
                    saved = self._save_checkpoint(ctx, prog.state(stream.state()), prog.last)
                    self._plot()
                    if stop:
                        raise Interrupted(self.signum, saved, prog.step)
                if self.stop_after is not None and self.stop_after <= prog.step < cfg.steps:
                    raise StopTraining(f"stopped after step {prog.step}")
        finally:
            bar.close()

    # -- signals: the first SIGINT / SIGTERM stops at the next step boundary, a second one at once
    @contextlib.contextmanager
    def _signals_caught(self):
        self.signum = None
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return

        def handler(signum, frame):
            if self.signum is not None:
                raise Aborted(signum)
            self.signum = signum
            self._log(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step and stopping "
                      "(send it again to stop at once, without saving)")

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _stop_requested(self) -> bool:
        """Whether a signal arrived (on any process: they all stop at the same step)."""
        if self.acc.num_processes == 1:
            return self.signum is not None
        got = torch.tensor([self.signum or 0], device=self.acc.device)
        torch.distributed.all_reduce(got, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(got.item()) or None
        return self.signum is not None

    def _accumulate(self, ctx):
        """Forward + backward over `accum` micro-batches (gradients synchronised on the last):
        (mean loss tensor, target tokens, {metric: mean tensor})."""
        acc, module, accum = self.acc, ctx["module"], ctx["accum"]
        step_loss, step_tokens, extra = 0.0, 0, {}
        for micro in range(accum):
            batch = self._next_nonempty(ctx["stream"])
            sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(module)
            with sync:
                loss, metrics = ctx["micro_step"](batch)
            step_loss += loss.detach().float() / accum
            am = batch.get("attention_mask")
            step_tokens += int(am.sum()) if am is not None else batch["input_ids"].numel()
            for k, v in metrics.items():
                if not k.endswith("_tokens"):
                    extra[k] = extra.get(k, 0.0) + v.detach().float() / accum
        return step_loss, step_tokens, extra

    def _next_nonempty(self, stream, limit: int = 1000) -> dict:
        """The next micro-batch that has rows: one whose every row was dropped (images unreadable since the data
        scan; the collator warned about each) is skipped and reported. Every process still runs `accum` forward /
        backward passes per step (no DDP hang); with several processes, the skipping one is then a micro-batch
        ahead, so a later --resume (positioned by the first process) may start a micro-batch off on the others."""
        for _ in range(limit):
            batch = stream.next()
            if batch["input_ids"].shape[0] > 0:
                return batch
            self.log(f"stage {self.stage}: skipped an empty micro-batch (global batch {stream.consumed - 1}): all "
                     "its rows were dropped, see the warnings above")
        raise ValueError(f"stage {self.stage}: {limit} micro-batches in a row had no usable rows; check the data")

    def _clip(self, ctx):
        """The gradient norm before clipping to grad_clip (None without clipping)."""
        return self.acc.clip_grad_norm_(ctx["trainable"], self.cfg.grad_clip) if self.cfg.grad_clip else None

    def _optimizer_step(self, ctx) -> float:
        """Step, schedule, zero the gradients; returns the lr used."""
        cfg, optimizer, scheduler = self.cfg, ctx["optimizer"], ctx["scheduler"]
        lr_used = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=not cfg.cuda_graph)  # a graph's gradient tensors stay
        return lr_used

    def _check_finite(self, step: int, loss: float, grad_norm, ctx) -> None:
        """Stop before applying step `step` when its loss or gradient norm is nan / inf, naming the last good
        checkpoint (the update is not applied, so no checkpoint ever holds its weights)."""
        gn = None if grad_norm is None else float(grad_norm)
        if math.isfinite(loss) and (gn is None or math.isfinite(gn)):
            return
        self._write_log({"step": step, "loss": loss, "grad_norm": gn, "stopped": "non-finite loss or gradient norm"})
        ckpt = latest_checkpoint(self.ckpt_dir)
        where = (f"The last good checkpoint is {ckpt} (step {int(ckpt.name[5:])}); continue from it with --resume "
                 "after the change (and --allow-changed)" if ckpt is not None
                 else "No checkpoint was written yet in this stage")
        raise NonFiniteError(
            f"stage {self.stage}: the {'loss' if not math.isfinite(loss) else 'gradient norm'} is "
            f"{loss if not math.isfinite(loss) else gn} at step {step}; stopped before that update. {where}. "
            f"Lower the learning rate (lr {self.cfg.lr:g}) or check the data.")

    def _reduce(self, loss, tokens, extra):
        """Across processes: (mean loss, summed tokens, mean metrics on the host)."""
        acc = self.acc
        loss = float(acc.reduce(loss.detach(), reduction="mean"))
        tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), reduction="sum"))
        return loss, tokens, {k: acc.reduce(v, reduction="mean").cpu() for k, v in extra.items()}

    def _bar(self, initial: int):
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.steps, initial=initial, desc=f"stage {self.stage}", unit="step",
                    dynamic_ncols=True, disable=not (self.progress and self.acc.is_main_process))

    def _write_log(self, rec: dict) -> None:
        if self.acc.is_main_process:
            with open(self.jsonl, "a") as fh:
                fh.write(json_text(rec) + "\n")

    def _plot(self) -> None:
        if self.acc.is_main_process and self.jsonl.exists():
            plot_loss(self.jsonl, self.png, f"{self.recipe.name}: stage {self.stage}")

    def _finish(self, ctx, prog: Progress) -> Path:
        last = prog.last
        final_metrics = {"loss": float(np.mean(prog.recent)) if prog.recent else None, "loss_last": last.get("loss"),
                         **{k: v for k, v in last.items() if k in ("kl", "ce", "layer_mse")},
                         "tokens": prog.tokens, "elapsed_s": prog.elapsed}
        self._save_final(ctx, prog.step, prog.tokens, final_metrics)
        self.log(f"stage {self.stage}: done, {prog.step} steps, {prog.tokens:,} tokens, final loss "
                 f"{final_metrics['loss']:.5g} -> {self.final_dir}")
        if self.signum is not None:  # arrived during the last step: the stage is complete, the next not started
            raise Interrupted(self.signum, self.final_dir, prog.step)
        return self.final_dir

    def _micro_step(self, module, accum: int, trainable: list):
        """batch -> (loss, metrics) after forward and backward; replayed from CUDA graphs under `cuda_graph`."""

        def micro(batch):
            loss, metrics = module(**batch)
            self.acc.backward(loss / accum)
            return loss.detach(), metrics  # no autograd graph kept alive into the next micro-step

        if not self.cfg.cuda_graph:
            return micro
        if self.acc.device.type != "cuda":
            self.log(f"stage {self.stage}: cuda_graph needs a GPU; running eagerly")
            return micro
        if self.acc.num_processes > 1:
            self.log(f"stage {self.stage}: cuda_graph runs on one GPU only (a graph cannot hold DDP's or FSDP's "
                     "gradient communication); running eagerly")
            return micro
        from .graphs import GraphedSteps

        return GraphedSteps(micro, trainable, log=self.log)

    # -- placement (stage 3) -----------------------------------------------------------------------------
    def _place(self, student, teacher, tokenizer):
        from ..models.placement import auto_count
        from .sensitivity import resolve_placement

        spec = self.recipe.placement
        n = student.config.num_hidden_layers
        batches = None
        if auto_count(spec) is not None:
            # the recipe's held-out split; data handed to the runner has no split, so its batches score instead
            if self.data is not None:
                self.log("stage 3: placement sensitivity scored on the data given to the runner (no held-out split)")
            batches = self._build_data(tokenizer, student.config, "heldout")
            dev = self.acc.device
            student.to(dev)
            teacher.to(dev)
        layers, scores = resolve_placement(spec, n, student=student, teacher=teacher, batches=batches,
                                           verbose=self.acc.is_main_process,
                                           max_batches=self.cfg.placement_batches) \
            if batches is not None else resolve_placement(spec, n)
        student = apply_placement(student.cpu(), teacher.cpu(), layers)
        self.log(f"stage 3: placement {spec!r} -> attention layers {layers}")
        info = {"spec": spec if not isinstance(spec, list) else list(spec), "attention_layers": layers}
        if scores is not None:
            info["sensitivity"] = {str(k): v for k, v in scores.items()}
        return student, info

    # -- saving --------------------------------------------------------------------------------------------
    def _manifest(self, ctx, steps, tokens, metrics, complete):
        student = self.acc.unwrap_model(ctx["module"]).student
        extra = {"placement": ctx["placement"]} if ctx["placement"] is not None else {}
        extra["settings"] = {"sha256": settings_sha256(self.settings), "values": self.settings}
        if self.changed:
            extra["settings_changed_on_resume"] = self.changed
        return make_manifest(self.stage, ctx["tid"], student.config.layer_types, recipe=self.recipe.to_dict(),
                             steps=steps, tokens=tokens, final_metrics=metrics, chain=ctx["chain"],
                             trainable=sorted(ctx["names"]), complete=complete, **extra)

    def _student_state(self, ctx) -> dict:
        sd = self.acc.get_state_dict(ctx["module"])
        sd = {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}
        return drop_tied_copies(sd, self.acc.unwrap_model(ctx["module"]).student) if sd else sd

    def _write_model(self, tmp: Path, ctx, sd: dict) -> None:
        student = self.acc.unwrap_model(ctx["module"]).student
        student.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        if ctx["tokenizer"] is not None:
            ctx["tokenizer"].save_pretrained(tmp)

    def _save_checkpoint(self, ctx, st: dict, last: dict) -> Path:
        acc = self.acc
        sd = self._student_state(ctx)
        bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # never let a checkpoint with nan / inf weights rotate a good one away
            raise NonFiniteError(f"stage {self.stage}: weights {bad[:4]} hold nan / inf after step {st['step']}; "
                                 f"not saved (checkpoints in {self.ckpt_dir} are kept). Lower the learning rate.")
        osd = _optimizer_state(acc, ctx["module"], ctx["optimizer"])
        js, tensors = rng_state()
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            all_rng = gather_object([(js, {k: v.tolist() for k, v in tensors.items()})])
        else:
            all_rng = [(js, tensors)]
        if acc.is_main_process:
            from safetensors.torch import save_file

            target = self.ckpt_dir / f"step-{st['step']:08d}"
            with atomic_dir(target) as tmp:
                self._write_model(tmp, ctx, sd)
                write_manifest(tmp, self._manifest(ctx, st["step"], st["tokens"], last, complete=False))
                tdir = tmp / "trainer"
                tdir.mkdir()
                torch.save(osd, tdir / "optimizer.pt")
                (tdir / "scheduler.json").write_text(json_text(ctx["scheduler"].state_dict()))
                (tdir / "state.json").write_text(json_text(st))
                for r, (rjs, rt) in enumerate(all_rng):
                    (tdir / f"rng_{r}.json").write_text(json.dumps(rjs))
                    rt = {k: (v if torch.is_tensor(v) else torch.tensor(v, dtype=torch.uint8)) for k, v in rt.items()}
                    save_file({k: v.contiguous() for k, v in rt.items()}, str(tdir / f"rng_{r}.safetensors"))
            old = sorted(p for p in self.ckpt_dir.glob("step-*") if p.is_dir())
            for p in old[: max(0, len(old) - max(1, self.cfg.keep_checkpoints))]:
                shutil.rmtree(p, ignore_errors=True)
        acc.wait_for_everyone()
        return self.ckpt_dir / f"step-{st['step']:08d}"

    def _save_final(self, ctx, steps, tokens, metrics) -> None:
        acc = self.acc
        sd = self._student_state(ctx)
        if acc.is_main_process:
            if self.jsonl.exists():
                plot_loss(self.jsonl, self.png, f"{self.recipe.name}: stage {self.stage}")
            with atomic_dir(self.final_dir) as tmp:
                self._write_model(tmp, ctx, sd)
                write_manifest(tmp, self._manifest(ctx, steps, tokens, metrics, complete=True), card=True)
                for f, name in ((self.jsonl, "metrics.jsonl"), (self.png, "loss.png")):
                    if f.exists():
                        shutil.copy2(f, tmp / name)
            if self.cfg.keep_checkpoints == 0:
                shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        acc.wait_for_everyone()


# --------------------------------------------------------------------------------------------- FSDP helpers
FSDP_UNIT = "DecoderLayer"  # the module class each FSDP unit wraps


def _fsdp_plugin():
    """Stage 3 under FSDP: one unit per decoder layer, fully sharded. Parameters, buffers and gradient reductions
    stay fp32, and bf16 comes from accelerate's autocast, as on one GPU or under DDP. accelerate's default FSDP
    policy for bf16 would instead run every parameter in bf16 (A_log, dt_bias and norm weights included) and
    round buffers such as RoPE's inverse frequencies to bf16. That would be another training recipe, not the same
    one sharded."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        sharding_strategy="FULL_SHARD", auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[FSDP_UNIT], use_orig_params=True,
        state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False, sync_module_states=True,
        mixed_precision_policy=fsdp_mixed_precision(),
    )


def fsdp_mixed_precision():
    """FSDP's precision policy for stage 3: everything fp32 (bf16 compute comes from autocast)."""
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32, buffer_dtype=torch.float32)


def _is_fsdp(acc) -> bool:
    return getattr(acc.state, "fsdp_plugin", None) is not None and acc.num_processes > 1


def drop_tied_copies(sd: dict, model) -> dict:
    """`sd` without the keys `model` ties to another (the LM head tied to the embedding). FSDP's gathered full
    state dict holds the two as separate CPU copies, which save_pretrained would then both write; on one device
    they share storage and it writes one. Refuses tied copies that differ: dropping one would lose weights."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return sd
    sd = dict(sd)
    for copy_key, source in (getattr(model, "_tied_weights_keys", None) or {}).items():
        if copy_key in sd and source in sd:
            if not torch.equal(sd[copy_key], sd[source]):
                raise RuntimeError(f"{copy_key} and {source} are tied but the state dict holds different values")
            del sd[copy_key]
    return sd


def _optimizer_state(acc, module, optimizer) -> dict:
    """The optimizer's full state (under FSDP: gathered from the shards; with GPU parameters, offloaded to the host
    memory of rank 0, which writes it)."""
    opt = getattr(optimizer, "optimizer", optimizer)
    if _is_fsdp(acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # "offloading" host tensors to the host aliases torch's gather buffers (torch 2.13, gloo: every moment
        # came back as the last one gathered), so offload only from the GPU
        offload = any(p.is_cuda for p in module.parameters())
        return get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=offload))
    return opt.state_dict()


def _load_optimizer_state(acc, module, optimizer, osd) -> None:
    opt = getattr(optimizer, "optimizer", optimizer)
    if _is_fsdp(acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, opt, osd, options=StateDictOptions(full_state_dict=True))
        return
    opt.load_state_dict(osd)


# --------------------------------------------------------------------------------------------- entry point
def run_distill(recipe: Recipe, stages: Iterable[int] = (1, 2, 3), *, resume: bool = False, data=None,
                progress: bool = True, allow_changed: bool = False, log: Callable = print) -> dict[int, Path]:
    """Run `stages` of `recipe` in order; each checks the previous one's output. Returns {stage: folder}."""
    out = {}
    for s in stages:
        out[s] = StageRunner(recipe, int(s), resume=resume, data=data, progress=progress,
                             allow_changed=allow_changed, log=log).run()
    return out
