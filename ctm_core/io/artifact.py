"""The one on-disk format of the project's saved models: safetensors weights + ``config.json``, pinned by sha256.

Layout::

    <folder>/config.json      {...the producer's config..., "kind": "teacher", "artifact_version": 1,
                               "meta": {...} (optional), "files": {"<weights file>": {"sha256": ...,
                               "weights_sha256": ...}, ...}}
    <folder>/<weights file>   one or more safetensors files (teacher.safetensors, weights/online.safetensors, ...)

For every weights file ``files`` records ``sha256`` (of the file's bytes, what a run pins) and ``weights_sha256``
(``weights_sha256`` below: of the tensors by key, independent of how they were serialised). ``read_artifact``
checks the kind and both digests before it returns anything. A producer may also embed its config (without the
``files`` record, which a file cannot hold about itself) in each weights file's safetensors metadata, so that the
file alone rebuilds the model. Writes are atomic: a new folder appears by one rename of a temporary folder; into an
existing folder each file is written to a temporary name and renamed over the old one, ``config.json`` last.

Every refusal is an ``InputError`` (a ``ValueError``) with one line: what, expected, got, and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import reprlib
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import safetensors.torch
import torch

from ctm_core.errors import InputError
from ctm_core.io.atomic import atomic_write_bytes, staged_dir
from ctm_core.io.hashing import sha256_bytes

__all__ = [
    "ARTIFACT_VERSION",
    "CONFIG_FILE",
    "Artifact",
    "EncodedWeights",
    "atomic_write_bytes",
    "encode_weights",
    "load_safetensors",
    "read_artifact",
    "read_artifact_config",
    "safetensors_metadata",
    "save_artifact",
    "weights_sha256",
    "write_artifact",
]

ARTIFACT_VERSION = 1
CONFIG_FILE = "config.json"
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header size

Tensors = Mapping[str, torch.Tensor]
Legacy = Callable[[dict[str, Any]], dict[str, dict[str, str | None]]]


def weights_sha256(tensors: Tensors) -> str:
    """sha256 over the tensors: for each key in sorted order, key, dtype, shape and the raw bytes (C order)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class EncodedWeights:
    """One serialised safetensors file: its bytes, their sha256, and the tensors' ``weights_sha256``."""

    data: bytes
    sha256: str
    weights_sha256: str


def encode_weights(tensors: Tensors, metadata: dict[str, str] | None = None) -> EncodedWeights:
    """Serialise ``{key: tensor}`` (CPU, contiguous copies) to safetensors bytes with optional string metadata."""
    if not isinstance(tensors, Mapping):
        raise InputError(f"tensors: expected a dict of str -> torch.Tensor, got {type(tensors).__name__}")
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputError(f"tensors[{key!r}]: expected a str key and a torch.Tensor, got {type(value).__name__}")
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = safetensors.torch.save(cpu, metadata=metadata)
    return EncodedWeights(data=data, sha256=sha256_bytes(data), weights_sha256=weights_sha256(cpu))


def _write(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)  # mkstemp creates 0o600


def _short(value: Any) -> str:
    """A bounded repr for messages (values read from a file may be huge or deeply nested)."""
    return reprlib.repr(value)


def _check_rel(rel: str, what: str) -> None:
    if not isinstance(rel, str):
        raise InputError(f"{what}: expected a relative file name inside the folder, got {_short(rel)}")
    parts = pathlib.PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or ".." in parts or rel == CONFIG_FILE or any(p.startswith(".") for p in parts):
        raise InputError(f"{what}: expected a relative file name inside the folder, got {_short(rel)}")


