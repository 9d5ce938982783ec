"""Distill inputs on S3: the prepared data's card and the teacher folder fetched and verified before Ray starts.

``ray job submit --working-dir .`` never uploads data/ or artifacts/, so on a cluster the distill stage takes
``--data s3://.../prepared`` and ``--teacher s3://.../teacher`` (the folders the prepare and teacher stages write, e.g.
after ``aws s3 sync data/prepared s3://bucket/ctm/prepared``). For the data the driver downloads ``card.json`` only
(size-capped, validated) into ``$CTM_INPUT_CACHE`` (default ``<repo>/.cache/inputs``) and checks with one ``HEAD``
request per train shard that every shard the card lists exists; it downloads no shard: the Ray workers stream the
shards from S3 and check each one against the card's sha256 as they read it (docs/data_streaming.md#checksums). The
teacher (``config.json`` + ``teacher.safetensors``) is downloaded and checked against ``weights_sha256`` by the safe
loader. Errors (no credentials, no bucket, missing card or shard, wrong teacher sha256) raise ``InputError`` with one
line; nothing unverified is cached.
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
    """The distill inputs on local disk; ``*_uri`` are the ``s3://`` sources (None for local paths). For s3:// data
    ``data_dir`` holds the validated ``card.json`` only (the workers stream the shards from ``data_uri``)."""

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
    """Local folders as they are; ``s3://`` data: its card cached and its shards checked to exist; ``s3://`` teacher:
    downloaded and verified into the cache (module doc).

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
    """``card.json`` of a prepared folder on S3, validated and cached; every train shard it lists checked to exist
    (``_check_shards_exist``), none downloaded: the workers stream and verify them (docs/data_streaming.md)."""
    from ctm_core.data.card import CARD_FILE, DatasetCard
    from pipelines.support.io_utils import read_json

    tmp_dir = cache / "tmp"
    card_tmp, card_sha = _s3_download(
        f"{uri}/{CARD_FILE}",
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
        paths = [shard.path for shard in card.splits["train"].shards]
        for path in paths:
            confined(folder, path, f"{uri}/card.json: shard path")  # second line (no shard is written here)
        _check_shards_exist(uri, paths)
        _install(card_tmp, folder / CARD_FILE)
    finally:
        card_tmp.unlink(missing_ok=True)
    return folder


def _check_shards_exist(uri: str, paths: list[str], threads: int = 16) -> None:
    """One ``HEAD`` request per shard (``{uri}/{path}``), in parallel: a missing or unreadable shard raises
    ``InputError`` naming its key and the fix, before Ray starts. The card records no sizes, so existence is what
    can be checked without reading; the bytes are checked against the card's sha256 as the workers read them."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.support.fetch import FetchError, _s3_client, s3_head

    try:
        client = _s3_client(uri, 30.0, 3)  # botocore retries throttling and 5xx itself
    except FetchError as e:
        raise InputError(one_line(e)) from None
    fix = (
        "fix: upload the whole folder the prepare stage writes again (aws s3 sync data/prepared "
        f"{uri}), or re-run the prepare stage"
    )

    def head(path: str) -> str | None:
        try:
            s3_head(client, f"{uri}/{path}")
        except FetchError as e:
            msg = one_line(e)
            if msg.startswith("S3 object not found"):
                return f"S3 object not found: {uri}/{path} (listed in card.json; {fix})"
            return f"{msg} (listed in card.json)"
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        errors = [m for m in pool.map(head, paths) if m is not None]
    if errors:
        more = f" (and {len(errors) - 1} more shards)" if len(errors) > 1 else ""
        raise InputError(errors[0] + more)


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
