"""Fetch a file into a content-addressed cache, verifying its sha256 before anyone uses it.

Supported sources: `https://` / `http://` (urllib, streamed, timeouts, retries with exponential backoff on
connection errors and HTTP 429/5xx), `s3://bucket/key` (boto3, imported lazily; endpoint and credentials from the
standard `AWS_*` environment / profile chain, e.g. `AWS_ENDPOINT_URL` for MinIO), `file://` URIs and plain local
paths, and the names of NVIDIA's released EDM networks (`resolve_release`, URLs from NVlabs/edm README.md:67-70).

Cache layout: `<cache_dir>/sha256/<hex>/<filename>`. A download streams into a temp file under
`<cache_dir>/tmp/` while it is hashed; only a file whose hash matches is moved (`os.replace`) into place, so a
truncated or tampered download never reaches the cache. A cached file is re-hashed before each reuse; a poisoned
entry is removed and fetched again. `sha256="record"` fetches once, stores the file under its computed hash, writes
`<filename>.sha256.json` next to it and logs the hash for the caller to pin.

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

from tqdm import tqdm

from pipelines.support.io_utils import CHUNK_BYTES, atomic_write_json, current_umask, normalize_sha256, sha256_file
from pipelines.support.logs import progress_enabled, setup_logging

__all__ = [
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

# --- Released EDM networks (docs/edm.md#a31-pretrained-files; NVlabs/edm README.md:67-70,77-224) ----------------------
EDM_BASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
_EDM_NAMES = [
    "edm-cifar10-32x32-cond-vp",
    "edm-cifar10-32x32-cond-ve",
    "edm-cifar10-32x32-uncond-vp",
    "edm-cifar10-32x32-uncond-ve",
    "edm-ffhq-64x64-uncond-vp",
    "edm-ffhq-64x64-uncond-ve",
    "edm-afhqv2-64x64-uncond-vp",
    "edm-afhqv2-64x64-uncond-ve",
    "edm-imagenet-64x64-cond-adm",
]
_BASELINE_NAMES = [
    "baseline-cifar10-32x32-uncond-vp",
    "baseline-cifar10-32x32-uncond-ve",
    "baseline-imagenet-64x64-cond-adm",
]
KNOWN_RELEASES: dict[str, str] = {
    **{n: f"{EDM_BASE_URL}{n}.pkl" for n in _EDM_NAMES},
    **{n: f"{EDM_BASE_URL}baseline/{n}.pkl" for n in _BASELINE_NAMES},
}
# No published hashes exist for these files (docs/edm.md#a31-pretrained-files): pin your own with sha256="record".


class FetchError(RuntimeError):
    """A fetch failed; the message names the problem and the fix on one line."""


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
        raise ValueError(f"uri: expected a non-empty string, got {uri!r}")
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        return "http", uri
    if scheme == "s3":
        if not parsed.netloc or not parsed.path.lstrip("/"):
            raise ValueError(f"uri: expected s3://<bucket>/<key>, got {uri!r}")
        return "s3", uri
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"uri: file:// URIs must name a local path (file:///abs/path), got {uri!r}")
        return "local", urllib.request.url2pathname(parsed.path)
    if scheme and len(scheme) > 1:  # one letter = Windows drive, treat as a path
        raise FetchError(
            f"unsupported URI scheme {scheme!r} in {uri!r}: use https://, http://, s3://, file:// or a local path"
        )
    base = uri[: -len(".pkl")] if uri.endswith(".pkl") else uri
    if not os.path.exists(uri) and (base in KNOWN_RELEASES or base.removeprefix("baseline/") in KNOWN_RELEASES):
        return "http", resolve_release(uri)
    return "local", uri


# --- streaming sources: each yields byte chunks and reports the expected total size (or None) -----------------
_Opener = Callable[[], tuple[Iterator[bytes], int | None]]


def _open_http(url: str, timeout_s: float) -> tuple[Iterator[bytes], int | None]:
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
    length = resp.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None

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


def _open_s3(uri: str, timeout_s: float, retries: int) -> tuple[Iterator[bytes], int | None]:
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    parsed = urllib.parse.urlparse(uri)
    bucket, key = parsed.netloc, urllib.parse.unquote(parsed.path.lstrip("/"))
    client = _s3_client(uri, timeout_s, retries)
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise FetchError(f"S3 object not found: {uri}: check the bucket and key") from None
        if code == "NoSuchBucket":
            raise FetchError(f"S3 bucket {bucket!r} does not exist ({uri}): check the bucket name / endpoint") from None
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
def _download_to_temp(opener: _Opener, tmp_dir: Path, desc: str, progress: bool) -> tuple[Path, str]:
    """Stream the source into a temp file under tmp_dir while hashing; return (temp path, sha256 hex)."""
    chunks, total = opener()
    fd, tmp_name = tempfile.mkstemp(prefix="partial-", suffix=".tmp", dir=tmp_dir)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600
        with (
            os.fdopen(fd, "wb") as f,
            tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress, leave=False
            ) as bar,
        ):
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest()


def _with_retries(fn: Callable[[], tuple[Path, str]], uri: str, retries: int, backoff_s: float) -> tuple[Path, str]:
    attempt = 0
    while True:
        try:
            return fn()
        except _RetryableError as e:
            attempt += 1
            if attempt > retries:
                raise FetchError(
                    f"giving up on {uri} after {attempt} attempts ({e}): check the network / server and retry"
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

    Raises:
        FetchError: missing sha256, unsupported scheme, missing S3 credentials, HTTP 4xx, retries exhausted.
        ChecksumMismatchError: the bytes do not match `sha256` (nothing is left in the cache).
    """
    kind, target = _classify(uri)
    if sha256 is None:
        raise FetchError(
            f"sha256 is required to fetch {uri}: pass sha256='<64 hex digits>', or sha256='record' once to compute "
            "the hash and pin it"
        )
    record = sha256 == RECORD
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
        opener: _Opener = lambda: _open_http(target, timeout_s)
    elif kind == "s3":
        opener = lambda: _open_s3(target, timeout_s, retries)
    else:
        opener = lambda: _open_local(target)

    tmp_dir = cache_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp, got = _with_retries(lambda: _download_to_temp(opener, tmp_dir, name, progress), uri, retries, backoff_s)
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
            {"uri": uri, "resolved": target, "sha256": got, "size_bytes": dest.stat().st_size, "filename": name},
        )
        logger.warning("sha256 of %s = %s (pin this value)", uri, got)
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
            print(f"{kind}\t{target}")
            return 0
        path = fetch(args.uri, args.cache_dir, sha256=args.sha256, progress=not args.no_progress and progress_enabled())
    except (FetchError, ValueError) as e:
        logger.error("error: %s", e)
        return 1
    print(path)  # stdout: the fetched file's path, for scripts
    return 0


if __name__ == "__main__":
    sys.exit(_main())
