"""MLflow model registry operations of the register stage: the student folder's identity, the pyfunc model version
(logged once per student weights), the run it is logged into, the champion lookup and the alias moves.

The promotion decision itself is `pipelines.support.gate` (pure); this module only reads and writes the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ctm_core.config import Params
from pipelines.support.gate import Decision, Evidence, metric_noise
from pipelines.support.io_utils import read_json

__all__ = [
    "DECISION_TAG",
    "EVAL_STATUS_TAG",
    "MODEL_ARTIFACT_NAME",
    "PROTOCOL_TAG",
    "STUDENT_TAG",
    "RegisterError",
    "apply_decision",
    "champion_evidence",
    "champion_version",
    "float_tag",
    "log_decision",
    "log_model_version",
    "metric_tags",
    "provenance",
    "student_for",
    "student_info",
    "target_run",
]

logger = logging.getLogger(__name__)

MODEL_ARTIFACT_NAME = "ctm_sampler"  # name= of the logged model inside the run
STUDENT_TAG = "ctm.student_sha256"
EVAL_STATUS_TAG = "ctm.eval_status"
PROTOCOL_TAG = "eval.protocol_sha256"
DECISION_TAG = "ctm.decision"
# Keys looked up in the student's config.json `meta` (written by the distill stage) for the provenance tags.
_META_KEYS = {
    "data.hash": ("data_hash", "data_sha256", "data_md5"),
    "teacher.hash": ("teacher_weights_sha256", "teacher_sha256", "teacher_hash"),
}


class RegisterError(RuntimeError):
    """The stage cannot register; the message is one line naming the problem and the fix."""


# --- the student folder -----------------------------------------------------------------------------------------------
def student_info(student_dir: str | os.PathLike[str], variant: str | None) -> dict[str, Any]:
    """{'config', 'variant', 'sha256' (identity of variant + weights), 'weights_sha256', 'run' (run.json)} of the
    student folder; `variant` None picks the first EMA variant, else 'online'. Raises RegisterError."""
    from ctm_core.io.student_format import read_student_config

    folder = Path(student_dir)
    try:
        config = read_student_config(folder)
    except (FileNotFoundError, ValueError) as e:
        raise RegisterError(f"--student: {e}") from None
    variants = sorted(config["variants"])
    if variant is None:
        emas = [v for v in variants if v.startswith("ema_")]
        variant = emas[0] if emas else "online"
    if variant not in config["variants"]:
        raise RegisterError(f"--student: variant {variant!r} not in {folder} (has {variants})")
    entry = config["variants"][variant]
    weights = folder / entry["file"]
    if not weights.is_file():
        raise RegisterError(f"--student: {weights} is missing (re-run the distill stage)")
    h = hashlib.sha256(f"{variant}:{entry['sha256']}".encode()).hexdigest()
    run_json = folder / "run.json"
    run_info = read_json(run_json) if run_json.is_file() else {}
    return {
        "config": config,
        "variant": variant,
        "sha256": h,
        "weights_sha256": entry["sha256"],
        "run": run_info if isinstance(run_info, dict) else {},
    }


def student_for(params: Params, student_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """`student_info` of the evaluated weights: `evaluate.ema` (e.g. ema_0.999) if the student has it, else the
    default choice."""
    from ctm_core.io.student_format import ema_variant

    first = student_info(student_dir, None)
    name = ema_variant(params.evaluate.ema)
    variant = name if name in first["config"].get("variants", {}) else first["variant"]
    return student_info(student_dir, variant) if variant != first["variant"] else first


def provenance(meta: dict[str, Any], repo_root: Path) -> dict[str, str]:
    """{'data.hash', 'teacher.hash'}: from the student's meta (distill stage), else dvc.lock, else 'unknown'."""
    from pipelines.support.tracking import data_hash_from_lock

    def pick(key: str, out_path: str) -> str:
        found = next((str(meta[k]) for k in _META_KEYS[key] if meta.get(k)), None)
        return found or data_hash_from_lock(repo_root, out_path) or "unknown"

    return {"data.hash": pick("data.hash", "data/prepared"), "teacher.hash": pick("teacher.hash", "artifacts/teacher")}


# --- runs and versions ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def target_run(params: Params, root: Path, tracking_uri: str, distill_run_id: str | None, tags: dict[str, str]):
    """The distill stage's run when it exists in this store, else this stage's own (resumable) run."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines.support.tracking import run_name, start_run

    mlflow.set_tracking_uri(tracking_uri)
    if distill_run_id:
        try:
            MlflowClient(tracking_uri).get_run(distill_run_id)
        except MlflowException:
            logger.warning(
                "run.json names MLflow run %s, which is not in %s; logging into a run of the register stage instead",
                distill_run_id,
                tracking_uri,
            )
        else:
            with mlflow.start_run(run_id=distill_run_id) as run:
                yield run
            return
    with start_run(
        run_name("register", tags["ctm.params_hash"]),
        tracking_uri=tracking_uri,
        experiment_name=params.mlflow.experiment_name,
        tags=tags,
        repo_root=root,
    ) as run:
        yield run


def _stage_code(tmp: Path) -> list[str]:
    """code_paths: a copy of ctm_core and a minimal `pipelines` package holding only the sampler module."""
    import ctm_core
    import pipelines.support.pyfunc_model as pm

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    core = tmp / "ctm_core"
    shutil.copytree(Path(ctm_core.__file__).parent, core, ignore=ignore)
    pkg = tmp / "pipelines"
    pkg.mkdir()
    (pkg / "support").mkdir()
    (pkg / "__init__.py").write_text('"""Only the pyfunc sampler module of the CTM pipeline."""\n')
    (pkg / "support" / "__init__.py").write_text('"""Only the pyfunc sampler module (pyfunc_model.py)."""\n')
    shutil.copy2(pm.__file__, pkg / "support" / "pyfunc_model.py")
    return [str(core), str(pkg)]


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "numpy", "pandas", "safetensors", "cloudpickle"):
        try:
            v = version(dist).split("+")[0]  # torch 2.13.0+cpu -> 2.13.0 (CPU or CUDA wheel of the same release)
        except PackageNotFoundError:
            continue
        reqs.append(f"{dist}=={v}")
    return reqs


def _find_version(client, name: str, student_sha256: str):
    """The newest existing version of `name` whose STUDENT_TAG equals `student_sha256`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    hits = [v for v in versions if (v.tags or {}).get(STUDENT_TAG) == student_sha256]
    return max(hits, key=lambda v: int(v.version)) if hits else None


