"""Thin MLflow helpers for the pipeline stages (MLflow 3.17.2; docs/stack.md#17-ray-and-mlflow, docs/stack.md#2-mlflow).

- One tracking URI everywhere: env `MLFLOW_TRACKING_URI` > `mlflow.tracking_uri` in params > the absolute
  `sqlite:////<repo>/mlflow.db` (a relative sqlite URI would follow the cwd, e.g. into Ray trial dirs).
- One MLflow run per (stage, params hash): `start_run` finds the run by the tag `ctm.run_key` and resumes it, so a
  repeated `dvc repro` (or a killed-and-restarted stage) logs into the same run instead of creating duplicates.
- Every run carries the git commit, dirty flag, DVC stage, params hash and data hash as tags.

Only `pipelines/` imports this module (and mlflow); `ctm_core` never does.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "RUN_KEY_TAG",
    "data_hash_from_lock",
    "default_repo_root",
    "flatten",
    "log_dict_json",
    "log_figure_png",
    "resolve_tracking_uri",
    "run_name",
    "run_tags",
    "stage_run",
    "start_run",
]

RUN_KEY_TAG = "ctm.run_key"


def default_repo_root() -> Path:
    """`DVC_ROOT` when DVC runs the stage (also for `dvc exp --temp`), else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def resolve_tracking_uri(params: Any, repo_root: str | os.PathLike[str]) -> str:
    """Tracking URI: env `MLFLOW_TRACKING_URI`, else `params.mlflow.tracking_uri`, else `sqlite:////<repo>/mlflow.db`.

    A relative `sqlite:///x.db` (from env or params) is made absolute against `repo_root`.
    `params` may be a `Params`, an `MlflowParams`, a plain dict of the `mlflow` section, or None.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        section = getattr(params, "mlflow", params)
        uri = section.get("tracking_uri") if isinstance(section, Mapping) else getattr(section, "tracking_uri", None)
    root = Path(repo_root).resolve()
    if not uri:
        return f"sqlite:///{root / 'mlflow.db'}"  # sqlite:/// + /abs/path = four slashes
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        rel = uri[len("sqlite:///") :]
        return f"sqlite:///{(root / rel).resolve()}"
    return uri


def _git(repo_root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def data_hash_from_lock(repo_root: str | os.PathLike[str], out_path: str = "data/prepared") -> str | None:
    """md5 that `dvc.lock` records for the output `out_path` (the prepared dataset), or None if not there yet."""
    lock = Path(repo_root) / "dvc.lock"
    if not lock.is_file():
        return None
    import yaml

    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return None
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            if out.get("path") == out_path:
                return out.get("md5")
    return None


def run_tags(
    stage: str,
    params_hash: str,
    repo_root: str | os.PathLike[str],
    *,
    data_hash: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Tags for a stage's MLflow run: git commit + dirty flag, DVC stage (env `DVC_STAGE`), params and data hash."""
    root = Path(repo_root)
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    if data_hash is None:
        data_hash = data_hash_from_lock(root)
    tags = {
        "ctm.stage": stage,
        "ctm.params_hash": params_hash,
        "dvc.stage": os.environ.get("DVC_STAGE", stage),
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
        "data.hash": data_hash or "unknown",
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    for k in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        if os.environ.get(k):
            tags[f"dvc.{k[4:].lower()}"] = os.environ[k]
    for k, v in (extra or {}).items():
        tags[k] = str(v)
    return tags


def run_name(stage: str, params_hash: str) -> str:
    """Deterministic run name (and `ctm.run_key` tag) for a stage: `<stage>-<first 12 hex of params hash>`."""
    return f"{stage}-{params_hash[:12]}"


def _experiment_id(client: Any, name: str, tracking_uri: str, repo_root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:"):  # keep artifacts next to the DB, not under whatever the cwd is
        artifact_location = (repo_root / "mlruns").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


@contextlib.contextmanager
def start_run(
    name: str,
    *,
    tracking_uri: str,
    experiment_name: str,
    tags: Mapping[str, str] | None = None,
    repo_root: str | os.PathLike[str] | None = None,
    log_system_metrics: bool | None = None,
) -> Iterator[Any]:
    """Create, or resume, the MLflow run whose tag `ctm.run_key` equals `name`; yields the active `mlflow.ActiveRun`.

    Resuming reopens the newest matching run (status back to RUNNING); on exit the run ends FINISHED, or FAILED if
    the body raised. Tags are (re)applied either way, so a resumed run shows the latest commit/dirty flag.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    root = Path(repo_root).resolve() if repo_root is not None else default_repo_root()
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = _experiment_id(client, experiment_name, tracking_uri, root)
    mlflow.set_experiment(experiment_id=exp_id)
    safe = name.replace("'", "\\'")
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{safe}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    all_tags = {RUN_KEY_TAG: name, **(tags or {})}
    if found:
        ctx = mlflow.start_run(run_id=found[0].info.run_id, log_system_metrics=log_system_metrics)
    else:
        ctx = mlflow.start_run(run_name=name, tags=all_tags, log_system_metrics=log_system_metrics)
    with ctx as run:
        mlflow.set_tags(all_tags)
        yield run


@contextlib.contextmanager
def stage_run(stage: str, params: Any, sections: tuple[str, ...], *, extra_tags: Mapping[str, Any] | None = None):
    """The usual stage wiring in one call: hash `sections` of `params`, name/tag the run, resolve the URI, resume.

    Example (in `pipelines/distill.py`):
        with stage_run("distill", params, ("distill", "teacher")) as run: ...
    """
    from ctm_core.config import params_hash

    root = default_repo_root()
    h = params_hash({name: params.section(name) for name in sections})
    with start_run(
        run_name(stage, h),
        tracking_uri=resolve_tracking_uri(params, root),
        experiment_name=params.mlflow.experiment_name,
        tags=run_tags(stage, h, root, extra=extra_tags),
        repo_root=root,
    ) as run:
        yield run


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{'gan': {'enabled': False}}` → `{'gan.enabled': False}`; lists are JSON strings (for `mlflow.log_params`)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v))
        else:
            out[key] = v
    return out


def log_figure_png(path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    """Log an existing PNG file (e.g. a sample grid written by the stage) as an artifact of the active run."""
    import mlflow

    p = Path(path)
    if p.suffix.lower() != ".png" or not p.is_file():
        raise ValueError(f"path: expected an existing .png file, got {str(p)!r}")
    mlflow.log_artifact(str(p), artifact_path=artifact_path)


def log_dict_json(obj: Mapping[str, Any], artifact_file: str) -> None:
    """Log a JSON-able dict as `artifact_file` (must end in .json) in the active run."""
    import mlflow

    if not artifact_file.endswith(".json"):
        raise ValueError(f"artifact_file: expected a name ending in .json, got {artifact_file!r}")
    mlflow.log_dict(dict(obj), artifact_file)
