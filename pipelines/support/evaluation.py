"""The evaluate stage's work: feature space and reference, samples of every method, Fréchet distances, outputs.

`evaluate` runs the protocol described in `pipelines/evaluate.py` and writes its output folder all-or-nothing. The
maths lives in the library (`ctm_core.eval.methods`: what is sampled and how; `ctm_core.eval.scoring`: the FD of one
method with its error bars, KID, the metric names); this module wires it to the prepared data, the stage's folders,
the plots and MLflow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ctm_core.config import Params, params_hash
from ctm_core.data.card import DatasetCard
from ctm_core.eval.methods import (
    REJECTION_KEY,
    Method,
    across_classes,
    plan_methods,
    sample_method,
    seed_sets,
    student_nfes,
    train_feature_classifier,
)
from ctm_core.eval.scoring import (
    add_nfe_aliases,
    add_teacher_ratios,
    fd_curve_csv,
    fd_summary,
    finite,
    finite_metrics,
    headline_keys,
    kid_summary,
    state_dict_sha256,
    stats_sha256,
)
from pipelines.support.io_utils import atomic_write_json, atomic_write_text, read_json, staged_dir
from pipelines.support.stage_common import (
    InputError,
    check_inputs,
    load_scored_networks,
    log_stage_to_mlflow,
    pick_device,
)
from pipelines.support.student_source import check_rejection, rejection_samples

__all__ = ["FeatureSpace", "evaluate", "log_to_mlflow"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FeatureSpace:
    """Where FDs are measured: a feature map for samples (N, C, H, W) -> (N, D) and the reference statistics."""

    features_of: Callable[[torch.Tensor], np.ndarray]
    mu_ref: np.ndarray  # (D,) float64
    sigma_ref: np.ndarray  # (D, D) float64
    kid_ref: np.ndarray | None  # (M, D) reference features for KID, None for a statistics-only reference
    metrics: dict[str, Any]  # num_reference, classifier_accuracy, fd_heldout_vs_train
    feature_net_sha256: str
    reference_sha256: str
    preprocessing: str
    real_grid: np.ndarray  # (grid_size², C, H, W) real levels for grids/data.png, taken across the classes
    set_size: int  # images per seed set (evaluate.set_size resolved)
    classifier_info: dict[str, Any] | None = None


def _real_grid(data: Path, grid_size: int) -> np.ndarray:
    """grid_size² train images taken round-robin over the classes (`across_classes`): (n, C, H, W) levels."""
    from ctm_core.data.prepared import load_prepared

    x, y = load_prepared(data, "train")
    return x[across_classes(y, grid_size**2)]


def _inception_space(fid, params: Params, data: Path, device: torch.device) -> FeatureSpace:
    """Pinned Inception-v3 pool3 features of EDM's saved uint8 images; reference from `setup_inception_fid`."""
    from ctm_core.eval.inception import extract_features
    from ctm_core.eval.metrics import images_to_uint8
    from pipelines.support.fid_reference import PREPROCESS_VERSION

    ev, ref = params.evaluate, fid.reference
    metrics: dict[str, Any] = {}
    if ref.num_images is not None:
        metrics["num_reference"] = int(ref.num_images)

    def features_of(x: torch.Tensor) -> np.ndarray:  # sampler output (N, C, H, W) -> (N, 2048)
        return extract_features(fid.model, images_to_uint8(x), batch_size=ev.inception.batch, device=device)

    return FeatureSpace(
        features_of=features_of,
        mu_ref=ref.mu,
        sigma_ref=ref.sigma,
        kid_ref=ref.kid_features,
        metrics=metrics,
        feature_net_sha256=fid.weights_sha256,
        reference_sha256=ref.sha256,
        preprocessing=PREPROCESS_VERSION,
        real_grid=_real_grid(data, ev.grid_size),
        set_size=ev.set_size or ev.num_samples,  # null: one set, the paper protocol
    )


