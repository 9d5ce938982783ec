"""Ray Train checkpoints you can trust: a verified upload, a completion marker written last, and resume from the
newest checkpoint whose files match their marker.

Each report of the distill stage writes ``<storage>/<run>/checkpoint_<step:06d>/trainer_state.pt`` through Ray's own
upload path (``StorageContext.persist_current_checkpoint``), then, through the same pyarrow filesystem, checks that
every file landed with its size and only then writes ``complete.json`` (step, size and sha256 of each file) LAST.
Why: pyarrow 25's ``fs.copy_files`` (Ray 2.60's upload) returns normally when the S3 server dies in the middle of the
PUT, and Ray logs "Checkpoint successfully created" for an object that does not exist (tests/system/test_faults.py). A
failed check raises ``CheckpointStorageError`` (the storage path and the fix on one line). Readers skip checkpoints
without a marker or whose files do not match it; a checkpoint without a marker is used only for runs written before
markers existed (with a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pipelines.support.io_utils import one_line

__all__ = [
    "CKPT_FILE",
    "MARKER_FILE",
    "CheckpointStorageError",
    "checkpoint_dirs",
    "complete_checkpoints",
    "download_checkpoint",
    "newest_complete_checkpoint",
    "persist_checkpoint_verified",
    "read_marker",
    "storage_fs",
    "storage_uri",
]

logger = logging.getLogger(__name__)

CKPT_FILE = "trainer_state.pt"
MARKER_FILE = "complete.json"  # written last, after the checkpoint's files were checked in storage
MARKER_FORMAT = "ctm-checkpoint/v1"
_CHUNK = 1 << 20


class CheckpointStorageError(RuntimeError):
    """A checkpoint could not be written to, or read back from, ``ray.storage_path`` (one line: path, cause, fix)."""


_STORAGE_FIX = (
    "fix: make ray.storage_path reachable and writable from every Ray node (S3: the endpoint "
    "AWS_ENDPOINT_URL, the credentials, the bucket; local: free disk space), then re-run the stage: it "
    "resumes from the last complete checkpoint"
)


def storage_uri(fs, path: str) -> str:
    """A user-facing URI for ``path`` on the pyarrow filesystem ``fs`` (``s3://bucket/key`` or a local path)."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.S3FileSystem):
        return f"s3://{path}"
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name}://{path}"


def _storage_error(action: str, fs, path: str, e: BaseException) -> CheckpointStorageError:
    return CheckpointStorageError(
        f"checkpoint storage error: {action} {storage_uri(fs, path)} failed ({one_line(e)}); {_STORAGE_FIX}"
    )


def persist_checkpoint_verified(storage, checkpoint, checkpoint_dir_name: str, *, step: int):
    """Ray's upload of ``checkpoint`` into ``<run>/<checkpoint_dir_name>``, checked, then the completion marker.

    Used as ``ray.train.report(checkpoint_upload_fn=...)`` on rank 0. ``storage`` is the run's
    ``ray.train.get_context().get_storage()`` (Ray's ``StorageContext``: ``storage_filesystem``,
    ``build_checkpoint_path_from_name``, ``persist_current_checkpoint``; ray/train/v2/_internal/execution/storage.py).
    Order: delete an older attempt's marker in that folder, upload, stat every file (type and size) through the
    same filesystem, write ``complete.json`` (step + size + sha256 per file), stat it. Returns Ray's persisted
    ``Checkpoint``; raises ``CheckpointStorageError`` if any step fails or a file is missing or short.
    """
    import pyarrow.fs as pafs

    from pipelines.support.io_utils import sha256_file

    fs = storage.storage_filesystem
    dest = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    local = Path(checkpoint.path)
    files = {
        p.relative_to(local).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(local.rglob("*"))
        if p.is_file()
    }
    if not files or MARKER_FILE in files:
        raise ValueError(f"checkpoint {local}: expected files other than {MARKER_FILE}, got {sorted(files)}")
    marker_path = f"{dest}/{MARKER_FILE}"
    try:  # a marker left by an earlier attempt at this step must not vouch for what is written now
        if fs.get_file_info(marker_path).type != pafs.FileType.NotFound:
            fs.delete_file(marker_path)
    except OSError as e:
        raise _storage_error("clearing the completion marker of", fs, dest, e) from e
    try:
        persisted = storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
    except OSError as e:
        raise _storage_error("uploading the checkpoint to", fs, dest, e) from e
    try:
        infos = fs.get_file_info([f"{dest}/{rel}" for rel in files])
    except OSError as e:
        raise _storage_error("checking the uploaded checkpoint", fs, dest, e) from e
    bad = []
    for (rel, meta), info in zip(files.items(), infos, strict=True):
        if info.type != pafs.FileType.File:
            bad.append(f"{rel} missing")
        elif info.size != meta["size"]:
            bad.append(f"{rel} has {info.size} of {meta['size']} bytes")
    if bad:
        raise CheckpointStorageError(
            f"checkpoint storage error: the upload to {storage_uri(fs, dest)} is incomplete although Ray reported "
            f"it done ({', '.join(bad)}); {_STORAGE_FIX}"
        )
    data = (
        json.dumps({"format": MARKER_FORMAT, "step": int(step), "files": files}, indent=2, sort_keys=True) + "\n"
    ).encode()
    try:
        with fs.open_output_stream(marker_path) as f:
            f.write(data)
        info = fs.get_file_info(marker_path)
    except OSError as e:
        raise _storage_error("writing the completion marker of", fs, dest, e) from e
    if info.type != pafs.FileType.File or info.size != len(data):
        raise CheckpointStorageError(
            f"checkpoint storage error: the completion marker {storage_uri(fs, marker_path)} "
            f"did not land ({info}); {_STORAGE_FIX}"
        )
    return persisted


