"""Small file helpers shared by the pipeline stages: hashing, atomic writes, all-or-nothing output folders.

Every stage writes its outputs so that a crash never leaves a half-written artifact where DVC (or the next stage)
would pick it up: single files go through a temp file + `os.replace`, whole output folders are built in a temp
folder next to the destination and renamed into place at the end (`staged_dir`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ctm_core.io.atomic import atomic_write_bytes, current_umask, staged_dir
from ctm_core.io.hashing import CHUNK_BYTES, sha256_bytes, sha256_file, sha256_fileobj
from ctm_core.redact import redact_text

__all__ = [
    "CHUNK_BYTES",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "current_umask",
    "json_dumps",
    "normalize_sha256",
    "one_line",
    "read_json",
    "sha256_bytes",
    "sha256_file",
    "sha256_fileobj",
    "staged_dir",
]

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def normalize_sha256(value: str, *, name: str = "sha256") -> str:
    """Return `value` as 64 lowercase hex digits or raise ValueError naming the argument."""
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a 64-digit hex string, got {type(value).__name__} {value!r}")
    v = value.strip().lower()
    if v.startswith("sha256:"):
        v = v[len("sha256:") :]
    if not _SHA256_RE.match(v):
        raise ValueError(f"{name}: expected a 64-digit hex string, got {value!r}")
    return v


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text variant of `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_dumps(obj: Any) -> str:
    """Canonical JSON used for every small artifact: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as canonical JSON (see `json_dumps`) atomically."""
    return atomic_write_text(path, json_dumps(obj))


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def one_line(e: BaseException | str, limit: int | None = None) -> str:
    """An exception (or text) as one line: whitespace runs, newlines included, become single spaces, URIs lose
    their user-info and query (`ctm_core.redact`: messages get printed and logged); at most `limit` characters
    when given."""
    line = redact_text(" ".join(str(e).split()))
    return line if limit is None else line[:limit]
