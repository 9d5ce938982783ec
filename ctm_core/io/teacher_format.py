"""The project's own teacher format (no pickle) and the one entry point that loads any teacher checkpoint.

A teacher folder holds

* ``teacher.safetensors``: the weights (flat ``state_dict`` of the precond module, keys ``model.*``); its header
  metadata holds the JSON config under ``"ctm_core_config"``, so the file alone is enough to rebuild the net;
* ``config.json``: the same config, for people and tools (format version, ``class_name``, ``init_kwargs``,
  ``precond``, sha256 of the source pickle and of its embedded module sources, sha256 of the weights).

``weights_sha256`` hashes the tensors themselves (sorted keys; key, dtype, shape, raw little-endian bytes), not the
file, so it can sit inside the file it describes and survives re-serialisation. ``load_edm_checkpoint`` sniffs
the format: an EDM snapshot pickle (read by ``ctm_core.io.edm_pickle``, nothing executed), a ``.safetensors`` file
(8-byte little-endian header length, then ``{``), or a teacher folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import struct
import tempfile
from typing import Any, BinaryIO

import safetensors.torch
import torch

from ctm_core.io.edm_pickle import read_edm_snapshot

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "METADATA_KEY",
    "weights_sha256",
    "save_teacher",
    "read_teacher",
    "convert_edm_pickle",
    "load_edm_checkpoint",
]

FORMAT_NAME = "ctm_core.teacher"
FORMAT_VERSION = 1
WEIGHTS_FILE = "teacher.safetensors"
CONFIG_FILE = "config.json"
METADATA_KEY = "ctm_core_config"
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header size

Source = str | os.PathLike | BinaryIO | bytes


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors: for each key in sorted order, key, dtype, shape and the raw bytes (C order)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_json(name: str, value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected JSON-serialisable values, got {value!r} ({e})") from e


def _make_config(class_name, init_kwargs, state_dict, source_file_sha256, source_sha256) -> dict:
    if not isinstance(class_name, str) or not class_name:
        raise ValueError(f"class_name: expected a non-empty str, got {class_name!r}")
    if not isinstance(init_kwargs, dict):
        raise ValueError(f"init_kwargs: expected a dict, got {type(init_kwargs).__name__}")
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError("state_dict: expected a non-empty dict of tensors")
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict[{key!r}]: expected a str key and a torch.Tensor, got {type(value).__name__}")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "class_name": class_name,
        "precond": class_name,  # preconditioning wrapper (EDMPrecond / VPPrecond / VEPrecond), ctm_core.nets.precond
        "model_type": init_kwargs.get("model_type"),
        "init_kwargs": _check_json("init_kwargs", init_kwargs),
        "source_file_sha256": source_file_sha256,
        "source_sha256": _check_json("source_sha256", dict(source_sha256 or {})),
        "weights_sha256": weights_sha256(state_dict),
        "num_tensors": len(state_dict),
        "num_elements": int(sum(t.numel() for t in state_dict.values())),
    }


def save_teacher(
    class_name: str,
    init_kwargs: dict,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    source_file_sha256: str | None = None,
    source_sha256: dict[str, str] | None = None,
) -> dict:
    """Write ``out_dir/teacher.safetensors`` and ``out_dir/config.json`` atomically; returns the config dict.

    Args:
        class_name: precond class (``'EDMPrecond'``, ...), as ``ctm_core.nets.precond.build_precond`` takes it.
        init_kwargs: its constructor kwargs (JSON-able).
        state_dict: flat ``{key: tensor}`` of the precond module (CPU copies are written).
        out_dir: folder to create (or update); its parent must exist.
        source_file_sha256: sha256 of the pickle the weights came from, if any.
        source_sha256: sha256 of its embedded module sources per class, if any.

    Both files are first written as temporary files; a new folder appears by one ``os.replace`` of a temporary
    folder, an existing one gets ``os.replace`` per file. On any error nothing is left behind.
    """
    config = _make_config(class_name, init_kwargs, state_dict, source_file_sha256, source_sha256)
    config_text = json.dumps(config, indent=2, sort_keys=False) + "\n"
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    payload = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(config)})

    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir: expected a folder (or a path to create), got an existing file {out_dir}")
    if not out_dir.parent.is_dir():
        raise ValueError(f"out_dir: parent folder {out_dir.parent} does not exist; create it first")

    def write(path: pathlib.Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(path, 0o644)  # mkstemp creates 0o600

    if not out_dir.exists():
        tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            os.chmod(tmp_dir, 0o755)  # mkdtemp creates 0o700
            write(tmp_dir / WEIGHTS_FILE, payload)
            write(tmp_dir / CONFIG_FILE, config_text.encode("utf-8"))
            os.replace(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        return config

    tmp_paths: list[pathlib.Path] = []
    try:
        for name, data in ((WEIGHTS_FILE, payload), (CONFIG_FILE, config_text.encode("utf-8"))):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=out_dir)
            os.close(fd)
            tmp_paths.append(pathlib.Path(tmp))
            write(tmp_paths[-1], data)
        os.replace(tmp_paths[0], out_dir / WEIGHTS_FILE)
        os.replace(tmp_paths[1], out_dir / CONFIG_FILE)
    finally:
        for tmp in tmp_paths:
            tmp.unlink(missing_ok=True)
    return config


def _read_source_bytes(source: Source) -> tuple[bytes, str]:
    """Bytes of a file path or binary file object, and a name for messages."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), "<bytes>"
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return f.read(), str(source)
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, bytes):
            raise TypeError(f"source: expected a binary file object, got one whose read() returns {type(data)}")
        return data, getattr(source, "name", "<file object>")
    raise TypeError(f"source: expected a path, bytes or a binary file object, got {type(source).__name__}")