def read_marker(fs, checkpoint_path: str) -> dict[str, Any] | None:
    """The checkpoint's ``complete.json`` if present and well-formed, else None (an incomplete checkpoint)."""
    try:
        with fs.open_input_stream(f"{checkpoint_path}/{MARKER_FILE}") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _storage_error("reading", fs, f"{checkpoint_path}/{MARKER_FILE}", e) from e
    try:
        marker = json.loads(raw)
        ok = (
            marker.get("format") == MARKER_FORMAT
            and isinstance(marker.get("step"), int)
            and isinstance(marker.get("files"), dict)
            and marker["files"]
            and all(
                isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str) for m in marker["files"].values()
            )
            and all(not k.startswith("/") and ".." not in k.split("/") for k in marker["files"])
        )
    except (ValueError, AttributeError):
        return None
    return marker if ok else None


def checkpoint_dirs(fs, run_path: str) -> list[str]:
    """Paths of the ``checkpoint_*`` folders directly under the run folder ``run_path`` (sorted by name)."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    except OSError as e:
        raise _storage_error("listing the checkpoints under", fs, run_path, e) from e
    return sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def complete_checkpoints(fs, run_path: str) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(complete, incomplete): ``(path, marker)`` of the checkpoints with a valid marker, highest step first, and
    the paths of those without one (half-written, or written before the marker existed)."""
    complete, incomplete = [], []
    for path in checkpoint_dirs(fs, run_path):
        marker = read_marker(fs, path)
        if marker is None:
            incomplete.append(path)
        else:
            complete.append((path, marker))
    complete.sort(key=lambda pm: (pm[1]["step"], pm[0]), reverse=True)
    return complete, incomplete


def download_checkpoint(fs, checkpoint_path: str, marker: dict[str, Any] | None, dest: Path) -> str | None:
    """Copy the checkpoint's files into ``dest``; with a marker, check each file's size and sha256.

    Returns None when the copy is complete and matches, else the reason (the partial copy is left to the caller).
    """
    names = list(marker["files"]) if marker else None
    if names is None:  # legacy checkpoint (no marker): take what is there
        import pyarrow.fs as pafs

        try:
            infos = fs.get_file_info(pafs.FileSelector(checkpoint_path, recursive=True))
        except OSError as e:
            raise _storage_error("listing", fs, checkpoint_path, e) from e
        names = [i.path[len(checkpoint_path) + 1 :] for i in infos if i.type == pafs.FileType.File]
    for rel in names:
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        h, size = hashlib.sha256(), 0
        try:
            with fs.open_input_stream(f"{checkpoint_path}/{rel}") as src, open(out, "wb") as dst:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    h.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
        except FileNotFoundError:
            return f"{rel} missing"
        except OSError as e:
            raise _storage_error("downloading", fs, f"{checkpoint_path}/{rel}", e) from e
        if marker:
            want = marker["files"][rel]
            if size != want["size"] or h.hexdigest() != want["sha256"]:
                return (
                    f"{rel} has {size} bytes, sha256 {h.hexdigest()[:12]}..., expected {want['size']} bytes, "
                    f"sha256 {want['sha256'][:12]}..."
                )
    return None


def newest_complete_checkpoint(fs, run_path: str, dest: Path, *, legacy=None, log=None) -> tuple[str, int] | None:
    """Download the newest checkpoint of the run whose files match its ``complete.json`` into ``dest``.

    Half-written checkpoints (no marker, or files that do not match it) are skipped with a log line. ``legacy``:
    Ray's registered checkpoint (``ray.train.get_checkpoint()``), used only when no checkpoint of the run has a
    marker and it has none either (a run started before markers existed). Returns ``(path, step or -1)`` or None.
    ``log``: called with each message (default: this module's logger, level WARNING).
    """
    if log is None:
        log = logger.warning

    complete, incomplete = complete_checkpoints(fs, run_path)
    newest = complete[0][1]["step"] if complete else -1
    use_legacy = legacy is not None and newest < 0 and read_marker(legacy.filesystem, legacy.path) is None
    for path in incomplete:
        if not (use_legacy and path.rstrip("/") == str(legacy.path).rstrip("/")):
            log(f"[distill] {storage_uri(fs, path)} has no {MARKER_FILE} (half-written): not loading it")
    for path, marker in complete:
        reason = download_checkpoint(fs, path, marker, dest)
        if reason is None:
            return path, int(marker["step"])
        log(f"[distill] {storage_uri(fs, path)} does not match its {MARKER_FILE} ({reason}): not loading it")
        _empty_dir(dest)
    if use_legacy:
        log(
            f"[distill] WARNING: resuming from {storage_uri(legacy.filesystem, legacy.path)}, which has no "
            f"{MARKER_FILE} (written before checkpoints were verified): its completeness is not checked"
        )
        reason = download_checkpoint(legacy.filesystem, legacy.path, None, dest)
        if reason is None:
            return legacy.path, -1
        _empty_dir(dest)
    return None


def _empty_dir(folder: Path) -> None:
    import shutil

    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def storage_fs(storage: str):
    """(pyarrow filesystem, path) for ``ray.storage_path``, resolved as Ray resolves it (``FileSystem.from_uri``;
    ray/train/v2/_internal/execution/storage.py ``get_fs_and_path``)."""
    import pyarrow.fs as pafs

    if "://" not in storage:
        return pafs.LocalFileSystem(), str(Path(storage).resolve())
    return pafs.FileSystem.from_uri(storage)
