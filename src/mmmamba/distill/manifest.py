"""Stage chaining: every stage output carries `mmmamba_manifest.json`, and a stage refuses an input that is
missing, comes from another teacher or from the wrong stage, naming what it expected (the authors' issue #4:
stage 3 silently started from seeds and reported a KL of ~8000).

A manifest records: format, stage ("seed", "stage1", "stage2", "stage3"), complete (False inside a running
stage's checkpoints), teacher identity (path + sha256 of its weight files), layer_types, trainable parameter
names, the recipe, steps, tokens, final metrics, and the chain of earlier stages (each a short summary).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

from .. import __version__
from ..io import json_text

MANIFEST_NAME = "mmmamba_manifest.json"
FORMAT = "mmmamba-manifest/1"
STAGE_NAMES = ("seed", "stage1", "stage2", "stage3")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth")


class ChainError(ValueError):
    """A stage input that cannot be used (missing, wrong teacher, wrong stage, unfinished)."""


def stage_name(stage: int | str) -> str:
    s = str(stage).lower()
    if s in STAGE_NAMES:
        return s
    if s in ("1", "2", "3"):
        return f"stage{s}"
    raise ValueError(f"stage {stage!r} unknown; one of seed, 1, 2, 3")


_HASH_CACHE: dict[tuple, str] = {}


def weights_sha256(folder: str | os.PathLike) -> str:
    """sha256 over the names and contents of the weight files in `folder` (sorted), independent of the dtype
    the model is later loaded in. Cached per process by (path, size, mtime)."""
    folder = Path(folder)
    files = sorted({f for pat in WEIGHT_PATTERNS for f in folder.glob(pat)})
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_PATTERNS)}) in {folder}")
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    total = hashlib.sha256()
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        total.update(f"{f.name}:{h.hexdigest()}\n".encode())
    _HASH_CACHE[key] = total.hexdigest()
    return _HASH_CACHE[key]


def teacher_identity(path: str | os.PathLike, spec: str | None = None) -> dict:
    """{"path", "spec", "sha256"} of a teacher folder."""
    path = Path(path)
    return {"path": str(path.resolve()), "spec": spec if spec is not None else str(path),
            "sha256": weights_sha256(path)}


def make_manifest(stage: int | str, teacher: dict, layer_types: list[str], *, recipe: dict | None = None,
                  steps: int = 0, tokens: int = 0, final_metrics: dict | None = None, chain: list | None = None,
                  trainable: list[str] | None = None, complete: bool = True, **extra) -> dict:
    return {
        "format": FORMAT,
        "stage": stage_name(stage),
        "complete": bool(complete),
        "teacher": dict(teacher),
        "layer_types": list(layer_types),
        "trainable": list(trainable or []),
        "recipe": recipe,
        "steps": int(steps),
        "tokens": int(tokens),
        "final_metrics": dict(final_metrics or {}),
        "chain": list(chain or []),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mmmamba_version": __version__,
        **extra,
    }


def summary(manifest: dict, path: str | os.PathLike | None = None) -> dict:
    """The short form of a manifest kept in later stages' chains."""
    keys = ("stage", "steps", "tokens", "final_metrics", "layer_types", "created")
    out = {k: manifest.get(k) for k in keys}
    if path is not None:
        out["path"] = str(Path(path).resolve())
    return out


def chain_after(manifest: dict, path: str | os.PathLike) -> list:
    """The chain a stage built on `manifest` (read from `path`) records: its chain plus itself."""
    return list(manifest.get("chain", [])) + [summary(manifest, path)]


def portable(manifest: dict, folder: str | os.PathLike) -> dict:
    """`manifest` with the paths it records (teacher, chain) relative to `folder`, the folder that holds it (or a
    sibling of it: atomic writes fill a temporary sibling), so that a run folder can be moved or shared."""
    def rel(p):
        return os.path.relpath(p, Path(folder).resolve()) if p and os.path.isabs(p) else p

    out = dict(manifest)
    if isinstance(out.get("teacher"), dict):
        out["teacher"] = {**out["teacher"], "path": rel(out["teacher"].get("path"))}
    out["chain"] = [{**c, "path": rel(c.get("path"))} if isinstance(c, dict) and "path" in c else c
                    for c in out.get("chain") or []]
    return out


def manifest_files(manifest: dict, folder: str | os.PathLike) -> dict[str, str]:
    """{file name: text} of a finished model folder: the manifest (portable paths) and its model card."""
    m = portable(manifest, folder)
    return {MANIFEST_NAME: json_text(m, indent=2, sort_keys=False) + "\n", "README.md": model_card(m)}


def write_manifest(folder: str | os.PathLike, manifest: dict, card: bool = False) -> Path:
    """Write the manifest (paths relative to `folder`) and, with `card`, the README.md model card."""
    for name, text in manifest_files(manifest, folder).items():
        if name == MANIFEST_NAME or card:
            (Path(folder) / name).write_text(text)
    return Path(folder) / MANIFEST_NAME


