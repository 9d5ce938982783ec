"""Pieces shared by the `evaluate` and `likelihood` stages: input checks and MLflow logging.

Kept out of pipelines/evaluate.py so the `likelihood` stage does not depend on the Fréchet-distance code (a change
there must not re-run the ODE likelihood). `pipelines.evaluate` re-exports `InputError` and `check_inputs`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ctm_core.config import Params, params_hash
from ctm_core.errors import InputError
from pipelines.support.io_utils import read_json

__all__ = ["InputError", "check_inputs", "log_stage_to_mlflow", "stage_arg_parser"]

logger = logging.getLogger(__name__)


# --- inputs -----------------------------------------------------------------------------------------------------------
def check_inputs(
    params: Params,
    data: Path,
    teacher: Path,
    student: Path,
    *,
    need_labels: bool | None = None,
    need_heldout: bool = False,
) -> dict[str, Any]:
    """Check every input before any work; returns {'card', 'student_config', 'variant'}. Raises InputError.

    With `evaluate.student_source.uri` set, the student is that released checkpoint (fetched with its pin and
    checked here; `student` is not read): 'variant' is its `OfficialVariant` and 'student_config' is None.

    need_labels: whether the data must have class labels (default: `evaluate.features == 'classifier'`, the feature
    classifier; the likelihood stage passes False). need_heldout: whether the held-out split must be non-empty (the
    likelihood stage, which scores held-out images)."""
    from ctm_core.data.prepared import load_card
    from ctm_core.io.student_format import ema_variant, read_student_config

    try:
        card = load_card(data)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--data: {e}") from None
    if card.splits["train"].count < 2:
        raise InputError(f"--data: {data} has {card.splits['train'].count} training images, need >= 2")
    if need_heldout and card.splits["heldout"].count < 1:
        raise InputError(
            f"--data: {data} has an empty held-out split; bits/dim is measured on held-out images "
            "(fix: set data.heldout_fraction > 0, or likelihood.enabled: false)"
        )
    if need_labels is None:
        need_labels = params.evaluate.features == "classifier"
    if need_labels and card.labels.label_dim < 2:
        raise InputError(
            f"--data: {data} has no class labels (label_dim {card.labels.label_dim}); the feature "
            "classifier of the Fréchet distance needs a labelled training split (fix: set "
            "evaluate.features: inception)"
        )
    if not teacher.exists():
        raise InputError(f"--teacher: {teacher} does not exist (run the teacher stage first: dvc repro teacher)")
    if teacher.is_dir() and not (teacher / "teacher.safetensors").is_file():
        raise InputError(
            f"--teacher: {teacher} has no teacher.safetensors (expected a folder written by the teacher stage)"
        )
    if params.evaluate.student_source.uri is not None:  # a released CTM checkpoint instead of --student
        from pipelines.support.student_source import resolve_student_source

        return {"card": card, "student_config": None, "variant": resolve_student_source(params, card)}
    if not student.is_dir():
        raise InputError(f"--student: {student} does not exist (run the distill stage first: dvc repro distill)")
    try:
        config = read_student_config(student)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--student: {e}") from None
    variant = ema_variant(params.evaluate.ema)
    if variant not in config["variants"]:
        raise InputError(
            f"evaluate.ema: the student in {student} has no weights {variant!r}, it has "
            f"{sorted(config['variants'])} (fix: set evaluate.ema to one of distill.eval_emas it saved)"
        )
    return {"card": card, "student_config": config, "variant": variant}


# --- MLflow -----------------------------------------------------------------------------------------------------------
def log_stage_to_mlflow(
    params: Params,
    student: Path,
    folder: Path,
    metrics: dict[str, Any],
    *,
    stage: str,
    artifact_prefix: str,
    extra_tags: dict[str, str] | None = None,
    complete: bool | None = None,
) -> str:
    """Log a stage's numeric metrics, tags and the .json/.csv/.png files of `folder` (under `artifact_prefix/`) to
    the distill run named by `student/run.json` when it exists in the tracking store, else to a `<stage>-<hash>`
    stage run (resumed by name, not duplicated). Tags: `ctm.<stage>.params_hash`, `ctm.<stage>.complete` plus
    `extra_tags` (complete: `metrics['complete']` unless given); the section `stage` of params goes to
    `<artifact_prefix>/<stage>_params.json`. Returns the run id.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.support.tracking import default_repo_root, log_dict_json, resolve_tracking_uri, stage_run

    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (bool, int, float))}
    h = params_hash(params.section(stage))
    complete = bool(metrics.get("complete")) if complete is None else bool(complete)
    tags = {f"ctm.{stage}.params_hash": h, f"ctm.{stage}.complete": str(complete).lower(), **(extra_tags or {})}

    def log_all() -> str:
        run = mlflow.active_run()
        mlflow.log_metrics(numeric)
        mlflow.set_tags(tags)
        log_dict_json(params.section(stage), f"{artifact_prefix}/{stage}_params.json")
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.suffix in (".json", ".csv", ".png"):
                rel = p.relative_to(folder).parent.as_posix()
                mlflow.log_artifact(str(p), artifact_path=artifact_prefix if rel == "." else f"{artifact_prefix}/{rel}")
        return run.info.run_id

    run_id = None
    run_json = student / "run.json"
    released = params.evaluate.student_source.uri is not None  # scored a released checkpoint, not the run's student
    if run_json.is_file() and not released:
        try:
            run_id = read_json(run_json).get("mlflow_run_id")
        except (OSError, ValueError):
            run_id = None
    uri = resolve_tracking_uri(params, default_repo_root())
    if run_id:
        mlflow.set_tracking_uri(uri)
        try:
            MlflowClient(tracking_uri=uri).get_run(run_id)
        except Exception:  # noqa: BLE001 - not in this store: fall back to a stage run
            logger.warning(
                "%s: MLflow run %s (from %s) not found in %s; logging to a new %s run",
                stage,
                run_id,
                run_json,
                uri,
                stage,
            )
            run_id = None
    if run_id:  # one nested run per evaluation under the distill run (docs/pipeline.md#tracking)
        from pipelines.support.tracking import nested_run, run_name

        with nested_run(run_id, run_name(stage, h), tracking_uri=uri, tags={"ctm.stage": stage}):
            return log_all()
    with stage_run(stage, params, (stage,)):
        return log_all()


