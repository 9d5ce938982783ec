"""Thin MLflow helpers for the pipeline stages (MLflow 3.17.2; docs/stack.md#17-ray-and-mlflow, docs/stack.md#2-mlflow).

- One tracking URI everywhere: env `MLFLOW_TRACKING_URI` > `mlflow.tracking_uri` in params > the absolute
  `sqlite:////<repo>/mlflow.db` (a relative sqlite URI would follow the cwd, e.g. into Ray trial dirs).
- One MLflow run per (stage, params hash): `start_run` finds the run by the tag `ctm.run_key` and resumes it, so a
  repeated `dvc repro` (or a killed-and-restarted stage) logs into the same run instead of creating duplicates.
- Every run carries the git commit, dirty flag, DVC stage, params hash and data hash as tags.
- A stage that scores a student logged into the distill run opens a nested child run per evaluation
  (`nested_run`): each evaluation its own run, never two values of a metric at the same step of one run.
- The prepared dataset is the training runs' dataset input (`log_prepared_dataset`): name, folder and a digest of
  its card (which pins every shard by sha256), shown under "Datasets" in the UI.
- Every experiment is tagged `mlflow.experimentKind: custom_model_development` (`EXPERIMENT_KIND_TAG`): the MLflow 3
  UI reads that tag (its JS enum ExperimentKind) to open the experiment on the training runs, not the GenAI overview.
- Nothing this module stores or raises carries credentials: tags, flattened params and logged dicts have every URI
  redacted (`ctm_core.redact`: user-info, password, query, fragment -> `***`), and so have MLflow's error messages
  (which quote the tracking URI). `public_tracking_uri` is the form to write into files such as registry.json.

Only `pipelines/` imports this module (and mlflow); `ctm_core` never does.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ctm_core.redact import redact_text, redact_uri

__all__ = [
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "RUN_KEY_TAG",
    "data_hash_from_lock",
    "default_repo_root",
    "flatten",
    "log_prepared_dataset",
    "nested_run",
    "log_dict_json",
    "log_figure_png",
    "public_tracking_uri",
    "redact_values",
    "resolve_tracking_uri",
    "run_name",
    "run_tags",
    "stage_run",
    "start_run",
]

RUN_KEY_TAG = "ctm.run_key"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow 3 UI to pick the experiment's default page
EXPERIMENT_KIND = "custom_model_development"  # "training runs" (the other kinds: genai_development, ...)


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


def public_tracking_uri(uri: str) -> str:
    """`uri` as it may be printed or stored: no user-info, password or query (`https://***@host/`)."""
    return redact_uri(uri) or ""


def redact_values(obj: Any) -> Any:
    """`obj` (JSON-like: dicts, lists, scalars) with every URI inside its strings and keys redacted."""
    if isinstance(obj, str):
        return redact_text(obj) if "://" in obj else obj
    if isinstance(obj, Mapping):
        return {redact_values(k) if isinstance(k, str) else k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_values(v) for v in obj]
    return obj


def _secret_parts(uri: str) -> list[str]:
    """The pieces of `uri` that may be credentials (user-info, password, query and its values, fragment)."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return []
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    found = {userinfo, *userinfo.split(":", 1), parts.query, parts.fragment}
    for item in parts.query.split("&"):
        found |= {item, *item.split("=", 1)[1:]}
    return sorted((p for p in found if len(p) >= 3), key=len, reverse=True)


def _scrub(text: str, uri: str) -> str:
    """`text` with URIs redacted and every credential piece of `uri` replaced, even outside a URI (urllib3 quotes
    the query string alone)."""
    text = redact_text(text)
    for part in _secret_parts(uri):
        text = text.replace(part, "***")
    return text


def _redact_exception(e: BaseException, uri: str) -> None:
    """Scrub an exception's message in place (MLflow quotes the tracking URI, credentials included)."""
    e.args = tuple(_scrub(a, uri) if isinstance(a, str) else a for a in e.args)
    if isinstance(getattr(e, "message", None), str):
        e.message = _scrub(e.message, uri)  # type: ignore[attr-defined]  # MlflowException keeps its own copy


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
    from ctm_core.config import ParamsError, read_yaml

    try:  # the params loader: no aliases, bounded size and depth (a lock file is data from the repo)
        lock_data = read_yaml(lock, "dvc.lock")
    except ParamsError:
        return None
    stages = lock_data.get("stages") if isinstance(lock_data, dict) else None
    for stage in (stages or {}).values() if isinstance(stages, dict) else ():
        outs = stage.get("outs") if isinstance(stage, dict) else None
        for out in outs if isinstance(outs, list) else ():
            if isinstance(out, dict) and out.get("path") == out_path:
                md5 = out.get("md5")
                return md5 if isinstance(md5, str) else None
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
    return {k: redact_values(v) for k, v in tags.items()}