def _safetensors_metadata(data: bytes, name: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (header = 8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise ValueError(f"{name}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise ValueError(f"{name}: not a safetensors file or truncated (header length {n}, file {len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: corrupt safetensors header ({e})") from e
    return header.get("__metadata__") or {}


def read_teacher(source: Source) -> tuple[str, dict, dict[str, torch.Tensor], dict]:
    """Read a teacher in the project format: a folder, a ``.safetensors`` path, or a binary file object / bytes.

    Returns:
        ``(class_name, init_kwargs, state_dict, config)``.

    Raises:
        ValueError: missing/corrupt files, no ``ctm_core_config`` metadata, unknown format version, a
            ``config.json`` that disagrees with the weights file, or weights whose sha256 differs from the record.
    """
    folder_config = None
    if isinstance(source, str | os.PathLike) and pathlib.Path(source).is_dir():
        folder = pathlib.Path(source)
        if not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(
                f"{folder}: expected a teacher folder with {WEIGHTS_FILE}; convert the checkpoint with "
                "ctm_core.io.teacher_format.convert_edm_pickle(src, out_dir)"
            )
        if (folder / CONFIG_FILE).is_file():
            folder_config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        source = folder / WEIGHTS_FILE
    data, name = _read_source_bytes(source)
    if data[:1] == b"\x80":
        raise ValueError(
            f"{name}: this is a pickle (EDM snapshot?), not a teacher in the project format; load it "
            "with load_edm_checkpoint(src) or convert it with convert_edm_pickle(src, out_dir)"
        )
    metadata = _safetensors_metadata(data, name)
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"{name}: safetensors file without '{METADATA_KEY}' metadata: not written by "
            "ctm_core.io.teacher_format.save_teacher, so the architecture is unknown"
        )
    config = json.loads(metadata[METADATA_KEY])
    if config.get("format") != FORMAT_NAME or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{name}: expected format {FORMAT_NAME!r} version {FORMAT_VERSION}, got "
            f"{config.get('format')!r} version {config.get('format_version')!r}"
        )
    if folder_config is not None and folder_config != config:
        raise ValueError(
            f"{name}: {CONFIG_FILE} next to it disagrees with the config stored in the weights file "
            "(partial or edited copy); re-run convert_edm_pickle into a fresh folder"
        )
    try:
        state_dict = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ValueError(f"{name}: corrupt or truncated safetensors data ({e})") from e
    recorded = config.get("weights_sha256")
    if recorded is not None:
        actual = weights_sha256(state_dict)
        if actual != recorded:
            raise ValueError(
                f"{name}: weights sha256 mismatch: recorded {recorded}, got {actual}; the file was "
                "modified or corrupted, convert the original checkpoint again"
            )
    return config["class_name"], config["init_kwargs"], state_dict, config


def convert_edm_pickle(src: Source, out_dir: str | os.PathLike) -> dict:
    """Convert an EDM snapshot pickle (read safely, nothing executed) into a teacher folder; returns the config."""
    snap = read_edm_snapshot(src)
    return save_teacher(
        snap.class_name,
        snap.init_kwargs,
        snap.state_dict,
        out_dir,
        source_file_sha256=snap.file_sha256,
        source_sha256=snap.source_sha256,
    )


def _sniff(data: bytes) -> str:
    if data[:1] == b"\x80":
        return "pickle"
    if len(data) >= 9 and data[8:9] == b"{" and struct.unpack("<Q", data[:8])[0] <= len(data) - 8:
        return "safetensors"
    return "unknown"


def load_edm_checkpoint(source: Source) -> torch.nn.Module:
    """Load a teacher: EDM snapshot pickle, ``.safetensors`` file, teacher folder, or a binary file object.

    Builds ``ctm_core.nets.precond.build_precond(class_name, init_kwargs)``, loads the weights with ``strict=True``
    (every tensor must be consumed, every parameter/buffer filled) and returns it in eval mode without grads.
    """
    if isinstance(source, str | os.PathLike) and pathlib.Path(source).is_dir():
        class_name, init_kwargs, state_dict, _ = read_teacher(source)
        name = str(source)
    else:
        data, name = _read_source_bytes(source)
        kind = _sniff(data)
        if kind == "pickle":
            snap = read_edm_snapshot(data)
            class_name, init_kwargs, state_dict = snap.class_name, snap.init_kwargs, snap.state_dict
        elif kind == "safetensors":
            class_name, init_kwargs, state_dict, _ = read_teacher(data)
        else:
            raise ValueError(
                f"{name}: unknown checkpoint format (first bytes {data[:8]!r}); expected an EDM "
                f"snapshot pickle (.pkl), a {WEIGHTS_FILE} file, or a folder holding one"
            )

    from ctm_core.nets.precond import build_precond  # networks are only needed here

    net = build_precond(class_name, init_kwargs)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{name}: checkpoint does not match {class_name}(**init_kwargs): missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all), unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} in all); check init_kwargs "
            f"{init_kwargs} against the network that wrote the file"
        )
    wrong_shape = [
        f"{k}: expected {list(v.shape)}, got {list(state_dict[k].shape)}"
        for k, v in expected.items()
        if v.shape != state_dict[k].shape
    ]
    if wrong_shape:
        raise ValueError(
            f"{name}: {len(wrong_shape)} tensor shapes do not match {class_name}(**init_kwargs): {wrong_shape[:5]}"
        )
    net.load_state_dict(state_dict, strict=True)
    return net.eval().requires_grad_(False)
