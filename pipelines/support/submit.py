"""Run a pipeline stage as a Ray job on a cluster and block until it ends (``ray.submit: true``).

    submit_job(params, "pipelines.distill", ["--params", "params.yaml", ...]) -> 0 | 1

What it does (Ray 2.60 job submission, docs/stack.md#18-job-submission; environment contract: infra/README.md §1, §4):

* Address: ``ray.address`` (an ``http://head:8265`` dashboard URL), else env ``RAY_ADDRESS``.
* Entrypoint: ``python -m <module> <argv>`` with ``CTM_INSIDE_RAY_JOB=1`` in the job's environment, so the stage
  runs its work instead of submitting again. Inside a job Ray sets ``RAY_ADDRESS`` to the cluster's GCS address and
  the stage joins it. If the params file itself names the dashboard URL (``ray.address: http://...``), the
  entrypoint is ``python -m pipelines.support.submit --inside <module> <argv>``, which runs ``<module>.main(argv)`` with
  ``ray.address`` cleared (a dashboard URL cannot be joined by ``ray.init``).
* ``runtime_env``: ``working_dir`` = the repository root (Ray zips it; ``.git``/``.venv``/``__pycache__`` are never
  sent and ``.gitignore`` is honoured, so ``data/``, ``artifacts/`` and the DVC cache never travel), ``excludes`` for
  the large local folders anyway, and ``env_vars`` with the NON-secret contract variables that are set here
  (``MLFLOW_TRACKING_URI``, ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ...).
  Credentials are NOT put in the runtime env by default (Ray shows runtime envs in the dashboard and the job
  table; the cluster gets them from its instance profile / Kubernetes Secret, infra/README §1). Set
  ``CTM_SUBMIT_FORWARD_AWS_CREDENTIALS=1`` to forward the secret variables of ``SECRET_ENV`` that are set here
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``MLFLOW_TRACKING_USERNAME``/
  ``MLFLOW_TRACKING_PASSWORD``/``MLFLOW_TRACKING_TOKEN``, ``PGPASSWORD``; e.g. a throw-away cluster on a trusted
  network). URIs are forwarded without user-info, query or fragment (``https://user:token@host`` becomes
  ``https://host``, with a warning): a job that needs those credentials gets them from the variables above, never
  baked into the runtime env. ``--print-runtime-env`` masks the value of every secret-looking variable.
* Paths: relative ``--data``/``--teacher``/``--out``/``--best-params``/``--params`` that point at files which are
  NOT uploaded (git-ignored) are sent as absolute client paths, which a loopback cluster or a shared file system
  sees; for remote clusters use ``s3://`` URIs or shared mounts (a line is printed for each rewritten path).
* Idempotence: the submission id is ``<stage>-<hash(module, argv, params)[:12]>-a<attempt>``. If that job is
  still PENDING/RUNNING (e.g. ``dvc repro`` was killed and re-run) we attach to it instead of submitting a
  duplicate; if it ended, the next attempt number is used (the stage itself resumes its Ray Train run by name).
* Logs are streamed (polling ``get_job_logs``, which carries the auth header) until the job ends; returns 0 on
  SUCCEEDED, else prints one line with the status and the ``ray job logs`` hint and returns 1.

Token authentication (Ray >= 2.59 turns it on for local clusters): Ray 2.60's ``JobSubmissionClient`` only adds the
``Authorization`` header when ``RAY_AUTH_MODE=token`` is set client-side (infra/README §3). We do not depend on that:
the token is looked up explicitly, in Ray's order, ``RAY_AUTH_TOKEN`` > ``RAY_AUTH_TOKEN_PATH`` > the token file that
``pipelines.support.ray_env`` writes for its local clusters (``<ray.temp_dir>/auth_token``) > ``~/.ray/auth_token``, and
sent as ``Authorization: Bearer <token>``. The token is never printed, logged or put into the runtime env.
The ``<ray.temp_dir>/auth_token`` file lies under the shared ``/tmp`` by default: it is used only when it is a regular
file owned by this user with mode 0600 (else one line naming it and the fix). The token is sent only over
``https://``, or ``http://`` to a loopback address (``127.0.0.1``, ``::1``, ``localhost``, e.g. through ``ray
dashboard`` / an SSH tunnel); to send it in clear to another host set ``CTM_ALLOW_INSECURE_TOKEN=1`` (a trusted
network only).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import stat
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from ctm_core.redact import is_loopback_url, redact_text, redact_uri
from pipelines.support.io_utils import one_line

logger = logging.getLogger(__name__)

__all__ = ["build_runtime_env", "find_auth_token", "masked_runtime_env", "submission_id", "submit_job"]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ACTIVE = ("PENDING", "RUNNING")

# Non-secret variables of the environment contract (infra/README §1) passed to the job when set here.
PASS_THROUGH_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_S3_IGNORE_TLS",
    "MLFLOW_EXPERIMENT_NAME",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "RAY_DATA_DISABLE_PROGRESS_BARS",
)
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PGPASSWORD",
)
FORWARD_SECRETS_FLAG = "CTM_SUBMIT_FORWARD_AWS_CREDENTIALS"
INSECURE_TOKEN_FLAG = "CTM_ALLOW_INSECURE_TOKEN"
_SECRET_NAME_RE = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE|_KEY$|^PG", re.I)

# Never uploaded: large or machine-local folders (most are git-ignored already; belt and braces for repos whose
# .gitignore differs). Patterns are gitignore-style, relative to the working dir.
EXCLUDES = [
    "data/",
    "artifacts/",
    "ray_results/",
    "mlruns/",
    "mlartifacts/",
    "mlflow.db",
    ".cache/",
    "dvc_cache/",
    ".dvc/cache/",
    ".dvc/tmp/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".whl/",
    "*.egg-info/",
    "benchmarks/results/",
]
PATH_FLAGS = ("--params", "--best-params", "--data", "--teacher", "--out")


# --------------------------------------------------------------------------------------------------------------
# Helpers (pure, unit-testable)


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def submission_id(stage: str, module: str, argv: list[str], params: Any, attempt: int) -> str:
    """Deterministic job id: same stage, module, argv and params -> same id for a given attempt."""
    from ctm_core.config import params_hash

    dump = params.model_dump(mode="json") if hasattr(params, "model_dump") else params
    h = params_hash({"module": module, "argv": list(argv), "params": dump})[:12]
    return f"{stage}-{h}-a{int(attempt)}"


def _read_token_file(path: Path, source: str, strict: bool) -> str:
    """The token in `path`, opened without following a final symlink. It must be this user's file; `strict`
    (a file under a shared temp dir) also wants mode 0600, else others could have read or replaced it."""
    fix = "(fix: delete it if it is not yours, or `chmod 600` it if it is; or set RAY_AUTH_TOKEN)"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise PermissionError(f"{source}: cannot open {str(path)!r} as a plain file ({e.strerror}) {fix}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        mode = stat.S_IMODE(st.st_mode)
        owners = (os.getuid(),) if strict else (os.getuid(), 0)  # root: e.g. a mounted Kubernetes Secret
        bad = st.st_uid not in owners or (mode != 0o600 if strict else bool(mode & stat.S_IWOTH))
        if bad or not stat.S_ISREG(st.st_mode):
            want = "mode 0600" if strict else "not writable by others"
            raise PermissionError(
                f"{source}: {str(path)!r} has owner uid {st.st_uid} and mode {mode:04o}, expected uid {os.getuid()} "
                f"and {want}; someone else may have planted or read it {fix}"
            )
        return f.read(64 << 10).decode("utf-8", "replace").strip()


def find_auth_token(params: Any | None = None) -> tuple[str | None, str]:
    """(token or None, where it came from). Ray's lookup order plus the ray_env per-cluster token file; a token
    file must be this user's (mode 0600 for the one under `ray.temp_dir`), else PermissionError (one line)."""
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return tok, "RAY_AUTH_TOKEN"
    candidates: list[tuple[Path, str, bool]] = []
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        candidates.append((Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser(), "RAY_AUTH_TOKEN_PATH", False))
    temp_dir = getattr(getattr(params, "ray", None), "temp_dir", None)
    if temp_dir:
        candidates.append((Path(temp_dir).expanduser() / "auth_token", "ray.temp_dir/auth_token", True))
    candidates.append((Path.home() / ".ray" / "auth_token", "~/.ray/auth_token", False))
    for path, source, strict in candidates:
        if os.path.lexists(path) and not path.is_dir():
            tok = _read_token_file(path, source, strict)
            if tok:
                return tok, f"{source} ({path})"
        elif source == "RAY_AUTH_TOKEN_PATH":
            raise FileNotFoundError(
                f"RAY_AUTH_TOKEN_PATH: file {str(path)!r} not found (fix: point it at the "
                "cluster's token file, or unset it)"
            )
    return None, "none"


