"""Distillation recipes (YAML): parse, fill in the paper's defaults, validate with errors that name the field.

```yaml
name: smollm2_hybrid
teacher: smollm2                 # 'smollm2' or a model folder; ${ENV_VARS} are expanded
output_dir: runs/smollm2_hybrid  # stage k writes <output_dir>/stage{k} (+ stage{k}-checkpoints, logs/)
seed: 0
init: mimic                      # seeding: mimic | inherit | scratch (PAPER Table 4)
student: null                    # optional seeded student folder (`mmmamba seed`); default: seed from the teacher
placement: every:4               # layers that are attention again in stage 3; none = mmMamba-linear
data: {...}                      # passed as-is to mmmamba.distill.data.build_dataloader
precision: auto                  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
distributed: ddp                 # ddp | fsdp (several processes via `accelerate launch`)
defaults: {grad_clip: 5.0}       # applied to every stage
stages:
  1: {lr: 1.0e-3, steps: 20000, batch_size: 128, micro_batch_size: 2}
  2: {lr: 5.0e-4}
  3: {lr: 5.0e-5, batch_size: 64, micro_batch_size: 1, loss: {temperature: 1.0, positions: assistant}}
```
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..models.placement import parse_placement
from .manifest import stage_name
from .stages import MIXER_PARTS


class RecipeError(ValueError):
    pass


# --- the paper's settings (METHOD.md §3) --------------------------------------------------------------------
COMMON_DEFAULTS = dict(
    weight_decay=0.05, betas=[0.9, 0.999], eps=1e-8, grad_clip=5.0, warmup=0.1, decay=0.1, decay_type="cosine",
    min_lr_ratio=0.0, steps=20000, seq_len=8192, gradient_checkpointing=False, log_every=10, save_every=1000,
    keep_checkpoints=2, train_a=False, trainable=None, input=None, input_stage=None, data=None, grad_accum=None,
    placement_batches=16, compile=False, cuda_graph=False,
)
STAGE_DEFAULTS = {
    1: dict(lr=1e-3, batch_size=128, micro_batch_size=2, loss=dict(target="heads", factor=1000.0)),
    2: dict(lr=5e-4, batch_size=128, micro_batch_size=2, loss=dict(target="heads", factor=1000.0)),
    3: dict(lr=5e-5, batch_size=64, micro_batch_size=1,
            loss=dict(temperature=1.0, positions="assistant", ce_weight=0.0, chunk_size=1024)),
}
LOSS_KEYS = {1: {"target", "factor"}, 2: {"target", "factor"},
             3: {"temperature", "positions", "ce_weight", "chunk_size"}}
SEED_INIT_MODES = ("mimic", "inherit", "scratch")


@dataclass
class StageConfig:
    stage: int
    lr: float
    steps: int
    batch_size: int | None
    micro_batch_size: int
    grad_accum: int | None
    seq_len: int | None
    weight_decay: float
    betas: list[float]
    eps: float
    grad_clip: float | None
    warmup: float
    decay: float
    decay_type: str
    min_lr_ratio: float
    gradient_checkpointing: bool
    compile: bool  # torch.compile the per-layer work (GPU): teacher layers, Mamba-2 mixers (see trainer)
    cuda_graph: bool  # replay each micro-batch's forward + backward from a CUDA graph (one GPU; distill.graphs)
    log_every: int
    save_every: int
    keep_checkpoints: int
    train_a: bool
    trainable: list[str] | None
    input: str | None
    input_stage: str | int | None
    data: dict | None
    placement_batches: int = 16  # stage 3, placement auto:N: held-out batches for the sensitivity scan
    loss: dict = field(default_factory=dict)

    def accumulation(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each process, so that the global batch is `batch_size`."""
        per_step = self.micro_batch_size * world_size
        if self.grad_accum is not None:
            if self.batch_size is not None and self.batch_size != per_step * self.grad_accum:
                raise RecipeError(
                    f"stage {self.stage}: batch_size {self.batch_size} != micro_batch_size {self.micro_batch_size} "
                    f"x {world_size} processes x grad_accum {self.grad_accum}"
                )
            return self.grad_accum
        if self.batch_size is None:
            return 1
        if self.batch_size % per_step:
            raise RecipeError(
                f"stage {self.stage}: batch_size {self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size} x {world_size} processes"
            )
        return self.batch_size // per_step


