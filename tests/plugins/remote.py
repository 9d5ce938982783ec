"""Pytest plugin for the tests on real servers (moto S3, Ray head, MLflow server), all on 127.0.0.1.

Registered by tests/conftest.py (``pytest_plugins``). Tests request its fixtures by name: ``inputs`` (tiny prepared
digits + tiny random teacher), ``moto_server``, ``s3``, ``ray_head``, and ``remote``, a namespace of the helpers
(``remote.Proc``, ``remote.write_params``, ``remote.reference_run`` ...). Expensive things (the inputs, the
uninterrupted reference distill run, the shared Ray head and moto server) are computed once per pytest process,
whichever test asks first.

Process hygiene: every server is started by a fixture and stopped by PID (a Ray head: the processes whose command
line names its own temp dir, plus their descendants; never ``ray stop``, which kills every Ray on the host).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# Tiny distill: 1 worker, a few seconds of CPU per checkpoint interval. K >= 4 so steps cost a bit (teacher Heun).
TINY_DISTILL: dict[str, Any] = {
    "distill": {
        "N": 8,
        "K": 4,
        "batch": 8,
        "microbatch": 8,
        "steps": 24,
        "checkpoint_every": 6,
        "log_every": 1,
        "eval_emas": [0.999],
        "seed": 0,
    },
    "ray": {
        "num_workers": 1,
        "cpus_per_worker": 1.0,
        "num_cpus": 3,
        "object_store_mb": 100,
        "max_failures": 2,
        "use_gpu": False,
    },
    "mlflow": {"experiment_name": "ctm-remote-tests"},
}
CLEAR_ENV = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_API_SERVER_ADDRESS",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "CTM_INSIDE_RAY_JOB",
    "DVC_ROOT",
)
AWS_CLEAR = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
)

_CACHE: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------------------------
# small utilities


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_tmp(prefix: str = "ctmr") -> Path:
    """A short, unique dir under /tmp (Ray's AF_UNIX socket paths are limited to 107 bytes); removed at exit
    (atexit runs last-in first-out: a Ray head registered later is stopped before its dir is removed)."""
    import atexit
    import shutil

    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    atexit.register(shutil.rmtree, path, True)
    return path


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def student_weights(out_dir: Path) -> dict[str, str]:
    """variant -> sha256 of its safetensors file (bitwise identity of the final weights)."""
    return {p.stem: sha256_bytes(p.read_bytes()) for p in sorted((Path(out_dir) / "weights").glob("*.safetensors"))}


def base_env(**extra: str) -> dict[str, str]:
    """os.environ without Ray/MLflow addresses and tokens (the tests set their own), venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAR_ENV}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def aws_env(endpoint: str, tmp: Path) -> dict[str, str]:
    """Dummy credentials + endpoint for moto; no shared config/credential files, no EC2 metadata lookups."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-credentials"),
        "AWS_CONFIG_FILE": str(tmp / "no-config"),
    }


def set_aws_env(monkeypatch, endpoint: str, tmp: Path) -> None:
    for var in AWS_CLEAR:
        monkeypatch.delenv(var, raising=False)
    for k, v in aws_env(endpoint, tmp).items():
        monkeypatch.setenv(k, v)


def write_params(folder: Path, overrides: dict[str, Any] | None = None, *, name: str = "params.yaml") -> Path:
    """params.yaml of the repo merged with TINY_DISTILL and ``overrides``, written to ``folder/name``.

    The folder becomes the params' repo root: relative ``ray.storage_path`` etc. resolve inside it.
    """
    import yaml

    from ctm_core.config import YamlLoader, merge_overrides

    raw = yaml.load((ROOT / "params.yaml").read_text(), Loader=YamlLoader)  # noqa: S506 - SafeLoader subclass
    raw = merge_overrides(raw, TINY_DISTILL)
    raw = merge_overrides(raw, {"ray": {"temp_dir": str(short_tmp("ctmr")), "dashboard_port": free_port()}})
    if overrides:
        raw = merge_overrides(raw, overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def copy_repo(dst: Path) -> Path:
    """The repository's tracked and untracked-but-not-ignored files as a fresh one-commit git repo at ``dst`` (what
    a clone holds; also used by tests/system/test_e2e_dvc.py). Ignored data/, artifacts/, ray_results/,
    .dvc/cache and .venv stay behind."""
    import shutil

    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "snapshot"],
    ):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


def upload_tree(client, bucket: str, prefix: str, folder: Path) -> list[str]:
    """``aws s3 sync folder s3://bucket/prefix`` with boto3 (what a user does with a prepare/teacher output)."""
    keys = []
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            key = f"{prefix.rstrip('/')}/{p.relative_to(folder).as_posix()}"
            client.upload_file(str(p), bucket, key)
            keys.append(key)
    return keys


