"""DVC stage `evaluate`: sample quality vs NFE of the CTM student, teacher baselines, Fréchet distance.

    python -m pipelines.evaluate --params params.yaml --data data/prepared --teacher artifacts/teacher \\
        --student artifacts/student --out artifacts/eval

Protocol (section `evaluate` of params.yaml):

* Feature space (`evaluate.features`):
    - `classifier` (default, the offline digits run; needs labels): a `ctm_core.eval.classifier.SmallClassifier`
      is trained on the prepared TRAIN split (`evaluate.classifier`: seeded, Adam; `steps` is turned into whole
      epochs, ceil(steps / batches per epoch)). Its held-out accuracy is reported. The Inception FID is
      meaningless on 8x8 grey digits: these Fréchet distances ("FD") are comparable only between runs with the same
      classifier (its weights' sha256 is in protocol.json). Reference statistics: float64 mean / unbiased
      covariance of the features of ALL real images (train + held-out split); `fd_heldout_vs_train` (held-out
      features against the train statistics) is the real-data floor at the held-out sample size.
    - `inception`: FID on the field's protocol (`pipelines.support.fid_reference`: pinned pytorch-fid Inception-v3 pool3
      weights through the fetcher, EDM's uint8 images, reference statistics computed from the prepared data and
      cached, or a fetched npz such as EDM's cifar10-32x32.npz). Works on unlabelled data. The CIFAR-10 protocol
      is `num_samples: 50000` against the 50,000 training images (EDM fid.py:116). Weights and reference are
      resolved and checked before any sampling. FD values here ARE FIDs (the `fd_` key names are kept).
* Methods, each on the same seeds: image i uses seed `seed_start + i` through `StackedRandomGenerator`
  (EDM generate.py:182-196), so an image does not depend on the batch size or its position in the batch:
    - student (`evaluate.ema` weights) with `gamma_sampler` at every NFE of `evaluate.nfe` ∪ {1} for every gamma of
      `evaluate.gammas` ∪ {0, 1} (at NFE 1 every gamma gives the same jump sigma_max -> sigma_min, sampled once);
    - the student's own score sampler (`student_heun_sampler`, Heun with g(x, σ, σ)) at NFE 3 and 7 (kept
      short: every 35-NFE method costs ~20-40 s per 1000 digits on 2 CPU cores);
    - the teacher with EDM's deterministic Heun sampler at `teacher_nfe` (= 2·steps − 1) and with Euler at
      `teacher_euler_nfe` (1 = the baseline D(x_T; sigma_max), one Euler step from sigma_max to 0).
  Classifier: every sample is clamped to [-1, 1] and quantised to the dataset's levels (`images_to_levels`, the
  inverse of prepare's `level / (L − 1) · 2 − 1`), exactly as the real images were, before the classifier sees it.
  Inception: every sample becomes EDM's saved uint8 image `clip(x·127.5 + 128, 0, 255)` (generate.py:297).
* FD of each method on all `num_samples` images (the number in metrics.json, e.g. `fd_nfe1`). Error bars:
  the same images split into K = 3 disjoint seed sets (2, or 1 when fewer than 2·feature_dim images per set; with
  2048-d Inception features 3 sets need >= 12,288 images: with fewer there is no `_mean/_std/_min`, and the reason
  is in fd_details.json `seed_sets_note`):
  `<key>_mean` ± `<key>_std` (SiD-style mean; sample std over the sets, measured at num_samples/K images per set,
  so it OVERSTATES the noise of the full-size number: a conservative margin for promotion; both are also biased
  upwards against `<key>` by the smaller set size) and `<key>_min` (EDM's min-of-sets); and a basic
  bootstrap 95 % interval `<key>_ci_low/_ci_high` from `evaluate.num_bootstrap` resamples of the full set
  (`ctm_core.eval.metrics.fid_error_bars`). Each FD uses scipy's sqrtm (the protocol) when the set has more images than
  feature dimensions, else the exact eigh form (`PreparedReference`; sqrtm of a singular 2048² product is slow
  and ill-conditioned); fd_details.json says which. KID (cubic polynomial kernel) for every method is in
  fd_details.json (against a 2,000-image subset of the reference features for `inception` with a data
  reference; none against a fetched npz, which holds no features).
* Bits/dim is not computed here: it is the `likelihood` stage (pipelines/likelihood.py, section `likelihood`), so
  changing FD params does not recompute the expensive ODE likelihood.

Outputs (`--out`, built in a temporary folder and renamed into place: all or nothing):
    metrics.json            flat: fd_nfe{n} (γ=0), fd_nfe{n}_gamma{g:g}, fd_student_heun{n}, fd_teacher_heun{n},
                            fd_teacher_euler{n} (+ _mean/_std/_min/_ci_low/_ci_high), fd_nfe1_over_teacher_heun{n},
                            fd_nfe1_over_teacher_euler{n}, fd_heldout_vs_train, kid_nfe1, classifier_accuracy,
                            num_samples, num_reference, feature_dim,
                            inception_features (bool), complete (true iff everything ran).
    protocol.json           what makes two FDs comparable: features, feature_net_sha256 (Inception file /
                            classifier tensors), feature_dim, reference_source, reference_sha256 (npz file /
                            classifier statistics content), num_samples, seed_start, preprocessing; plus its
                            canonical-JSON sha256 `protocol_sha256` (also in fd_details.json "protocol").
    fd_vs_nfe/gamma_{g:g}.csv   nfe,fd,fd_std,fd_min,fd_ci_low,fd_ci_high (one file per gamma; `dvc plots`)
    fd_vs_nfe.png           FD vs NFE per gamma with error bars and the teacher lines
    grids/<method>.png      grid_size² samples of each method (first seeds) and grids/data.png
    fd_details.json         per-method details (seed-set FDs, bootstrap, KID, timings), classifier / inception,
                            reference, protocol
    classifier/             the feature classifier (safetensors + config; features: classifier only)

MLflow: everything above is logged to the distill run (`mlflow_run_id` in <student>/run.json) when it exists in the
tracking store, else to an `evaluate-<params hash>` run (pipelines.support.tracking). Exit codes: 0 ok, 2 bad params or
missing inputs (one line on stderr, nothing written), 1 failure during the work (nothing written).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ctm_core.eval.methods import (
    plan_methods,
    sample_method,
    seed_sets,
    student_nfes,
    train_feature_classifier,
)
from pipelines.config import Params, ParamsError, load_params, params_hash
from pipelines.support.io_utils import atomic_write_json, atomic_write_text, read_json, staged_dir
from pipelines.support.stage_common import InputError, check_inputs, log_stage_to_mlflow, stage_arg_parser

__all__ = [
    "InputError",
    "check_inputs",
    "evaluate",
    "main",
]

NUM_BOOTSTRAP = 200  # bootstrap replicates per method (64-d features: milliseconds each)
KID_SUBSETS = 20


# --- the stage --------------------------------------------------------------------------------------------------------
def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fd_summary(
    key: str,
    feats: np.ndarray,
    mu_ref: np.ndarray,
    sigma_ref: np.ndarray,
    sets: list[slice],
    seed: int,
    *,
    num_bootstrap: int = NUM_BOOTSTRAP,
    prepared=None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Flat metrics (key, _std, _min, _ci_low, _ci_high) and the details of one method's features (N, D).

    Each FD: scipy sqrtm (the protocol) when the set has N > D images, else the exact eigh form
    (`fid_error_bars(method="auto")`). `prepared`: `PreparedReference` of (mu_ref, sigma_ref), built once per run."""
    from ctm_core.eval.metrics import PreparedReference, fid_error_bars

    prepared = prepared or PreparedReference.from_stats(mu_ref, sigma_ref)
    boot = fid_error_bars(
        [feats],
        mu_ref,
        sigma_ref,
        num_bootstrap=num_bootstrap,
        generator=torch.Generator().manual_seed(seed),
        method="auto",
        prepared=prepared,
    )
    per_set = fid_error_bars(
        [feats[s] for s in sets], mu_ref, sigma_ref, num_bootstrap=0, method="auto", prepared=prepared
    )
    flat = {key: boot.fids[0], f"{key}_ci_low": boot.bootstrap_low, f"{key}_ci_high": boot.bootstrap_high}
    if len(sets) > 1:
        flat[f"{key}_mean"] = per_set.mean
        flat[f"{key}_std"] = per_set.std
        flat[f"{key}_min"] = per_set.min
    dim = feats.shape[1]
    details = {
        "fd": boot.fids[0],
        "fd_method": "sqrtm" if len(feats) > dim else "eigh",
        "bootstrap": {
            k: v for k, v in boot.to_dict().items() if k.startswith("bootstrap") or k in ("confidence", "num_bootstrap")
        },
        "seed_sets": {
            "fds": list(per_set.fids),
            "mean": per_set.mean,
            "std": per_set.std if len(sets) > 1 else None,
            "min": per_set.min,
            "num_samples": list(per_set.num_samples),
            "fd_method": ["sqrtm" if n > dim else "eigh" for n in per_set.num_samples],
        },
    }
    return {k: float(v) for k, v in flat.items() if _finite(v)}, details


