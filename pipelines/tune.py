"""DVC stage `tune`: Ray Tune search over `distill` keys (ASHA + Optuna), writes the distill section to use.

    python -m pipelines.tune --params params.yaml --data data/prepared --teacher artifacts/teacher \\
        --out artifacts/best_params.yaml

`tune.enabled: false` (the default): writes `{"distill": <params distill section as-is>, "tuned": false}` and exits
without starting Ray or touching MLflow. The distill stage reads the file either way (`--best-params`).

`tune.enabled: true` (STACK_FACTS §1.5-1.7, the Train V2 pattern):

* The driver (this process) validates params and inputs, trains the Fréchet-distance feature classifier once
  (`evaluate.classifier`, the same seeded training as the evaluate stage, so the same feature space) and saves it
  with the reference statistics of all real images (train + held-out) to a temporary folder for the trials.
* Every Tune trial runs `_trial_driver` (a Tune function trainable) which builds ONE `TorchTrainer` with
  `pipelines.distill.train_loop_per_worker` on the trial's distill section (`apply_trial`; `tune.steps` steps,
  one report every `tune.report_every` steps), `RunConfig(name=f"train-{trial_id}", callbacks=[TuneReportCallback()])`
  so every `ray.train.report` is one Tune `training_iteration`. The loop's quality hook (`config["quality"]`)
  adds `fd_nfe1` at every report: the 1-step γ=0 sample FD of the ONLINE student weights on `evaluate.num_samples`
  seeds from `evaluate.seed_start` (the EMA weights the evaluate stage scores move too slowly to rank trials of a
  few hundred steps: 0.999^200 ≈ 0.82 of the initial weights).
* ASHA (`time_attr="training_iteration"`, `tune.scheduler`) stops bad trials early; Optuna (`seed=tune.seed`) or
  HyperOpt proposes the values of `tune.space` (`ray_env.tune_search_space`). Concurrency = min(
  `tune.max_concurrent_trials`, what the cluster holds: each trial = 1 CPU for the trial driver + the Train workers,
  one CPU kept for Ray Data; GPUs // workers with `ray.use_gpu`).
* Best trial: among the trials that trained the most distill steps (ASHA survivors, compared at equal budget), the
  best last value of `tune.metric`. `--out` = the full distill section with that trial's values, `tuned: true`, the
  metric, its value, the trial id and config, the Tune experiment name and the MLflow parent run id.
* MLflow: one parent run `tune-<hash>` (resumed by its `ctm.run_key` tag) and one nested run per trial
  (`mlflow.parentRunId` tag) written by `MLflowLoggerCallback` on the Tuner, i.e. by this process only: trials and
  Train workers never open the tracking store (one writer per sqlite file).
* Restartable: the Tune experiment name is `tune-<hash of tune + distill + evaluate FD settings + data + teacher +
  workers>` under `ray.storage_path`; re-running the stage after a kill resumes it with
  `Tuner.restore(path, trainable, resume_unfinished=True)`, resumed trials continue their Train run from its last
  checkpoint (same `train-<trial_id>` name). Known Tune limits (STACK_FACTS §1.6): ASHA rung state is not restored and
  resumed trials restart `training_iteration` at 1. Nested MLflow runs are reused by the `ctm.tune.trial_id` tag.
* The local Ray this stage starts is shut down at the end; a Ray that was already initialised (tests, notebooks)
  is left to its owner.

The feature-classifier folder is local to the driver: trials on other nodes of a multi-node cluster cannot read it
(open point: ship it through the object store or `ray.storage_path`).

Exit codes: 0 ok, 2 bad params or missing inputs (one line on stderr, nothing written), 1 failure during the search
or an interrupted search (Ctrl-C / SIGTERM: Tune saves its state, nothing is written, the next run resumes).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ctm_core.errors import InputError
from pipelines.config import Params, ParamsError, apply_trial, distill_train_config, load_params, params_hash

__all__ = [
    "TRIAL_ID_TAG",
    "InputError",
    "SearchInterrupted",
    "disabled_payload",
    "experiment_name",
    "main",
    "max_concurrent",
    "run_tune",
    "write_best_params",
]

TRIAL_ID_TAG = "ctm.tune.trial_id"
QUALITY_METRICS = ("fd_nfe1",)


class SearchInterrupted(RuntimeError):
    """Tuner.fit() returned with unfinished trials (interrupted): nothing is written, a re-run resumes."""


# --- output ---------------------------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    """numpy scalars (searchers may return them) → Python scalars; everything else unchanged."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