@dataclass
class Recipe:
    name: str
    teacher: str
    output_dir: str
    seed: int = 0
    init: str = "mimic"
    student: str | None = None
    placement: str | list[int] | None = None
    data: dict = field(default_factory=dict)
    precision: str = "auto"
    distributed: str = "ddp"
    teacher_dtype: str = "auto"
    stages: dict[int, StageConfig] = field(default_factory=dict)
    source: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = {str(k): {kk: vv for kk, vv in asdict(v).items() if kk != "stage"}
                       for k, v in self.stages.items()}
        return d


    def settings(self, stage: int) -> dict:
        """The settings that decide what stage `stage` trains (not where it writes, how often it logs or saves,
        or speed options that train the same model): recorded in each manifest and compared on --resume."""
        cfg = {k: v for k, v in asdict(self.stages[stage]).items() if k not in RUN_ONLY_KEYS}
        top = {"seed": self.seed, "init": self.init, "student": self.student, "data": self.data,
               "precision": self.precision, "teacher_dtype": self.teacher_dtype}
        if stage == 3:
            top["placement"] = self.placement
        return {**top, **cfg}


# stage keys that do not change what a stage trains: logging, checkpoints, speed
RUN_ONLY_KEYS = {"stage", "log_every", "save_every", "keep_checkpoints", "compile", "cuda_graph",
                 "gradient_checkpointing"}


