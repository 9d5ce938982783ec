"""pipelines.support.fetch against hostile sources: endless or over-announced downloads, partials left by a killed
fetch, `sha256: record` over plain http, credentials in the URI (user-info, presigned query strings)."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.support.fetch import DEFAULT_MAX_BYTES, FetchError, fetch

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = bytes(range(256)) * 64  # 16 KiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = dict(progress=False, timeout_s=5.0, retries=0, backoff_s=0.01)
MIB = 1 << 20


class _Handler(http.server.BaseHTTPRequestHandler):
    sent: dict[str, int] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        route = self.path.split("?", 1)[0]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if route == "/good.bin":
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif route == "/announced-10g.bin":  # claims 10 GiB, sends 1 MiB
            self.send_header("Content-Length", str(10 << 30))
            self.end_headers()
            self._stream(MIB)
        elif route == "/unannounced-8m.bin":  # no Content-Length: ends when the connection closes
            self.end_headers()
            self._stream(8 * MIB)
        elif route == "/slow.bin":  # 3 MiB (past one 1 MiB read), then nothing for 20 s (a fetch to kill)
            self.send_header("Content-Length", str(10 * MIB))
            self.end_headers()
            self._stream(3 * MIB)
            time.sleep(20)
        self.close_connection = True

    def _stream(self, n: int) -> None:
        sent = 0
        try:
            while sent < n:
                self.wfile.write(b"\0" * (64 << 10))
                self.wfile.flush()
                sent += 64 << 10
        except OSError:
            pass
        self.sent[self.path] = sent


@pytest.fixture(scope="module")
def http_base():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file()) if d.exists() else []


def test_default_cap_is_4_gib():
    assert DEFAULT_MAX_BYTES == 4 << 30


def test_announced_size_over_cap_refused_before_writing(http_base, tmp_path):
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch(f"{http_base}/announced-10g.bin", cache, sha256=PAYLOAD_SHA, **FAST)
    msg = str(info.value)
    assert "\n" not in msg and "10737418240 bytes (announced)" in msg and "download cap" in msg and "fix:" in msg
    assert _files(cache) == [] and time.monotonic() - t0 < 5


def test_streamed_bytes_over_cap_refused(http_base, tmp_path):
    url = f"{http_base}/unannounced-8m.bin"
    plain = tmp_path / "plain.bin"  # what a plain download does: takes whatever the server sends
    with urllib.request.urlopen(url, timeout=10) as resp, open(plain, "wb") as f:  # noqa: S310 (loopback)
        shutil.copyfileobj(resp, f)
    assert plain.stat().st_size == 8 * MIB
    cache = tmp_path / "cache"
    with pytest.raises(FetchError) as info:
        fetch(url, cache, sha256=PAYLOAD_SHA, max_bytes=MIB, **FAST)
    msg = str(info.value)
    assert "\n" not in msg and f"more than {MIB} bytes (streamed)" in msg, msg
    assert _files(cache) == []  # the partial is gone too
    # a legitimate file under the cap still works, and the cap can be lifted
    assert fetch(f"{http_base}/good.bin", cache, sha256=PAYLOAD_SHA, max_bytes=len(PAYLOAD), **FAST).is_file()
    local = tmp_path / "local.bin"
    local.write_bytes(PAYLOAD)
    with pytest.raises(FetchError, match="over the download cap"):
        fetch(str(local), tmp_path / "c2", sha256=PAYLOAD_SHA, max_bytes=len(PAYLOAD) - 1, **FAST)


def test_partial_of_a_killed_fetch_is_cleaned_by_the_next(http_base, tmp_path):
    cache = tmp_path / "cache"
    code = (
        "import sys; from pipelines.support.fetch import fetch; "
        f"fetch(sys.argv[1], sys.argv[2], sha256={PAYLOAD_SHA!r}, progress=False, retries=0)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, f"{http_base}/slow.bin", str(cache)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not any(p.name.startswith("partial-") and p.stat().st_size > 0 for p in _files(cache)):
            assert time.monotonic() < deadline and proc.poll() is None, "the fetch never started writing"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    left = [p for p in _files(cache) if p.name.startswith("partial-")]
    assert len(left) == 1 and left[0].name.startswith(f"partial-{proc.pid}-")  # what a kill leaves behind

    tmp_dir = cache / "tmp"
    old = tmp_dir / "partial-abc123.tmp"  # an older partial without a pid, untouched for two hours
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    live = tmp_dir / f"partial-{os.getpid()}-live.tmp"  # a fetch of this process still writing: kept
    live.write_bytes(b"y")
    other = tmp_dir / "notes.txt"  # not ours: kept
    other.write_text("keep")

    p = fetch(f"{http_base}/good.bin", cache, sha256=PAYLOAD_SHA, **FAST)
    assert p.read_bytes() == PAYLOAD
    assert not left[0].exists() and not old.exists()
    assert live.exists() and other.exists()


def test_record_refused_over_plain_http(tmp_path, http_base):
    cache = tmp_path / "cache"
    with pytest.raises(FetchError) as info:  # refused before any connection (the host does not even resolve)
        fetch("http://mirror.example.invalid/edm.pkl", cache, sha256="record", **FAST)
    msg = str(info.value)
    assert "\n" not in msg and "sha256='record' over plain http is refused" in msg and "fix: use the https://" in msg
    assert _files(cache) == []
    # a pinned hash over http is fine (the bytes are checked), and so is record on loopback (nobody in between)
    assert fetch(f"{http_base}/good.bin", cache, sha256="record", **FAST).read_bytes() == PAYLOAD


def test_credentials_in_uri_never_in_messages_or_record(http_base, tmp_path, caplog):
    secret_user = "http://alice:hunter2@no-such-host.invalid/x.bin?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA1"
    with pytest.raises(FetchError) as info:
        fetch(secret_user, tmp_path / "c1", sha256=PAYLOAD_SHA, **FAST)
    msg = str(info.value)
    assert "hunter2" not in msg and "alice" not in msg and "s3cr3t" not in msg and "AKIA1" not in msg, msg
    assert "no-such-host.invalid/x.bin" in msg and "credentials in the URL" in msg, msg  # the place is still named
    with pytest.raises(FetchError) as info:  # a failure deep in the network stack is scrubbed too
        fetch("http://no-such-host.invalid/x.bin?sig=s3cr3t", tmp_path / "c1", sha256=PAYLOAD_SHA, **FAST)
    assert "s3cr3t" not in str(info.value) and "giving up on" in str(info.value)

    caplog.set_level(logging.INFO)
    presigned = f"{http_base}/good.bin?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA1"
    p = fetch(presigned, tmp_path / "c2", sha256="record", **FAST)
    rec = p.with_name(p.name + ".sha256.json").read_text()
    assert json.loads(rec)["sha256"] == PAYLOAD_SHA
    assert "s3cr3t" not in rec and "AKIA1" not in rec and "s3cr3t" not in caplog.text
    with pytest.raises(FetchError) as info:
        fetch(presigned.replace("good", "missing"), tmp_path / "c3", sha256=PAYLOAD_SHA, max_bytes=1, **FAST)
    assert "s3cr3t" not in str(info.value)


def test_cli_error_line_is_redacted(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.support.fetch",
            "ftp://bob:pw123@host/x.bin?token=zzz",
            "--cache-dir",
            str(tmp_path),
            "--sha256",
            PAYLOAD_SHA,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "pw123" not in out and "zzz" not in out and "unsupported URI scheme" in out, out