def run_name(stage: str, params_hash: str) -> str:
    """Deterministic run name (and `ctm.run_key` tag) for a stage: `<stage>-<first 12 hex of params hash>`."""
    return f"{stage}-{params_hash[:12]}"


def _experiment_id(client: Any, name: str, tracking_uri: str, repo_root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) is None:  # an experiment made before the tag, or by hand
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:"):  # keep artifacts next to the DB, not under whatever the cwd is
        artifact_location = (repo_root / "mlruns").resolve().as_uri()
    return client.create_experiment(
        name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


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
    the body raised. Tags are (re)applied either way, so a resumed run shows the latest commit/dirty flag. Tag
    values and the messages of exceptions raised here or in the body have their URIs redacted.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
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
        all_tags = {RUN_KEY_TAG: name, **{k: redact_values(str(v)) for k, v in (tags or {}).items()}}
        if found:
            ctx = mlflow.start_run(run_id=found[0].info.run_id, log_system_metrics=log_system_metrics)
        else:
            ctx = mlflow.start_run(run_name=name, tags=all_tags, log_system_metrics=log_system_metrics)
        with ctx as run:
            mlflow.set_tags(all_tags)
            yield run
    except Exception as e:
        _redact_exception(e, tracking_uri)
        raise


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


@contextlib.contextmanager
def nested_run(parent_run_id: str, name: str, *, tracking_uri: str, tags: Mapping[str, str] | None = None):
    """A new child run `name` of `parent_run_id` (MLflow nested run), active inside the block; yields it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=parent_run_id):
            child_tags = {k: redact_values(str(v)) for k, v in (tags or {}).items()}
            with mlflow.start_run(run_name=name, nested=True, tags=child_tags) as run:
                yield run
    except Exception as e:
        _redact_exception(e, tracking_uri)
        raise


def log_prepared_dataset(data_dir: str | os.PathLike[str], context: str = "training", source: str | None = None) -> str:
    """Log the prepared dataset (`data_dir` with its card.json) as a dataset input of the active run; returns the
    digest: the first 32 hex digits of sha256(card.json), the card pinning every shard's sha256. `source`: where the
    shards are when not in `data_dir` (the s3:// folder the workers stream; only its card is in `data_dir`)."""
    import hashlib
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from ctm_core.data.card import CARD_FILE, DatasetCard

    folder = Path(data_dir).resolve()
    card = DatasetCard.read(folder)
    digest = hashlib.sha256((folder / CARD_FILE).read_bytes()).hexdigest()[:32]
    img = card.image
    name = f"{card.source.kind} {img.height}x{img.width}x{img.channels} ({card.count} images)"
    with warnings.catch_warnings():  # MLflow registers its local-folder source twice and warns that it picked one
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        where = resolve_dataset_source(source or str(folder))
    dataset = MetaDataset(where, name=name, digest=digest)
    mlflow.log_input(dataset, context=context)
    return digest


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{'gan': {'enabled': False}}` → `{'gan.enabled': False}`; lists are JSON strings (for `mlflow.log_params`);
    URIs in string values redacted (a presigned `data.path` is a credential)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(redact_values(list(v)))
        else:
            out[key] = redact_values(v)
    return out


def log_figure_png(path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    """Log an existing PNG file (e.g. a sample grid written by the stage) as an artifact of the active run."""
    import mlflow

    p = Path(path)
    if p.suffix.lower() != ".png" or not p.is_file():
        raise ValueError(f"path: expected an existing .png file, got {str(p)!r}")
    mlflow.log_artifact(str(p), artifact_path=artifact_path)


def log_dict_json(obj: Mapping[str, Any], artifact_file: str) -> None:
    """Log a JSON-able dict as `artifact_file` (must end in .json) in the active run, every URI in it redacted."""
    import mlflow

    if not artifact_file.endswith(".json"):
        raise ValueError(f"artifact_file: expected a name ending in .json, got {artifact_file!r}")
    mlflow.log_dict(redact_values(dict(obj)), artifact_file)
