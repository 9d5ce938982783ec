"""Fetch a file into a content-addressed cache, verifying its sha256 before anyone uses it.

Supported sources: `https://` / `http://` (urllib, streamed, timeouts, retries with exponential backoff on
connection errors and HTTP 429/5xx), `s3://bucket/key` (boto3, imported lazily; endpoint and credentials from the
standard `AWS_*` environment / profile chain, e.g. `AWS_ENDPOINT_URL` for MinIO), `file://` URIs and plain local
paths, and the names of NVIDIA's released EDM networks (`resolve_release`, URLs from NVlabs/edm README.md:67-70).

Cache layout: `<cache_dir>/sha256/<hex>/<filename>`. A download streams into a temp file
`<cache_dir>/tmp/partial-<pid>-*.tmp` while it is hashed; only a file whose hash matches is moved (`os.replace`)
into place, so a truncated or tampered download never reaches the cache. Partials a killed fetch left behind (its
pid gone, or untouched for `STALE_PARTIAL_S`) are removed by the next fetch into the same cache. A cached file is
re-hashed before each reuse; a poisoned entry is removed and fetched again. `sha256="record"` fetches once, stores
the file under its computed hash, writes `<filename>.sha256.json` next to it and logs the hash for the caller to
pin; it is refused over plain `http://` (anyone on the path could choose the bytes being pinned) except on loopback.

A download larger than `max_bytes` (default `DEFAULT_MAX_BYTES`, 4 GiB) is refused as soon as its announced
length or its streamed byte count passes the cap. URIs in messages and in the record file carry no user-info or
query string (`ctm_core.redact`: presigned URLs are credentials).

Examples:
    python -m pipelines.support.fetch edm-cifar10-32x32-uncond-vp --cache-dir ~/.cache/ctm --sha256 record
    python -m pipelines.support.fetch s3://bucket/cifar-10-python.tar.gz --cache-dir .cache --sha256 6d958be0...
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import logging
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ctm_core.config import EDM_RELEASES
from ctm_core.redact import is_loopback_url, redact_text, redact_uri
from pipelines.support.io_utils import CHUNK_BYTES, atomic_write_json, current_umask, normalize_sha256, sha256_file
from pipelines.support.logs import progress_enabled, setup_logging

__all__ = [
    "DEFAULT_MAX_BYTES",
    "EDM_BASE_URL",
    "KNOWN_RELEASES",
    "ChecksumMismatchError",
    "FetchError",
    "cache_path",
    "fetch",
    "resolve_release",
]

logger = logging.getLogger(__name__)

RECORD = "record"
USER_AGENT = "ctm-pipeline-fetch/0.1 (+urllib)"
DEFAULT_MAX_BYTES = 4 << 30  # the largest file the pipeline fetches is a ~1 GB EDM pickle / a dataset archive
STALE_PARTIAL_S = 3600.0  # a partial download untouched this long is left over from a killed fetch
_PARTIAL_RE = re.compile(r"^partial-(?:(\d+)-)?.*\.tmp$")

# --- Released EDM networks (docs/edm.md#a31-pretrained-files; NVlabs/edm README.md:67-70,77-224) ----------------------
EDM_BASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
KNOWN_RELEASES: dict[str, str] = {  # the names of ctm_core.config.EDM_RELEASES -> their download URLs
    n: f"{EDM_BASE_URL}baseline/{n}.pkl" if n.startswith("baseline-") else f"{EDM_BASE_URL}{n}.pkl"
    for n in EDM_RELEASES
}
# No published hashes exist for these files (docs/edm.md#a31-pretrained-files): pin your own with sha256="record".


class FetchError(RuntimeError):
    """A fetch failed; the message names the problem and the fix on one line (URIs in it redacted)."""

    def __init__(self, message: str):
        super().__init__(redact_text(" ".join(str(message).split())))


class ChecksumMismatchError(FetchError):
    """The fetched bytes do not hash to the expected sha256."""


class _RetryableError(Exception):
    """Internal: a transient failure (connection dropped, timeout, HTTP 429/5xx) worth retrying."""


def resolve_release(name: str) -> str:
    """Map a released EDM network name (with or without `.pkl`, optionally `baseline/`) to NVIDIA's URL."""
    key = name.strip()
    key = key[: -len(".pkl")] if key.endswith(".pkl") else key
    key = key[len("baseline/") :] if key.startswith("baseline/") else key
    if key not in KNOWN_RELEASES:
        raise ValueError(f"unknown release name {name!r}: expected one of {sorted(KNOWN_RELEASES)}")
    return KNOWN_RELEASES[key]


