"""DVC stage `distill`: CTM distillation of the teacher into a student with Ray Train (TorchTrainer, Train V2).

    python -m pipelines.distill --params params.yaml --best-params artifacts/best_params.yaml \\
        --data data/prepared --teacher artifacts/teacher --out artifacts/student

`--best-params` (the tune stage's output) holds distill overrides; they are merged into params.yaml and validated
with it in one go. The training runs on Ray (`pipelines.support.ray_train`: the per-worker loop, data parallelism,
verified checkpoints) under a run name that a re-run resumes (`pipelines.support.distill_run`). `--data` and
`--teacher` may be s3:// folders (`pipelines.support.remote_inputs`): the teacher and the data's card are fetched and
verified before Ray starts, and the workers stream the data's shards from S3.

Outputs (`--out`, written atomically): the student folder of `ctm_core.io.student_format` (online + eval-EMA
weights) and `run.json` (MLflow run id, Ray run name and storage, final checkpoint path, last metrics).

Exit codes: 0 done, 2 bad params or inputs (one line, before Ray starts), 1 the Ray run failed (one line).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from ctm_core.config import Params, ParamsError, check_batch_split, gan_phases, params_hash
from pipelines.support.checkpoints import (  # noqa: F401 - re-exported: the stage's checkpoint API
    MARKER_FILE,
    CheckpointStorageError,
    complete_checkpoints,
    newest_complete_checkpoint,
    persist_checkpoint_verified,
    read_marker,
)
from pipelines.support.distill_run import DistillRunError, gan_run_name, run_identity, run_name, section_identity
from pipelines.support.gan_phase import check_gan_phase, fetch_feature_networks
from pipelines.support.io_utils import one_line
from pipelines.support.lpips_weights import LpipsWeightsError, pin_lpips_weights
from pipelines.support.params import load_params, read_overrides
from pipelines.support.ray_train import check_inputs
from pipelines.support.remote_inputs import InputError, Inputs, resolve_inputs  # noqa: F401 - re-exported

__all__ = ["CheckpointStorageError", "DistillRunError", "check_stage_features", "main", "run_distill"]

logger = logging.getLogger(__name__)


def check_stage_features(params: Params) -> None:
    """Checks of the section that need the worker count, before any work (not deep in a worker): the GAN phase's
    batch split (docs/gan.md)."""
    d = params.distill
    if (phase2 := gan_phases(d)[1]) is not None:  # the GAN phase's own batch split (gan.changes may change it)
        check_batch_split(phase2, params.ray.num_workers)


def run_distill(
    params: Params, *, data_dir: str, teacher_dir: str, out_dir: str, num_workers: int | None = None
) -> dict[str, Any]:
    """Check, train `params.distill` on Ray (one MLflow run, resumed by name), write the student folder."""
    import mlflow
    import torch

    from ctm_core.io.student_format import ema_variant, save_student
    from ctm_core.io.teacher_format import load_edm_checkpoint
    from pipelines.support import distill_run, tracking
    from pipelines.support.init_from import initial_student, resolve_init_from
    from pipelines.support.io_utils import read_json

    check_stage_features(params)
    params = pin_lpips_weights(params)  # distance lpips: both files fetched + verified before Ray (record -> digest)
    d = params.distill
    workers = int(num_workers or params.ray.num_workers)
    phase1, phase2 = gan_phases(d)  # CTM+DSM, then the GAN phase when gan.enabled (docs/gan.md#the-two-phases)
    for phase in (phase1, phase2):
        if phase is not None:
            check_batch_split(phase, workers)
    inputs = resolve_inputs(data_dir, teacher_dir)  # s3://: teacher + data card fetched and checked before Ray
    card = check_inputs(inputs.data_dir, inputs.teacher_dir)
    check_gan_phase(params, card)
    teacher = load_edm_checkpoint(inputs.teacher_dir)
    params, init = resolve_init_from(params, card, teacher)  # a released student to continue: verified, pinned
    root = tracking.default_repo_root()
    params, feature_weights = fetch_feature_networks(params)  # projected D: pinned files, before Ray
    d = params.distill
    phase1, phase2 = gan_phases(d)
    teacher_sha = read_json(inputs.teacher_dir / "config.json").get("weights_sha256")
    ident = run_identity(phase1, card, teacher_sha, workers)
    name = name1 = run_name(ident)
    if phase2 is not None:  # its own Ray run, named by the CTM+DSM run it continues and its own section
        ident = {**ident, "gan_phase": section_identity(phase2)}
        name = gan_run_name(ident)
    tracking_uri = tracking.resolve_tracking_uri(params, root)
    with tracking.start_run(
        name,
        tracking_uri=tracking_uri,
        experiment_name=params.mlflow.experiment_name,
        tags=tracking.run_tags("distill", params_hash(ident), root),
        repo_root=root,
    ) as run:
        logged = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri).get_run(run.info.run_id).data.params
        flat = tracking.flatten({"distill": d.model_dump(), "ray.num_workers": workers})
        if new := {k: str(v) for k, v in flat.items() if k not in logged}:
            mlflow.log_params(new)
        tracking.log_prepared_dataset(inputs.data_dir, source=inputs.data_uri)  # the run's input, the card's digest
        run_kw = dict(workers=workers, mlflow_run_id=run.info.run_id, tracking_uri=tracking_uri, init=init)
        if phase2 is None:
            state, fit_record = distill_run.fit(params, inputs, card, name=name1, distill=phase1, **run_kw)
        else:  # both phases on one Ray connection (a local cluster starts once)
            from pipelines.support import ray_env

            run_kw["ray_info"] = ray_env.connect_or_start(params)
            try:
                state, phase1_record = distill_run.fit(params, inputs, card, name=name1, distill=phase1, **run_kw)
                state, fit_record = distill_run.fit(
                    params,
                    inputs,
                    card,
                    name=name,
                    distill=phase2,
                    continue_from=state,
                    feature_weights=feature_weights,
                    **run_kw,
                )
            finally:
                distill_run.shutdown_local_ray(params)
            fit_record = {**fit_record, "ctm_dsm_phase": phase1_record}
        record = {
            "mlflow_run_id": run.info.run_id,
            **fit_record,
            "inputs": {
                "data": inputs.data_uri or str(inputs.data_dir),
                "teacher": inputs.teacher_uri or str(inputs.teacher_dir),
            },
            "teacher_weights_sha256": teacher_sha,
        }
        with torch.device("meta"):  # only its init_kwargs (the network class and size) are needed here
            student = initial_student(teacher, d, init)
        variants = {"online": state["model"]}
        variants.update({ema_variant(r): distill_run.ema_state(state["emas"], r) for r in d.eval_emas})
        save_student(out_dir, student.init_kwargs, variants, meta=record, extra_json={"run.json": record})
        mlflow.log_metric("distill/fit_wall_s", record["fit_wall_s"])
        mlflow.log_dict(record, "distill/run.json")
    return record


def main(argv: list[str] | None = None) -> int:
    from pipelines.support.logs import setup_logging

    setup_logging()
    ap = argparse.ArgumentParser(prog="python -m pipelines.distill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--best-params", default=None, help="tune stage output: distill overrides applied to params")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--teacher", default="artifacts/teacher")
    ap.add_argument("--out", default="artifacts/student")
    ap.add_argument("--dry-run", action="store_true", help="validate params and inputs, print the plan, train nothing")
    args = ap.parse_args(argv)
    submitting = False
    try:
        params = load_params(args.params, read_overrides(args.best_params))
        check_stage_features(params)
        submitting = params.ray.submit and not os.environ.get("CTM_INSIDE_RAY_JOB")
        card = None  # when submitting s3:// inputs, the job downloads and verifies them (its credentials, not ours)
        if not (submitting and any(str(v).startswith("s3://") for v in (args.data, args.teacher))):
            inputs = resolve_inputs(args.data, args.teacher)
            card = check_inputs(inputs.data_dir, inputs.teacher_dir)
            check_gan_phase(params, card)
            if args.dry_run and params.distill.init_from.uri is not None:  # a run checks it in run_distill, once
                from ctm_core.io.teacher_format import load_edm_checkpoint
                from pipelines.support.init_from import resolve_init_from

                params = resolve_init_from(params, card, load_edm_checkpoint(inputs.teacher_dir))[0]
    except (ParamsError, FileNotFoundError, ValueError) as e:
        logger.error("%s", one_line(e))
        return 2
    if args.dry_run:
        count = card.splits["train"].count if card else args.data
        plan = {"distill": params.distill.model_dump(), "data": count, "workers": params.ray.num_workers}
        print(json.dumps(plan, indent=2))
        return 0
    if submitting:
        from pipelines.support.submit import submit_job  # blocks until the job ends, streaming its logs

        return submit_job(params, "pipelines.distill", sys.argv[1:] if argv is None else argv)
    try:
        record = run_distill(params, data_dir=args.data, teacher_dir=args.teacher, out_dir=args.out)
    except (LpipsWeightsError, InputError) as e:  # found before Ray started
        logger.error("%s", one_line(e))
        return 2
    except (DistillRunError, CheckpointStorageError) as e:
        logger.error("%s", one_line(e))
        return 1
    logger.info("student written to %s (Ray run %s, %d steps)", args.out, record["ray_run_name"], record["steps"])
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