def model_card(m: dict) -> str:
    """A short README.md for a model folder, from its manifest: teacher, layers, stages, tokens, results."""
    types = m.get("layer_types") or []
    attn = [i for i, t in enumerate(types) if t in ("full_attention", "attention")]
    t = m.get("teacher") or {}
    recipe = m.get("recipe") or {}
    lines = [f"# mmmamba model: {m.get('stage')}" + (f" of recipe {recipe['name']}" if recipe.get("name") else ""),
             "",
             "A decoder whose attention layers were turned into Mamba-2 layers (hybrid or linear) by seeding and "
             "distillation from a Transformer teacher (the mmMamba method, arXiv 2502.13145), made with mmmamba. "
             "Load with `import mmmamba` then `AutoModelForCausalLM.from_pretrained(folder)`; weights are "
             "safetensors.",
             "",
             f"- Teacher: `{t.get('path') if os.path.isabs(str(t.get('spec'))) else t.get('spec')}` (weights "
             f"sha256 `{str(t.get('sha256'))[:16]}…`)",
             f"- Layers: {len(types)}, attention at {attn or 'none'} (the rest Mamba-2): "
             + "".join("A" if i in attn else "M" for i in range(len(types)))]
    if m.get("placement"):
        lines.append(f"- Placement: `{m['placement'].get('spec')}`")
    if m.get("init"):
        lines.append(f"- Seeded with init `{m['init']}`, seed {m.get('seed')}")
    rows = [c for c in m.get("chain") or [] if isinstance(c, dict)] + [m]
    trained = [c for c in rows if c.get("stage") != "seed"]
    if trained:
        lines += ["", "| stage | steps | tokens | final loss |", "|---|---|---|---|"]
        for c in trained:
            loss = (c.get("final_metrics") or {}).get("loss")
            lines.append(f"| {c.get('stage')} | {c.get('steps', 0):,} | {c.get('tokens', 0):,} | "
                         + (f"{loss:.5g}" if isinstance(loss, (int, float)) else "-") + " |")
        lines += ["", f"Token budget: {sum(c.get('tokens') or 0 for c in trained):,} training tokens over "
                      f"{len(trained)} stage(s)."]
    got = m.get("final_metrics") or {}
    fm = {k: got[k] for k in ("kl", "ce", "layer_mse", "loss_last") if got.get(k) is not None}
    measured = ", ".join(f"{k} {v:.5g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in fm.items())
    lines += ["", f"Measured results: {measured or 'none yet (only the training loss above)'} (on the training "
                  "data; held-out quality is not measured by training)."]
    lines += ["", f"Created {m.get('created')} with mmmamba {m.get('mmmamba_version')}; the full record is in "
                  f"`{MANIFEST_NAME}`.", ""]
    return "\n".join(lines)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    p = Path(folder) / MANIFEST_NAME
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ChainError(f"{p} is not valid JSON ({e})") from e
    if not isinstance(m, dict):
        raise ChainError(f"{p} is not a manifest object")
    return m


def check_input(folder: str | os.PathLike, expected: int | str | list, teacher: dict, *,
                for_stage: int | str, hint: str = "") -> dict:
    """Validate a stage input and return its manifest; raise ChainError naming what was expected.

    expected: the stage(s) whose output is acceptable (e.g. 2 for stage 3). teacher: `teacher_identity(...)`."""
    exp = [stage_name(e) for e in (expected if isinstance(expected, (list, tuple)) else [expected])]
    want = " or ".join(exp)
    who = stage_name(for_stage)
    folder = Path(folder)
    hint = f" {hint}" if hint else ""
    if not folder.is_dir():
        raise ChainError(f"{who} needs the output of {want} at {folder}, which does not exist.{hint}")
    m = read_manifest(folder)
    if m is None:
        raise ChainError(
            f"{who} needs the output of {want} at {folder}, but it has no {MANIFEST_NAME}; refusing to start from "
            f"an unknown model (e.g. a bare seed).{hint}"
        )
    got = m.get("stage")
    if got not in exp:
        raise ChainError(f"{who} expects the output of {want}, but {folder} is the output of {got}.{hint}")
    if not m.get("complete", False):
        raise ChainError(f"{folder} is an unfinished {got} checkpoint, not a completed {want} output.{hint}")
    t = m.get("teacher") or {}
    if t.get("sha256") != teacher.get("sha256"):
        raise ChainError(
            f"{folder} was distilled from teacher {t.get('spec') or t.get('path')!r} (weights sha256 "
            f"{str(t.get('sha256'))[:12]}…), but this run's teacher is {teacher.get('spec')!r} (sha256 "
            f"{str(teacher.get('sha256'))[:12]}…); {who} expects a {want} output of that teacher.{hint}"
        )
    return m
