"""The tune stage's search: Ray Tune trials, each one Ray Train run of the distill loop on the trial's distill section.

* Every trial runs `_trial_driver` (a Tune function trainable) which builds ONE `TorchTrainer` of
  `pipelines.support.ray_train.train_loop_per_worker` on `with_changes(distill, trial values)` (`tune.steps` steps,
  one report every `tune.report_every` steps), `RunConfig(name=f"train-{trial_id}", callbacks=[TuneReportCallback()])`
  so every `ray.train.report` is one Tune `training_iteration`. The loop's quality hook (`config["quality"]`) adds
  `fd_nfe1` at every report: the 1-step γ=0 sample FD of the ONLINE student weights on `evaluate.num_samples` seeds
  from `evaluate.seed_start` (the EMA weights move too slowly to rank trials of a few hundred steps).
* ASHA (`time_attr="training_iteration"`, `tune.scheduler`) stops bad trials early; Optuna (`seed=tune.seed`) or
  HyperOpt proposes the values of `tune.space`. Concurrency = min(`tune.max_concurrent_trials`, what the cluster
  holds: each trial = 1 CPU for the trial driver + the Train workers, one CPU kept for Ray Data; GPUs // workers).
* Best trial: among the trials that trained the most distill steps (ASHA survivors, compared at equal budget), the
  best last value of `tune.metric`.
* MLflow: one nested run per trial (`mlflow.parentRunId` tag) written by `MLflowLoggerCallback` on the Tuner, i.e.
  by the stage's process only: trials and Train workers never open the tracking store (one writer per sqlite file).
* Restartable: a Tune experiment under `ray.storage_path` is resumed with `Tuner.restore(path, trainable,
  resume_unfinished=True)`; resumed trials continue their Train run from its last checkpoint (same
  `train-<trial_id>` name). Known Tune limits (docs/stack.md): ASHA rung state is not restored and resumed trials
  restart `training_iteration` at 1. Nested MLflow runs are reused by the `ctm.tune.trial_id` tag.

The feature-classifier folder is local to the driver: trials on other nodes of a multi-node cluster cannot read it
(open point: ship it through the object store or `ray.storage_path`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctm_core.config import DistillParams, Params, check_batch_split, gan_phases, params_hash, with_changes
from ctm_core.errors import InputError
from pipelines.support.lpips_weights import LpipsWeightsError, pin_lpips_weights

if TYPE_CHECKING:
    from ctm_core.data.card import DatasetCard

__all__ = [
    "QUALITY_METRICS",
    "TRIAL_ID_TAG",
    "SearchInterrupted",
    "check_tune_inputs",
    "experiment_name",
    "max_concurrent",
    "pick_best",
    "plain",
    "prepare_quality",
    "search",
]

logger = logging.getLogger(__name__)

TRIAL_ID_TAG = "ctm.tune.trial_id"
QUALITY_METRICS = ("fd_nfe1",)


class SearchInterrupted(RuntimeError):
    """Tuner.fit() returned with unfinished trials (interrupted): nothing is written, a re-run resumes."""


def plain(v: Any) -> Any:
    """numpy scalars (searchers may return them) → Python scalars; everything else unchanged."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


# --- plan -----------------------------------------------------------------------------------------------------------
def experiment_name(params: Params, card: DatasetCard, teacher_sha256: str | None, workers: int) -> str:
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
        "data": [s.sha256 for s in card.splits["train"].shards],
        "teacher": teacher_sha256,
        "workers": workers,
        "use_gpu": params.ray.use_gpu,
    }
    return f"tune-{params_hash(ident)[:12]}"


