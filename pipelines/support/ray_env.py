"""Start or join a Ray cluster for the pipeline stages (Ray 2.60; docs/stack.md#18-job-submission,
docs/stack.md#111-small-machines).

Local clusters (`ray.address: null` and no `RAY_ADDRESS`) get explicit logical CPUs, a short private temp dir
(AF_UNIX socket paths are limited to 107 bytes), the dashboard on a given port (Tune + Train V2 need the State API
to release placement groups, docs/stack.md#1112-state-api) and Ray Data progress bars off.

Token authentication (Ray 2.59+ turns it on by default for local `ray.init()` clusters and writes a shared
`~/.ray/auth_token`). Our choice, made explicit: if `RAY_AUTH_MODE` is already set we respect it; otherwise a local
cluster runs with `RAY_AUTH_MODE=token` and its OWN token file `<temp_dir>/auth_token` (mode 0600, via
`RAY_AUTH_TOKEN_PATH`) unless `RAY_AUTH_TOKEN`/`RAY_AUTH_TOKEN_PATH` are given. Why: Ray binds GCS/raylet to the
node's routable IP even when asked for 127.0.0.1 (`ray/_private/services.py` `resolve_ip_for_localhost`), so the
token is what keeps a local cluster from being an open code-execution endpoint; a per-cluster file means concurrent
sessions on one machine never overwrite each other's token in `~/.ray`. `auth="disabled"` opts out. Joining a
remote cluster needs that cluster's token in `RAY_AUTH_TOKEN` (or `RAY_AUTH_TOKEN_PATH`); we do not touch the auth
variables then.

Quiet logs (docs/pipeline.md#logging): a local cluster is configured so that Ray prints nothing that does not concern
the user, at the source, through the environment its processes inherit (`quiet_local_env`; a variable the user set is
kept): no print patch (Ray Train's `RAY_TRAIN_ENABLE_PRINT_PATCH` sends a worker's `print` to the root logger and,
as Ray wraps the worker's stdout, to the original print too: every printed line appeared twice; our workers log
through `logging`, one handler); no preemption watcher (`RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`: a single local node
is never drained, and the watcher actor logs a core_worker error at every start); a raylet worker-startup limit of
4x the logical CPUs we give Ray (`RAY_worker_maximum_startup_concurrency`; the default, the physical core count,
makes the raylet warn "N PYTHON worker processes ... 4x the maximum expected startup concurrency" on 2 cores as soon as
Train's controller, workers and dataset actors start); and `PYTHONWARNINGS` set, which stops Ray from turning its
RayDeprecationWarnings on (ray/util/annotations.py does so only when no warning option is given) and ignores the
`ExecutionOptions.exclude_resources` one that Ray Train's own DatasetManager triggers.

The default temp dir is under the shared `/tmp`, so anyone on the machine could create it, or plant an
`auth_token` there first and then know the token of our cluster. An existing temp dir must be ours and not
writable by others, and an existing token file is reused only if it is a regular file (not a link) owned by us with
mode 0600; anything else stops with one line naming the path and the fix (`check_private_file`).
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Any

from ctm_core.config import Params
from ctm_core.redact import redact_uri
from pipelines.support.params import resolve_path

__all__ = [
    "check_private_file",
    "connect_or_start",
    "init_local_ray",
    "quiet_local_env",
    "shutdown",
    "storage_path",
    "tune_search_space",
]

_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_DATA_DISABLE_PROGRESS_BARS")
# Ray's internal deprecation warning triggered by Ray Train itself (not by our code): ignored in Ray's processes.
_RAY_INTERNAL_WARNINGS = "ignore:`ExecutionOptions.exclude_resources`:DeprecationWarning"


def quiet_local_env(num_cpus: int) -> dict[str, str]:
    """The environment a local cluster starts with so that Ray's processes print nothing the user cannot act on
    (module doc); variables the user set are left alone (`PYTHONWARNINGS` is extended, not replaced)."""
    env = {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        # a 2-worker digits run starts ~16 Python workers (Train controller and workers, dataset actors, Ray Data
        # tasks): at 4x the limit the raylet warns, so the limit is 4x the logical CPUs (16 for num_cpus 4)
        "RAY_worker_maximum_startup_concurrency": str(4 * int(num_cpus)),
    }
    out = {k: v for k, v in env.items() if k not in os.environ}
    user = os.environ.get("PYTHONWARNINGS", "")
    if _RAY_INTERNAL_WARNINGS not in user.split(","):
        out["PYTHONWARNINGS"] = f"{user},{_RAY_INTERNAL_WARNINGS}" if user else _RAY_INTERNAL_WARNINGS
    return out


_saved_env: dict[str, str | None] = {}


def _set_env(name: str, value: str) -> None:
    """Set an env var for this process and its children, remembering the old value for `shutdown()`."""
    _saved_env.setdefault(name, os.environ.get(name))
    os.environ[name] = value


def _refresh_ray_auth_config() -> None:
    """Make an already-imported Ray re-read RAY_AUTH_* (its C++ RayConfig is read once, at `import ray`).

    Ray does the same in `ray/_private/authentication/authentication_token_setup.py` (`_enable_token_auth`).
    Without it, a process that imported ray before we set the env starts a token-auth GCS it cannot talk to.
    """
    if "ray._raylet" not in sys.modules:
        return  # `import ray` will read the env
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def check_private_file(path: Path, what: str) -> None:
    """`path` must be a regular file (not a symlink) owned by this user with mode 0600, else ValueError (one line)."""
    st = os.lstat(path)
    problems = []
    if not stat.S_ISREG(st.st_mode):
        problems.append("is not a regular file")
    if st.st_uid != os.getuid():
        problems.append(f"is owned by uid {st.st_uid}, not {os.getuid()}")
    if stat.S_IMODE(st.st_mode) != 0o600:
        problems.append(f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0600")
    if problems:
        raise ValueError(
            f"{what}: {str(path)!r} {' and '.join(problems)}; someone else may have written or read it (fix: delete "
            "it if it is yours, or set ray.temp_dir to a folder of your own)"
        )


def _check_private_dir(path: Path) -> None:
    """`path` (an existing temp dir) must be a real folder owned by this user, else ValueError. Ray itself makes its
    temp dir world-writable (mode 0777, for multi-user sessions), so that mode is accepted; what another user could
    plant there is caught by the checks on the files we reuse (`check_private_file`)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ValueError(
            f"ray.temp_dir: {str(path)!r} is not a folder of your own (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}); another user could plant files there (fix: set ray.temp_dir to a "
            "new path, e.g. /tmp/ray_ctm_$USER)"
        )


