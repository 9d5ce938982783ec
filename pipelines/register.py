"""DVC stage `register`: the student as an MLflow pyfunc model, a registry version, and a guarded `@champion` move.

1. Logs the student folder as a pyfunc model (`pipelines.support.pyfunc_model.CTMSampler`, weights + config as the
   `student` artifact, signature `num_samples, nfe, gamma, seed, class_labels -> uint8 (N, H, W, C)`, `ctm_core` and
   the sampler module as code paths) into the distill stage's MLflow run when `<student>/run.json` names one
   (`mlflow_run_id`), else into a run of its own; registers it as a version of `register.model_name`.
   Idempotent: a version whose tag `ctm.student_sha256` matches the student's weights is reused (a repeated
   `dvc repro` that re-runs the stage re-decides without logging a new model).
2. Reads `<eval>/metrics.json`. A failed or partial evaluation (file or key missing, value not finite,
   `"complete": false`) never promotes: the version is tagged `ctm.eval_status=failed`, no alias moves, and the
   stage exits 1 after writing its record.
3. Compares `register.metric` with the tag `metric.<name>` of the current `@champion` version through the gate of
   `pipelines.support.gate`: `@champion` moves only if both were evaluated with the same protocol (`protocol.json`
   fingerprint: feature network, reference statistics, sample count, seeds) and the new value is better by more
   than `register.noise_z` × the measured noise of the difference (seed-set std / bootstrap interval of both
   evaluations) and by more than `register.min_improvement` (relative); otherwise the version gets `@challenger`
   and the tag `challenger`.
4. Tags every version with its metrics (`metric.*`), evaluation protocol, data hash, teacher hash, git commit,
   params hash, student sha256; logs the decision and its numbers to the run; writes `--out` (registry.json) atomically.

Tracking URI: env `MLFLOW_TRACKING_URI` > `mlflow.tracking_uri` > absolute `sqlite:////<repo>/mlflow.db`.
Exit codes: 0 registered (promoted or not), 1 evaluation failed / work failed (one line), 2 bad params or inputs.

Example:
    python -m pipelines.register --params params.yaml --student artifacts/student --eval artifacts/eval \\
        --out artifacts/registry.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipelines.config import Params, ParamsError, load_params, params_hash
from pipelines.support.gate import Decision, Evidence, decide, metric_noise, read_protocol
from pipelines.support.io_utils import atomic_write_json, json_dumps, one_line, read_json

__all__ = ["MODEL_ARTIFACT_NAME", "RegisterError", "decide", "main", "read_eval", "run"]

MODEL_ARTIFACT_NAME = "ctm_sampler"  # name= of the logged model inside the run
STUDENT_TAG = "ctm.student_sha256"
EVAL_STATUS_TAG = "ctm.eval_status"
PROTOCOL_TAG = "eval.protocol_sha256"
DECISION_TAG = "ctm.decision"
# Sections whose values shape the registered model (tracking-only sections `ray`, `mlflow` left out).
HASHED_SECTIONS = ("data", "teacher", "tune", "distill", "evaluate", "register")
# Keys looked up in the student's config.json `meta` (written by the distill stage) for the provenance tags.
_META_KEYS = {
    "data.hash": ("data_hash", "data_sha256", "data_md5"),
    "teacher.hash": ("teacher_weights_sha256", "teacher_sha256", "teacher_hash"),
}


class RegisterError(RuntimeError):
    """The stage cannot register; the message is one line naming the problem and the fix."""


# --- inputs ------------------------------------------------------------------------------------------------------------
def read_eval(eval_dir: str | os.PathLike[str], metric: str) -> tuple[dict[str, float], float | None, str]:
    """(all finite numeric metrics flattened, value of `metric` or None, status 'ok' | 'failed: <why>')."""
    path = Path(eval_dir) / "metrics.json"
    if not path.is_file():
        return {}, None, f"failed: {path} not found (the evaluate stage did not finish)"
    try:
        raw = read_json(path)
    except (OSError, ValueError) as e:
        return {}, None, f"failed: {path} is not valid JSON ({e})"
    if not isinstance(raw, dict):
        return {}, None, f"failed: {path} holds {type(raw).__name__}, expected an object"
    numbers: dict[str, float] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                numbers[key] = float(v)

    walk(raw, "")
    if raw.get("complete") is False:
        return numbers, None, f"failed: {path} says complete: false (partial evaluation)"
    if metric not in raw and metric not in numbers:
        return numbers, None, f"failed: {path} has no key {metric!r} (register.metric)"
    value = raw.get(metric, numbers.get(metric))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return numbers, None, f"failed: {path} {metric} = {value!r} is not a finite number"
    return numbers, float(value), "ok"


def _student_info(student_dir: str | os.PathLike[str], variant: str | None) -> dict[str, Any]:
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


def _variant_for(params: Params, config: dict[str, Any]) -> str | None:
    """The evaluated weights: `evaluate.ema` (e.g. ema_0.999) if the student has it, else the default choice."""
    from ctm_core.io.student_format import ema_variant

    name = ema_variant(params.evaluate.ema)
    return name if name in config.get("variants", {}) else None


# --- MLflow ------------------------------------------------------------------------------------------------------------
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


def _champion(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _metric_tags(mv) -> dict[str, float]:
    """The `metric.*` version tags as numbers (what `metric_noise` reads for the champion)."""
    out = {}
    for k in mv.tags or {}:
        if k.startswith("metric."):
            v = _float_tag(mv, k)
            if v is not None:
                out[k.removeprefix("metric.")] = v
    return out


def _read_protocol_status(eval_dir) -> tuple[Any, str | None]:
    """(protocol dict, sha256) or (why it is unusable, None): the gate never compares without a protocol."""
    try:
        protocol, sha = read_protocol(eval_dir)
    except ValueError as e:
        return str(e), None
    if sha is None:
        return (
            f"{Path(eval_dir) / 'protocol.json'} not found (the evaluate stage did not finish, or wrote no "
            "protocol fingerprint: re-run it)"
        ), None
    return protocol, sha


def _float_tag(mv, key: str) -> float | None:
    if mv is None:
        return None
    try:
        v = float((mv.tags or {})[key])
    except (KeyError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@contextlib.contextmanager
def _target_run(params: Params, root: Path, tracking_uri: str, distill_run_id: str | None, tags: dict[str, str]):
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
            print(
                f"register: run.json names MLflow run {distill_run_id}, which is not in {tracking_uri}; "
                "logging into a run of the register stage instead",
                file=sys.stderr,
            )
        else:
            with mlflow.start_run(run_id=distill_run_id) as run:
                yield run
            return
    h = tags["ctm.params_hash"]
    with start_run(
        run_name("register", h),
        tracking_uri=tracking_uri,
        experiment_name=params.mlflow.experiment_name,
        tags=tags,
        repo_root=root,
    ) as run:
        yield run


def run(
    params: Params,
    student_dir: str | os.PathLike[str],
    eval_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    repo_root: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Register the student and decide on `@champion`; writes and returns the registry record."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.support.pyfunc_model import CTMSampler, input_example, make_signature
    from pipelines.support.tracking import data_hash_from_lock, default_repo_root, resolve_tracking_uri, run_tags

    reg = params.register
    root = Path(repo_root).resolve() if repo_root is not None else default_repo_root()
    metrics, value, status = read_eval(eval_dir, reg.metric)
    protocol, protocol_sha = _read_protocol_status(eval_dir)
    if status == "ok" and protocol_sha is None:
        status = f"failed: {protocol}"
        value = None
    first = _student_info(student_dir, None)
    variant = _variant_for(params, first["config"]) or first["variant"]
    info = _student_info(student_dir, variant) if variant != first["variant"] else first
    config, meta = info["config"], info["config"].get("meta", {}) or {}
    kw = config["init_kwargs"]
    rho = float(meta.get("rho", params.distill.rho))

    p_hash = params_hash({s: params.section(s) for s in HASHED_SECTIONS})
    provenance = {
        "data.hash": next((str(meta[k]) for k in _META_KEYS["data.hash"] if meta.get(k)), None)
        or data_hash_from_lock(root)
        or "unknown",
        "teacher.hash": next((str(meta[k]) for k in _META_KEYS["teacher.hash"] if meta.get(k)), None)
        or data_hash_from_lock(root, "artifacts/teacher")
        or "unknown",
    }
    tags = run_tags("register", p_hash, root, data_hash=provenance["data.hash"])
    tracking_uri = resolve_tracking_uri(params, root)
    client = MlflowClient(tracking_uri=tracking_uri)
    version_tags = {
        STUDENT_TAG: info["sha256"],
        "student.variant": variant,
        "student.weights_sha256": info["weights_sha256"],
        "data.hash": provenance["data.hash"],
        "teacher.hash": provenance["teacher.hash"],
        "git.commit": tags["git.commit"],
        "git.dirty": tags["git.dirty"],
        "params.hash": p_hash,
        EVAL_STATUS_TAG: "ok" if status == "ok" else "failed",
        PROTOCOL_TAG: protocol_sha or "unknown",
        **{f"metric.{k}": repr(v) for k, v in sorted(metrics.items())},
    }
    if meta.get("params_hash"):
        version_tags["distill.params_hash"] = str(meta["params_hash"])

    distill_run_id = info["run"].get("mlflow_run_id")
    with _target_run(params, root, tracking_uri, distill_run_id, tags) as active:
        run_id = active.info.run_id
        existing = _find_version(client, reg.model_name, info["sha256"])
        if existing is not None:
            mv = existing
            reused = True
        else:
            reused = False
            with tempfile.TemporaryDirectory(prefix="ctm-register-") as tmp:
                model_info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT_NAME,
                    python_model=CTMSampler(variant=variant, rho=rho),
                    artifacts={"student": str(Path(student_dir).resolve())},
                    signature=make_signature(kw["img_resolution"], kw["img_channels"]),
                    input_example=input_example(),
                    code_paths=_stage_code(Path(tmp)),
                    pip_requirements=_pip_requirements(),
                )
            mv = mlflow.register_model(model_info.model_uri, reg.model_name, tags=version_tags)
        version = str(mv.version)
        for k, v in version_tags.items():  # (re)apply: metrics of a re-evaluation land on the reused version
            client.set_model_version_tag(reg.model_name, version, k, v)

        champ = _champion(client, reg.model_name, reg.champion_alias)
        champ_value = _float_tag(champ, f"metric.{reg.metric}")
        challenger_ev = Evidence(value, metric_noise(metrics, reg.metric), protocol_sha)
        champion_ev = (
            None
            if champ is None
            else Evidence(
                champ_value, metric_noise(_metric_tags(champ), reg.metric), (champ.tags or {}).get(PROTOCOL_TAG)
            )
        )
        if champ is not None and str(champ.version) == version and status == "ok":
            gate = Decision("champion", "this version already is the champion")
        else:
            gate = decide(
                challenger_ev,
                status,
                champion_ev,
                mode=reg.mode,
                noise_z=reg.noise_z,
                min_improvement=reg.min_improvement,
            )
        decision, reason = gate.decision, gate.reason
        if decision == "champion" and not (champ is not None and str(champ.version) == version):
            client.set_registered_model_alias(reg.model_name, reg.champion_alias, version)
            challenger = _champion(client, reg.model_name, reg.challenger_alias)
            if challenger is not None and str(challenger.version) == version:
                client.delete_registered_model_alias(reg.model_name, reg.challenger_alias)
        elif decision == "challenger":
            client.set_registered_model_alias(reg.model_name, reg.challenger_alias, version)
            client.set_model_version_tag(reg.model_name, version, "challenger", "true")
        client.set_model_version_tag(reg.model_name, version, DECISION_TAG, decision)

        aliases = sorted(client.get_model_version(reg.model_name, version).aliases or [])
        record = {
            "model_name": reg.model_name,
            "version": version,
            "model_uri": f"models:/{reg.model_name}/{version}",
            "aliases": aliases,
            "decision": decision,
            "reason": reason,
            "reused_version": reused,
            "eval_status": status,
            "metric": reg.metric,
            "mode": reg.mode,
            "value": value,
            "noise": challenger_ev.noise,
            "protocol_sha256": protocol_sha,
            "gate": {"noise_z": reg.noise_z, "min_improvement": reg.min_improvement, **gate.to_dict()},
            "relative_improvement": gate.to_dict()["relative_improvement"],
            "champion_before": None
            if champ is None
            else {
                "version": str(champ.version),
                "value": champ_value,
                "noise": champion_ev.noise,
                "protocol_sha256": champion_ev.protocol,
            },
            "run_id": run_id,
            "student_variant": variant,
            "student_sha256": info["sha256"],
            "params_hash": p_hash,
            "tracking_uri": tracking_uri,
        }
        mlflow.set_tags(
            {
                "ctm.register.decision": decision,
                "ctm.register.version": version,
                "ctm.register.model_name": reg.model_name,
            }
        )
        numbers = {
            k: v
            for k, v in (
                ("register/value", value),
                ("register/champion_value", champ_value),
                ("register/relative_improvement", record["relative_improvement"]),
                ("register/improvement", gate.to_dict()["improvement"]),
                ("register/noise", gate.to_dict()["noise"]),
                ("register/threshold", gate.to_dict()["threshold"]),
            )
            if v is not None
        }
        if numbers:
            mlflow.log_metrics(numbers)
        mlflow.log_dict(record, f"register/decision-v{version}.json")
    atomic_write_json(out_path, record)
    return record


def _check_inputs(params: Params, student_dir: str, eval_dir: str) -> dict[str, Any]:
    first = _student_info(student_dir, None)
    variant = _variant_for(params, first["config"]) or first["variant"]
    info = _student_info(student_dir, variant)
    metrics, value, status = read_eval(eval_dir, params.register.metric)
    protocol, protocol_sha = _read_protocol_status(eval_dir)
    if status == "ok" and protocol_sha is None:
        status = f"failed: {protocol}"
    return {
        "model_name": params.register.model_name,
        "student_variant": info["variant"],
        "student_sha256": info["sha256"],
        "eval_status": status,
        "value": value,
        "mlflow_run_id": info["run"].get("mlflow_run_id"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.register",
        description=__doc__.split("\n\n")[0],
        epilog="Example:" + __doc__.split("Example:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--student", required=True, help="student folder from the distill stage")
    ap.add_argument("--eval", required=True, dest="eval_dir", help="evaluation folder holding metrics.json")
    ap.add_argument("--out", required=True, help="registry record to write (JSON)")
    ap.add_argument("--dry-run", action="store_true", help="check params and inputs, print the plan, touch nothing")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        plan = _check_inputs(params, args.student, args.eval_dir)
    except ParamsError as e:
        print(f"params error: {e}", file=sys.stderr)
        return 2
    except RegisterError as e:
        print(f"register: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json_dumps(plan), end="")
        return 0
    from mlflow.exceptions import MlflowException

    try:
        record = run(params, args.student, args.eval_dir, args.out)
    except (RegisterError, MlflowException, ValueError, OSError) as e:
        print(f"register: {one_line(e)}", file=sys.stderr)
        return 1
    line = (
        f"register: {record['model_name']} v{record['version']} -> {record['decision']} "
        f"({record['reason']}); aliases {record['aliases']}"
    )
    print(line, file=sys.stderr)
    return 1 if record["decision"] == "rejected" else 0


if __name__ == "__main__":
    sys.exit(main())