def max_concurrent(params: Params, cluster: dict[str, float], workers: int) -> int:
    """Trials that fit at once: min(tune.max_concurrent_trials, cluster CPUs, cluster GPUs), at least 1.

    One trial holds 1 CPU (its Tune driver function) + workers × ray.cpus_per_worker; one CPU stays free for Ray
    Data (docs/stack.md). With ray.use_gpu, also GPUs // workers.
    """
    per_trial = 1.0 + workers * params.ray.cpus_per_worker
    fit = math.floor((float(cluster.get("CPU", 0.0)) - 1.0) / per_trial)
    if params.ray.use_gpu:
        fit = min(fit, int(float(cluster.get("GPU", 0.0)) // workers))
    return max(1, min(params.tune.max_concurrent_trials, fit))


def check_tune_inputs(params: Params, data: Path, teacher: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(card, teacher config) after the distill input checks; the metric must be computable on this data."""
    from pipelines.support.io_utils import read_json
    from pipelines.support.ray_train import check_inputs

    try:
        card = check_inputs(data, teacher)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(" ".join(str(e).split())) from None
    # Trials start from the teacher (docs/official.md#5-continuing-training-from-a-released-checkpoint).
    if params.distill.init_from.uri is not None:
        raise InputError(
            "distill.init_from: the tune stage trains its trials from the teacher, not from a released student "
            "(fix: tune.enabled: false to continue a released student, or distill.init_from.uri: null to tune)"
        )
    if card.labels.label_dim < 2 and params.tune.metric in QUALITY_METRICS:
        raise InputError(
            f"--data: {data} has no class labels; tune.metric {params.tune.metric!r} needs the "
            "feature classifier trained on labels (fix: use labelled data, or tune.metric: train/loss)"
        )
    if params.tune.metric not in QUALITY_METRICS and not params.tune.metric.startswith("train/"):
        raise InputError(
            f"tune.metric: expected one of {', '.join(QUALITY_METRICS)} or a train/<name> metric, "
            f"got {params.tune.metric!r}"
        )
    try:  # distance lpips: both weight files fetched and verified before Ray starts
        pin_lpips_weights(params)
    except LpipsWeightsError as e:
        raise InputError(str(e)) from None
    return card, read_json(teacher / "config.json")


def prepare_quality(params: Params, card: DatasetCard, data: Path, folder: Path) -> dict[str, Any]:
    """Train the feature classifier (as the evaluate stage does) and save it + reference statistics in `folder`."""
    import numpy as np

    from ctm_core.eval.classifier import classifier_features
    from ctm_core.eval.methods import train_feature_classifier
    from ctm_core.eval.metrics import feature_statistics, save_reference_stats

    clf, info, (x_train, x_held) = train_feature_classifier(params, card, data, folder, progress=False)
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


def trial_section(params: Params, trial: dict[str, Any]) -> DistillParams:
    """The distill section one trial trains: the sampled `trial` values on the CTM + DSM phase, for `tune.steps`
    steps with a report every `tune.report_every`. With `distill.gan.enabled` the trials tune phase 1 (the section
    without its GAN, `gan_phases`): the GAN phase continues a finished phase 1 (docs/gan.md#the-two-phases)."""
    phase1, _ = gan_phases(params.distill)
    return with_changes(phase1, {**trial, "steps": params.tune.steps, "checkpoint_every": params.tune.report_every})


def _trial_driver(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Tune function trainable: one TorchTrainer (Train V2) per trial; metrics reach Tune via TuneReportCallback."""
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.support.ray_train import torch_trainer

    _pin_cluster_address()
    params: Params = setup["params"]
    trial = {k: plain(v) for k, v in config.items()}
    d = trial_section(params, trial)
    check_batch_split(d, params.ray.num_workers)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = torch_trainer(
        {
            "distill": d,
            "card": setup["card"],
            "data_dir": setup["data_dir"],
            "teacher_dir": setup["teacher_dir"],
            "quality": setup["quality"],
        },  # no mlflow_run_id: trials never write to the tracking store (the Tune driver does)
        params=params,
        workers=params.ray.num_workers,
        run_config=RunConfig(
            name=f"train-{trial_id}",
            storage_path=setup["train_storage"],
            failure_config=FailureConfig(max_failures=params.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
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


def search(
    params: Params,
    setup: dict[str, Any],
    *,
    name: str,
    storage: str,
    tracking_uri: str,
    parent_run_id: str,
    concurrency: int,
    points_to_evaluate: list[dict[str, Any]] | None = None,
):
    """Run (or resume) the Tune experiment `name` under `storage`; returns Tune's ResultGrid.

    `setup`: "card", "data_dir", "teacher_dir", "quality" for the trials (the params travel with it). Raises
    `SearchInterrupted` when trials are left unfinished (Ctrl-C / SIGTERM: Tune saved its state).
    """
    from ray import tune

    from pipelines.support import ray_env

    t = params.tune
    params = pin_lpips_weights(params)  # the trials' workers fetch the pinned LPIPS files (cache hits on this node)
    trainable = tune.with_parameters(
        _trial_driver, setup={**setup, "params": params, "train_storage": f"{storage.rstrip('/')}/{name}-train"}
    )
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        logger.info("tune: resuming the Tune experiment %s", path)
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
                        parent_run_id,
                        {"ctm.stage": "tune", "ctm.tune.experiment": name},
                    )
                ],
            ),
        )
    results = tuner.fit()
    unfinished = len(results) - results.num_terminated - results.num_errors
    if unfinished:
        raise SearchInterrupted(
            f"the search stopped with {unfinished} of {len(results)} trials unfinished "
            f"(state saved in {path}; re-run the stage to resume it)"
        )
    return results


def pick_best(results, metric: str, mode: str) -> dict[str, Any]:
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
                    "config": {k: plain(x) for k, x in (r.config or {}).items()},
                    "iterations": int(m.get("training_iteration", 0)),
                    "steps": int(m.get("step", m.get("training_iteration", 0))),
                }
            )
    if not rows:
        errors = [f"{type(r.error).__name__}: {r.error}" for r in results if r.error is not None][:3]
        raise RuntimeError(f"no trial reported a finite {metric!r} ({len(results)} trials; errors: {errors})")
    top = max(r["steps"] for r in rows)
    survivors = [r for r in rows if r["steps"] == top]
    best = (min if mode == "min" else max)(survivors, key=lambda r: r["value"])
    return {**best, "trials": rows}
