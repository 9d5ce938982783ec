"""Scoring one evaluation method's features: the Fréchet distance with its error bars, KID, and the flat metric names.

For features (N, D) of one method against reference statistics (mu_ref, sigma_ref):

* the FD of all N images (the headline number, e.g. `fd_nfe1`) and a basic bootstrap 95 % interval from
  resamples of the same images (`<key>_ci_low/_ci_high`);
* with K > 1 disjoint seed sets (`ctm_core.eval.methods.seed_sets`): `<key>_mean` ± `<key>_std` (sample std over
  the sets, measured at N/K images, so it overstates the noise of the full-size number) and `<key>_min` (EDM's
  min-of-sets);
* each FD uses scipy's sqrtm when the set has more images than feature dimensions, else the exact eigh form.

Also the identities the evaluation protocol records (feature-net tensors, reference statistics) and the aliases the
stage's metrics file carries (`fd_nfe{n}` = γ 0; every γ at NFE 1 is the same jump). See docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "KID_SUBSETS",
    "NUM_BOOTSTRAP",
    "SUFFIXES",
    "add_nfe_aliases",
    "add_teacher_ratios",
    "fd_curve_csv",
    "fd_summary",
    "finite",
    "finite_metrics",
    "kid_summary",
    "state_dict_sha256",
    "stats_sha256",
]

NUM_BOOTSTRAP = 200  # bootstrap replicates per method (64-d features: milliseconds each)
KID_SUBSETS = 20
SUFFIXES = ("", "_mean", "_std", "_min", "_ci_low", "_ci_high")  # the flat names of one method's FD


def finite(v: Any) -> bool:
    """True for a finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fd_summary(
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
    """Flat metrics (key, _mean, _std, _min, _ci_low, _ci_high) and the details of one method's features (N, D).

    `sets`: the seed sets as slices of the N images; `seed` seeds the bootstrap generator. `prepared`:
    `PreparedReference` of (mu_ref, sigma_ref), built once per run (the reference's square root)."""
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
    return {k: float(v) for k, v in flat.items() if finite(v)}, details


def kid_summary(feats: np.ndarray, ref_feats: np.ndarray | None, seed: int) -> dict[str, float] | None:
    """KID (cubic polynomial kernel) of feats (N, D) against ref_feats (M, D) on KID_SUBSETS subsets of
    min(N, M, 1000) // 2 images; None without reference features (e.g. a fetched npz holds statistics only)."""
    from ctm_core.eval.metrics import kid

    if ref_feats is None:
        return None
    m = min(len(feats), len(ref_feats), 1000) // 2
    if m < 2:
        return None
    r = kid(feats, ref_feats, num_subsets=KID_SUBSETS, subset_size=m, generator=torch.Generator().manual_seed(seed))
    return {"mean": r.mean, "std": r.std, "num_subsets": r.num_subsets, "subset_size": r.subset_size}


def add_nfe_aliases(metrics: dict[str, Any], nfes: Iterable[int], gammas: Iterable[float]) -> None:
    """In place: `fd_nfe{n}<suffix>` = `fd_nfe{n}_gamma0<suffix>`, and at NFE 1 (one jump sigma_max -> sigma_min,
    the same for every γ, sampled once) `fd_nfe1_gamma{g}<suffix>` for every γ."""
    gammas = list(gammas)
    for n in nfes:
        for suffix in SUFFIXES:
            src = f"fd_nfe{n}_gamma0{suffix}"
            if src in metrics:
                metrics[f"fd_nfe{n}{suffix}"] = metrics[src]
                if n == 1:
                    for g in gammas:
                        metrics[f"fd_nfe1_gamma{g:g}{suffix}"] = metrics[src]


def add_teacher_ratios(metrics: dict[str, Any], teacher_nfe: int, teacher_euler_nfe: int) -> None:
    """In place: `fd_nfe1_over_teacher_heun{n}` and `fd_nfe1_over_teacher_euler{n}` when both FDs exist."""
    for ref_key, name in (
        (f"fd_teacher_heun{teacher_nfe}", f"fd_nfe1_over_teacher_heun{teacher_nfe}"),
        (f"fd_teacher_euler{teacher_euler_nfe}", f"fd_nfe1_over_teacher_euler{teacher_euler_nfe}"),
    ):
        if "fd_nfe1" in metrics and metrics.get(ref_key, 0) > 0:
            metrics[name] = metrics["fd_nfe1"] / metrics[ref_key]


def fd_curve_csv(metrics: dict[str, Any], nfes: Sequence[int], gamma: float) -> str:
    """CSV `nfe,fd,fd_std,fd_min,fd_ci_low,fd_ci_high` of the γ-sampler at each NFE that has an FD."""
    rows = ["nfe,fd,fd_std,fd_min,fd_ci_low,fd_ci_high"]
    for n in nfes:
        k = f"fd_nfe{n}_gamma{gamma:g}"
        if k in metrics:
            vals = [metrics.get(f"{k}{s}", "") for s in ("", "_std", "_min", "_ci_low", "_ci_high")]
            rows.append(",".join([str(n)] + [f"{v:.6g}" if v != "" else "" for v in vals]))
    return "\n".join(rows) + "\n"


def finite_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Bools and finite numbers (ints kept, other numbers as float); everything else dropped."""
    return {
        k: (float(v) if not isinstance(v, (bool, int)) else v)
        for k, v in metrics.items()
        if isinstance(v, bool) or finite(v)
    }


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's tensors (names, dtypes, shapes, bytes in name order): the feature net's identity,
    independent of file metadata (the classifier file also stores its training time)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def stats_sha256(mu: np.ndarray, sigma: np.ndarray) -> str:
    """sha256 of float64 little-endian mu then sigma: the content identity of reference statistics."""
    h = hashlib.sha256()
    for a in (mu, sigma):
        h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
    return h.hexdigest()