def disabled_payload(params: Params) -> dict[str, Any]:
    return {"distill": params.section("distill"), "tuned": False}


def write_best_params(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write the tune output atomically (readers never see a partial file)."""
    from pipelines.support.io_utils import atomic_write_text

    text = "# written by pipelines/tune.py (dvc stage tune); read by pipelines/distill.py --best-params\n"
    return atomic_write_text(path, text + yaml.safe_dump(payload, sort_keys=False))


# --- plan -----------------------------------------------------------------------------------------------------------
def experiment_name(params: Params, card: dict[str, Any], teacher_sha256: str | None, workers: int) -> str:
    """Deterministic Tune experiment name: everything that changes the trials' results, hashed."""
    ev = params.evaluate
    ident = {
        "tune": params.section("tune"),
        "distill": params.section("distill"),
        "fd": {
            "classifier": ev.classifier.model_dump(mode="json"),
            "num_samples": ev.num_samples,
            "seed_start": ev.seed_start,
        },
        "data": [s["sha256"] for s in card["splits"]["train"]["shards"]],
        "teacher": teacher_sha256,
        "workers": workers,
        "use_gpu": params.ray.use_gpu,
    }
    return f"tune-{params_hash(ident)[:12]}"


def max_concurrent(params: Params, cluster: dict[str, float], workers: int) -> int:
    """Trials that fit at once: min(tune.max_concurrent_trials, cluster CPUs, cluster GPUs), at least 1.

    One trial holds 1 CPU (its Tune driver function) + workers × ray.cpus_per_worker; one CPU stays free for Ray
    Data (STACK_FACTS 1.11.1). With ray.use_gpu, also GPUs // workers.
    """
    per_trial = 1.0 + workers * params.ray.cpus_per_worker
    fit = math.floor((float(cluster.get("CPU", 0.0)) - 1.0) / per_trial)
    if params.ray.use_gpu:
        fit = min(fit, int(float(cluster.get("GPU", 0.0)) // workers))
    return max(1, min(params.tune.max_concurrent_trials, fit))


def _check_inputs(params: Params, data: Path, teacher: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from pipelines.distill import _check_inputs as check_distill_inputs
    from pipelines.support.io_utils import read_json

    try:
        card = check_distill_inputs(data, teacher)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(" ".join(str(e).split())) from None
    if int(card["labels"]["label_dim"]) < 2 and params.tune.metric in QUALITY_METRICS:
        raise InputError(
            f"--data: {data} has no class labels; tune.metric {params.tune.metric!r} needs the "
            "feature classifier trained on labels (fix: use labelled data, or tune.metric: train/loss)"
        )
    if params.tune.metric not in QUALITY_METRICS and not params.tune.metric.startswith("train/"):
        raise InputError(
            f"tune.metric: expected one of {', '.join(QUALITY_METRICS)} or a train/<name> metric, "
            f"got {params.tune.metric!r}"
        )
    return card, read_json(teacher / "config.json")


def _prepare_quality(params: Params, card: dict[str, Any], data: Path, folder: Path) -> dict[str, Any]:
    """Train the feature classifier (as the evaluate stage does) and save it + reference statistics in `folder`."""
    import numpy as np

    from ctm_core.eval.classifier import classifier_features
    from ctm_core.eval.methods import train_feature_classifier as _train_feature_classifier
    from ctm_core.eval.metrics import feature_statistics, save_reference_stats

    clf, info, (x_train, x_held) = _train_feature_classifier(params, card, data, folder, progress=False)
    f_ref = classifier_features(clf, x_train)
    if len(x_held):
        f_ref = np.concatenate([f_ref, classifier_features(clf, x_held)])
    mu, sigma = feature_statistics(f_ref)
    ref_sha = save_reference_stats(
        folder / "reference_stats.npz",
        mu,
        sigma,
        meta={"count": int(len(f_ref)), "splits": ["train", "heldout"], "classifier_sha256": info["sha256"]},
    )
    ev = params.evaluate
    return {
        "dir": str(folder),
        "classifier_sha256": info["sha256"],
        "reference_sha256": ref_sha,
        "num_samples": ev.num_samples,
        "batch": ev.batch,
        "seed": ev.seed_start,
        "ema": None,
        "classifier_accuracy": info["heldout_accuracy"],
    }


# --- trial side -----------------------------------------------------------------------------------------------------
def _pin_cluster_address() -> None:
    """Make the Train controller (and the placement-group cleaner it starts) find THIS cluster.

    Train V2's `PlacementGroupCleaner` asks the State API with `address=None`, i.e. `RAY_ADDRESS` or auto-detection;
    on a machine where a second Ray cluster runs (shared CI boxes) auto-detection raises "Found multiple active Ray
    instances", the cleaner's monitor thread dies and the placement groups of trials that ASHA stopped are never
    removed (seen here with Ray 2.60). So the trial process sets `RAY_ADDRESS` to its own GCS address and adds it to
    the env vars Train propagates to its controller (whose children, the cleaner included, inherit them).
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    try:
        from ray.train.v2._internal import constants

        constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")
    except (ImportError, AttributeError):  # internal layout changed: the cleaner falls back to auto-detection
        pass


def _trial_driver(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Tune function trainable: one TorchTrainer (Train V2) per trial; metrics reach Tune via TuneReportCallback."""
    import ray.data
    import ray.tune
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.config import DistillParams
    from pipelines.distill import train_loop_per_worker

    _pin_cluster_address()
    workers = int(setup["workers"])
    trial = {k: _plain(v) for k, v in config.items()}
    d = apply_trial(
        DistillParams.model_validate(setup["distill"]),
        {**trial, "steps": setup["steps"], "checkpoint_every": setup["report_every"]},
        num_workers=workers,
    )
    train_cfg = distill_train_config(d, workers)
    train_cfg["run"]["progress"] = False
    trial_id = ray.tune.get_context().get_trial_id()
    ray.data.DataContext.get_current().enable_progress_bars = False
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "card": setup["card"],
            "train_config": train_cfg,
            "data_dir": setup["data_dir"],
            "teacher_dir": setup["teacher_dir"],
            "use_gpu": setup["use_gpu"],
            "threads_per_worker": max(1, int(setup["cpus_per_worker"])),
            "quality": setup["quality"],
        },  # no mlflow_run_id: trials never write to the tracking store (the Tune driver does)
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=setup["use_gpu"], resources_per_worker={"CPU": setup["cpus_per_worker"]}
        ),
        run_config=RunConfig(
            name=f"train-{trial_id}",
            storage_path=setup["train_storage"],
            failure_config=FailureConfig(max_failures=setup["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
        datasets={"train": ray.data.read_parquet(str(Path(setup["data_dir"]) / "train"))},
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    trainer.fit()


# --- MLflow: nested run per trial ----------------------------------------------------------------------------------
def _nested_logger(tracking_uri: str, experiment: str, parent_run_id: str, tags: dict[str, str]):
    """`MLflowLoggerCallback` whose trial runs are children of `parent_run_id` and are reused after a restore."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class NestedTrialRuns(MLflowLoggerCallback):
        def log_trial_start(self, trial) -> None:
            if trial not in self._trial_runs:
                client = self.mlflow_util._get_client()
                found = client.search_runs(
                    [self.mlflow_util.experiment_id],
                    filter_string=(
                        f"tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'"
                    ),
                    max_results=1,
                )
                if found:  # a restored experiment: keep logging into the trial's run
                    run_id = found[0].info.run_id
                    client.update_run(run_id, status="RUNNING")
                else:
                    run_id = self.mlflow_util.start_run(
                        run_name=str(trial), tags={**self.tags, "trial_name": str(trial), TRIAL_ID_TAG: trial.trial_id}
                    ).info.run_id
                self._trial_runs[trial] = run_id
            super().log_trial_start(trial)  # logs trial.config as params (same values on a restore: allowed)

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            # MLflow step = the distill step the loop reports (Tune's training_iteration restarts at 1 on a restore)
            step = int(result.get("step") or result["training_iteration"])
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=result, step=step)

    return NestedTrialRuns(
        tracking_uri=tracking_uri,
        experiment_name=experiment,
        tags={**tags, "mlflow.parentRunId": parent_run_id},
        save_artifact=False,
    )


# --- search ---------------------------------------------------------------------------------------------------------
def _search_alg(params: Params, points_to_evaluate: list[dict[str, Any]] | None):
    t = params.tune
    if t.search_alg == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(points_to_evaluate=points_to_evaluate, random_state_seed=t.seed)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(points_to_evaluate=points_to_evaluate, seed=t.seed)


def _scheduler(params: Params):
    s = params.tune.scheduler
    if s.type == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration", max_t=s.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor
    )


def _pick_best(results, metric: str, mode: str) -> dict[str, Any]:
    """Best last value of `metric` among the finite trials that trained the most steps (module doc).

    The budget is the distill `step` the loop reports, not Tune's `training_iteration`, which restarts at 1 when a
    trial is resumed after a restore.
    """
    rows = []
    for r in results:
        m = r.metrics or {}
        v = m.get(metric)
        if r.error is None and isinstance(v, (int, float)) and math.isfinite(v):
            rows.append(
                {
                    "trial_id": m.get("trial_id"),
                    "value": float(v),
                    "config": dict(r.config or {}),
                    "iterations": int(m.get("training_iteration", 0)),
                    "steps": int(m.get("step", m.get("training_iteration", 0))),
                    "path": r.path,
                    "checkpoint_path": m.get("checkpoint_path"),
                }
            )
    if not rows:
        errors = [f"{type(r.error).__name__}: {r.error}" for r in results if r.error is not None][:3]
        raise RuntimeError(f"no trial reported a finite {metric!r} ({len(results)} trials; errors: {errors})")
    top = max(r["steps"] for r in rows)
    survivors = [r for r in rows if r["steps"] == top]
    best = (min if mode == "min" else max)(survivors, key=lambda r: r["value"])
    return {**best, "trials": rows}


# --- the stage ------------------------------------------------------------------------------------------------------
def run_tune(
    params: Params,
    *,
    data_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    out: str | os.PathLike,
    points_to_evaluate: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the search (module doc), write `out`, return its payload. Raises InputError before any work.

    `points_to_evaluate`: trial configs the searcher proposes first (Python API only; e.g. a known good setting).
    """
    import mlflow
    import ray
    from ray import tune

    from pipelines.support import ray_env, tracking

    t = params.tune
    if not t.enabled:
        payload = disabled_payload(params)
        write_best_params(out, payload)
        return payload
    data_p, teacher_p = Path(data_dir).resolve(), Path(teacher_dir).resolve()
    card, teacher_cfg = _check_inputs(params, data_p, teacher_p)
    workers = params.ray.num_workers
    name = experiment_name(params, card, teacher_cfg.get("weights_sha256"), workers)
    root = tracking.default_repo_root()
    storage = ray_env.storage_path(params)
    tracking_uri = tracking.resolve_tracking_uri(params, root)
    h = name.removeprefix("tune-")
    t_start = time.time()

    with tracking.start_run(
        name,
        tracking_uri=tracking_uri,
        experiment_name=params.mlflow.experiment_name,
        tags=tracking.run_tags("tune", h, root, extra={"ctm.tune.experiment": name}),
        repo_root=root,
    ) as parent:
        parent_id = parent.info.run_id
        logged = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri).get_run(parent_id).data.params
        new = {
            k: str(v)
            for k, v in tracking.flatten(
                {"tune": params.section("tune"), "distill": params.section("distill"), "ray.num_workers": workers}
            ).items()
            if k not in logged
        }
        if new:
            mlflow.log_params(new)
        qdir = Path(tempfile.mkdtemp(prefix="ctm-tune-quality-"))
        started = False
        try:
            quality = _prepare_quality(params, card, data_p, qdir) if t.metric in QUALITY_METRICS else None
            if not ray.is_initialized():
                ray_env.connect_or_start(params)
                started = True
            concurrency = max_concurrent(params, ray.cluster_resources(), workers)
            setup = {
                "distill": params.section("distill"),
                "steps": t.steps,
                "report_every": t.report_every,
                "workers": workers,
                "card": card,
                "data_dir": str(data_p),
                "teacher_dir": str(teacher_p),
                "use_gpu": params.ray.use_gpu,
                "cpus_per_worker": params.ray.cpus_per_worker,
                "max_failures": params.ray.max_failures,
                "train_storage": f"{storage.rstrip('/')}/{name}-train",
                "quality": {k: v for k, v in quality.items() if k != "classifier_accuracy"} if quality else None,
            }
            trainable = tune.with_parameters(_trial_driver, setup=setup)
            path = f"{storage.rstrip('/')}/{name}"
            if tune.Tuner.can_restore(path):
                print(f"tune: resuming the Tune experiment {path}", file=sys.stderr)
                tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True)
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=ray_env.tune_search_space(t.space),
                    tune_config=tune.TuneConfig(
                        metric=t.metric,
                        mode=t.mode,
                        num_samples=t.num_samples,
                        search_alg=_search_alg(params, points_to_evaluate),
                        scheduler=_scheduler(params),
                        max_concurrent_trials=concurrency,
                    ),  # Tune wraps the searcher in a ConcurrencyLimiter
                    run_config=tune.RunConfig(
                        name=name,
                        storage_path=storage,
                        verbose=1,
                        failure_config=tune.FailureConfig(max_failures=max(0, params.ray.max_failures)),
                        callbacks=[
                            _nested_logger(
                                tracking_uri,
                                params.mlflow.experiment_name,
                                parent_id,
                                {"ctm.stage": "tune", "ctm.tune.experiment": name},
                            )
                        ],
                    ),
                )
            results = tuner.fit()
        finally:
            shutil.rmtree(qdir, ignore_errors=True)
            if started:
                ray_env.shutdown()
        unfinished = len(results) - results.num_terminated - results.num_errors
        if unfinished:  # e.g. Ctrl-C / SIGTERM: Tune saved its state and returned; write nothing
            raise SearchInterrupted(
                f"the search stopped with {unfinished} of {len(results)} trials unfinished "
                f"(state saved in {storage.rstrip('/')}/{name}; re-run the stage to resume it)"
            )
        best = _pick_best(results, t.metric, t.mode)
        trial_values = {k: _plain(v) for k, v in best["config"].items()}
        d = apply_trial(params.distill, trial_values, num_workers=workers)
        payload = {
            "distill": d.model_dump(mode="json"),
            "tuned": True,
            "metric": t.metric,
            "mode": t.mode,
            "value": best["value"],
            "trial_id": best["trial_id"],
            "trial_config": trial_values,
            "iterations": best["iterations"],
            "steps": best["steps"],
            "num_trials": len(results),
            "experiment": name,
            "storage_path": storage,
            "mlflow_parent_run_id": parent_id,
            "trials": [
                {
                    "trial_id": r["trial_id"],
                    "config": {k: _plain(v) for k, v in r["config"].items()},
                    "iterations": r["iterations"],
                    "steps": r["steps"],
                    "value": r["value"],
                }
                for r in best["trials"]
            ],
        }
        if quality and quality.get("classifier_accuracy") is not None:
            payload["classifier_accuracy"] = float(quality["classifier_accuracy"])
        write_best_params(out, payload)
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
        mlflow.log_dict(payload, "tune/best_params.json")
    return payload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--teacher", default="artifacts/teacher")
    ap.add_argument("--out", default="artifacts/best_params.yaml")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as e:
        print(f"params error: {e}", file=sys.stderr)
        return 2
    if not params.tune.enabled:
        write_best_params(args.out, disabled_payload(params))
        print(f"tune: disabled (tune.enabled: false); wrote the distill section as-is to {args.out}", file=sys.stderr)
        return 0
    try:
        _check_inputs(params, Path(args.data), Path(args.teacher))
    except InputError as e:
        print(f"input error: {e}", file=sys.stderr)
        return 2
    try:
        payload = run_tune(params, data_dir=args.data, teacher_dir=args.teacher, out=args.out)
    except SearchInterrupted as e:
        print(f"tune: interrupted: {e}", file=sys.stderr)
        return 1
    print(
        f"tune: best {payload['metric']}={payload['value']:.4g} (trial {payload['trial_id']}, "
        f"{payload['trial_config']}) -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
