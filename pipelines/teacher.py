"""DVC stage `teacher`: get the EDM teacher that the CTM student is distilled from, as a teacher folder.

`teacher.source` (params.yaml) picks the way:

    train        (the offline default) train an EDM denoiser on the prepared train split with the EDM loss
                 (Karras et al. 2022, §5 / Table 1) through `ctm_core.training.edm_training.EDMTrainer`, which takes
                 the `teacher.train` section as it is; the EMA weights (EDM's half-life `ema_halflife_kimg` with
                 ramp-up `ema_rampup_ratio`) become the teacher. Progress bar from the trainer, params and the
                 loss curve go to one MLflow run (tagged by `pipelines.support.tracking`).
    <release>    a released EDM network name (e.g. `edm-cifar10-32x32-uncond-vp`,
                 `pipelines.support.fetch.resolve_release`)
    https:// s3:// file://
                 a snapshot pickle (or a project `teacher.safetensors`) fetched into the content-addressed cache
                 with `teacher.sha256` verified (`record` = fetch once and print the digest to pin), then converted
                 with `ctm_core.io.teacher_format.convert_edm_pickle` (an allow-list unpickler: nothing is executed).

The work itself is `pipelines.support.teacher_build` (plan, train, fetch); this module adds MLflow and the CLI.

Output (`--out`, all-or-nothing: built in a temp folder next to it, checked with `load_edm_checkpoint`, renamed):
    teacher.safetensors, config.json   the project's teacher format (`ctm_core.io.teacher_format.save_teacher`)
    source.json                        how it was made: kind, URI / release, file sha256, weights sha256
    train_meta.json                    (train only) steps, final / mean loss, data hash, seconds, config

Exit codes: 0 done, 2 bad params / arguments (one line, before any work), 1 the work failed (one line).

Examples:
    python -m pipelines.teacher --params params.yaml --data data/prepared --out artifacts/teacher
    python -m pipelines.teacher --params params.yaml --data data/prepared --out artifacts/teacher --dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ctm_core.config import Params, ParamsError
from pipelines.support.io_utils import json_dumps, read_json
from pipelines.support.params import load_params
from pipelines.support.teacher_build import TRAIN_META_FILE, TeacherError, fetch_teacher, plan, train_teacher

__all__ = ["TeacherError", "main", "run"]

logger = logging.getLogger(__name__)


# --- stage ------------------------------------------------------------------------------------------------------------
def run(
    params: Params,
    data_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    track: bool = True,
) -> dict[str, Any]:
    """The stage: check, then train or fetch into `out_dir`, with one MLflow run when `track`; returns a summary."""
    info = plan(params, data_dir, out_dir)  # every check before any work
    kind = info["kind"]
    sections = ("data", "teacher") if kind == "train" else ("teacher",)
    ctx: Any = contextlib.nullcontext()
    if track:
        from pipelines.support.tracking import stage_run

        ctx = stage_run("teacher", params, sections, extra_tags={"ctm.teacher.source": params.teacher.source})
    with ctx as mlrun:
        mlflow = None
        if track:
            import mlflow

            from pipelines.support.tracking import flatten

            mlflow.log_params(flatten({s: params.section(s) for s in sections}))
        if kind == "train":
            cb = None
            if mlflow is not None:
                from pipelines.support.tracking import log_prepared_dataset

                log_prepared_dataset(data_dir)  # the run's dataset input, with the card's digest
                cb = lambda step, m: mlflow.log_metrics({f"teacher/{k}": float(v) for k, v in m.items()}, step=step)
            meta = train_teacher(params, data_dir, out_dir, progress=progress, metrics_callback=cb)
            summary = {
                "kind": kind,
                "steps": meta["steps"],
                "loss_final": meta["loss_final"],
                "train_seconds": meta["train_seconds"],
                "weights_sha256": meta["weights_sha256"],
            }
        else:
            record = fetch_teacher(params, out_dir, data_dir=data_dir, progress=progress)
            summary = {"kind": kind, "file_sha256": record["file_sha256"], "weights_sha256": record["weights_sha256"]}
        if mlflow is not None:
            mlflow.set_tags({"ctm.teacher.weights_sha256": summary["weights_sha256"]})
            if kind == "train":
                mlflow.log_metrics(
                    {"teacher/loss_final": summary["loss_final"], "teacher/train_seconds": summary["train_seconds"]}
                )
                mlflow.log_dict(read_json(Path(out_dir) / TRAIN_META_FILE), "teacher/train_meta.json")
            mlflow.log_dict(read_json(Path(out_dir) / "config.json"), "teacher/config.json")
            summary["mlflow_run_id"] = mlrun.info.run_id
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.teacher",
        description=__doc__.split("\n\n")[0],
        epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--params", default="params.yaml", help="params.yaml (section `teacher`)")
    ap.add_argument("--data", default=None, help="prepared dataset folder (required for teacher.source: train)")
    ap.add_argument("--out", required=True, help="teacher folder to write (replaced all-or-nothing)")
    ap.add_argument("--dry-run", action="store_true", help="check params and inputs, print the plan, write nothing")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)
    from pipelines.support.logs import progress_enabled, setup_logging

    setup_logging()
    try:
        params = load_params(args.params)
        info = plan(params, args.data, args.out)
    except ParamsError as e:
        logger.error("params error: %s", e)
        return 2
    except TeacherError as e:
        logger.error("%s", e)
        return 2
    if args.dry_run:
        print(json_dumps(info), end="")
        return 0
    from pipelines.support.fetch import FetchError

    try:
        progress = not args.no_progress and progress_enabled()
        summary = run(params, args.data, args.out, progress=progress, track=not args.no_mlflow)
    except (TeacherError, FetchError, ValueError, FileNotFoundError) as e:
        logger.error("%s", " ".join(str(e).split()))
        return 1
    logger.info("teacher: %s", json_dumps(summary).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
