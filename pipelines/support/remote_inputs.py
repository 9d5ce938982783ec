"""Distill inputs on S3: the prepared data and the teacher folder downloaded and verified before Ray starts.

``ray job submit --working-dir .`` never uploads data/ or artifacts/, so on a cluster the distill stage takes
``--data s3://.../prepared`` and ``--teacher s3://.../teacher`` (the folders the prepare and teacher stages write, e.g.
after ``aws s3 sync data/prepared s3://bucket/ctm/prepared``). The driver downloads ``card.json`` and the train shards
into ``$CTM_INPUT_CACHE`` (default ``<repo>/.cache/inputs``), checking each shard against the card's sha256, and the
teacher (``config.json`` + ``teacher.safetensors``, checked against ``weights_sha256`` by the safe loader). Errors (no
credentials, no bucket, missing key, wrong sha256) raise ``InputError`` with one line; nothing unverified is cached.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

from ctm_core.errors import InputError
from pipelines.support.io_utils import one_line

__all__ = ["InputError", "Inputs", "confined", "input_cache_dir", "resolve_inputs"]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_JSON_BYTES = 16 << 20  # card.json / config.json: a few KB to a few hundred KB when genuine


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Local, verified copies of the distill inputs; ``*_uri`` are the ``s3://`` sources (None for local paths)."""

    data_dir: Path
    teacher_dir: Path
    data_uri: str | None = None
    teacher_uri: str | None = None


def input_cache_dir() -> Path:
    """``$CTM_INPUT_CACHE``, else ``<repo root>/.cache/inputs`` (git-ignored)."""
    from pipelines.support import tracking

    env = os.environ.get("CTM_INPUT_CACHE")
    return Path(env).expanduser().resolve() if env else tracking.default_repo_root() / ".cache" / "inputs"


def resolve_inputs(data: str, teacher: str, cache_dir: str | os.PathLike[str] | None = None) -> Inputs:
    """Local folders as they are; ``s3://`` folders downloaded and verified into the cache (module doc).

    Raises ``InputError`` (one line naming the S3 path and the fix) before anything starts.
    """
    is_s3 = [str(v).startswith("s3://") for v in (data, teacher)]
    if not any(is_s3):
        return Inputs(Path(data).resolve(), Path(teacher).resolve())
    cache = Path(cache_dir) if cache_dir is not None else input_cache_dir()
    data_dir = _fetch_prepared(str(data).rstrip("/"), cache) if is_s3[0] else Path(data).resolve()
    teacher_dir = _fetch_teacher(str(teacher).rstrip("/"), cache) if is_s3[1] else Path(teacher).resolve()
    return Inputs(
        data_dir,
        teacher_dir,
        str(data).rstrip("/") if is_s3[0] else None,
        str(teacher).rstrip("/") if is_s3[1] else None,
    )


def _s3_download(uri: str, tmp_dir: Path, what: str, max_bytes: int | None = None) -> tuple[Path, str]:
    """Stream ``uri`` into a temp file under ``tmp_dir`` (boto3, retries and size cap from ``pipelines.support.fetch``;
    ``max_bytes`` defaults to its ``DEFAULT_MAX_BYTES``). Returns (path, sha256)."""
    from pipelines.support.fetch import DEFAULT_MAX_BYTES, FetchError, _download_to_temp, _open_s3, _with_retries

    cap = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _with_retries(
            lambda: _download_to_temp(lambda: _open_s3(uri, 30.0, 3), tmp_dir, uri, False, uri, cap), uri, 3, 0.5
        )
    except FetchError as e:
        msg = one_line(e)
        if msg.startswith("S3 object not found"):
            msg += f" ({what})"
        raise InputError(msg) from None


def _install(tmp: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)


def confined(folder: Path, rel: str, what: str) -> Path:
    """``folder / rel`` resolved, refusing any ``rel`` (from a downloaded file) that lands outside ``folder``.

    The card's own validation already refuses such paths; this is the second line: whatever a card or config
    says, nothing is written outside the cache folder (an absolute path, ``..`` or a symlink out)."""
    base = folder.resolve()
    dest = (base / rel).resolve()
    if dest == base or not dest.is_relative_to(base):
        raise InputError(
            f"{what}: expected a path inside {base}, got {rel!r} (fix: the file was edited or is not a pipeline "
            "output; upload the folder the stage writes again)"
        )
    return dest


