"""Scoring one evaluation method's features: the Fréchet distance with its error bar, KID, and the flat metric names.

For features (N, D) of one method against reference statistics (mu_ref, sigma_ref), cut into K disjoint seed sets
of `set_size` images each (`ctm_core.eval.methods.seed_sets`; docs/evaluation.md#seed-sets):

* K >= 2: the headline `<key>` is the MEAN of the K set FDs and `<key>_std` their sample std (ddof 1): both come from
  the same sets at the same sample size, the size the data floor `fd_heldout_vs_train` is measured at;
* K = 1 (e.g. the Inception protocol's one set of 50,000): `<key>` is the FD of that set and `<key>_std` the std of
  its bootstrap replicates; the basic bootstrap 95 % interval is in the details;
* each FD uses scipy's sqrtm when the set has more images than feature dimensions, else the exact eigh form.

`metrics.json` holds only the headline keys (`headline_keys`: FD ± std at each NFE with γ = 0, the teacher
baselines, the data floor); every other number (other γ, the student's Heun sampler, KID, ratios, minima, ...) goes
to the details file. Also the identities the evaluation protocol records (feature-net tensors, reference statistics)
and the aliases (`fd_nfe{n}` = γ 0; every γ at NFE 1 is the same jump). See docs/evaluation.md.
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
    "headline_keys",
    "kid_summary",
    "state_dict_sha256",
    "stats_sha256",
]

NUM_BOOTSTRAP = 200  # bootstrap replicates per method (64-d features: milliseconds each)
KID_SUBSETS = 20
SUFFIXES = ("", "_std")  # the flat names of one method's FD: headline and its error bar


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
    """Flat metrics {key, key_std} and the details of one method's features (N, D) (module doc).

    `sets`: the K seed sets as slices of the N images, all of one size; `seed` seeds the bootstrap generator (used
    only when K = 1). `prepared`: `PreparedReference` of (mu_ref, sigma_ref), built once per run."""
    from ctm_core.eval.metrics import PreparedReference, fid_error_bars

    sizes = {s.stop - s.start for s in sets}
    if not sets or len(sizes) != 1 or min(sizes) < 2:
        raise ValueError(f"fd_summary: expected >= 1 seed sets of one size >= 2, got sizes {sorted(sizes)}")
    prepared = prepared or PreparedReference.from_stats(mu_ref, sigma_ref)
    one = len(sets) == 1
    per_set = fid_error_bars(
        [feats[s] for s in sets],
        mu_ref,
        sigma_ref,
        num_bootstrap=num_bootstrap if one else 0,
        generator=torch.Generator().manual_seed(seed),
        method="auto",
        prepared=prepared,
    )
    if one:
        reps = np.asarray(per_set.bootstrap_fids)
        std = float(reps.std(ddof=1)) if len(reps) > 1 else math.nan
        flat = {key: per_set.fids[0], f"{key}_std": std}
    else:
        flat = {key: per_set.mean, f"{key}_std": per_set.std}
    dim = feats.shape[1]
    set_size = sizes.pop()
    details = {
        "fd": flat[key],
        "std": flat[f"{key}_std"],
        "how": (
            f"mean and sample std of the FDs of {len(sets)} disjoint seed sets of {set_size} images"
            if not one
            else f"FD of one set of {set_size} images; std of {num_bootstrap} bootstrap replicates"
        ),
        "fd_method": "sqrtm" if set_size > dim else "eigh",
        "seed_sets": {"fds": list(per_set.fids), "min": per_set.min, "set_size": set_size},
        "bootstrap": None
        if not one or num_bootstrap == 0
        else {
            k: v
            for k, v in per_set.to_dict().items()
            if k.startswith("bootstrap") or k in ("confidence", "num_bootstrap")
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
    """In place: `fd_nfe1_over_teacher_heun{n}`, `fd_nfe1_over_teacher_euler{n}`, and `<key>_over_floor` = an FD
    divided by the data floor `fd_heldout_vs_train` (same reference, same sample size), when both exist."""
    for ref_key, name in (
        (f"fd_teacher_heun{teacher_nfe}", f"fd_nfe1_over_teacher_heun{teacher_nfe}"),
        (f"fd_teacher_euler{teacher_euler_nfe}", f"fd_nfe1_over_teacher_euler{teacher_euler_nfe}"),
    ):
        if "fd_nfe1" in metrics and metrics.get(ref_key, 0) > 0:
            metrics[name] = metrics["fd_nfe1"] / metrics[ref_key]
    floor = metrics.get("fd_heldout_vs_train")
    if finite(floor) and floor > 0:
        fds = [k for k, v in metrics.items() if k.startswith("fd_") and "_over_" not in k and finite(v)]
        for k in fds:
            if k != "fd_heldout_vs_train" and not k.endswith("_std"):
                metrics[f"{k}_over_floor"] = metrics[k] / floor


def fd_curve_csv(metrics: dict[str, Any], nfes: Sequence[int], gammas: Sequence[float]) -> str:
    """CSV `gamma,nfe,fd,fd_std`: the γ-sampler at each γ and NFE that has an FD, one row each (long format)."""
    rows = ["gamma,nfe,fd,fd_std"]
    for g in gammas:
        for n in nfes:
            k = f"fd_nfe{n}_gamma{g:g}"
            if k in metrics:
                std = metrics.get(f"{k}_std")
                rows.append(f"{g:g},{n},{metrics[k]:.6g}," + ("" if std is None else f"{std:.6g}"))
    return "\n".join(rows) + "\n"


def headline_keys(nfes: Iterable[int], teacher_nfe: int, teacher_euler_nfe: int) -> list[str]:
    """The keys of metrics.json (what `dvc metrics show` prints), in this order: FD ± std of the student at each NFE
    (γ = 0) and of the teacher's Heun baseline, the teacher's Euler baseline (its std is in the details: it only
    marks the top of the scale), and the data floor."""
    keys = []
    for base in [f"fd_nfe{n}" for n in nfes] + [f"fd_teacher_heun{teacher_nfe}"]:
        keys += [base, f"{base}_std"]
    return keys + [f"fd_teacher_euler{teacher_euler_nfe}", "fd_heldout_vs_train"]


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