def write_artifact(
    out_dir: str | os.PathLike,
    weights: Mapping[str, Tensors | EncodedWeights],
    config: dict[str, Any],
    *,
    kind: str,
    meta: dict[str, Any] | None = None,
    embed_key: str | None = None,
    extra_json: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Write an artifact folder (module doc) atomically; returns the config written to ``config.json``.

    Args:
        out_dir: the folder (created, with its parents, if missing).
        weights: relative file name (e.g. ``"teacher.safetensors"``, ``"weights/online.safetensors"``) -> tensors,
            or bytes already made by ``encode_weights``.
        config: the producer's JSON-able config; ``kind``, ``artifact_version`` (and ``meta``) are added to it.
        embed_key: if given, tensors are written with the config (without ``files``) as metadata under this key.
        extra_json: further JSON files (name -> object) written inside the same atomic step.
        replace: an existing folder is swapped as a whole (its other files go); otherwise its files are replaced one
            by one, ``config.json`` last, and other files are kept.

    Nothing on disk changes when an input is invalid (a non-JSON value raises ``TypeError`` before any write).
    """
    if not isinstance(kind, str) or not kind:
        raise InputError(f"kind: expected a non-empty str, got {kind!r}")
    if not weights:
        raise InputError("weights: expected at least one weights file, got none")
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"out_dir: expected a folder (or a path to create), got an existing file {out}")
    if "files" in config:
        raise InputError("config: expected no 'files' entry (the digests are recorded by write_artifact), got one")
    body = {**config, "kind": kind, "artifact_version": ARTIFACT_VERSION}
    if meta is not None:
        body["meta"] = meta
    body = json.loads(json.dumps(body))  # JSON-able check (TypeError otherwise) and a deep copy
    metadata = {embed_key: json.dumps(body, sort_keys=True)} if embed_key else None
    payloads: dict[str, bytes] = {}
    files: dict[str, dict[str, str]] = {}
    for rel, value in weights.items():
        _check_rel(rel, "weights")
        enc = value if isinstance(value, EncodedWeights) else encode_weights(value, metadata)
        payloads[rel] = enc.data
        files[rel] = {"sha256": enc.sha256, "weights_sha256": enc.weights_sha256}
    for name, obj in (extra_json or {}).items():
        _check_rel(name, "extra_json")
        if name in payloads:
            raise InputError(f"extra_json: {name!r} is also a weights file name")
        payloads[name] = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
    written = {**body, "files": files}
    payloads[CONFIG_FILE] = (json.dumps(written, indent=2, sort_keys=True) + "\n").encode("utf-8")

    out.parent.mkdir(parents=True, exist_ok=True)
    if replace or not out.exists():
        with staged_dir(out) as tmp_dir:
            for rel, data in payloads.items():
                (tmp_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                _write(tmp_dir / rel, data)
        return written

    tmp_paths: dict[str, pathlib.Path] = {}
    try:
        for rel, data in payloads.items():  # config.json is the last entry
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{pathlib.PurePosixPath(rel).name}.tmp-", dir=(out / rel).parent)
            os.close(fd)
            tmp_paths[rel] = pathlib.Path(tmp)
            _write(tmp_paths[rel], data)
        for rel, tmp in tmp_paths.items():
            os.replace(tmp, out / rel)
    finally:
        for tmp in tmp_paths.values():
            tmp.unlink(missing_ok=True)
    return written


def save_artifact(
    out_dir: str | os.PathLike,
    tensors: Tensors,
    config: dict[str, Any],
    *,
    kind: str,
    weights_file: str = "weights.safetensors",
    meta: dict[str, Any] | None = None,
    embed_key: str | None = None,
) -> str:
    """Write a one-file artifact (``weights_file`` + ``config.json``) atomically; returns the weights file's sha256."""
    written = write_artifact(out_dir, {weights_file: tensors}, config, kind=kind, meta=meta, embed_key=embed_key)
    return written["files"][weights_file]["sha256"]


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A verified artifact: ``config`` (``config.json`` without ``files``), the ``files`` record, and per weights
    file read: its tensors, its sha256 and its safetensors metadata."""

    folder: pathlib.Path
    config: dict[str, Any]
    files: dict[str, dict[str, str | None]]
    tensors: dict[str, dict[str, torch.Tensor]]
    sha256: dict[str, str]
    metadata: dict[str, dict[str, str]]


def read_artifact_config(
    folder: str | os.PathLike, kind: str, *, legacy: Legacy | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, str | None]]]:
    """``config.json`` of a ``kind`` folder, checked: returns (config without ``files``, the ``files`` record).

    ``legacy(config)`` accepts a config written before this format (no ``kind`` or no ``files``): it checks the
    producer's own format tag and returns the digests that config records (``None`` for a digest not recorded).
    """
    folder = pathlib.Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        found = "a file" if folder.exists() else "nothing"
        raise InputError(f"{folder}: expected a {kind} folder with {CONFIG_FILE}, found {found} (fix: check the path)")
    if not path.is_file():
        raise InputError(f"{path}: missing; expected a {kind} folder written by ctm_core (fix: write it again)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise InputError(f"{path}: expected JSON, got unreadable text ({why}) (fix: write the {kind} again)") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(config).__name__} (fix: write the {kind} again)")
    got = config.get("kind")
    if got is not None and got != kind:
        raise InputError(f"{path}: expected kind {kind!r}, got {got!r} (fix: pass a {kind} folder)")
    version = config.get("artifact_version", ARTIFACT_VERSION)
    if version != ARTIFACT_VERSION:
        raise InputError(
            f"{path}: expected artifact_version {ARTIFACT_VERSION}, got {version!r} "
            "(fix: read it with the ctm_core version that wrote it)"
        )
    files = config.pop("files", None)
    if got is None or files is None:
        if legacy is None:
            raise InputError(f"{path}: expected 'kind' and 'files' entries, got {sorted(config)} (fix: write it again)")
        files = legacy(config)
    if not isinstance(files, dict) or not files:
        raise InputError(
            f"{path}: expected a non-empty 'files' record, got {_short(files)} (fix: write the {kind} again)"
        )
    for rel, entry in files.items():
        _check_rel(rel, f"{path}: files")
        digests = entry.values() if isinstance(entry, dict) else ()
        if not isinstance(entry, dict) or not all(d is None or isinstance(d, str) for d in digests):
            raise InputError(
                f"{path}: files[{_short(rel)}]: expected {{'sha256': hex or null, 'weights_sha256': hex or null}}, "
                f"got {_short(entry)} (fix: write the {kind} again)"
            )
    return config, files


def safetensors_metadata(data: bytes, name: str) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (header = 8-byte little-endian length, then JSON); {} if none."""
    if len(data) < 8:
        raise InputError(f"{name}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise InputError(f"{name}: not a safetensors file or truncated (header length {n}, file {len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise InputError(f"{name}: corrupt safetensors header ({why}) (fix: write it again)") from None
    if not isinstance(header, dict):
        raise InputError(
            f"{name}: corrupt safetensors header: expected a JSON object, got {type(header).__name__} "
            "(fix: write it again)"
        )
    meta = header.get("__metadata__")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InputError(
            f"{name}: corrupt safetensors header: expected '__metadata__' to map str to str, got {_short(meta)} "
            "(fix: write it again)"
        )
    return meta


def load_safetensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """Tensors of safetensors bytes; corrupt data raises ``InputError``."""
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        why = " ".join(str(e).split())[:300]
        raise InputError(f"{name}: corrupt or truncated safetensors data ({why}) (fix: write it again)") from None


def read_artifact(
    folder: str | os.PathLike,
    kind: str,
    *,
    files: Sequence[str] | None = None,
    legacy: Legacy | None = None,
) -> Artifact:
    """Read a ``kind`` artifact folder, verifying each weights file's sha256 and ``weights_sha256`` first.

    ``files`` picks which weights files to load (default: all that ``config.json`` lists); ``legacy`` as in
    ``read_artifact_config``.
    """
    folder = pathlib.Path(folder)
    config, record = read_artifact_config(folder, kind, legacy=legacy)
    tensors, digests, metadata = {}, {}, {}
    for rel in record if files is None else files:
        if rel not in record:
            raise InputError(
                f"{folder}: expected a weights file listed in {CONFIG_FILE}, got {rel!r} (has {sorted(record)})"
            )
        path = folder / rel
        if not path.is_file():
            raise InputError(f"{path}: missing; expected a {kind} folder with {rel} (fix: write the {kind} again)")
        data = path.read_bytes()
        digests[rel] = sha256_bytes(data)
        _check_digest(path, record[rel].get("sha256"), digests[rel])
        metadata[rel] = safetensors_metadata(data, str(path))
        tensors[rel] = load_safetensors(data, str(path))
        recorded = record[rel].get("weights_sha256")
        if recorded is not None:
            _check_digest(path, recorded, weights_sha256(tensors[rel]))
    return Artifact(folder, config, record, tensors, digests, metadata)


def _check_digest(path: pathlib.Path, recorded: str | None, actual: str) -> None:
    if recorded is not None and actual != recorded:
        raise InputError(
            f"{path}: weights sha256 mismatch: recorded {recorded}, got {actual} (fix: the file was modified or "
            "truncated; write or fetch it again)"
        )
