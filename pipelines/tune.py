"""DVC stage `tune`: Ray Tune search over `distill` keys (ASHA + Optuna); writes the distill overrides it chose.

    python -m pipelines.tune --params params.yaml --data data/prepared --teacher artifacts/teacher \\
        --out artifacts/best_params.yaml

`--out` holds only the overrides the search chose, params-shaped (`distill: {lr: ..., K: ...}`), with a comment
line naming the metric, its value and the trial; the distill stage merges them into params.yaml (`--best-params`).
`tune.enabled: false` (the default) writes an empty mapping without starting Ray or touching MLflow.

`tune.enabled: true`: this process validates params and inputs, trains the Fréchet-distance feature classifier once
(`evaluate.classifier`, the same seeded training as the evaluate stage) and saves it with the reference statistics of
all real images for the trials, then runs the search (`pipelines.support.tune_search`: trials, ASHA, the searcher,
nested MLflow runs, restore after a kill) under one MLflow parent run `tune-<hash>`, resumed by its `ctm.run_key` tag.
The experiment name hashes everything that changes the trials (tune + distill + evaluate FD settings + data +
teacher + workers), so re-running the stage after a kill resumes it. A local Ray this stage starts is shut down at
the end; a Ray that was already initialised (tests, notebooks) is left to its owner.

Exit codes: 0 ok, 2 bad params or missing inputs (one line on stderr, nothing written), 1 failure during the search
or an interrupted search (Ctrl-C / SIGTERM: Tune saves its state, nothing is written, the next run resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ctm_core.config import Params, ParamsError, check_batch_split, with_changes
from ctm_core.errors import InputError
from pipelines.support.params import load_params
from pipelines.support.tune_search import QUALITY_METRICS, SearchInterrupted, check_tune_inputs

__all__ = ["main", "run_tune", "write_best_params"]

logger = logging.getLogger(__name__)


def write_best_params(path: str | os.PathLike[str], overrides: dict[str, Any], note: str = "") -> Path:
    """Write the chosen overrides atomically (readers never see a partial file); `note` becomes a comment line."""
    from pipelines.support.io_utils import atomic_write_text

    head = "# written by the tune stage; merged into params.yaml by the distill stage (--best-params)\n"
    body = yaml.safe_dump(overrides, sort_keys=False) if overrides else "{}\n"
    return atomic_write_text(path, head + (f"# {note}\n" if note else "") + body)


def run_tune(
    params: Params,
    *,
    data_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    out: str | os.PathLike,
    points_to_evaluate: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the search (module doc), write `out`, return a summary (`overrides`, best trial, all finished trials).

    `points_to_evaluate`: trial configs the searcher proposes first (Python API only; e.g. a known good setting).
    """
    import mlflow
    import ray

    from pipelines.support import ray_env, tracking, tune_search

    t = params.tune
    if not t.enabled:
        write_best_params(out, {})
        return {"tuned": False, "overrides": {}}
    data_p, teacher_p = Path(data_dir).resolve(), Path(teacher_dir).resolve()
    card, teacher_cfg = check_tune_inputs(params, data_p, teacher_p)
    workers = params.ray.num_workers
    name = tune_search.experiment_name(params, card, teacher_cfg.get("weights_sha256"), workers)
    root = tracking.default_repo_root()
    storage = ray_env.storage_path(params)
    tracking_uri = tracking.resolve_tracking_uri(params, root)
    t_start = time.time()
    with tracking.start_run(
        name,
        tracking_uri=tracking_uri,
        experiment_name=params.mlflow.experiment_name,
        tags=tracking.run_tags("tune", name.removeprefix("tune-"), root, extra={"ctm.tune.experiment": name}),
        repo_root=root,
    ) as parent:
        logged = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri).get_run(parent.info.run_id).data.params
        sections = {"tune": params.section("tune"), "distill": params.section("distill"), "ray.num_workers": workers}
        if new := {k: str(v) for k, v in tracking.flatten(sections).items() if k not in logged}:
            mlflow.log_params(new)
        qdir = Path(tempfile.mkdtemp(prefix="ctm-tune-quality-"))
        started = False
        try:
            quality = tune_search.prepare_quality(params, card, data_p, qdir) if t.metric in QUALITY_METRICS else None
            if not ray.is_initialized():
                ray_env.connect_or_start(params)
                started = True
            results = tune_search.search(
                params,
                {
                    "card": card,
                    "data_dir": str(data_p),
                    "teacher_dir": str(teacher_p),
                    "quality": {k: v for k, v in quality.items() if k != "classifier_accuracy"} if quality else None,
                },
                name=name,
                storage=storage,
                tracking_uri=tracking_uri,
                parent_run_id=parent.info.run_id,
                concurrency=tune_search.max_concurrent(params, ray.cluster_resources(), workers),
                points_to_evaluate=points_to_evaluate,
            )
        finally:
            shutil.rmtree(qdir, ignore_errors=True)
            if started:
                ray_env.shutdown()
        best = tune_search.pick_best(results, t.metric, t.mode)
        check_batch_split(with_changes(params.distill, best["config"]), workers)  # valid before it is written
        overrides = {"distill": best["config"]}
        summary = {
            "tuned": True,
            "overrides": overrides,
            **{k: best[k] for k in ("trial_id", "value", "iterations", "steps", "trials")},
            "metric": t.metric,
            "mode": t.mode,
            "num_trials": len(results),
            "experiment": name,
            "storage_path": storage,
            "mlflow_parent_run_id": parent.info.run_id,
        }
        if quality and quality.get("classifier_accuracy") is not None:
            summary["classifier_accuracy"] = float(quality["classifier_accuracy"])
        note = f"best {t.metric}={best['value']:.6g} of {len(results)} trials (trial {best['trial_id']}, {name})"
        write_best_params(out, overrides, note)
        steps = [r["steps"] for r in best["trials"]]
        mlflow.log_metrics(
            {
                f"best_{t.metric}": best["value"],
                "num_trials": float(len(results)),
                "num_finished_trials": float(len(best["trials"])),
                "num_stopped_early": float(sum(n < max(steps) for n in steps)),
                "tune_wall_s": time.time() - t_start,
            }
        )
        mlflow.set_tags({"ctm.tune.best_trial_id": str(best["trial_id"])})
        mlflow.log_dict(summary, "tune/summary.json")
    return summary


def main(argv: list[str] | None = None) -> int:
    from pipelines.support.logs import setup_logging

    setup_logging()
    ap = argparse.ArgumentParser(prog="python -m pipelines.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--teacher", default="artifacts/teacher")
    ap.add_argument("--out", default="artifacts/best_params.yaml")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as e:
        logger.error("params error: %s", e)
        return 2
    if not params.tune.enabled:
        write_best_params(args.out, {})
        logger.info("tune: disabled (tune.enabled: false); wrote no overrides to %s", args.out)
        return 0
    try:
        check_tune_inputs(params, Path(args.data), Path(args.teacher))
    except InputError as e:
        logger.error("input error: %s", e)
        return 2
    try:
        summary = run_tune(params, data_dir=args.data, teacher_dir=args.teacher, out=args.out)
    except SearchInterrupted as e:
        logger.error("interrupted: %s", e)
        return 1
    logger.info(
        "tune: best %s=%.4g (trial %s, %s) -> %s",
        summary["metric"],
        summary["value"],
        summary["trial_id"],
        summary["overrides"]["distill"],
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