# --------------------------------------------------------------------------------------------------------------
# tiny inputs (prepared digits + tiny random teacher), once per process


def tiny_inputs() -> dict[str, Path]:
    if "inputs" in _CACHE:
        return _CACHE["inputs"]
    import torch

    from ctm_core.io.teacher_format import save_teacher
    from ctm_core.nets.precond import EDMPrecond
    from pipelines.prepare import prepare_dataset

    root = short_tmp("ctm-inputs")
    prepare_dataset(
        "sklearn-digits", None, root / "prepared", heldout_fraction=0.1, seed=0, shard_size=4096, progress=False
    )
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = EDMPrecond(
            img_resolution=8,
            img_channels=1,
            model_type="SongUNet",
            model_channels=16,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[],
            dropout=0.0,
        ).eval()
    with torch.no_grad():  # EDM zero-initialises the output conv: perturb so the nets do something
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_teacher("EDMPrecond", teacher.init_kwargs, teacher.state_dict(), root / "teacher")
    _CACHE["inputs"] = {"root": root, "data": root / "prepared", "teacher": root / "teacher"}
    return _CACHE["inputs"]


@pytest.fixture(scope="session")
def inputs() -> dict[str, Path]:
    return tiny_inputs()


# --------------------------------------------------------------------------------------------------------------
# processes: distill subprocess with a log reader, Ray cleanup by temp dir


class Proc:
    """A subprocess whose merged stdout/stderr is read by a thread; lines are timestamped."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path = ROOT, log: Path | None = None):
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.log = open(log, "w") if log else None  # noqa: SIM115 - closed in _reader
        self.p = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        for line in self.p.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
            if self.log:
                self.log.write(line)
                self.log.flush()
        if self.log:
            self.log.close()

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float, after: float = 0.0) -> tuple[float, re.Match] | None:
        """First line matching ``pattern`` logged after monotonic time ``after``; None if the process ended."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = 0
        while time.monotonic() < deadline:
            while i < len(self.lines):
                t, line = self.lines[i]
                i += 1
                m = rx.search(line)
                if m and t >= after:
                    return t, m
            if self.p.poll() is not None and i >= len(self.lines):
                self._thread.join(timeout=2)
                if i >= len(self.lines):
                    return None
            time.sleep(0.05)
        raise TimeoutError(f"no line matching {pattern!r} within {timeout} s; last lines:\n" + self.tail())

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def finish(self, timeout: float) -> int:
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._thread.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(timeout=10)


def distill_cmd(params: Path, out: Path, inp: dict[str, Path]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines.distill",
        "--params",
        str(params),
        "--data",
        str(inp["data"]),
        "--teacher",
        str(inp["teacher"]),
        "--out",
        str(out),
    ]


def ray_processes(temp_dir: str | Path) -> list:
    """Processes of the Ray cluster rooted at ``temp_dir`` (command line names it) and all their descendants."""
    import psutil

    key = str(temp_dir)
    found: dict[int, Any] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(key in a for a in (p.info["cmdline"] or [])):
                found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
        except psutil.NoSuchProcess:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def kill_ray(temp_dir: str | Path, timeout: float = 10.0) -> int:
    """SIGKILL the processes of the Ray cluster of ``temp_dir`` (by PID); returns how many were killed."""
    import psutil

    procs = ray_processes(temp_dir)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)
    return len(procs)


def train_worker_pids(temp_dir: str | Path) -> list[int]:
    """PIDs of Ray Train worker actors (process title ``ray::RayTrainWorker...``) of the cluster of ``temp_dir``."""
    import psutil

    out = []
    for p in ray_processes(temp_dir):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "RayTrainWorker" in cmd:
            out.append(p.pid)
    return out


def params_temp_dir(params_path: Path) -> str:
    import yaml

    return yaml.safe_load(params_path.read_text())["ray"]["temp_dir"]


# --------------------------------------------------------------------------------------------------------------
# the uninterrupted reference run (same tiny params, local storage), once per process


