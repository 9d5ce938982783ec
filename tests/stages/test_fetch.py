"""pipelines.support.fetch against real servers on loopback: http.server for https/http paths, moto for s3://."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest

from pipelines.support.fetch import (
    KNOWN_RELEASES,
    ChecksumMismatchError,
    FetchError,
    cache_path,
    fetch,
    recorded_sha256,
    resolve_release,
)

PAYLOAD = bytes(range(256)) * 1024 + b"tail"  # 262,148 bytes: several 1 MiB-chunk-free reads, deterministic
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = dict(progress=False, timeout_s=5.0, retries=2, backoff_s=0.01)


# --- a real HTTP server with misbehaving routes ----------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, body: bytes, length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path == "/good.bin":
            self._send(PAYLOAD)
        elif self.path == "/short.bin":  # honest Content-Length, but only half the file -> hash mismatch
            self._send(PAYLOAD[: len(PAYLOAD) // 2])
        elif self.path == "/tampered.bin":
            self._send(PAYLOAD[:-1] + b"X")
        elif self.path == "/cut.bin":  # announces the full length, closes after half -> always truncated
            self._send(PAYLOAD[: len(PAYLOAD) // 2], length=len(PAYLOAD))
            self.close_connection = True
        elif self.path == "/drop-once.bin":  # first request: connection closed without a response
            if n == 1:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._send(PAYLOAD)
        elif self.path == "/cut-once.bin":  # first request: body cut mid-stream; second: good
            if n == 1:
                self._send(PAYLOAD[:1000], length=len(PAYLOAD))
                self.close_connection = True
                return
            self._send(PAYLOAD)
        elif self.path == "/busy-once.bin":
            if n == 1:
                self.send_error(503, "busy")
                return
            self._send(PAYLOAD)
        else:
            self.send_error(404, "Not Found")


@pytest.fixture(scope="module")
def http_base():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _reset_hits():
    _Handler.hits = {}


def _cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_http_good_and_cached(http_base, tmp_path):
    cache = tmp_path / "cache"
    p = fetch(f"{http_base}/good.bin", cache, sha256=PAYLOAD_SHA, **FAST)
    assert p == cache / "sha256" / PAYLOAD_SHA / "good.bin"
    assert p.read_bytes() == PAYLOAD
    assert _cache_files(cache) == [p]  # no temp files left behind
    p2 = fetch(f"{http_base}/good.bin", cache, sha256=PAYLOAD_SHA.upper(), **FAST)
    assert p2 == p and _Handler.hits["/good.bin"] == 1  # second call served from the verified cache


@pytest.mark.parametrize("route", ["/short.bin", "/tampered.bin"])
def test_http_bad_bytes_rejected_and_not_cached(http_base, tmp_path, route):
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatchError) as ei:
        fetch(f"{http_base}{route}", cache, sha256=PAYLOAD_SHA, **FAST)
    msg = str(ei.value)
    bad = PAYLOAD[: len(PAYLOAD) // 2] if route == "/short.bin" else PAYLOAD[:-1] + b"X"
    assert f"expected {PAYLOAD_SHA}" in msg and f"got {hashlib.sha256(bad).hexdigest()}" in msg
    assert _cache_files(cache) == []


def test_http_truncated_stream_retried_then_fails(http_base, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=r"after 3 attempts.*dropped after \d+ of 262148 bytes"):
        fetch(f"{http_base}/cut.bin", cache, sha256=PAYLOAD_SHA, **FAST)
    assert _Handler.hits["/cut.bin"] == 3  # 1 + retries
    assert _cache_files(cache) == []


@pytest.mark.parametrize("route", ["/drop-once.bin", "/cut-once.bin", "/busy-once.bin"])
def test_http_transient_failure_retried(http_base, tmp_path, route):
    p = fetch(f"{http_base}{route}", tmp_path / "cache", sha256=PAYLOAD_SHA, **FAST)
    assert p.read_bytes() == PAYLOAD
    assert _Handler.hits[route] == 2


def test_http_404_is_one_clear_error_without_retry(http_base, tmp_path):
    with pytest.raises(FetchError, match=r"HTTP 404 .*missing\.bin: check the URL"):
        fetch(f"{http_base}/missing.bin", tmp_path / "cache", sha256=PAYLOAD_SHA, **FAST)
    assert _Handler.hits["/missing.bin"] == 1


def test_missing_sha256_and_bad_scheme(http_base, tmp_path):
    with pytest.raises(FetchError, match="sha256 is required.*record"):
        fetch(f"{http_base}/good.bin", tmp_path, sha256=None, **FAST)
    with pytest.raises(FetchError, match="unsupported URI scheme 'ftp'"):
        fetch("ftp://example.org/x.bin", tmp_path, sha256=PAYLOAD_SHA, **FAST)
    with pytest.raises(ValueError, match="64-digit hex"):
        fetch(f"{http_base}/good.bin", tmp_path, sha256="abc", **FAST)
    assert "/good.bin" not in _Handler.hits  # argument errors never touch the network


def test_poisoned_cache_entry_is_replaced(http_base, tmp_path, caplog):
    cache = tmp_path / "cache"
    poisoned = cache_path(cache, PAYLOAD_SHA, "good.bin")
    poisoned.parent.mkdir(parents=True)
    poisoned.write_bytes(b"evil")
    p = fetch(f"{http_base}/good.bin", cache, sha256=PAYLOAD_SHA, **FAST)
    assert p == poisoned and p.read_bytes() == PAYLOAD
    assert _Handler.hits["/good.bin"] == 1
    assert "corrupt" in caplog.text


def test_record_mode_writes_json_and_logs(http_base, tmp_path, caplog):
    cache = tmp_path / "cache"
    p = fetch(f"{http_base}/good.bin", cache, sha256="record", **FAST)
    assert recorded_sha256(p) == PAYLOAD_SHA
    rec = json.loads(p.with_name("good.bin.sha256.json").read_text())
    assert rec["sha256"] == PAYLOAD_SHA and rec["size_bytes"] == len(PAYLOAD)
    assert PAYLOAD_SHA in caplog.text
    # the recorded hash then works as a pin and hits the cache
    assert fetch(f"{http_base}/good.bin", cache, sha256=PAYLOAD_SHA, **FAST) == p
    assert _Handler.hits["/good.bin"] == 1


def test_local_paths_and_file_uri(tmp_path):
    src = tmp_path / "src" / "data.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    p1 = fetch(str(src), cache, sha256=PAYLOAD_SHA, **FAST)
    p2 = fetch(src.as_uri(), cache, sha256=PAYLOAD_SHA, **FAST)
    assert p1 == p2 == cache / "sha256" / PAYLOAD_SHA / "data.bin"
    assert p1.read_bytes() == PAYLOAD
    src.write_bytes(PAYLOAD + b"!")
    p1.unlink()
    with pytest.raises(ChecksumMismatchError, match=f"expected {PAYLOAD_SHA}"):
        fetch(src.as_uri(), cache, sha256=PAYLOAD_SHA, **FAST)
    with pytest.raises(FetchError, match="local file not found"):
        fetch(str(tmp_path / "nope.bin"), cache, sha256=PAYLOAD_SHA, **FAST)
    assert _cache_files(cache) == []


def test_release_names():
    assert resolve_release("edm-cifar10-32x32-uncond-vp") == (
        "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl"
    )
    assert resolve_release("baseline-cifar10-32x32-uncond-ve.pkl") == (
        "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/baseline/baseline-cifar10-32x32-uncond-ve.pkl"
    )
    assert len(KNOWN_RELEASES) == 12
    assert resolve_release("edm-imagenet-64x64-cond-adm").endswith("/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl")
    with pytest.raises(ValueError, match="unknown release name 'edm-mnist'"):
        resolve_release("edm-mnist")


# --- s3:// against a real moto server on loopback --------------------------------------------------------------
@pytest.fixture(scope="module")
def moto_endpoint():
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _clear_aws_env(monkeypatch, tmp_path):
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch, tmp_path):
    import boto3

    _clear_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    bucket = f"ctm-{tmp_path.name.lower().replace('_', '-')}"[:63]
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="teachers/net.pkl", Body=PAYLOAD)
    return bucket


def test_s3_good_bad_missing(s3_bucket, tmp_path):
    cache = tmp_path / "cache"
    p = fetch(f"s3://{s3_bucket}/teachers/net.pkl", cache, sha256=PAYLOAD_SHA, **FAST)
    assert p == cache / "sha256" / PAYLOAD_SHA / "net.pkl" and p.read_bytes() == PAYLOAD
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError, match=f"expected {wrong}, got {PAYLOAD_SHA}"):
        fetch(f"s3://{s3_bucket}/teachers/net.pkl", cache, sha256=wrong, **FAST)
    assert _cache_files(cache) == [p]
    with pytest.raises(FetchError, match="S3 object not found"):
        fetch(f"s3://{s3_bucket}/teachers/absent.pkl", cache, sha256=PAYLOAD_SHA, **FAST)
    rec = fetch(f"s3://{s3_bucket}/teachers/net.pkl", tmp_path / "rec", sha256="record", **FAST)
    assert recorded_sha256(rec) == PAYLOAD_SHA


def test_s3_missing_credentials_fails_before_download(moto_endpoint, monkeypatch, tmp_path):
    _clear_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    with pytest.raises(FetchError, match=r"no AWS credentials found for s3://b/k\.bin: set AWS_ACCESS_KEY_ID"):
        fetch("s3://b/k.bin", tmp_path / "cache", sha256=PAYLOAD_SHA, **FAST)
    assert _cache_files(tmp_path / "cache") == []