def _kid(feats: np.ndarray, ref_feats: np.ndarray | None, seed: int) -> dict[str, float] | None:
    from ctm_core.eval.metrics import kid

    if ref_feats is None:  # e.g. a fetched reference npz: statistics only, no features
        return None
    m = min(len(feats), len(ref_feats), 1000) // 2
    if m < 2:
        return None
    r = kid(feats, ref_feats, num_subsets=KID_SUBSETS, subset_size=m, generator=torch.Generator().manual_seed(seed))
    return {"mean": r.mean, "std": r.std, "num_subsets": r.num_subsets, "subset_size": r.subset_size}


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
    """Run the whole stage (module doc); returns the flat metrics. Raises InputError before any work."""
    from ctm_core.data.prepared import load_prepared
    from ctm_core.eval.classifier import classifier_features
    from ctm_core.eval.inception import extract_features
    from ctm_core.eval.metrics import (
        PreparedReference,
        feature_statistics,
        frechet_distance,
        images_to_levels,
        images_to_uint8,
    )
    from ctm_core.io.student_format import load_student
    from ctm_core.io.teacher_format import load_edm_checkpoint
    from pipelines.support.fid_reference import FIDSetupError, protocol_dict, protocol_sha256, setup_inception_fid
    from pipelines.support.plots import plot_fd_vs_nfe, save_grid

    data, teacher, student, out = Path(data), Path(teacher), Path(student), Path(out)
    ev = params.evaluate
    checked = check_inputs(params, data, teacher, student)
    card, variant = checked["card"], checked["variant"]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    num_levels = int(card["image"]["num_levels"])
    img_shape = (int(card["image"]["channels"]), int(card["image"]["height"]), int(card["image"]["width"]))
    inception = ev.features == "inception"
    fid = None
    if inception:  # weights + reference statistics before any output or sampling (one-line errors)
        try:
            fid = setup_inception_fid(params, card, data, device=dev, progress=progress)
        except FIDSetupError as e:
            raise InputError(str(e)) from None

    with staged_dir(out) as tmp:
        errors: list[str] = []
        # 1. feature space and reference statistics.
        clf = clf_info = None
        if fid is not None:
            ref = fid.reference
            mu_ref, sigma_ref, f_kid_ref = ref.mu, ref.sigma, ref.kid_features
            x_train = load_prepared(data, "train")[0][: ev.grid_size**2]
            metrics: dict[str, Any] = {"num_samples": ev.num_samples}
            if ref.num_images is not None:
                metrics["num_reference"] = int(ref.num_images)
            feature_net_sha256, preprocessing = fid.weights_sha256, _fid_preprocess_version()
            reference_sha256 = ref.sha256

            def features_of(x: torch.Tensor) -> np.ndarray:  # sampler output (N, C, H, W) -> (N, 2048)
                return extract_features(fid.model, images_to_uint8(x), batch_size=ev.inception.batch, device=dev)
        else:  # classifier: train + held-out real images
            clf, clf_info, (x_train, x_held) = train_feature_classifier(params, card, data, tmp, progress)
            f_train = classifier_features(clf, x_train)
            f_held = classifier_features(clf, x_held) if len(x_held) else np.zeros((0, f_train.shape[1]))
            f_ref = f_kid_ref = np.concatenate([f_train, f_held])
            mu_ref, sigma_ref = feature_statistics(f_ref)
            metrics = {"num_samples": ev.num_samples, "num_reference": int(len(f_ref))}
            if clf_info["heldout_accuracy"] is not None:
                metrics["classifier_accuracy"] = float(clf_info["heldout_accuracy"])
            if len(f_held) >= 2:
                mu_h, sigma_h = feature_statistics(f_held)
                metrics["fd_heldout_vs_train"] = frechet_distance(mu_h, sigma_h, *feature_statistics(f_train))
            feature_net_sha256 = _state_dict_sha256(clf)
            reference_sha256 = _stats_sha256(mu_ref, sigma_ref)
            preprocessing = f"clamp(-1,1)|levels-{num_levels}(images_to_levels)|SmallClassifier"

            def features_of(x: torch.Tensor) -> np.ndarray:
                return classifier_features(clf, images_to_levels(x.clamp(-1, 1), num_levels))

        feature_dim = int(mu_ref.shape[0])
        metrics.update(feature_dim=feature_dim, inception_features=inception)
        prepared = PreparedReference.from_stats(mu_ref, sigma_ref)  # the reference root, once per run
        save_grid(tmp / "grids" / "data.png", x_train[: ev.grid_size**2], num_levels, ev.grid_size)

        # 2. networks.
        teacher_net = load_edm_checkpoint(teacher).to(dev).eval().requires_grad_(False)
        student_net = load_student(student, variant, device=dev)
        label_dim = int(getattr(student_net, "label_dim", 0))

        # 3. samples -> levels -> features -> FD, per method.
        methods = plan_methods(params)
        seeds = list(range(ev.seed_start, ev.seed_start + ev.num_samples))
        sets = seed_sets(ev.num_samples, feature_dim)
        details: dict[str, Any] = {}
        for m in tqdm(methods, desc="evaluate methods", unit="method", disable=not progress):
            t0 = time.perf_counter()
            try:
                x = sample_method(
                    m,
                    student_net,
                    teacher_net,
                    seeds=seeds,
                    batch=ev.batch,
                    img_shape=img_shape,
                    label_dim=label_dim,
                    device=dev,
                    progress=progress,
                )
                feats = features_of(x)  # (N, D); raises ValueError on non-finite samples
                q = images_to_levels(x[: ev.grid_size**2].clamp(-1, 1), num_levels)  # grid: integer levels
            except (ValueError, RuntimeError) as e:  # e.g. a diverged sampler (non-finite samples)
                errors.append(f"{m.key}: {type(e).__name__}: {e}")
                continue
            flat, det = _fd_summary(
                m.key, feats, mu_ref, sigma_ref, sets, ev.seed, num_bootstrap=ev.num_bootstrap, prepared=prepared
            )
            det.update(
                kind=m.kind,
                nfe=m.nfe,
                gamma=m.gamma,
                label=m.label,
                kid=_kid(feats, f_kid_ref, ev.seed),
                seconds=time.perf_counter() - t0,
            )
            details[m.key] = det
            metrics.update(flat)
            save_grid(tmp / "grids" / f"{m.grid_name}.png", q.numpy(), num_levels, ev.grid_size)
        # NFE 1: every gamma is the same jump; gamma 0 is the headline name fd_nfe{n}.
        gammas = sorted(set(ev.gammas) | {0.0, 1.0})
        for n in student_nfes(params):
            for suffix in ("", "_mean", "_std", "_min", "_ci_low", "_ci_high"):
                src = f"fd_nfe{n}_gamma0{suffix}"
                if src in metrics:
                    metrics[f"fd_nfe{n}{suffix}"] = metrics[src]
                    if n == 1:
                        for g in gammas:
                            metrics[f"fd_nfe1_gamma{g:g}{suffix}"] = metrics[src]
        if "fd_nfe1_gamma0" in details and _kid_ok(details["fd_nfe1_gamma0"]):
            metrics["kid_nfe1"] = details["fd_nfe1_gamma0"]["kid"]["mean"]
        heun_key = f"fd_teacher_heun{ev.teacher_nfe}"
        euler_key = f"fd_teacher_euler{ev.teacher_euler_nfe}"
        for ref_key, name in (
            (heun_key, f"fd_nfe1_over_teacher_heun{ev.teacher_nfe}"),
            (euler_key, f"fd_nfe1_over_teacher_euler{ev.teacher_euler_nfe}"),
        ):
            if "fd_nfe1" in metrics and metrics.get(ref_key, 0) > 0:
                metrics[name] = metrics["fd_nfe1"] / metrics[ref_key]

        # 4. outputs.
        for g in gammas:
            rows = ["nfe,fd,fd_std,fd_min,fd_ci_low,fd_ci_high"]
            for n in student_nfes(params):
                k = f"fd_nfe{n}_gamma{g:g}"
                if k in metrics:
                    vals = [metrics.get(f"{k}{s}", "") for s in ("", "_std", "_min", "_ci_low", "_ci_high")]
                    rows.append(",".join([str(n)] + [f"{v:.6g}" if v != "" else "" for v in vals]))
            atomic_write_text(tmp / "fd_vs_nfe" / f"gamma_{g:g}.csv", "\n".join(rows) + "\n")
        curves = {
            g: [
                (n, metrics[f"fd_nfe{n}_gamma{g:g}"], metrics.get(f"fd_nfe{n}_gamma{g:g}_std"))
                for n in student_nfes(params)
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
            lbl: metrics[k]
            for lbl, k in (
                (f"teacher Heun {ev.teacher_nfe} NFE", heun_key),
                (f"teacher Euler {ev.teacher_euler_nfe} NFE", euler_key),
            )
            if k in metrics
        }
        if "fd_heldout_vs_train" in metrics:
            baselines["real held-out vs train"] = metrics["fd_heldout_vs_train"]
        plot_fd_vs_nfe(
            tmp / "fd_vs_nfe.png",
            curves,
            baselines=baselines,
            extra_points={"student g Heun": heun_pts} if heun_pts else None,
        )

        metrics = {
            k: (float(v) if not isinstance(v, (bool, int)) else v)
            for k, v in metrics.items()
            if isinstance(v, bool) or _finite(v)
        }
        expected = [m.key for m in methods]
        missing = [k for k in expected if k not in metrics]
        metrics["complete"] = not errors and not missing
        metrics["eval_seconds"] = time.perf_counter() - t_start
        protocol = protocol_dict(
            features=ev.features,
            feature_net_sha256=feature_net_sha256,
            feature_dim=feature_dim,
            reference_source="data" if fid is None else fid.reference.source,
            reference_sha256=reference_sha256,
            num_samples=ev.num_samples,
            seed_start=ev.seed_start,
            preprocessing=preprocessing,
        )
        protocol_hash = protocol_sha256(protocol)
        atomic_write_json(tmp / "protocol.json", {**protocol, "protocol_sha256": protocol_hash})
        if fid is None:
            reference = {
                "source": "data",
                "splits": ["train", "heldout"],
                "count": metrics["num_reference"],
                "feature_dim": feature_dim,
                "sha256": reference_sha256,
            }
        else:
            r = fid.reference
            reference = {
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
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_json(
            tmp / "fd_details.json",
            {
                "methods": details,
                "errors": errors,
                "missing": missing,
                "classifier": clf_info,
                "features": ev.features,
                "protocol": {**protocol, "protocol_sha256": protocol_hash},
                "inception": None
                if fid is None
                else {"source": fid.weights_source, "sha256": fid.weights_sha256, "file": str(fid.weights_path)},
                "reference": reference,
                "seed_sets": [[s.start + ev.seed_start, s.stop + ev.seed_start] for s in sets],
                "seed_sets_note": None
                if len(sets) > 1
                else (
                    f"one seed set: {ev.num_samples} images < {2 * 2 * feature_dim} (2 sets of >= 2·{feature_dim}); "
                    "no _mean/_std/_min, only the bootstrap interval"
                ),
                "student": {"dir": str(student), "variant": variant},
                "teacher": {"dir": str(teacher)},
                "device": str(dev),
                "params": params.section("evaluate"),
                "params_hash": params_hash(params.section("evaluate")),
            },
        )
        if log_mlflow:
            _log_to_mlflow(params, student, tmp, metrics)
    return metrics


def _kid_ok(det: dict[str, Any]) -> bool:
    return bool(det.get("kid")) and _finite(det["kid"].get("mean"))


def _fid_preprocess_version() -> str:
    from pipelines.support.fid_reference import PREPROCESS_VERSION

    return PREPROCESS_VERSION


def _state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's tensors (names, dtypes, shapes, bytes in name order): the feature net's identity,
    independent of file metadata (the classifier file also stores its training time)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _stats_sha256(mu: np.ndarray, sigma: np.ndarray) -> str:
    """sha256 of float64 little-endian mu then sigma: the content identity of reference statistics."""
    import hashlib

    h = hashlib.sha256()
    for a in (mu, sigma):
        h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
    return h.hexdigest()


def _log_to_mlflow(params: Params, student: Path, folder: Path, metrics: dict[str, Any]) -> str:
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


# --- entrypoint -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = stage_arg_parser("python -m pipelines.evaluate", __doc__.split("\n\n")[0])
    args = ap.parse_args(argv)
    try:
        # Ray is not used here: skip the Ray-address / GPU / S3 reachability checks of the other stages.
        params = load_params(args.params, check_env=False)
    except ParamsError as e:
        print(f"params error: {e}", file=sys.stderr)
        return 2
    try:
        check_inputs(params, Path(args.data), Path(args.teacher), Path(args.student))
    except InputError as e:
        print(f"input error: {e}", file=sys.stderr)
        return 2
    try:
        metrics = evaluate(
            params,
            args.data,
            args.teacher,
            args.student,
            args.out,
            progress=not args.no_progress,
            device=args.device,
            log_mlflow=not args.no_mlflow,
        )
    except InputError as e:
        print(f"input error: {e}", file=sys.stderr)
        return 2
    main_keys = [k for k in ("fd_nfe1", f"fd_teacher_heun{params.evaluate.teacher_nfe}", "complete") if k in metrics]
    print(
        "evaluate: "
        + ", ".join(
            f"{k}={metrics[k]:.4g}" if not isinstance(metrics[k], bool) else f"{k}={metrics[k]}" for k in main_keys
        )
        + f" -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