def reference_run(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``python -m pipelines.distill`` uninterrupted with TINY_DISTILL (+extra); weights sha256 + wall time."""
    import yaml

    key = "ref:" + yaml.safe_dump(extra or {}, sort_keys=True)
    if key in _CACHE:
        return _CACHE[key]
    inp = tiny_inputs()
    head = shared_head()
    folder = short_tmp("ctm-ref")
    params = write_params(folder, {"ray": {"address": head.gcs_address}, **(extra or {})})
    proc = Proc(distill_cmd(params, folder / "student", inp), head_run_env(head, folder), log=folder / "distill.log")
    try:
        rc = proc.finish(timeout=240)
    finally:
        proc.kill()
    assert rc == 0, f"reference distill failed (rc {rc}):\n{proc.tail()}"
    _CACHE[key] = {
        "weights": student_weights(folder / "student"),
        "wall_s": time.monotonic() - proc.t0,
        "folder": folder,
        "source": "reference_run",
    }
    register_checkpoints(folder / "ray_results")
    return _CACHE[key]


def register_checkpoints(storage: Path) -> None:
    """Remember a finished TINY_DISTILL run's local checkpoints (fault 3 re-uploads two of them)."""
    dirs = sorted(p for p in Path(storage).glob("distill-*/checkpoint_*") if p.is_dir())
    if len(dirs) >= 2 and "ckpt_dirs" not in _CACHE:
        _CACHE["ckpt_dirs"] = dirs[-2:]


def checkpoint_dirs() -> list[Path]:
    """Two consecutive real checkpoint dirs of a finished tiny run (runs the reference if no test left any)."""
    if "ckpt_dirs" not in _CACHE:
        register_checkpoints(reference_run()["folder"] / "ray_results")
        if "ckpt_dirs" not in _CACHE:  # the reference was registered by a run without local checkpoints
            _CACHE.pop("ref:{}\n")
            register_checkpoints(reference_run()["folder"] / "ray_results")
    return _CACHE["ckpt_dirs"]


def match_reference(weights: dict[str, str], wall_s: float, source: str) -> bool:
    """Compare an UNINTERRUPTED run with TINY_DISTILL against the reference; the first such run of the process
    becomes the reference (saves one ~1-min Ray run). Interrupted runs must compare with ``reference_run()``."""
    key = "ref:" + "{}\n"
    if key not in _CACHE:
        _CACHE[key] = {"weights": dict(weights), "wall_s": wall_s, "folder": None, "source": source}
        return True
    return _CACHE[key]["weights"] == weights


# --------------------------------------------------------------------------------------------------------------
# moto S3 server on loopback


class MotoServer:
    """moto's ThreadedMotoServer on 127.0.0.1; ``stop()``/``start()`` keep the buckets (moto's state is in-process)."""

    def __init__(self, port: int | None = None):
        from moto.server import ThreadedMotoServer

        self.port = port or free_port()
        self._cls = ThreadedMotoServer
        self.server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def shared_moto() -> MotoServer:
    """One moto server per pytest process (the shared Ray head points its workers at it)."""
    if "moto" not in _CACHE:
        import atexit

        srv = MotoServer().start()
        atexit.register(srv.stop)
        _CACHE["moto"] = srv
    return _CACHE["moto"]


@pytest.fixture
def moto_server() -> MotoServer:
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    return shared_moto()


class CutProxy:
    """TCP proxy on 127.0.0.1 in front of ``upstream_port`` that can play "the S3 server goes down mid-upload".

    ``cut_after(n)``: the first connection that has forwarded more than ``n`` bytes client->server is reset in the
    middle of its request, and the proxy stops listening (connection refused) until ``start()`` is called again.
    ``cut_on(pattern, n)``: the same, but counting starts where ``pattern`` (e.g. the object key of one checkpoint
    file, which appears in the request line of its PUT) shows up in a connection's client->server bytes: "the
    server dies a third into the upload of that file", whatever else the clients send first.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.cut_bytes: int | None = None
        self.cut_pattern: bytes | None = None
        self.cut_at: float | None = None
        self._lsock: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CutProxy:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._lsock = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()
        return self

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                c.close()
                continue
            with self._lock:
                if self._lsock is not ls:  # stop() ran while this client connected: it must not get through
                    for s in (c, u):
                        s.close()
                    return
                self._conns += [c, u]
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        sent = 0  # client->server bytes counted towards the cut
        armed = False  # counting (cut_after: from the start; cut_on: from the pattern)
        window = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upload and self.cut_bytes is not None:
                    start = 0
                    if not armed:
                        if self.cut_pattern is None:
                            armed = True
                        else:
                            hay = window + data
                            i = hay.find(self.cut_pattern)
                            if i >= 0:
                                armed, start = True, max(0, i + len(self.cut_pattern) - len(window))
                            window = hay[-len(self.cut_pattern) :]
                    if armed and sent + len(data) - start > self.cut_bytes:
                        dst.sendall(data[: start + max(0, self.cut_bytes - sent)])
                        self.cut_at = time.monotonic()
                        self.stop()  # mid-request: reset everything, refuse new connections
                        return
                    if armed:
                        sent += len(data) - start
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut_after(self, n: int) -> None:
        self.cut_pattern, self.cut_bytes = None, n

    def cut_on(self, pattern: bytes, n: int) -> None:
        self.cut_pattern, self.cut_bytes = pattern, n

    @property
    def listening(self) -> bool:
        return self._lsock is not None

    def stop(self) -> None:
        self.cut_bytes = None
        self.cut_pattern = None
        with self._lock:  # atomically: no listener, and no connection accepted before this survives it
            if self._lsock is not None:
                self._lsock.close()
                self._lsock = None
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
                s.close()
            except OSError:
                pass


FAULTS: list[dict[str, Any]] = []


def report_fault(**row: Any) -> None:
    """Print one fault-injection result line (a row of the fault table in the test log) and keep it for the summary."""
    FAULTS.append(row)
    print("\nFAULT " + " | ".join(f"{k}={v}" for k, v in row.items()), flush=True)


@pytest.fixture
def s3(moto_server, monkeypatch, tmp_path):
    """Env pointing at moto (dummy creds) and a fresh bucket; yields (endpoint, bucket, boto3 client)."""
    import boto3

    set_aws_env(monkeypatch, moto_server.endpoint, tmp_path)
    bucket = f"ctm-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    return {"endpoint": moto_server.endpoint, "bucket": bucket, "client": client, "server": moto_server}


def list_keys(client, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return sorted(keys)


# --------------------------------------------------------------------------------------------------------------
# a local Ray head (`ray start --head`) with its own temp dir, ports and token


class RayHead:
    def __init__(self, num_cpus: int = 4, extra_env: dict[str, str] | None = None):
        self.temp_dir = short_tmp("ctmh")
        self.token_path = self.temp_dir / "auth_token"
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(uuid.uuid4().hex + uuid.uuid4().hex)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        # token auth explicit: the cluster runs in token mode with its own token file (not ~/.ray/auth_token)
        self.env = base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), **(extra_env or {}))
        self.num_cpus = num_cpus

    def start(self) -> RayHead:
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        cmd = [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--dashboard-host",
            "127.0.0.1",
            "--temp-dir",
            str(self.temp_dir),
            "--num-cpus",
            str(self.num_cpus),
            "--num-gpus",
            "0",
            "--include-dashboard",
            "true",
            "--object-store-memory",
            str(150 * 2**20),
            "--disable-usage-stats",
        ]
        for k, v in ports.items():
            cmd += [k, str(v)]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        self._wait_dashboard(90)
        return self

    def _wait_dashboard(self, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        req = urllib.request.Request(
            f"{self.dashboard_url}/api/version",
            headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"},
        )
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"Ray dashboard {self.dashboard_url} not up within {timeout} s")

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def alive(self) -> bool:
        return any("gcs_server" in " ".join(p.cmdline()) for p in ray_processes(self.temp_dir))

    def stop(self) -> int:
        return kill_ray(self.temp_dir)


def shared_head() -> RayHead:
    """One Ray head per pytest process (started on first use, stopped by PID at exit): joining it costs seconds,
    a fresh local cluster per run costs ~30 s on 2 busy cores."""
    head = _CACHE.get("head")
    if head is not None and head.alive():
        return head
    import atexit

    moto = shared_moto()  # the head's workers read/write s3:// through the shared moto (their env is the head's)
    head = RayHead(extra_env=aws_env(moto.endpoint, short_tmp("ctm-aws")))
    atexit.register(head.stop)  # before start(): an interrupted start leaves nothing behind either
    _CACHE["head"] = head.start()
    return head


@pytest.fixture
def ray_head() -> RayHead:
    pytest.importorskip("psutil")
    return shared_head()


def head_run_env(head: RayHead, folder: Path, **extra: str) -> dict[str, str]:
    """Env for a driver joining ``head``: its token (token mode), MLflow DB and DVC_ROOT in ``folder``."""
    env = dict(head.env)
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}", DVC_ROOT=str(folder), **extra)
    return env


@pytest.fixture(scope="session")
def remote() -> types.SimpleNamespace:
    """The helpers of this plugin, for tests that start processes or talk to the servers themselves."""
    return types.SimpleNamespace(
        ROOT=ROOT,
        VENV_BIN=VENV_BIN,
        TINY_DISTILL=TINY_DISTILL,
        CutProxy=CutProxy,
        MotoServer=MotoServer,
        Proc=Proc,
        RayHead=RayHead,
        aws_env=aws_env,
        base_env=base_env,
        checkpoint_dirs=checkpoint_dirs,
        copy_repo=copy_repo,
        distill_cmd=distill_cmd,
        free_port=free_port,
        head_run_env=head_run_env,
        kill_ray=kill_ray,
        list_keys=list_keys,
        match_reference=match_reference,
        params_temp_dir=params_temp_dir,
        ray_processes=ray_processes,
        reference_run=reference_run,
        register_checkpoints=register_checkpoints,
        report_fault=report_fault,
        set_aws_env=set_aws_env,
        sha256_bytes=sha256_bytes,
        short_tmp=short_tmp,
        student_weights=student_weights,
        train_worker_pids=train_worker_pids,
        tree_bytes=tree_bytes,
        upload_tree=upload_tree,
        write_params=write_params,
    )