def _safe_filename(name: str) -> str:
    name = os.path.basename(name.rstrip("/")) or "download"
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name)
    return "download" if name in {"", ".", ".."} else name


def cache_path(cache_dir: str | os.PathLike[str], sha256: str, filename: str) -> Path:
    """Content-addressed location `<cache_dir>/sha256/<hex>/<filename>`."""
    return Path(cache_dir) / "sha256" / normalize_sha256(sha256) / _safe_filename(filename)


def _classify(uri: str) -> tuple[str, str]:
    """Return (kind, target): kind in {'http', 's3', 'local'}; release names become their https URL."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"uri: expected a non-empty string, got {type(uri).__name__}")
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        if "@" in parsed.netloc:
            raise FetchError(
                f"credentials in the URL are not supported ({uri}): they would travel in clear and land in logs "
                "(fix: use a presigned https URL, or s3:// with AWS credentials from the environment)"
            )
        return "http", uri
    if scheme == "s3":
        if not parsed.netloc or not parsed.path.lstrip("/"):
            raise ValueError(f"uri: expected s3://<bucket>/<key>, got {redact_uri(uri)!r}")
        return "s3", uri
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"uri: file:// URIs must name a local path (file:///abs/path), got {redact_uri(uri)!r}")
        return "local", urllib.request.url2pathname(parsed.path)
    if scheme and len(scheme) > 1:  # one letter = Windows drive, treat as a path
        raise FetchError(
            f"unsupported URI scheme {scheme[:20]!r} in {redact_uri(uri)[:200]!r}: use https://, http://, s3://, "
            "file:// or a local path"
        )
    base = uri[: -len(".pkl")] if uri.endswith(".pkl") else uri
    if not os.path.exists(uri) and (base in KNOWN_RELEASES or base.removeprefix("baseline/") in KNOWN_RELEASES):
        return "http", resolve_release(uri)
    return "local", uri


# --- streaming sources: each yields byte chunks and reports the expected total size (or None) -----------------
_Opener = Callable[[], tuple[Iterator[bytes], int | None]]


def _open_http(url: str, timeout_s: float, *, https_only: bool = False) -> tuple[Iterator[bytes], int | None]:
    """Open `url`; with `https_only` a redirect to plain non-loopback http:// is refused (record mode)."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)  # noqa: S310 (scheme checked by _classify)
    except urllib.error.HTTPError as e:
        if e.code == 429 or e.code >= 500:
            raise _RetryableError(f"HTTP {e.code} {e.reason}") from e
        hint = {
            404: "check the URL or release name",
            403: "the server refused access; check the URL and any required credentials",
            401: "the server wants credentials; this fetcher only supports public http(s) URLs",
        }.get(e.code, "check the URL")
        raise FetchError(f"HTTP {e.code} {e.reason} for {url}: {hint}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
        raise _RetryableError(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e
    final = resp.geturl() or url
    if https_only and final.lower().startswith("http://") and not is_loopback_url(final):
        resp.close()
        raise FetchError(
            f"{url} redirected to plain http ({final}), which cannot be trusted for sha256='record' (fix: pin the "
            "64-hex sha256 instead)"
        )
    length = resp.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() and len(length) < 20 else None

    def chunks() -> Iterator[bytes]:
        got = 0
        try:
            while True:
                try:
                    chunk = resp.read(CHUNK_BYTES)
                except (ConnectionError, TimeoutError, http.client.HTTPException) as e:
                    raise _RetryableError(f"connection lost after {got} bytes: {type(e).__name__}: {e}") from e
                if not chunk:
                    break
                got += len(chunk)
                yield chunk
        finally:
            resp.close()
        # urllib returns b'' (no error) when the peer closes early, so compare with the announced length here.
        if total is not None and got < total:
            raise _RetryableError(f"connection dropped after {got} of {total} bytes")

    return chunks(), total


def _s3_client(uri: str, timeout_s: float, retries: int):
    try:
        import boto3  # lazy: only s3:// needs it
        from botocore.config import Config
    except ImportError:
        raise FetchError(f"{uri} needs boto3, which is not installed: pip install boto3") from None
    session = boto3.session.Session()
    if session.get_credentials() is None:  # boto3's own chain: env, profile files, container/instance roles
        raise FetchError(
            f"no AWS credentials found for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            "plus AWS_ENDPOINT_URL for MinIO/S3-compatible stores"
        )
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        retries={"max_attempts": max(1, retries), "mode": "standard"},
    )
    return session.client("s3", endpoint_url=endpoint, region_name=session.region_name or "us-east-1", config=config)


def s3_bucket_key(uri: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://bucket/key`` URI (the key percent-decoded)."""
    parsed = urllib.parse.urlparse(uri)
    return parsed.netloc, urllib.parse.unquote(parsed.path.lstrip("/"))


def _s3_request(uri: str, request: Callable[[], Any]) -> Any:
    """``request()`` (one boto3 call on ``uri``) with its errors as one line: FetchError, or _RetryableError for
    throttling, 5xx and an unreachable endpoint."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    try:
        return request()
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise FetchError(f"S3 object not found: {uri}: check the bucket and key") from None
        if code == "NoSuchBucket":
            raise FetchError(
                f"S3 bucket {s3_bucket_key(uri)[0]!r} does not exist ({uri}): check the bucket name / endpoint"
            ) from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise FetchError(
                f"S3 access denied for {uri} ({code}): check the AWS credentials and bucket policy"
            ) from None
        if status is not None and (status == 429 or status >= 500):
            raise _RetryableError(f"S3 {code} (HTTP {status})") from e
        raise FetchError(f"S3 error {code} for {uri}: {e}") from None
    except EndpointConnectionError as e:
        raise _RetryableError(f"cannot reach the S3 endpoint: {e}") from e
    except BotoCoreError as e:
        raise FetchError(f"S3 request for {uri} failed: {e}") from None


def s3_head(client, uri: str) -> None:
    """Check that the object ``uri`` exists (one HEAD request, retried by the client's own retry config); raises
    FetchError with ``_s3_request``'s one-line message."""
    bucket, key = s3_bucket_key(uri)
    try:
        _s3_request(uri, lambda: client.head_object(Bucket=bucket, Key=key))
    except _RetryableError as e:
        raise FetchError(f"S3 request for {uri} failed: {e}") from None


def _open_s3(uri: str, timeout_s: float, retries: int) -> tuple[Iterator[bytes], int | None]:
    from botocore.exceptions import BotoCoreError

    bucket, key = s3_bucket_key(uri)
    client = _s3_client(uri, timeout_s, retries)
    obj = _s3_request(uri, lambda: client.get_object(Bucket=bucket, Key=key))
    body = obj["Body"]
    total = obj.get("ContentLength")

    def chunks() -> Iterator[bytes]:
        got = 0
        try:
            while True:
                try:
                    chunk = body.read(CHUNK_BYTES)
                except (BotoCoreError, ConnectionError, TimeoutError) as e:
                    raise _RetryableError(f"S3 stream lost after {got} bytes: {e}") from e
                if not chunk:
                    break
                got += len(chunk)
                yield chunk
        finally:
            body.close()
        if total is not None and got < total:
            raise _RetryableError(f"S3 stream ended after {got} of {total} bytes")

    return chunks(), total


def _open_local(path: str) -> tuple[Iterator[bytes], int | None]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FetchError(f"local file not found: {path}: check the path (relative paths resolve against {os.getcwd()})")
    f = open(p, "rb")  # noqa: SIM115 (closed by the generator)

    def chunks() -> Iterator[bytes]:
        with f:
            yield from iter(lambda: f.read(CHUNK_BYTES), b"")

    return chunks(), p.stat().st_size


# --- the download + verify + install step ----------------------------------------------------------------------
def _too_big(uri: str, size: str, max_bytes: int) -> FetchError:
    return FetchError(
        f"{uri} is {size}, over the download cap of {max_bytes} bytes (nothing was cached) (fix: check the source, "
        "or pass a larger max_bytes / --max-bytes if the file is legitimately that big)"
    )


def _download_to_temp(
    opener: _Opener, tmp_dir: Path, desc: str, progress: bool, uri: str, max_bytes: int | None
) -> tuple[Path, str]:
    """Stream the source into a temp file under tmp_dir while hashing; return (temp path, sha256 hex).

    Refuses (FetchError) a source announcing, or streaming, more than `max_bytes` bytes (None = no cap)."""
    chunks, total = opener()
    if max_bytes is not None and total is not None and total > max_bytes:
        with contextlib.suppress(Exception):
            chunks.close()  # type: ignore[attr-defined]  # unstarted: the response / file closes when collected
        raise _too_big(uri, f"{total} bytes (announced)", max_bytes)
    fd, tmp_name = tempfile.mkstemp(prefix=f"partial-{os.getpid()}-", suffix=".tmp", dir=tmp_dir)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    got = 0
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600
        with (
            os.fdopen(fd, "wb") as f,
            tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress, leave=False
            ) as bar,
        ):
            for chunk in chunks:
                got += len(chunk)
                if max_bytes is not None and got > max_bytes:
                    chunks.close()  # type: ignore[attr-defined]
                    raise _too_big(uri, f"more than {max_bytes} bytes (streamed)", max_bytes)
                h.update(chunk)
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # someone else's process, or a number no pid can be: keep unless old
    return True


def _remove_stale_partials(tmp_dir: Path, now: float | None = None) -> list[Path]:
    """Remove `partial-*.tmp` files a killed fetch left in `tmp_dir`: those whose pid (in the name) is not
    running on this machine, and any untouched for `STALE_PARTIAL_S` seconds. Returns the removed paths."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(tmp_dir.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _PARTIAL_RE.match(p.name)
        if m is None or not p.is_file() or p.is_symlink():
            continue
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        pid = int(m.group(1)) if m.group(1) else None
        dead = pid is not None and pid != os.getpid() and not _pid_alive(pid)
        if dead or age > STALE_PARTIAL_S:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    if removed:
        logger.info("removed %d partial download(s) left by an interrupted fetch in %s", len(removed), tmp_dir)
    return removed


def _with_retries(fn: Callable[[], tuple[Path, str]], uri: str, retries: int, backoff_s: float) -> tuple[Path, str]:
    attempt = 0
    while True:
        try:
            return fn()
        except _RetryableError as e:
            attempt += 1
            if attempt > retries:
                raise FetchError(
                    f"giving up on {uri} after {attempt} attempts ({e}): check the network / server and retry, or "
                    "download the file elsewhere and set the source to its local path (same sha256 pin)"
                ) from e
            time.sleep(backoff_s * 2 ** (attempt - 1))


def fetch(
    uri: str,
    cache_dir: str | os.PathLike[str],
    *,
    sha256: str | None,
    progress: bool = True,
    filename: str | None = None,
    timeout_s: float = 60.0,
    retries: int = 3,
    backoff_s: float = 1.0,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> Path:
    """Return the path of a verified copy of `uri` in `cache_dir`.

    Args:
        uri: `https://…`, `http://…`, `s3://bucket/key`, `file:///abs/path`, a local path, or a release name from
            `KNOWN_RELEASES` (e.g. `edm-cifar10-32x32-uncond-vp`).
        cache_dir: cache root; files land at `<cache_dir>/sha256/<hex>/<filename>`.
        sha256: the expected 64-digit hex digest (required), or `"record"` to fetch, hash, store and log the
            digest (also written to `<entry>.sha256.json`) so the caller can pin it.
        progress: show a tqdm byte progress bar.
        filename: name of the cached file (default: the last path component of the URI).
        timeout_s: connect/read timeout per request.
        retries: extra attempts after a connection error, timeout, truncated stream or HTTP 429/5xx.
        backoff_s: sleep before retry k is `backoff_s * 2**(k-1)`.
        max_bytes: refuse a source larger than this many bytes (announced or streamed); None = no cap.

    Raises:
        FetchError: missing sha256, unsupported scheme, missing S3 credentials, HTTP 4xx, retries exhausted,
            over `max_bytes`, `record` over plain non-loopback http.
        ChecksumMismatchError: the bytes do not match `sha256` (nothing is left in the cache).
    """
    try:
        return _fetch(uri, cache_dir, sha256, progress, filename, timeout_s, retries, backoff_s, max_bytes)
    except FetchError as e:  # a message from deep in the stack (urllib, boto) may quote parts of the URI
        e.args = (_scrub(str(e), uri),)
        raise


def _scrub(message: str, uri: str) -> str:
    """`message` without the user-info, password, query or fragment of `uri`, wherever they appear in it."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return message
    netloc = parts.netloc
    userinfo = netloc.rsplit("@", 1)[0] if "@" in netloc else ""
    secrets = {userinfo, *userinfo.split(":", 1), parts.query, parts.fragment, *parts.query.split("&")}
    secrets |= {v for item in parts.query.split("&") for v in item.split("=", 1)[1:]}
    for s in sorted((s for s in secrets if len(s) >= 3), key=len, reverse=True):
        message = message.replace(s, "***")
    return message


def _fetch(
    uri: str,
    cache_dir: str | os.PathLike[str],
    sha256: str | None,
    progress: bool,
    filename: str | None,
    timeout_s: float,
    retries: int,
    backoff_s: float,
    max_bytes: int | None,
) -> Path:
    kind, target = _classify(uri)
    if sha256 is None:
        raise FetchError(
            f"sha256 is required to fetch {uri}: pass sha256='<64 hex digits>', or sha256='record' once to compute "
            "the hash and pin it"
        )
    record = sha256 == RECORD
    if record and kind == "http" and target.lower().startswith("http://") and not is_loopback_url(target):
        raise FetchError(
            f"sha256='record' over plain http is refused for {uri}: anyone on the network path could choose the "
            "bytes being pinned (fix: use the https:// URL, s3:// or a local file, or pin the 64-hex sha256)"
        )
    expected = None if record else normalize_sha256(sha256)
    name = _safe_filename(filename or urllib.parse.unquote(urllib.parse.urlparse(target).path or target))
    if kind == "local":
        name = _safe_filename(filename or target)
    cache_dir = Path(cache_dir)

    if expected is not None:
        dest = cache_path(cache_dir, expected, name)
        if dest.is_file():
            got = sha256_file(dest)
            if got == expected:
                return dest
            logger.warning(
                "cached %s is corrupt (expected sha256 %s, got %s); removing it and fetching again", dest, expected, got
            )
            dest.unlink()

    if kind == "http":
        opener: _Opener = lambda: _open_http(target, timeout_s, https_only=record)
    elif kind == "s3":
        opener = lambda: _open_s3(target, timeout_s, retries)
    else:
        opener = lambda: _open_local(target)

    tmp_dir = cache_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(tmp_dir)
    tmp, got = _with_retries(
        lambda: _download_to_temp(opener, tmp_dir, name, progress, uri, max_bytes), uri, retries, backoff_s
    )
    try:
        if expected is not None and got != expected:
            raise ChecksumMismatchError(
                f"sha256 mismatch for {uri}: expected {expected}, got {got}; the download is truncated or tampered "
                "(nothing was cached): check the source, or re-pin the hash if the file legitimately changed"
            )
        dest = cache_path(cache_dir, got, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        tmp_dir.rmdir()  # only if empty (another fetch may be using it)

    if record:
        atomic_write_json(
            dest.with_name(dest.name + ".sha256.json"),
            {
                "uri": redact_uri(uri),
                "resolved": redact_uri(target),
                "sha256": got,
                "size_bytes": dest.stat().st_size,
                "filename": name,
            },
        )
        logger.warning("sha256 of %s = %s (pin this value)", redact_uri(uri), got)
    return dest


def recorded_sha256(path: str | os.PathLike[str]) -> str:
    """The digest of a cache entry returned by `fetch` (its parent folder name), checked for form."""
    return normalize_sha256(Path(path).parent.name)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.support.fetch", description=__doc__.split("\n\n")[0])
    ap.add_argument("uri", nargs="?", help="https://, http://, s3://, file:// URI, local path or release name")
    ap.add_argument("--cache-dir", help="cache root (files go to <cache>/sha256/<hex>/<name>)")
    ap.add_argument("--sha256", help="expected hex digest, or 'record' to compute and print it")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--list-releases", action="store_true", help="print the known release names and URLs, exit")
    ap.add_argument("--dry-run", action="store_true", help="resolve the URI and cache path, download nothing")
    ap.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="refuse larger downloads")
    args = ap.parse_args(argv)
    setup_logging()
    if args.list_releases:  # stdout: the CLI's machine-readable output
        for k, v in KNOWN_RELEASES.items():
            print(f"{k}\t{v}")
        return 0
    if not args.uri or not args.cache_dir:
        ap.error("uri and --cache-dir are required (unless --list-releases)")
    try:
        if args.dry_run:
            kind, target = _classify(args.uri)
            print(f"{kind}\t{redact_uri(target)}")
            return 0
        path = fetch(
            args.uri,
            args.cache_dir,
            sha256=args.sha256,
            progress=not args.no_progress and progress_enabled(),
            max_bytes=args.max_bytes,
        )
    except (FetchError, ValueError) as e:
        logger.error("error: %s", redact_text(" ".join(str(e).split())))
        return 1
    print(path)  # stdout: the fetched file's path, for scripts
    return 0


if __name__ == "__main__":
    sys.exit(_main())