def _is_uploaded(path: Path, root: Path) -> bool:
    """True when ``path`` lies inside ``root`` and is tracked by git (i.e. travels with the working dir)."""
    import subprocess

    try:
        rel = path.resolve().relative_to(root)
    except ValueError:
        return False
    if any(part in (".git", ".venv", "venv", "__pycache__") for part in rel.parts):
        return False
    r = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", str(rel)], capture_output=True)
    return r.returncode == 1  # 1 = not ignored; 0 = ignored; 128 = no git (treat as not uploaded below)


def absolutize_argv(argv: list[str], root: Path, cwd: Path | None = None) -> tuple[list[str], list[str]]:
    """Rewrite relative path flags that would not travel with the working dir to absolute client paths."""
    cwd = cwd or Path.cwd()
    out, notes, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        flag, value, joined = a, None, False
        if "=" in a and a.split("=", 1)[0] in PATH_FLAGS:
            flag, value, joined = a.split("=", 1)[0], a.split("=", 1)[1], True
        elif a in PATH_FLAGS and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None and "://" not in value and not Path(value).is_absolute():
            p = (cwd / value).resolve()
            inside = str(p).startswith(str(root) + os.sep)
            if inside and _is_uploaded(p, root):
                value = p.relative_to(root).as_posix()  # travels with the working dir (the job's cwd)
            else:
                notes.append(
                    f"{flag} {value} -> {p} (not in the uploaded working dir: the cluster must see this "
                    "path, e.g. a shared file system; else use s3://)"
                )
                value = str(p)
        if value is not None:
            out.extend([f"{flag}={value}"] if joined else [flag, value])
            i += 1 if joined else 2
        else:
            out.append(a)
            i += 1
    return out, notes