def _setup_token_auth(temp_dir: Path, auth: str) -> str:
    """Apply the auth policy of the module docstring; returns the effective mode ('token' | 'disabled' | ...)."""
    if auth not in ("token", "disabled"):
        raise ValueError(f"auth: expected 'token' or 'disabled', got {auth!r}")
    if "RAY_AUTH_MODE" in os.environ:  # explicit user choice wins
        return os.environ["RAY_AUTH_MODE"].lower()
    own_token = auth == "token" and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    token_path = temp_dir / "auth_token"
    if own_token and os.path.lexists(token_path):
        check_private_file(token_path, "ray.temp_dir/auth_token")  # before any env change
    _set_env("RAY_AUTH_MODE", auth)
    if own_token:
        if not os.path.lexists(token_path):
            fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # 256 bits, the format `ray get-auth-token --generate` writes
        _set_env("RAY_AUTH_TOKEN_PATH", str(token_path))
    _refresh_ray_auth_config()
    return auth


def init_local_ray(
    num_cpus: int,
    temp_dir: str | os.PathLike[str],
    dashboard_port: int,
    object_store_mb: int = 200,
    *,
    num_gpus: int | None = None,
    auth: str = "token",
    log_to_driver: bool = True,
) -> dict[str, Any]:
    """Start a NEW local Ray cluster owned by this process (`address='local'`, so `RAY_ADDRESS` is ignored).

    Args:
        num_cpus: logical CPUs (may exceed physical cores; keep > Train workers' CPUs so Ray Data can run).
        temp_dir: Ray's session/log/socket root; keep it short (<= 60 chars).
        dashboard_port: dashboard/State API port on 127.0.0.1 (use a distinct one on shared machines).
        object_store_mb: object store size in MiB (>= 75).
        num_gpus: GPUs to expose (None = autodetect).
        auth: 'token' (default; own token file, see module doc) or 'disabled'.

    Returns:
        The `ray.init` context as a dict (`dashboard_url`, `gcs_address`, `session_dir`, ...) plus `auth_mode`.
    """
    temp_dir = Path(temp_dir).expanduser().resolve()
    if len(str(temp_dir)) > 60:
        raise ValueError(f"temp_dir: expected a short path (<= 60 chars, unix socket limit), got {str(temp_dir)!r}")
    if num_cpus < 1:
        raise ValueError(f"num_cpus: expected >= 1, got {num_cpus}")
    temp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private_dir(temp_dir)
    auth_mode = _setup_token_auth(temp_dir, auth)
    # readable CI logs (docs/stack.md#1117-progress-bars); workers inherit it
    _set_env("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    for name, value in quiet_local_env(num_cpus).items():  # quiet logs (module doc), inherited by Ray's processes
        _set_env(name, value)

    import ray

    ctx = ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        object_store_memory=object_store_mb * 1024 * 1024,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        _temp_dir=str(temp_dir),
        log_to_driver=log_to_driver,
    )
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    info = {k: v for k, v in ctx.address_info.items() if isinstance(v, (str, int, float))}
    info["dashboard_url"] = ctx.dashboard_url
    info["auth_mode"] = auth_mode
    return info