def _classifier_space(params: Params, card: DatasetCard, data: Path, folder: Path, progress: bool) -> FeatureSpace:
    """Features of a classifier trained on the train split; reference = the train split's statistics, against which
    the held-out split gives the data floor `fd_heldout_vs_train` at the held-out size, the default set size of the
    models' FDs (docs/evaluation.md#data-floor)."""
    from ctm_core.eval.classifier import classifier_features
    from ctm_core.eval.metrics import feature_statistics, frechet_distance, images_to_levels
    from pipelines.support.fid_reference import warn_if_weak_classifier

    ev, num_levels = params.evaluate, card.image.num_levels
    num_held = card.splits["heldout"].count if "heldout" in card.splits else 0
    set_size = ev.set_size or num_held
    if set_size < 2 or set_size > ev.num_samples:  # before the classifier is trained
        raise InputError(
            f"evaluate.set_size: expected 2 <= set size <= evaluate.num_samples ({ev.num_samples}), got {set_size} "
            f"({'the held-out split size' if ev.set_size is None else 'set'}) (fix: set evaluate.set_size, or raise "
            "data.heldout_fraction / evaluate.num_samples)"
        )
    clf, info, (x_train, x_held) = train_feature_classifier(params, card, data, folder, progress)
    f_train = classifier_features(clf, x_train)
    mu_ref, sigma_ref = feature_statistics(f_train)
    metrics: dict[str, Any] = {"num_reference": int(len(f_train)), "num_heldout": int(len(x_held))}
    if info["heldout_accuracy"] is not None:
        metrics["classifier_accuracy"] = float(info["heldout_accuracy"])
        warn_if_weak_classifier(metrics["classifier_accuracy"])
    if len(x_held) >= 2:
        # Like with like (docs/evaluation.md#data-floor): the mean FD of disjoint held-out subsets of the models' set
        # size (the whole split when set_size is null or larger than it).
        f_held = classifier_features(clf, x_held)
        size = min(set_size, len(f_held))
        subsets = [f_held[i : i + size] for i in range(0, len(f_held) - size + 1, size)]
        fds = [frechet_distance(*feature_statistics(f), mu_ref, sigma_ref) for f in subsets]
        metrics["fd_heldout_vs_train"] = float(np.mean(fds))
        metrics["floor_set_size"] = int(size)

    def features_of(x: torch.Tensor) -> np.ndarray:
        return classifier_features(clf, images_to_levels(x.clamp(-1, 1), num_levels))

    return FeatureSpace(
        features_of=features_of,
        mu_ref=mu_ref,
        sigma_ref=sigma_ref,
        kid_ref=f_train,
        metrics=metrics,
        feature_net_sha256=state_dict_sha256(clf),
        reference_sha256=stats_sha256(mu_ref, sigma_ref),
        preprocessing=f"clamp(-1,1)|levels-{num_levels}(images_to_levels)|SmallClassifier",
        real_grid=_real_grid(data, ev.grid_size),
        set_size=set_size,
        classifier_info=info,
    )