def log_model_version(
    client, model_name: str, student_dir: str | os.PathLike[str], info: dict[str, Any], rho: float, tags: dict
) -> tuple[str, bool]:
    """The registry version of the student (`student_info` `info`) in the active run: an existing version with the
    same weights is reused, else the pyfunc model is logged and registered. Applies `tags` to the version (a
    re-evaluation's metrics land on a reused version). Returns (version, reused)."""
    import mlflow

    from pipelines.support.pyfunc_model import CTMSampler, input_example, make_signature

    mv = _find_version(client, model_name, info["sha256"])
    reused = mv is not None
    if not reused:
        kw = info["config"]["init_kwargs"]
        with tempfile.TemporaryDirectory(prefix="ctm-register-") as tmp:
            model_info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=CTMSampler(variant=info["variant"], rho=rho),
                artifacts={"student": str(Path(student_dir).resolve())},
                signature=make_signature(kw["img_resolution"], kw["img_channels"]),
                input_example=input_example(),
                code_paths=_stage_code(Path(tmp)),
                pip_requirements=_pip_requirements(),
            )
        mv = mlflow.register_model(model_info.model_uri, model_name, tags=tags)
    version = str(mv.version)
    for k, v in tags.items():
        client.set_model_version_tag(model_name, version, k, v)
    return version, reused


# --- champion and aliases ---------------------------------------------------------------------------------------------
def champion_version(client, name: str, alias: str):
    """The version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def float_tag(mv, key: str) -> float | None:
    """A version tag as a finite float, or None."""
    if mv is None:
        return None
    try:
        v = float((mv.tags or {})[key])
    except (KeyError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def champion_evidence(client, reg):
    """(the `@champion` version of `reg.model_name` or None, its gate Evidence from its `metric.*` and protocol
    tags or None)."""
    champ = champion_version(client, reg.model_name, reg.champion_alias)
    if champ is None:
        return None, None
    noise = metric_noise(metric_tags(champ), reg.metric)
    return champ, Evidence(float_tag(champ, f"metric.{reg.metric}"), noise, (champ.tags or {}).get(PROTOCOL_TAG))


def metric_tags(mv) -> dict[str, float]:
    """The `metric.*` version tags as numbers (what `metric_noise` reads for the champion)."""
    out = {}
    for k in mv.tags or {}:
        if k.startswith("metric."):
            v = float_tag(mv, k)
            if v is not None:
                out[k.removeprefix("metric.")] = v
    return out


def apply_decision(client, reg, version: str, gate: Decision, champ) -> list[str]:
    """Move the aliases of `reg.model_name` for `gate` (champion: `@champion` to `version`, dropping its
    `@challenger`; challenger: `@challenger` + tag); tag the decision. Returns the version's aliases, sorted."""
    if gate.decision == "champion" and not (champ is not None and str(champ.version) == version):
        client.set_registered_model_alias(reg.model_name, reg.champion_alias, version)
        challenger = champion_version(client, reg.model_name, reg.challenger_alias)
        if challenger is not None and str(challenger.version) == version:
            client.delete_registered_model_alias(reg.model_name, reg.challenger_alias)
    elif gate.decision == "challenger":
        client.set_registered_model_alias(reg.model_name, reg.challenger_alias, version)
        client.set_model_version_tag(reg.model_name, version, "challenger", "true")
    client.set_model_version_tag(reg.model_name, version, DECISION_TAG, gate.decision)
    return sorted(client.get_model_version(reg.model_name, version).aliases or [])


def log_decision(record: dict[str, Any], gate: Decision, champion_value: float | None) -> None:
    """Tags, numbers (`register/*` metrics) and the record (`register/decision-v<version>.json`) of the decision,
    to the active run."""
    import mlflow

    mlflow.set_tags(
        {
            "ctm.register.decision": gate.decision,
            "ctm.register.version": record["version"],
            "ctm.register.model_name": record["model_name"],
        }
    )
    numbers = {"value": record["value"], "champion_value": champion_value, **gate.to_dict()}
    keys = ("value", "champion_value", "relative_improvement", "improvement", "noise", "threshold")
    numbers = {f"register/{k}": numbers[k] for k in keys if numbers[k] is not None}
    if numbers:
        mlflow.log_metrics(numbers)
    mlflow.log_dict(record, f"register/decision-v{record['version']}.json")
