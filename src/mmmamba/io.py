"""Atomic folder writes and checked model loading (safetensors only)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from .models import MMMambaForCausalLM


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike):
    """Yield a temporary sibling folder; on success it replaces `out` in one rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def finite_json(obj):
    """`obj` with every non-finite float (nan, inf) replaced by None, recursively: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj, **kw) -> str:
    """json.dumps that always writes valid JSON: non-finite floats become null (never a bare NaN)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kw)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_model_folder(path: str | os.PathLike) -> Path:
    """Raise a clear error for a missing folder / config / weights or an unreadable safetensors file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    cfg = path / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{cfg} is missing: not a model folder")
    try:
        json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg} is not valid JSON: {e}") from e
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(no_safetensors_message(path))
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    sf.get_slice(k).get_shape()
            size = f.stat().st_size
            with open(f, "rb") as fh:
                header = int.from_bytes(fh.read(8), "little")
                meta = json.loads(fh.read(header))
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
            if 8 + header + end != size:
                raise ValueError(f"expected {8 + header + end} bytes, found {size}")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"weights file {f} is truncated or corrupt ({e}); re-create or re-download it") from e
    return path


def no_safetensors_message(path: Path) -> str:
    """The error for a folder without safetensors weights, with the one-off conversion of pickled ones."""
    pickled = sorted(p.name for pat in ("*.bin", "*.pt", "*.pth") for p in path.glob(pat))
    if not pickled:
        return f"no *.safetensors weights in {path}: not a model folder"
    conv = (f"python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
            f"M.from_pretrained('{path}', use_safetensors=False).save_pretrained('{path}-st'); "
            f"T.from_pretrained('{path}').save_pretrained('{path}-st')\"")
    return (f"{path} holds pickled weights ({', '.join(pickled[:3])}) and no *.safetensors: mmmamba loads only "
            f"safetensors, since unpickling a file can run any code in it. If you trust these files, convert them "
            f"once and use {path}-st: {conv}")


def from_pretrained_checked(cls, path: str | os.PathLike, **kwargs):
    """cls.from_pretrained(path) reading safetensors only, refusing missing, unexpected or mis-shaped tensors
    (which transformers would fill with random values, or drop, with only a printed report)."""
    model, info = cls.from_pretrained(path, use_safetensors=True, output_loading_info=True, **kwargs)
    problems = [f"{what} {sorted(map(str, info.get(key) or []))[:6]}" for key, what in
                (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "mis-shaped"))
                if info.get(key)]
    if problems:
        raise ValueError(f"{path}: the weights do not match its config.json ({'; '.join(problems)} tensors). A "
                         "partial or damaged save, or layer_types that do not match the weights: re-create the folder")
    return model


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | None = None):
    """Load an mmmamba model folder after checking its files; every tensor must match the config."""
    path = check_model_folder(path)
    model = from_pretrained_checked(MMMambaForCausalLM, path, dtype=dtype or torch.float32)
    if device is not None:
        model = model.to(device)
    return model.eval()


def is_mmmamba_folder(path: str | os.PathLike) -> bool:
    """Whether `path` holds an mmmamba model (config.json with model_type mmmamba)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "mmmamba"
    except (OSError, ValueError, AttributeError):
        return False


def check_output_folder(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to write a model over `out` when it is a file, a non-empty folder that is not an mmmamba model
    folder (a run folder, the user's files), or, without `overwrite`, an mmmamba model folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder; choose another output folder")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not is_mmmamba_folder(out):
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise FileExistsError(f"{out} is not empty ({shown}) and is not an mmmamba model folder; it is left "
                              "untouched: choose a new or empty folder")
    if not overwrite:
        raise FileExistsError(f"{out} already holds an mmmamba model; pass --overwrite (overwrite=True) to replace it")
    return out


def save_model(model, out: str | os.PathLike, tokenizer=None, extra: dict[str, str] | None = None,
               overwrite: bool = False) -> Path:
    """save_pretrained (safetensors) + tokenizer + extra text files, written atomically (a temporary sibling
    folder renamed into place). An existing `out` must be empty, or an mmmamba model folder with `overwrite`."""
    check_output_folder(out, overwrite)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return Path(out)
