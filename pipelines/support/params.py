"""params.yaml for the stages: the schema (`ctm_core.config`) plus the checks that depend on this machine.

`load_params()` validates the whole file (+ overrides) and then checks the environment: a GPU is visible when
`ray.use_gpu`, S3 credentials exist for s3:// paths, the Ray address answers, hyperopt is installed when chosen.
Every problem is one `ParamsError` line naming the key, raised before a stage does any work.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctm_core.config import Params, ParamsError, load_config, read_yaml
from ctm_core.redact import redact_uri

__all__ = ["check_environment", "load_params", "read_overrides", "resolve_path"]


def load_params(
    path: str | os.PathLike[str] = "params.yaml",
    overrides: Mapping[str, Any] | None = None,
    *,
    check_env: bool = True,
) -> Params:
    """Read and validate `path` (+ overrides), then `check_environment` unless `check_env` is false."""
    params = load_config(path, overrides)
    if check_env:
        check_environment(params)
    return params


def read_overrides(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """A params-shaped mapping of overrides from a YAML file (the tune stage's best_params.yaml); {} for None."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ParamsError("--best-params", f"file {path} not found (fix: run the tune stage, or omit the flag)")
    raw = read_yaml(path, "--best-params")  # no aliases, no duplicate keys, bounded size and depth, UTF-8
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ParamsError("--best-params", f"expected a mapping of overrides in {path}, got {type(raw).__name__}")
    return raw


def resolve_path(value: str, repo_root: str | os.PathLike[str]) -> str:
    """URIs (`s3://…`) unchanged; local paths made absolute against the repo root."""
    if "://" in value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (Path(repo_root) / p).resolve())


# --- environment checks (lazy imports, short timeouts) ----------------------------------------------------------------
def _require(cond: bool, key: str, problem: str) -> None:
    if not cond:
        raise ParamsError(key, problem)


def _has_s3_credentials() -> bool:
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return True
    try:
        import boto3
    except ImportError:
        return False
    try:
        return boto3.session.Session().get_credentials() is not None
    except Exception:  # a broken profile is as good as none
        return False


def _parse_address(addr: str) -> tuple[str, int] | None:
    """(host, port) to probe for a Ray address; None for 'auto'/'local' (nothing to probe)."""
    if addr in ("auto", "local"):
        return None
    parsed = urllib.parse.urlparse(addr if "://" in addr else f"tcp://{addr}")
    default = {"ray": 10001, "http": 8265, "https": 443}.get(parsed.scheme, 6379)
    if not parsed.hostname:
        raise ParamsError(
            "ray.address", f"expected host:port, ray://host:port or http://host:port, got {redact_uri(addr)!r}"
        )
    return parsed.hostname, parsed.port or default


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_environment(p: Params, *, timeout_s: float = 1.0) -> None:
    """Checks that depend on this machine: GPU visible, S3 credentials, Ray address reachable, hyperopt installed."""
    env_addr = os.environ.get("RAY_ADDRESS")
    addr_key, addr = ("ray.address", p.ray.address) if p.ray.address else ("RAY_ADDRESS (env)", env_addr)
    if p.ray.use_gpu and not addr:  # a remote cluster's GPUs are not visible from here
        import torch

        _require(
            torch.cuda.is_available(),
            "ray.use_gpu",
            "true but no CUDA GPU is visible on this machine (fix: set ray.use_gpu: false, or set ray.address "
            "to a GPU cluster)",
        )
    s3_paths = [
        ("ray.storage_path", p.ray.storage_path),
        ("teacher.source", p.teacher.source),
        ("data.path", p.data.path or ""),
    ]
    for key, value in s3_paths:
        if value.startswith("s3://"):
            _require(
                _has_s3_credentials(),
                key,
                f"{redact_uri(value)!r} needs S3 credentials, found none (fix: export AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; plus AWS_ENDPOINT_URL for MinIO)",
            )
    if addr:
        target = _parse_address(addr)
        if target is not None:
            host, port = target
            _require(
                _reachable(host, port, timeout_s),
                addr_key,
                f"cannot reach {redact_uri(addr)!r} ({host}:{port}) within {timeout_s:g} s (fix: start the cluster, "
                "correct the address, or set it to null for a local Ray)",
            )
    if p.tune.enabled and p.tune.search_alg == "hyperopt":
        _require(
            importlib.util.find_spec("hyperopt") is not None,
            "tune.search_alg",
            "'hyperopt' is not installed (fix: pip install hyperopt, or use optuna)",
        )
