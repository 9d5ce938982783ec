"""The project's CTM student format: an artifact of kind ``"student"`` with safetensors weights per variant.

Layout of a student folder (``ctm_core.io.artifact``)::

    config.json                 {"format": ..., "class_name": "CTMStudent", "init_kwargs": {...CTMStudent kwargs...},
                                 "variants": {"online": {"file": ..., "sha256": ...}, ...},
                                 "meta": {...free-form provenance: steps, teacher sha256, data hash, run ids...},
                                 "kind": "student", "artifact_version": 1, "files": {...digests per file...}}
    weights/<variant>.safetensors   one file per variant: "online", "ema_0.999", "ema_0.9999", ...

``load_student`` verifies the sha256 of the variant's file (and of its tensors) before use, and, when the caller
holds a digest from elsewhere (a registry tag, a model manifest), that digest too: ``config.json`` can be edited
together with the weights, so its own record alone proves nothing about who wrote them. Weights paths are confined
to the folder: relative, no ``..``, and still inside the folder once symlinks are resolved. The whole folder is
swapped in by one rename, so a crash never leaves a half-written student.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch

from ctm_core.errors import InputError
from ctm_core.io.artifact import encode_weights, read_artifact, read_artifact_config, write_artifact
from ctm_core.nets.student import CTMStudent

FORMAT = "ctm_core.nets.student/1"
KIND = "student"

__all__ = [
    "FORMAT",
    "KIND",
    "build_student",
    "ema_variant",
    "load_student",
    "read_student_config",
    "save_student",
    "student_class_name",
]


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
    the same atomic rename. An existing ``out_dir`` is replaced as a whole.
    """
    if not variants:
        raise InputError("variants: expected at least one state_dict (e.g. {'online': ...}), got none")
    for name in variants:
        if not name or "/" in name or name.startswith("."):
            raise InputError(f"variants: invalid variant name {name!r}")
    for fname in extra_json or {}:
        if "/" in fname or fname in ("config.json", "weights"):
            raise InputError(f"extra_json: invalid file name {fname!r}")
    weights = {f"weights/{name}.safetensors": encode_weights(sd) for name, sd in variants.items()}
    config = {
        "format": FORMAT,
        "class_name": student_class_name(init_kwargs),
        "init_kwargs": init_kwargs,
        "variants": {
            name: {"file": f"weights/{name}.safetensors", "sha256": weights[f"weights/{name}.safetensors"].sha256}
            for name in variants
        },
    }
    written = write_artifact(out_dir, weights, config, kind=KIND, meta=meta or {}, extra_json=extra_json, replace=True)
    written.pop("files")
    return written


def student_class_name(init_kwargs: dict[str, Any]) -> str:
    """``"ADMStudent"`` for the sony/ctm ImageNet-64 network (``model_type`` ``"ADMUNet"``), else ``"CTMStudent"``."""
    return "ADMStudent" if init_kwargs.get("model_type") == "ADMUNet" else "CTMStudent"


def build_student(config: dict[str, Any]) -> CTMStudent:
    """A freshly initialised student of a ``config.json`` (``class_name`` + ``init_kwargs``): ``CTMStudent``, or
    ``ADMStudent`` for a student continued from a released sony/ctm checkpoint
    (docs/official.md#5-continuing-training-from-a-released-checkpoint)."""
    kwargs = dict(config["init_kwargs"])
    name = config.get("class_name", "CTMStudent")
    if name != student_class_name(kwargs):
        raise InputError(
            f"config.json: class_name {name!r} does not fit init_kwargs.model_type {kwargs.get('model_type')!r} "
            "(fix: write the student again with save_student)"
        )
    if name == "ADMStudent":
        from ctm_core.nets.official.loader import ADMStudent

        kwargs.pop("model_type")
        return ADMStudent(**kwargs)
    return CTMStudent(**kwargs)


def _legacy_files(config: dict[str, Any]) -> dict[str, dict[str, str | None]]:
    """Digests a student ``config.json`` written before the artifact format records: the file sha256 per variant."""
    if config.get("format") != FORMAT:
        raise InputError(f"config.json: format expected {FORMAT!r}, got {config.get('format')!r}")
    variants = config.get("variants")
    if not isinstance(variants, dict) or not all(
        isinstance(v, dict) and {"file", "sha256"} <= set(v) for v in variants.values()
    ):
        raise InputError(f"config.json: variants: expected {{name: {{'file', 'sha256'}}}}, got {str(variants)[:200]!r}")
    return {v["file"]: {"sha256": v["sha256"], "weights_sha256": None} for v in variants.values()}


def _confined(folder: pathlib.Path, rel: Any, what: str) -> pathlib.Path:
    """``folder / rel`` for a relative POSIX path without ``..`` that stays inside ``folder`` after resolving
    symlinks; anything else (absolute, ``..``, a link out of the folder) raises ``InputError``."""
    parts = pathlib.PurePosixPath(rel).parts if isinstance(rel, str) else ()
    bad = not parts or rel.startswith("/") or "\\" in rel or ".." in parts
    path = folder / rel if not bad else folder
    if bad or not path.resolve().is_relative_to(folder.resolve()):
        raise InputError(
            f"{what}: expected a relative path that stays inside {folder} (no '..', no link out), "
            f"got {str(rel)[:200]!r} (fix: write the student again with save_student)"
        )
    return path


def read_student_config(student_dir: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a student folder written by ``save_student`` (format-checked, without the digests).

    Every variant's ``file`` is checked to be a path inside the folder (``_confined``) before anyone opens it.
    """
    config, _ = read_artifact_config(student_dir, KIND, legacy=_legacy_files)
    path = pathlib.Path(student_dir) / "config.json"
    if config.get("format") != FORMAT:
        raise InputError(f"{path}: format expected {FORMAT!r}, got {config.get('format')!r}")
    variants = config.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise InputError(f"{path}: variants: expected a non-empty object, got {str(variants)[:200]!r}")
    for name, entry in variants.items():
        if not isinstance(entry, dict):
            raise InputError(
                f"{path}: variants[{name[:80]!r}]: expected an object with 'file', got {str(entry)[:200]!r}"
            )
        _confined(pathlib.Path(student_dir), entry.get("file"), f"{path}: variants[{name[:80]!r}].file")
    return config


def load_student(
    student_dir: str | os.PathLike, variant: str = "online", *, device="cpu", sha256: str | None = None
) -> CTMStudent:
    """Build the student of ``student_dir`` (``build_student``) with the weights of ``variant``, verified by
    sha256; eval mode.

    ``sha256``: the weights file's digest as recorded outside the folder (e.g. a registered model's manifest); the
    bytes read must match it as well as ``config.json``'s record.
    """
    config = read_student_config(student_dir)
    if variant not in config["variants"]:
        raise InputError(f"variant: expected one of {sorted(config['variants'])}, got {variant!r}")
    file = config["variants"][variant]["file"]
    art = read_artifact(student_dir, KIND, files=[file], legacy=_legacy_files)
    if sha256 is not None and art.sha256[file] != sha256:
        raise InputError(
            f"{pathlib.Path(student_dir) / file}: weights sha256 {art.sha256[file]} differs from the expected "
            f"{sha256} (fix: the student folder was modified; fetch the model again)"
        )
    student = build_student(config)
    student.load_state_dict(art.tensors[file], strict=True)
    return student.to(device).eval().requires_grad_(False)
