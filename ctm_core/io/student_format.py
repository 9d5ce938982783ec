"""The project's CTM student format: safetensors weights per variant + one JSON config, no pickle.

Layout of a student folder::

    config.json                 {"format": ..., "init_kwargs": {...CTMStudent kwargs...}, "variants": [...],
                                 "meta": {...free-form provenance: steps, teacher sha256, data hash, run ids...}}
    weights/<variant>.safetensors   one file per variant: "online", "ema_0.999", "ema_0.9999", ...

Every weights file also carries its sha256 in ``config.json``; ``load_student`` verifies it before use.
Writes go to a temporary folder renamed into place, so a crash never leaves a half-written student.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ctm_core.nets.student import CTMStudent

FORMAT = "ctm_core.nets.student/1"

__all__ = ["FORMAT", "ema_variant", "load_student", "read_student_config", "save_student"]


def ema_variant(rate: float | None) -> str:
    """Variant name of an evaluation EMA (``None`` = the online weights)."""
    return "online" if rate is None else f"ema_{rate:g}"


def save_student(
    out_dir: str | os.PathLike,
    init_kwargs: dict[str, Any],
    variants: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any] | None = None,
    extra_json: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``variants`` (name -> state_dict of a ``CTMStudent``) atomically to ``out_dir``; returns the config.

    ``extra_json`` maps file names (e.g. ``"run.json"``) to JSON-able objects written into the same folder, inside
    the same atomic rename.
    """
    if not variants:
        raise ValueError("variants: expected at least one state_dict (e.g. {'online': ...}), got none")
    for name in variants:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"variants: invalid variant name {name!r}")
    out = pathlib.Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "class_name": "CTMStudent",
        "init_kwargs": json.loads(json.dumps(init_kwargs)),  # JSON-able check (raises TypeError otherwise)
        "variants": {},
        "meta": json.loads(json.dumps(meta or {})),
    }
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="." + out.name + ".", dir=out.parent))
    try:
        (tmp / "weights").mkdir()
        for name, sd in variants.items():
            blob = st_save({k: v.detach().cpu().contiguous() for k, v in sd.items()})
            (tmp / "weights" / f"{name}.safetensors").write_bytes(blob)
            config["variants"][name] = {
                "file": f"weights/{name}.safetensors",
                "sha256": hashlib.sha256(blob).hexdigest(),
            }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for fname, obj in (extra_json or {}).items():
            if "/" in fname or fname in ("config.json", "weights"):
                raise ValueError(f"extra_json: invalid file name {fname!r}")
            (tmp / fname).write_text(json.dumps(obj, indent=2, sort_keys=True))
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


def read_student_config(student_dir: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(student_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no student config; expected a folder written by save_student")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format expected {FORMAT!r}, got {config.get('format')!r}")
    return config


def load_student(student_dir: str | os.PathLike, variant: str = "online", *, device="cpu") -> CTMStudent:
    """Build the ``CTMStudent`` of ``student_dir`` with the weights of ``variant``, verified by sha256; eval mode."""
    config = read_student_config(student_dir)
    if variant not in config["variants"]:
        raise ValueError(f"variant: expected one of {sorted(config['variants'])}, got {variant!r}")
    entry = config["variants"][variant]
    blob = (pathlib.Path(student_dir) / entry["file"]).read_bytes()
    got = hashlib.sha256(blob).hexdigest()
    if got != entry["sha256"]:
        raise ValueError(
            f"{entry['file']}: sha256 mismatch, expected {entry['sha256']}, got {got} (file changed "
            "or truncated; re-run the distill stage)"
        )
    student = CTMStudent(**config["init_kwargs"])
    student.load_state_dict(st_load(blob), strict=True)
    return student.to(device).eval().requires_grad_(False)
