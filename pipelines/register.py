"""DVC stage `register`: the student as an MLflow pyfunc model, a registry version, and a guarded `@champion` move.

1. Logs the student as a pyfunc model from code (MLflow models-from-code, nothing pickled; signature
   `num_samples, nfe, gamma, seed, class_labels -> uint8 (N, H, W, C)`) into the distill stage's MLflow run (or one
   of its own), registers it as a version of `register.model_name` and pins every file of it by a sha256 manifest
   whose digest is the tag `ctm.manifest_sha256` (`pipelines.support.registry`; load through
   `verify_registered_model`). Idempotent: a version whose `ctm.student_sha256` matches is reused.
2. Reads `<eval>/metrics.json`. A failed or partial evaluation (file or key missing, value not finite,
   `"complete": false`) never promotes: the version is tagged `ctm.eval_status=failed`, no alias moves, and the
   stage exits 1 after writing its record.
3. Compares `register.metric` with the tag `metric.<name>` of the current `@champion` version through the gate of
   `pipelines.support.gate`: `@champion` moves only if both were evaluated with the same protocol (`protocol.json`
   fingerprint: feature network, reference statistics, sample count, seeds) and the new value is better by more
   than `register.noise_z` × the measured noise of the difference and by more than `register.min_improvement`
   (relative); otherwise the version gets `@challenger`.
4. Tags every version with its headline metric (`metric.<register.metric>` and its error bars), evaluation
   protocol, data hash, teacher hash, git commit, params hash, student sha256 and image shape (a name holds one
   shape: a student of another shape is refused in one line); logs the decision and its numbers to the run; writes
   `--out` (registry.json) atomically.

Tracking URI: env `MLFLOW_TRACKING_URI` > `mlflow.tracking_uri` > absolute `sqlite:////<repo>/mlflow.db`; it is
recorded (registry.json, the logged decision) and printed without user-info, password or query (`redact_uri`).
Exit codes: 0 registered (promoted or not), 1 evaluation failed / work failed (one line), 2 bad params or inputs.

Example:
    python -m pipelines.register --params params.yaml --student artifacts/student --eval artifacts/eval \\
        --out artifacts/registry.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ctm_core.config import Params, ParamsError, params_hash
from ctm_core.redact import redact_text, redact_uri
from pipelines.support.gate import Decision, Evidence, decide, metric_noise, read_evaluation
from pipelines.support.io_utils import atomic_write_json, json_dumps, one_line
from pipelines.support.logs import setup_logging
from pipelines.support.params import load_params
from pipelines.support.registry import (
    MANIFEST_TAG,
    RegisterError,
    apply_decision,
    champion_evidence,
    check_image_shape,
    image_shape,
    log_decision,
    log_model_version,
    provenance,
    student_for,
    target_run,
    version_tags_for,
)

__all__ = ["RegisterError", "main", "plan", "run"]

logger = logging.getLogger(__name__)

# Sections whose values shape the registered model (tracking-only sections `ray`, `mlflow` left out).
HASHED_SECTIONS = ("data", "teacher", "tune", "distill", "evaluate", "register")


def run(
    params: Params,
    student_dir: str | os.PathLike[str],
    eval_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    repo_root: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Register the student and decide on `@champion`; writes and returns the registry record."""
    from mlflow.tracking import MlflowClient

    from pipelines.support.tracking import default_repo_root, resolve_tracking_uri, run_tags

    reg = params.register
    root = Path(repo_root).resolve() if repo_root is not None else default_repo_root()
    metrics, value, status, protocol_sha = read_evaluation(eval_dir, reg.metric)
    value = value if status == "ok" else None
    info = student_for(params, student_dir)
    meta = info["config"].get("meta", {}) or {}
    p_hash = params_hash({s: params.section(s) for s in HASHED_SECTIONS})
    prov = provenance(meta, root)
    tags = run_tags("register", p_hash, root, data_hash=prov["data.hash"])
    tracking_uri = resolve_tracking_uri(params, root)
    client = MlflowClient(tracking_uri=tracking_uri)
    check_image_shape(client, reg.model_name, image_shape(info))
    version_tags = version_tags_for(info, prov, tags, p_hash, status, protocol_sha, metrics, reg.metric)
    with target_run(params, root, tracking_uri, info["run"].get("mlflow_run_id"), tags) as active:
        rho = float(meta.get("rho", params.distill.rho))
        version, reused = log_model_version(client, reg.model_name, student_dir, info, rho, version_tags)
        champ, champion_ev = champion_evidence(client, reg)
        champ_value = None if champion_ev is None else champion_ev.value
        challenger_ev = Evidence(value, metric_noise(metrics, reg.metric), protocol_sha)
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
        aliases = apply_decision(client, reg, version, gate, champ)
        numbers = gate.to_dict()
        record = {
            "model_name": reg.model_name,
            "version": version,
            "model_uri": f"models:/{reg.model_name}/{version}",
            "aliases": aliases,
            "decision": gate.decision,
            "reason": gate.reason,
            "reused_version": reused,
            "eval_status": status,
            "metric": reg.metric,
            "mode": reg.mode,
            "value": value,
            "noise": challenger_ev.noise,
            "protocol_sha256": protocol_sha,
            "gate": {"noise_z": reg.noise_z, "min_improvement": reg.min_improvement, **numbers},
            "relative_improvement": numbers["relative_improvement"],
            "champion_before": None
            if champ is None
            else {
                "version": str(champ.version),
                "value": champ_value,
                "noise": champion_ev.noise,
                "protocol_sha256": champion_ev.protocol,
            },
            "run_id": active.info.run_id,
            "student_variant": info["variant"],
            "student_sha256": info["sha256"],
            "params_hash": p_hash,
            "tracking_uri": redact_uri(tracking_uri),
            "manifest_sha256": client.get_model_version(reg.model_name, version).tags.get(MANIFEST_TAG),
        }
        log_decision(record, gate, champ_value)
    atomic_write_json(out_path, record)
    return record


def plan(params: Params, student_dir: str, eval_dir: str) -> dict[str, Any]:
    """What `run` would register, from the inputs alone (no MLflow): the `--dry-run` output."""
    info = student_for(params, student_dir)
    _, value, status, _ = read_evaluation(eval_dir, params.register.metric)
    return {
        "model_name": params.register.model_name,
        "student_variant": info["variant"],
        "student_sha256": info["sha256"],
        "eval_status": status,
        "value": value,
        "mlflow_run_id": info["run"].get("mlflow_run_id"),
    }


def main(argv: list[str] | None = None) -> int:
    setup_logging()
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
        checked = plan(params, args.student, args.eval_dir)
    except ParamsError as e:
        logger.error("params error: %s", e)
        return 2
    except RegisterError as e:
        logger.error("register: %s", e)
        return 2
    if args.dry_run:
        print(json_dumps(checked), end="")  # the CLI's machine-readable output (stdout)
        return 0
    from mlflow.exceptions import MlflowException

    try:
        record = run(params, args.student, args.eval_dir, args.out)
    except (RegisterError, MlflowException, ValueError, OSError) as e:
        logger.error("register: %s", redact_text(one_line(e)))
        return 1
    logger.info(
        "register: %s v%s -> %s (%s); aliases %s",
        record["model_name"],
        record["version"],
        record["decision"],
        record["reason"],
        record["aliases"],
    )
    return 1 if record["decision"] == "rejected" else 0


if __name__ == "__main__":
    sys.exit(main())