def _fetch_prepared(uri: str, cache: Path) -> Path:
    """``card.json`` + the train shards of a prepared folder on S3, each shard checked against the card."""
    from ctm_core.data.card import DatasetCard
    from pipelines.support.io_utils import read_json, sha256_file

    tmp_dir = cache / "tmp"
    card_tmp, card_sha = _s3_download(
        f"{uri}/card.json",
        tmp_dir,
        "fix: --data must be the folder the prepare stage writes (card.json + "
        "train/*.parquet), e.g. after aws s3 sync data/prepared <that URI>",
        max_bytes=_MAX_JSON_BYTES,
    )
    try:
        try:
            raw = read_json(card_tmp)
        except (ValueError, RecursionError) as e:
            raise InputError(
                f"{uri}/card.json: expected JSON, got {type(e).__name__} ({one_line(e)[:200]}) (fix: point --data at "
                "a folder written by the prepare stage)"
            ) from None
        try:
            card = DatasetCard.from_dict(raw, where=f"{uri}/card.json")
        except InputError as e:
            raise InputError(f"{e} (fix: point --data at a folder written by the prepare stage)") from None
        folder = cache / "prepared" / card_sha[:16]
        for shard in card.splits["train"].shards:
            dest = confined(folder, shard.path, f"{uri}/card.json: shard path")
            if dest.is_file() and sha256_file(dest) == shard.sha256:
                continue  # verified copy from an earlier run
            tmp, got = _s3_download(f"{uri}/{shard.path}", tmp_dir, "listed in card.json")
            if got != shard.sha256:
                tmp.unlink(missing_ok=True)
                raise InputError(
                    f"sha256 mismatch for {uri}/{shard.path}: expected {shard.sha256} (card.json), "
                    f"got {got}; the object is truncated or was modified (nothing cached): re-upload "
                    "the prepared folder (aws s3 sync / dvc push) or re-run the prepare stage"
                )
            _install(tmp, dest)
        _install(card_tmp, folder / "card.json")  # last: a folder with card.json has its train shards
    finally:
        card_tmp.unlink(missing_ok=True)
    return folder


def _fetch_teacher(uri: str, cache: Path) -> Path:
    """``config.json`` + ``teacher.safetensors`` from S3, checked against ``weights_sha256`` before caching."""
    import shutil

    from ctm_core.io.teacher_format import CONFIG_FILE, WEIGHTS_FILE, load_edm_checkpoint
    from pipelines.support.io_utils import read_json, sha256_file

    fix = (
        "fix: --teacher must be the folder the teacher stage writes (teacher.safetensors + config.json), e.g. "
        "after aws s3 sync artifacts/teacher <that URI>"
    )
    tmp_dir = cache / "tmp"
    cfg_tmp, cfg_sha = _s3_download(f"{uri}/{CONFIG_FILE}", tmp_dir, fix, max_bytes=_MAX_JSON_BYTES)
    try:
        try:
            cfg = read_json(cfg_tmp)
        except (ValueError, RecursionError) as e:
            raise InputError(f"{uri}/{CONFIG_FILE}: not JSON ({one_line(e)}); {fix}") from None
        claimed = cfg.get("weights_sha256") if isinstance(cfg, dict) else None
        name = claimed if isinstance(claimed, str) and _SHA256_RE.fullmatch(claimed) else cfg_sha
        folder = cache / "teacher" / name[:16]  # hex only: a config cannot name a folder outside the cache
        stamp = folder / "verified.json"  # sha256 of both files once load_edm_checkpoint accepted them
        if stamp.is_file() and (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file():
            seen = read_json(stamp)
            if seen.get(CONFIG_FILE) == cfg_sha == sha256_file(folder / CONFIG_FILE) and seen.get(
                WEIGHTS_FILE
            ) == sha256_file(folder / WEIGHTS_FILE):
                return folder
        staging = Path(tempfile.mkdtemp(prefix="teacher-", dir=tmp_dir))
        try:
            w_tmp, w_sha = _s3_download(f"{uri}/{WEIGHTS_FILE}", tmp_dir, fix)
            os.replace(w_tmp, staging / WEIGHTS_FILE)
            shutil.copyfile(cfg_tmp, staging / CONFIG_FILE)
            try:
                load_edm_checkpoint(staging)  # weights_sha256 + config/metadata agreement + architecture
            except (ValueError, KeyError, RuntimeError) as e:
                raise InputError(
                    f"teacher {uri} failed verification ({one_line(e)}); nothing cached: re-upload "
                    "the teacher folder or re-run the teacher stage"
                ) from None
            (staging / "verified.json").write_text(json.dumps({CONFIG_FILE: cfg_sha, WEIGHTS_FILE: w_sha}))
            if folder.exists():
                shutil.rmtree(folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        cfg_tmp.unlink(missing_ok=True)
    return folder