def _score_methods(
    methods: list[Method],
    student_net: torch.nn.Module,
    teacher_net: torch.nn.Module,
    space: FeatureSpace,
    params: Params,
    card: DatasetCard,
    folder: Path,
    *,
    device: torch.device,
    progress: bool,
    rejection_classifier: torch.nn.Module | None = None,
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Sample, featurise and score every method on the same seeds; a failing method (e.g. non-finite samples)
    is recorded in the returned errors and skipped. Returns (flat metrics, per-method details, errors).
    The 'rejection' method's images are the K·set_size kept by `rejection_classifier` out of a pool from seeds
    seed_start + i (`student_source.rejection_samples`), cut into the seed sets by position."""
    from ctm_core.eval.metrics import PreparedReference, images_to_levels
    from pipelines.support.plots import save_grid

    ev, num_levels = params.evaluate, card.image.num_levels
    label_dim = int(getattr(student_net, "label_dim", 0))
    sets = seed_sets(ev.num_samples, space.set_size)
    seeds = list(range(ev.seed_start, ev.seed_start + sets[-1].stop))  # K·set_size images, K = num_samples // size
    prepared = PreparedReference.from_stats(space.mu_ref, space.sigma_ref)  # the reference root, once per run
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    errors: list[str] = []
    for m in tqdm(methods, desc="evaluate methods", unit="method", disable=not progress, leave=False):
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        try:
            if m.kind == "rejection":
                x, extra["rejection"] = rejection_samples(
                    params, student_net, img_shape=card.image.shape, device=device,
                    classifier=rejection_classifier, num_out=len(seeds), progress=progress,
                )  # fmt: skip
            else:
                x = sample_method(
                    m,
                    student_net,
                    teacher_net,
                    seeds=seeds,
                    batch=ev.batch,
                    img_shape=card.image.shape,
                    label_dim=label_dim,
                    device=device,
                    progress=progress,
                )
            feats = space.features_of(x)  # (N, D); raises ValueError on non-finite samples
            q = images_to_levels(x[: ev.grid_size**2].clamp(-1, 1), num_levels)  # grid: integer levels
        except (ValueError, RuntimeError) as e:  # e.g. a diverged sampler (non-finite samples)
            errors.append(f"{m.key}: {type(e).__name__}: {e}")
            logger.warning("%s failed: %s: %s", m.key, type(e).__name__, e)
            continue
        flat, det = fd_summary(
            m.key,
            feats,
            space.mu_ref,
            space.sigma_ref,
            sets,
            ev.seed,
            num_bootstrap=ev.num_bootstrap,
            prepared=prepared,
        )
        kid = kid_summary(feats, space.kid_ref, ev.seed)
        det.update(kind=m.kind, nfe=m.nfe, gamma=m.gamma, label=m.label, kid=kid, seconds=time.perf_counter() - t0)
        det.update(extra)
        details[m.key] = det
        metrics.update(flat)
        logger.info("%s: fd %.4g (%.1f s)", m.key, flat.get(m.key, float("nan")), det["seconds"])
        save_grid(folder / "grids" / f"{m.grid_name}.png", q.numpy(), num_levels, ev.grid_size)
    return metrics, details, errors


def _write_curves(folder: Path, metrics: dict[str, Any], methods: list[Method], params: Params) -> None:
    """fd_vs_nfe.csv (gamma,nfe,fd,fd_std for every γ) and fd_vs_nfe.png (one colour per γ with error bars, the
    teacher baselines and the data floor, log-scale FD): the figure `dvc plots show` shows as an image."""
    from pipelines.support.plots import plot_fd_vs_nfe

    ev, nfes = params.evaluate, student_nfes(params)
    gammas = sorted(set(ev.gammas) | {0.0, 1.0})
    atomic_write_text(folder / "fd_vs_nfe.csv", fd_curve_csv(metrics, nfes, gammas))
    curves = {
        g: [
            (n, metrics[f"fd_nfe{n}_gamma{g:g}"], metrics.get(f"fd_nfe{n}_gamma{g:g}_std"))
            for n in nfes
            if f"fd_nfe{n}_gamma{g:g}" in metrics
        ]
        for g in gammas
    }
    heun_pts = [
        (m.nfe, metrics[m.key], metrics.get(f"{m.key}_std"))
        for m in methods
        if m.kind == "student_heun" and m.key in metrics
    ]
    baselines = {
        label: metrics[k]
        for label, k in (
            (f"teacher Heun {ev.teacher_nfe} NFE", f"fd_teacher_heun{ev.teacher_nfe}"),
            (f"teacher Euler {ev.teacher_euler_nfe} NFE", f"fd_teacher_euler{ev.teacher_euler_nfe}"),
        )
        if k in metrics
    }
    if "fd_heldout_vs_train" in metrics:
        baselines["data floor: held-out vs train"] = metrics["fd_heldout_vs_train"]
    plot_fd_vs_nfe(
        folder / "fd_vs_nfe.png",
        curves,
        baselines=baselines,
        extra_points={"student g Heun": heun_pts} if heun_pts else None,
        ylabel=f"Fréchet distance, {ev.features} features (log scale)",
        title=f"CTM student: FD vs NFE (mean of {metrics['num_sets']} sets of {metrics['set_size']} images)",
    )


def _reference_record(fid, space: FeatureSpace, metrics: dict[str, Any]) -> dict[str, Any]:
    """fd_details.json's `reference`: where the reference statistics came from."""
    feature_dim = int(space.mu_ref.shape[0])
    if fid is None:
        return {
            "source": "data",
            "splits": ["train"],
            "count": metrics["num_reference"],
            "feature_dim": feature_dim,
            "sha256": space.reference_sha256,
        }
    r = fid.reference
    return {
        "source": r.source,
        "splits": list(r.splits) if r.splits else None,
        "count": r.num_images,
        "feature_dim": feature_dim,
        "sha256": r.sha256,
        "file": str(r.path),
        "cached": r.cached,
        "data_hash": r.data_hash,
        "cache_key": r.key,
        "kid_features": None if r.kid_features is None else int(len(r.kid_features)),
    }


def evaluate(
    params: Params,
    data: str | os.PathLike,
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    out: str | os.PathLike,
    *,
    progress: bool = True,
    device: str | None = None,
    log_mlflow: bool = True,
) -> dict[str, Any]:
    """Run the whole stage (pipelines/evaluate.py); returns the flat metrics. Raises InputError before any work."""
    from pipelines.support.fid_reference import FIDSetupError, protocol_dict, protocol_sha256, setup_inception_fid
    from pipelines.support.plots import save_grid

    data, teacher, student, out = Path(data), Path(teacher), Path(student), Path(out)
    ev = params.evaluate
    checked = check_inputs(params, data, teacher, student)
    card, variant = checked["card"], checked["variant"]
    dev = pick_device(device)
    t_start = time.perf_counter()
    fid = None
    if ev.features == "inception":  # weights + reference statistics before any output or sampling (one-line errors)
        try:
            fid = setup_inception_fid(params, card, data, device=dev, progress=progress)
        except FIDSetupError as e:
            raise InputError(str(e)) from None
    rejection_classifier = check_rejection(params, card, dev, progress=progress) if ev.rejection.enabled else None

    with staged_dir(out) as tmp:
        # 1. feature space and reference statistics.
        if fid is not None:
            space = _inception_space(fid, params, data, dev)
        else:
            space = _classifier_space(params, card, data, tmp, progress)
        feature_dim = int(space.mu_ref.shape[0])
        sets = seed_sets(ev.num_samples, space.set_size)
        metrics = {
            **space.metrics,
            "feature_dim": feature_dim,
            "inception_features": fid is not None,
            "set_size": space.set_size,
            "num_sets": len(sets),
        }
        save_grid(tmp / "grids" / "data.png", space.real_grid, card.image.num_levels, ev.grid_size)

        # 2. networks; 3. samples -> features -> FD, per method.
        teacher_net, student_net = load_scored_networks(teacher, student, variant, dev)
        methods = plan_methods(params)
        scored, details, errors = _score_methods(
            methods, student_net, teacher_net, space, params, card, tmp, device=dev, progress=progress,
            rejection_classifier=rejection_classifier,
        )  # fmt: skip
        metrics.update(scored)
        add_nfe_aliases(metrics, student_nfes(params), sorted(set(ev.gammas) | {0.0, 1.0}))
        if "fd_nfe1_gamma0" in details and _kid_ok(details["fd_nfe1_gamma0"]):
            metrics["kid_nfe1"] = details["fd_nfe1_gamma0"]["kid"]["mean"]
        add_teacher_ratios(metrics, ev.teacher_nfe, ev.teacher_euler_nfe)

        # 4. outputs: metrics.json = the headline keys (`dvc metrics show`); every number in fd_details.json.
        _write_curves(tmp, metrics, methods, params)
        metrics = finite_metrics(metrics)
        missing = [m.key for m in methods if m.key not in metrics]
        metrics["complete"] = not errors and not missing
        metrics["eval_seconds"] = time.perf_counter() - t_start
        keys = headline_keys(student_nfes(params), ev.teacher_nfe, ev.teacher_euler_nfe)
        keys += [REJECTION_KEY, f"{REJECTION_KEY}_std"] if ev.rejection.enabled else []
        headline = {k: metrics[k] for k in keys if k in metrics} | {"complete": metrics["complete"]}
        protocol = protocol_dict(
            features=ev.features,
            feature_net_sha256=space.feature_net_sha256,
            feature_dim=feature_dim,
            reference_source="data" if fid is None else fid.reference.source,
            reference_sha256=space.reference_sha256,
            num_samples=ev.num_samples,
            seed_start=ev.seed_start,
            preprocessing=space.preprocessing,
            set_size=space.set_size,
        )
        protocol = {**protocol, "protocol_sha256": protocol_sha256(protocol)}
        atomic_write_json(tmp / "protocol.json", protocol)
        atomic_write_json(tmp / "metrics.json", headline)
        atomic_write_json(
            tmp / "fd_details.json",
            {
                "metrics": metrics,
                "methods": details,
                "errors": errors,
                "missing": missing,
                "classifier": space.classifier_info,
                "features": ev.features,
                "protocol": protocol,
                "inception": None
                if fid is None
                else {"source": fid.weights_source, "sha256": fid.weights_sha256, "file": str(fid.weights_path)},
                "reference": _reference_record(fid, space, metrics),
                "seed_sets": [[s.start + ev.seed_start, s.stop + ev.seed_start] for s in sets],
                "seed_sets_note": (
                    f"every FD is the mean over {len(sets)} seed sets of {space.set_size} images, _std their spread"
                    if len(sets) > 1
                    else f"one seed set of {space.set_size} images: _std from {ev.num_bootstrap} bootstrap replicates"
                ),
                "student": {"dir": str(student), "variant": variant},
                "teacher": {"dir": str(teacher)},
                "device": str(dev),
                "params": params.section("evaluate"),
                "params_hash": params_hash(params.section("evaluate")),
            },
        )
        if log_mlflow:
            log_to_mlflow(params, student, tmp, metrics)
    return headline


def _kid_ok(det: dict[str, Any]) -> bool:
    return bool(det.get("kid")) and finite(det["kid"].get("mean"))


def log_to_mlflow(params: Params, student: Path, folder: Path, metrics: dict[str, Any]) -> str:
    """Log metrics + artifacts of `folder` to the distill run (student/run.json) or a new evaluate run."""
    tags = {"ctm.evaluate.features": params.evaluate.features}
    if (folder / "protocol.json").is_file():
        proto = read_json(folder / "protocol.json")
        tags.update(
            {
                "ctm.evaluate.protocol_sha256": str(proto.get("protocol_sha256")),
                "ctm.evaluate.feature_net_sha256": str(proto.get("feature_net_sha256")),
                "ctm.evaluate.reference_sha256": str(proto.get("reference_sha256")),
            }
        )
    return log_stage_to_mlflow(
        params, student, folder, metrics, stage="evaluate", artifact_prefix="eval", extra_tags=tags
    )