def _without_credentials(value: str) -> str:
    """A URI without user-info, query or fragment (`https://u:t@h/p?sig=x` -> `https://h/p`); other values as
    they are. Unlike `redact_uri` nothing is marked: the result is used, not just shown."""
    if "://" not in value or redact_uri(value) == value:
        return value
    try:
        parts = urllib.parse.urlsplit(value)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return value.split("://", 1)[0] + "://"
    host = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit((parts.scheme, host + (f":{port}" if port is not None else ""), parts.path, "", ""))


def build_runtime_env(root: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime_env: working dir, excludes and the non-secret env contract (see module doc)."""
    env = dict(os.environ if env is None else env)
    env_vars = {}
    for k in PASS_THROUGH_ENV:
        if env.get(k):
            env_vars[k] = _without_credentials(env[k])
            if env_vars[k] != env[k]:
                logger.warning(
                    "submit: %s carries credentials (%s); the job gets %s (fix: give the job its credentials through "
                    "%s with %s=1, or from the cluster's own environment)",
                    k,
                    redact_uri(env[k]),
                    env_vars[k],
                    "/".join(SECRET_ENV),
                    FORWARD_SECRETS_FLAG,
                )
    if env.get(FORWARD_SECRETS_FLAG) == "1":
        env_vars.update({k: env[k] for k in SECRET_ENV if env.get(k)})
    env_vars["CTM_INSIDE_RAY_JOB"] = "1"
    return {"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": env_vars}


def masked_runtime_env(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """`runtime_env` as it may be printed: secret-looking variables' values `***`, URIs redacted."""
    env_vars = {
        k: "***" if k in SECRET_ENV or _SECRET_NAME_RE.search(k) else (redact_uri(v) if isinstance(v, str) else v)
        for k, v in runtime_env.get("env_vars", {}).items()
    }
    return {**runtime_env, "env_vars": env_vars}


def _check_token_transport(address: str) -> None:
    """The bearer token goes over https, to loopback http, or in clear only with CTM_ALLOW_INSECURE_TOKEN=1."""
    if address.lower().startswith("https://") or is_loopback_url(address) or os.environ.get(INSECURE_TOKEN_FLAG) == "1":
        return
    raise RuntimeError(
        f"ray job submit: refusing to send the cluster token in clear to {redact_uri(address)} (plain http to a "
        "non-loopback host) (fix: use https://, or tunnel the dashboard to 127.0.0.1 (`ray dashboard` / ssh -L), or "
        f"set {INSECURE_TOKEN_FLAG}=1 on a trusted network)"
    )


def _make_client(address: str, params: Any):
    from ray.job_submission import JobSubmissionClient

    token, source = find_auth_token(params)
    if token:
        _check_token_transport(address)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        client = JobSubmissionClient(address, headers=headers)
    except Exception as e:  # noqa: BLE001 - re-raised as one clear line
        msg = one_line(e)
        if "401" in msg or "403" in msg or "nauthorized" in msg or "orbidden" in msg:
            raise RuntimeError(
                f"ray job submit: {redact_uri(address)} refused authentication (token from {source}) (fix: set "
                "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token)"
            ) from None
        raise RuntimeError(
            f"ray job submit: cannot reach the Ray dashboard at {redact_uri(address)}: {redact_text(msg)[:300]} "
            "(fix: check ray.address / RAY_ADDRESS, e.g. http://127.0.0.1:8265 through `ray dashboard`)"
        ) from None
    return client, source


def _job_status(client, job_id: str) -> str | None:
    try:
        return str(client.get_job_status(job_id)).split(".")[-1]
    except RuntimeError as e:  # "Request failed with status code 404" for an unknown id
        if "404" in str(e) or "does not exist" in str(e):
            return None
        raise


def _stream_until_done(client, job_id: str, poll_s: float, timeout_s: float | None, out=sys.stdout) -> str:
    seen = 0
    t0 = time.monotonic()
    status = _job_status(client, job_id) or "PENDING"
    while True:
        status = _job_status(client, job_id) or status
        try:
            logs = client.get_job_logs(job_id)
        except Exception:  # noqa: BLE001 - transient: keep polling the status
            logs = None
        if logs is not None and len(logs) > seen:
            out.write(logs[seen:])
            out.flush()
            seen = len(logs)
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            return f"TIMEOUT({status})"
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------------------------
# Entry point used by the stages


def submit_job(
    params: Any,
    module: str,
    argv: list[str],
    *,
    stage: str | None = None,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    max_attempts: int = 100,
) -> int:
    """Submit ``python -m <module> <argv>`` to ``ray.address``/``RAY_ADDRESS`` and block; 0 iff SUCCEEDED."""
    address = params.ray.address or os.environ.get("RAY_ADDRESS")
    if not address or not address.startswith(("http://", "https://")):
        print(
            f"submit: ray.submit needs the dashboard URL (http://head:8265) in ray.address or RAY_ADDRESS, got "
            f"{redact_uri(address)!r}",
            file=sys.stderr,
        )
        return 1
    root = _repo_root()
    stage = stage or module.rsplit(".", 1)[-1]
    argv, notes = absolutize_argv(list(argv), root)
    for n in notes:
        logger.info("submit: %s", n)
    inner = ["python", "-m", module, *argv]
    if params.ray.address:  # the params file names the dashboard URL: clear it inside the job (module doc)
        inner = ["python", "-m", "pipelines.support.submit", "--inside", module, *argv]
    import shlex

    entrypoint = " ".join(shlex.quote(a) for a in inner)
    runtime_env = build_runtime_env(root)
    shown = redact_uri(address)
    job_id = None
    try:
        client, token_source = _make_client(address, params)
        attempt = 1
        while attempt <= max_attempts:
            candidate = submission_id(stage, module, argv, params, attempt)
            status = _job_status(client, candidate)
            if status is None:
                job_id = client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=candidate,
                    runtime_env=runtime_env,
                    metadata={"ctm.stage": stage, "ctm.module": module},
                )
                logger.info("submit: job %s submitted to %s (auth token from %s)", job_id, shown, token_source)
                break
            if status in ACTIVE:
                job_id = candidate
                logger.info("submit: job %s is already %s on %s: attaching to it", job_id, status, shown)
                break
            attempt += 1
        if job_id is None:
            print(
                f"submit: {max_attempts} attempts of this submission exist already on {shown} (fix: ray job "
                "delete old ones)",
                file=sys.stderr,
            )
            return 1
        final = _stream_until_done(client, job_id, poll_s, timeout_s)
    except KeyboardInterrupt:
        if job_id is not None:
            print(
                f"submit: interrupted; job {job_id} keeps running on {shown} (re-run the stage to attach to it, "
                f"or RAY_ADDRESS={shown} ray job stop {job_id})",
                file=sys.stderr,
            )
        raise
    except Exception as e:  # noqa: BLE001 - the cluster went away or refused us: one clear line, exit 1
        where = f"job {job_id}" if job_id else "submission"
        print(
            f"submit: {where} on {shown} failed: {type(e).__name__}: {redact_text(' '.join(str(e).split()))[:400]}",
            file=sys.stderr,
        )
        return 1
    if final == "SUCCEEDED":
        logger.info("submit: job %s SUCCEEDED", job_id)
        return 0
    print(f"submit: job {job_id} ended {final} (logs: RAY_ADDRESS={shown} ray job logs {job_id})", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------------------------------------------
# Inside the job, when the params file names the dashboard URL


def _run_inside(module: str, argv: list[str]) -> int:
    """Run ``<module>.main(argv)`` with ``ray.address`` cleared from the loaded params (Ray set RAY_ADDRESS)."""
    from pipelines.support import params as support_params

    mod = importlib.import_module(module)
    original = support_params.load_params

    def load_params(*a, **kw):
        p = original(*a, **kw)
        if p.ray.address:
            p = p.model_copy(update={"ray": p.ray.model_copy(update={"address": None})})
        return p

    if hasattr(mod, "load_params"):
        mod.load_params = load_params
    return int(mod.main(argv) or 0)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.support.submit")
    ap.add_argument("--inside", metavar="MODULE", help="run MODULE.main(argv) inside a Ray job (internal)")
    ap.add_argument("--print-runtime-env", action="store_true", help="print the runtime_env that would be sent")
    args, rest = ap.parse_known_args(argv)
    if args.inside:
        if not os.environ.get("CTM_INSIDE_RAY_JOB"):
            print("submit: --inside is only for Ray jobs (CTM_INSIDE_RAY_JOB unset)", file=sys.stderr)
            return 2
        return _run_inside(args.inside, rest)
    if args.print_runtime_env:
        print(json.dumps(masked_runtime_env(build_runtime_env(_repo_root())), indent=2))
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(_main())