def settings_sha256(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def settings_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'field: old -> new' for every (dotted, nested) field that differs."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


TOP_KEYS = {f.name for f in fields(Recipe)} - {"stages", "source"} | {"stages", "defaults"}
STAGE_KEYS = {f.name for f in fields(StageConfig)} - {"stage"}


def _expand(value, where):
    if isinstance(value, str):
        out = os.path.expandvars(value)
        left = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", out)
        if left:
            raise RecipeError(f"{where}: environment variable {left[0]} is not set (in {value!r})")
        return out
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    return value


def _num(value, where, kind=float, positive=False, nonneg=False, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    try:
        v = kind(float(value)) if kind is int else kind(value)  # YAML reads 1e-3 (no dot) as a string
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is int and float(value) != v:
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if positive and not v > 0:
        raise RecipeError(f"{where}: must be positive, got {value!r}")
    if nonneg and v < 0:
        raise RecipeError(f"{where}: must be >= 0, got {value!r}")
    return v


def _bool(value, where):
    if not isinstance(value, bool):
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    return value


def _stage_key(k, where) -> int:
    s = str(k).lower().removeprefix("stage").strip()
    if s not in ("1", "2", "3"):
        raise RecipeError(f"{where}: stage key {k!r} unknown; use 1, 2 or 3")
    return int(s)


def _stage(stage: int, raw: dict, defaults: dict, where: str) -> StageConfig:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of settings, got {raw!r}")
    for src, w in ((defaults, "defaults"), (raw, where)):
        unknown = sorted(set(src) - STAGE_KEYS)
        if unknown:
            raise RecipeError(f"{w}: unknown key(s) {unknown}; allowed: {sorted(STAGE_KEYS)}")
    merged = {**COMMON_DEFAULTS, **copy.deepcopy(STAGE_DEFAULTS[stage])}
    base_loss = merged.pop("loss")
    d_loss = defaults.get("loss") or {}
    r_loss = raw.get("loss") or {}
    merged.update({k: v for k, v in defaults.items() if k != "loss"})
    merged.update({k: v for k, v in raw.items() if k != "loss"})
    loss = dict(base_loss)
    for src, w in ((d_loss, "defaults.loss"), (r_loss, f"{where}.loss")):
        if not isinstance(src, dict):
            raise RecipeError(f"{w}: expected a mapping, got {src!r}")
        unknown = sorted(set(src) - LOSS_KEYS[stage])
        if unknown and src is r_loss:
            raise RecipeError(f"{w}: unknown key(s) {unknown} for stage {stage}; allowed: {sorted(LOSS_KEYS[stage])}")
        typos = sorted(set(src) - set().union(*LOSS_KEYS.values()), key=str)
        if typos:  # defaults.loss serves every stage: a key no stage knows is a typo
            raise RecipeError(f"{w}: unknown key(s) {typos}; allowed: {sorted(set().union(*LOSS_KEYS.values()))}")
        loss.update({k: v for k, v in src.items() if k in LOSS_KEYS[stage]})
    w = where
    cfg = StageConfig(
        stage=stage,
        lr=_num(merged["lr"], f"{w}.lr", positive=True),
        steps=_num(merged["steps"], f"{w}.steps", int, positive=True),
        batch_size=_num(merged["batch_size"], f"{w}.batch_size", int, positive=True, allow_none=True),
        micro_batch_size=_num(merged["micro_batch_size"], f"{w}.micro_batch_size", int, positive=True),
        grad_accum=_num(merged["grad_accum"], f"{w}.grad_accum", int, positive=True, allow_none=True),
        seq_len=_num(merged["seq_len"], f"{w}.seq_len", int, positive=True, allow_none=True),
        weight_decay=_num(merged["weight_decay"], f"{w}.weight_decay", nonneg=True),
        betas=merged["betas"],
        eps=_num(merged["eps"], f"{w}.eps", positive=True),
        grad_clip=_num(merged["grad_clip"], f"{w}.grad_clip", positive=True, allow_none=True),
        warmup=_num(merged["warmup"], f"{w}.warmup", nonneg=True),
        decay=_num(merged["decay"], f"{w}.decay", nonneg=True),
        decay_type=str(merged["decay_type"]),
        min_lr_ratio=_num(merged["min_lr_ratio"], f"{w}.min_lr_ratio", nonneg=True),
        gradient_checkpointing=_bool(merged["gradient_checkpointing"], f"{w}.gradient_checkpointing"),
        compile=_bool(merged["compile"], f"{w}.compile"),
        cuda_graph=_bool(merged["cuda_graph"], f"{w}.cuda_graph"),
        log_every=_num(merged["log_every"], f"{w}.log_every", int, positive=True),
        save_every=_num(merged["save_every"], f"{w}.save_every", int, positive=True),
        keep_checkpoints=_num(merged["keep_checkpoints"], f"{w}.keep_checkpoints", int, nonneg=True),
        train_a=_bool(merged["train_a"], f"{w}.train_a"),
        trainable=merged["trainable"],
        input=merged["input"],
        input_stage=merged["input_stage"],
        data=merged["data"],
        placement_batches=_num(merged["placement_batches"], f"{w}.placement_batches", int, positive=True),
        loss=loss,
    )
    if not (isinstance(cfg.betas, (list, tuple)) and len(cfg.betas) == 2):
        raise RecipeError(f"{w}.betas: expected two numbers like [0.9, 0.999], got {cfg.betas!r}")
    cfg.betas = [_num(b, f"{w}.betas", nonneg=True) for b in cfg.betas]
    if cfg.warmup + cfg.decay > 1 and cfg.warmup < 1:
        raise RecipeError(f"{w}: warmup ({cfg.warmup}) + decay ({cfg.decay}) fractions exceed 1")
    if cfg.cuda_graph and cfg.compile:
        raise RecipeError(f"{w}: compile and cuda_graph both set; use one (a captured graph already removes the "
                          "launch overhead that compile's fusion reduces)")
    if cfg.decay_type not in ("linear", "cosine", "1-sqrt"):
        raise RecipeError(f"{w}.decay_type: {cfg.decay_type!r} unknown; use linear, cosine or 1-sqrt")
    if cfg.trainable is not None:
        if not isinstance(cfg.trainable, list) or any(p not in MIXER_PARTS for p in cfg.trainable):
            raise RecipeError(f"{w}.trainable: expected a list of Mamba-2 mixer parts from {list(MIXER_PARTS)}, "
                              f"got {cfg.trainable!r}")
    if cfg.train_a and stage != 3:
        raise RecipeError(f"{w}.train_a: only stage 3 has this option (stages 1-2 always train dt_bias / A_log)")
    if cfg.data is not None and not isinstance(cfg.data, dict):
        raise RecipeError(f"{w}.data: expected a mapping (merged over the recipe's data), got {cfg.data!r}")
    if cfg.input_stage is not None:
        try:
            stage_name(cfg.input_stage)
        except ValueError as e:
            raise RecipeError(f"{w}.input_stage: {e}") from None
    if stage in (1, 2):
        if loss["target"] not in ("heads", "output"):
            raise RecipeError(f"{w}.loss.target: {loss['target']!r} unknown; use heads (before W_O) or output")
        loss["factor"] = _num(loss["factor"], f"{w}.loss.factor", positive=True)
    else:
        if loss["positions"] not in ("assistant", "all"):
            raise RecipeError(f"{w}.loss.positions: {loss['positions']!r} unknown; use assistant or all")
        loss["temperature"] = _num(loss["temperature"], f"{w}.loss.temperature", positive=True)
        loss["ce_weight"] = _num(loss["ce_weight"], f"{w}.loss.ce_weight", nonneg=True)
        loss["chunk_size"] = _num(loss["chunk_size"], f"{w}.loss.chunk_size", int, positive=True)
    return cfg


def parse_recipe(raw: dict, source: str | None = None) -> Recipe:
    """Validate a recipe mapping (as loaded from YAML) and fill in the paper's defaults."""
    where = source or "recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(TOP_KEYS)}")
    for key in ("teacher", "output_dir"):
        if not raw.get(key):
            raise RecipeError(f"{where}: '{key}' is required")
    raw = {k: (_expand(v, f"{where}: {k}") if k in ("teacher", "output_dir", "student", "data") else v)
           for k, v in raw.items()}
    init = raw.get("init", "mimic")
    if init not in SEED_INIT_MODES:
        raise RecipeError(f"{where}: init {init!r} unknown; use one of {SEED_INIT_MODES}")
    precision = str(raw.get("precision", "auto")).lower()
    if precision not in ("auto", "bf16", "fp32", "no"):
        raise RecipeError(f"{where}: precision {precision!r} unknown; use auto, bf16 or fp32")
    distributed = str(raw.get("distributed", "ddp")).lower()
    if distributed not in ("ddp", "fsdp"):
        raise RecipeError(f"{where}: distributed {distributed!r} unknown; use ddp or fsdp")
    teacher_dtype = str(raw.get("teacher_dtype", "auto")).lower()
    if teacher_dtype not in ("auto", "bf16", "fp32"):
        raise RecipeError(f"{where}: teacher_dtype {teacher_dtype!r} unknown; use auto, bf16 or fp32")
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: data: expected a mapping (passed to build_dataloader), got {data!r}")
    placement = raw.get("placement")
    if placement is not None and not isinstance(placement, (str, list)):
        raise RecipeError(f"{where}: placement: expected a spec like every:4 or a list of layers, got {placement!r}")
    if isinstance(placement, str) and not placement.lower().startswith("auto"):
        try:
            parse_placement(placement, 10**6)
        except ValueError as e:
            raise RecipeError(f"{where}: placement: {e}") from None
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RecipeError(f"{where}: defaults: expected a mapping, got {defaults!r}")
    stages_raw = raw.get("stages") or {}
    if not isinstance(stages_raw, dict):
        raise RecipeError(f"{where}: stages: expected a mapping like {{1: {{lr: 1.0e-3}}}}, got {stages_raw!r}")
    per = {}
    for k, v in stages_raw.items():
        s = _stage_key(k, f"{where}: stages")
        if s in per:
            raise RecipeError(f"{where}: stages: stage {s} given twice")
        per[s] = v or {}
    stages = {s: _stage(s, per.get(s, {}), defaults, f"{where}: stages.{s}") for s in (1, 2, 3)}
    return Recipe(
        name=str(raw.get("name") or Path(source or "recipe").stem),
        teacher=str(raw["teacher"]),
        output_dir=str(raw["output_dir"]),
        seed=_num(raw.get("seed", 0), f"{where}: seed", int, nonneg=True),
        init=init,
        student=raw.get("student"),
        placement=placement,
        data=data,
        precision=precision,
        distributed=distributed,
        teacher_dtype=teacher_dtype,
        stages=stages,
        source=source,
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
            if dup:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem, where, and the context it arose in."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(e, "context", None)
    problem = getattr(e, "problem", None) or str(e)
    return " ".join((f"{problem}{where}" + (f" ({context})" if context else "")).split())


def load_recipe(path: str | os.PathLike, overrides: dict | None = None) -> Recipe:
    """Read and validate a YAML recipe; `overrides` replace top-level keys (e.g. output_dir from --out)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}") from None
    if raw is None:
        raise RecipeError(f"recipe {path} is empty")
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    return parse_recipe(raw, str(path))