def stage_arg_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line shared by the stages that read data + teacher + student and write one output folder."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", required=True, help="prepared dataset folder (prepare stage)")
    ap.add_argument("--teacher", required=True, help="teacher folder (teacher stage)")
    ap.add_argument("--student", required=True, help="student folder (distill stage)")
    ap.add_argument("--out", required=True, help="output folder (replaced all-or-nothing)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--no-mlflow", action="store_true", help="skip MLflow logging")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def run_scoring_stage(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    run: Callable[..., dict[str, Any]],
    summary_keys: Callable[[Params], Sequence[str]],
    log: logging.Logger,
) -> int:
    """The `main` of a stage built on `stage_arg_parser`: parse, load params, `run(params, data, teacher, student,
    out, progress=, device=, log_mlflow=)`, log a one-line summary. Exit 2 on bad params or inputs (one line)."""
    from ctm_core.config import ParamsError
    from pipelines.support.logs import progress_enabled, setup_logging
    from pipelines.support.params import load_params

    setup_logging()
    args = stage_arg_parser(prog, description).parse_args(argv)
    try:
        # Ray is not used here: skip the Ray-address / GPU / S3 reachability checks of the other stages.
        params = load_params(args.params, check_env=False)
    except ParamsError as e:
        log.error("params error: %s", e)
        return 2
    try:
        metrics = run(
            params,
            args.data,
            args.teacher,
            args.student,
            args.out,
            progress=not args.no_progress and progress_enabled(),
            device=args.device,
            log_mlflow=not args.no_mlflow,
        )
    except InputError as e:
        log.error("input error: %s", e)
        return 2
    shown = [k for k in summary_keys(params) if k in metrics]
    summary = ", ".join(f"{k}={metrics[k]}" if isinstance(metrics[k], bool) else f"{k}={metrics[k]:.4g}" for k in shown)
    log.info("%s -> %s", summary, args.out)
    return 0


def pick_device(device: str | None):
    """`device` as a torch.device, else CUDA when available, else CPU."""
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_scored_networks(teacher: Path, student: Path, variant: str | None, device):
    """(teacher D(x; σ), student) on `device` for the stages that score a student against its teacher, both in eval
    mode without gradients. The student is the released checkpoint when `variant` is an `OfficialVariant`
    (`evaluate.student_source`), else the `variant` weights of the `student` folder."""
    from ctm_core.io.student_format import load_student
    from ctm_core.io.teacher_format import load_edm_checkpoint
    from pipelines.support.student_source import OfficialVariant, load_official_student

    teacher_net = load_edm_checkpoint(teacher).to(device).eval().requires_grad_(False)
    if isinstance(variant, OfficialVariant):  # evaluate.student_source, resolved by check_inputs
        return teacher_net, load_official_student(variant, device)
    return teacher_net, load_student(student, variant, device=device)