def connect_or_start(params: Params) -> dict[str, Any]:
    """Join `ray.address` (or env `RAY_ADDRESS`), else start a local cluster from the `ray` section.

    Inside `ray job submit` Ray sets `RAY_ADDRESS`, so the same entrypoint joins the job's cluster.
    """
    import ray

    r = params.ray
    address = r.address or os.environ.get("RAY_ADDRESS")
    if address:
        if address.startswith(("http://", "https://")):
            raise ValueError(
                f"ray.address: {redact_uri(address)!r} is a dashboard/job-submission URL; ray.init needs "
                "ray://host:10001, host:6379 or 'auto' (use the http:// URL with ray.submit: true)"
            )
        ctx = ray.init(address=address, log_to_driver=True)
        return {
            "address": redact_uri(address),
            "dashboard_url": ctx.dashboard_url,
            "auth_mode": os.environ.get("RAY_AUTH_MODE"),
        }
    return init_local_ray(
        r.num_cpus,
        r.temp_dir,
        r.dashboard_port,
        r.object_store_mb,
        num_gpus=None if r.use_gpu else 0,
    )


def shutdown() -> None:
    """`ray.shutdown()` (stops the processes a local `init_local_ray` started) and restore the env we changed."""
    import ray

    ray.shutdown()
    for name, old in _saved_env.items():
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
    if _saved_env:
        _saved_env.clear()
        _refresh_ray_auth_config()


def storage_path(params: Params) -> str:
    """Absolute local path or `s3://` URI for Train/Tune `RunConfig(storage_path=...)`.

    For MinIO, pyarrow 25 reads `AWS_ENDPOINT_URL` (or put `?endpoint_override=host:9000&scheme=http` in the URI).
    """
    return resolve_path(params.ray.storage_path, params.repo_root)


def tune_search_space(space: dict[str, Any]) -> dict[str, Any]:
    """`tune.space` (validated `SpaceParam`s or plain dicts) → Ray Tune sampling objects, keyed like the params."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, spec in space.items():
        s = spec if isinstance(spec, dict) else spec.model_dump()
        if s["type"] == "loguniform":
            out[name] = tune.loguniform(s["low"], s["high"])
        elif s["type"] == "uniform":
            out[name] = tune.uniform(s["low"], s["high"])
        elif s["type"] == "randint":
            out[name] = tune.randint(int(s["low"]), int(s["high"]))
        elif s["type"] == "choice":
            out[name] = tune.choice(list(s["values"]))
        else:
            raise ValueError(f"tune.space.{name}.type: expected loguniform|uniform|randint|choice, got {s['type']!r}")
    return out
