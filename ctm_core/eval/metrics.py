"""Sample-quality metrics on feature vectors: Fréchet distance (FID), KID, error bars, reference statistics.

Everything here works on features ``f: (N, D)`` that some detector produced (the FID Inception-v3 of
``ctm_core.eval.inception`` for 8-bit RGB data, the small classifier of ``ctm_core.eval.classifier`` for the
offline digits default). Statistics are always computed in float64.

Protocol (docs/edm.md#a32-fid-references, docs/edm.md#a33-fid-protocol; docs/ctm.md#5-evaluation):
    * images are what the generator would save: ``uint8 = clip(x·127.5 + 128, 0, 255)`` (``images_to_uint8``);
    * ``mu = Σf / n``, ``sigma = (Σ fᵀf − n·mu·muᵀ) / (n − 1)`` in float64, unbiased (EDM fid.py:59-77);
    * ``FID = ‖mu − mu_ref‖² + Tr(Σ + Σ_ref − 2·sqrtm(Σ·Σ_ref))``, scipy's sqrtm, real part (EDM fid.py:82-86);
    * 50,000 generated images against the 50,000-image training-set statistics (EDM fid.py:116).

Reference statistics use EDM's npz layout (``np.savez(mu=(D,) float64, sigma=(D, D) float64)``, EDM fid.py:150-155)
rather than the project's safetensors folders, so that EDM's own reference files (e.g. cifar10-32x32.npz) read the
same way; they are read with ``allow_pickle=False``: a statistics file can never execute code.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import pathlib
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.linalg
import torch

from ctm_core.io.artifact import atomic_write_bytes
from ctm_core.io.hashing import sha256_bytes

__all__ = [
    "FIDErrorBars",
    "KIDResult",
    "PreparedReference",
    "ReferenceStats",
    "feature_statistics",
    "fid_error_bars",
    "fid_from_features",
    "frechet_distance",
    "images_to_levels",
    "images_to_uint8",
    "kid",
    "load_reference_stats",
    "save_reference_stats",
]

ArrayLike = np.ndarray | torch.Tensor


def _as_features(name: str, features: ArrayLike) -> np.ndarray:
    """Return ``features`` as a C-contiguous float64 ndarray of shape (N, D), validating shape and finiteness."""
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    features = np.asarray(features)
    if features.dtype == object or not (
        np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)
    ):
        raise TypeError(f"{name}: expected a real numeric array, got dtype {features.dtype}")
    if features.ndim != 2:
        raise ValueError(f"{name}: expected shape (N, D), got {tuple(features.shape)}")
    features = np.ascontiguousarray(features, dtype=np.float64)
    if not np.isfinite(features).all():
        raise ValueError(f"{name}: contains {int((~np.isfinite(features)).sum())} non-finite values")
    return features


# ---------------------------------------------------------------------------------------------------------------------
# Image quantisation


def images_to_uint8(x: torch.Tensor, convention: str = "edm") -> torch.Tensor:
    """Map model outputs ``x: (B, C, H, W)`` in [-1, 1] to the uint8 images a generator would save.

    ``convention="edm"`` (default, used for every FID here): ``clip(x·127.5 + 128, 0, 255)`` then a cast to uint8,
    computed in ``x``'s own dtype, exactly as EDM generate.py:297. The cast truncates, so with the +128 offset
    (= +127.5 + 0.5) this is round-half-up of ``(x + 1)/2 · 255``: the level k is produced for
    ``x ∈ [(k − 128)/127.5, (k − 127)/127.5)``; ``x = 0`` maps to 128, ``x = ±1`` to 255 / 0.

    ``convention="ctm"``: the CTM repositories' ``clamp((x + 1)·127.5, 0, 255)`` and uint8 cast (C image_sample.py:161,
    docs/ctm.md#3-sampling), i.e. **truncation** without the +0.5: every pixel sits on average half a level lower
    (``x = 0`` → 127), and only ``x = 1`` reaches 255. Use it only to reproduce numbers computed that way.

    Pass the sampler's output dtype unchanged (EDM's is float64) so that values at bin edges round as EDM's do.
    Non-finite inputs raise ``ValueError`` (a diverged sampler must not be scored as black pixels).
    Returns a uint8 tensor of the same shape.
    """
    if convention not in ("edm", "ctm"):
        raise ValueError(f"images_to_uint8: convention must be 'edm' or 'ctm', got {convention!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"images_to_uint8: expected a floating-point tensor, got {got}")
    if not torch.isfinite(x).all():
        raise ValueError(f"images_to_uint8: input contains {int((~torch.isfinite(x)).sum())} non-finite values")
    if convention == "edm":
        y = x * 127.5 + 128
    else:
        y = (x + 1) * 127.5
    return y.clip(0, 255).to(torch.uint8)


def images_to_levels(x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Quantise ``x: (B, C, H, W)`` in [-1, 1] to integer levels 0..num_levels-1 (uint8 if it fits, else int64).

    The same rounding as ``images_to_uint8(convention="edm")`` generalised to ``L = num_levels`` levels:
    ``floor(clip((x + 1)/2 · (L − 1) + 0.5, 0, L − 1))`` in float64. It inverts the data mapping
    ``level / (L − 1) · 2 − 1`` used by the prepared datasets (e.g. sklearn digits, L = 17); for L = 256 it equals
    EDM's ``x·127.5 + 128`` up to float64 rounding.
    """
    if not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"images_to_levels: num_levels must be an int >= 2, got {num_levels!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("images_to_levels: expected a floating-point tensor")
    if not torch.isfinite(x).all():
        raise ValueError(f"images_to_levels: input contains {int((~torch.isfinite(x)).sum())} non-finite values")
    y = (x.to(torch.float64) + 1) / 2 * (num_levels - 1) + 0.5
    y = torch.floor(y.clip(0, num_levels - 1))
    return y.to(torch.uint8 if num_levels <= 256 else torch.int64)


# ---------------------------------------------------------------------------------------------------------------------
# Statistics and Fréchet distance


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of ``features: (N, D)`` in float64.

    Returns ``mu: (D,)`` and ``sigma: (D, D)`` with ``sigma = Σ (f − mu)ᵀ(f − mu) / (N − 1)``. This is the same
    estimator as EDM fid.py:59-77 (which accumulates ``(Σ fᵀf − n·mu·muᵀ)/(n − 1)`` batch by batch) and as
    ``np.cov(rowvar=False)`` in pytorch-fid (src/pytorch_fid/fid_score.py, ``calculate_activation_statistics``);
    the centred two-pass form avoids the cancellation of the one-pass sum in float64.
    """
    f = _as_features("features", features)
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"feature_statistics: need at least 2 samples for an unbiased covariance, got N={n}")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (n - 1)
    sigma = (sigma + sigma.T) / 2  # exact symmetry (matmul rounding can differ by an ulp)
    return mu, sigma


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6, method: str = "sqrtm"
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017; Dowson & Landau 1982).

    ``d² = ‖mu1 − mu2‖² + Tr(sigma1 + sigma2 − 2·sqrtm(sigma1 @ sigma2))`` with ``scipy.linalg.sqrtm``, real part
    (EDM fid.py:82-86). mu: (D,), sigma: (D, D); all arithmetic in float64.

    Numerical safeguards follow pytorch-fid (src/pytorch_fid/fid_score.py, ``calculate_frechet_distance``): if
    sqrtm returns non-finite values (a near-singular product, e.g. fewer samples than dimensions) a warning is issued
    and ``eps·I`` is added to both covariances before retrying; an imaginary residue is dropped only if the diagonal's
    imaginary part is below 1e-3 in absolute value, otherwise ``ValueError`` is raised.

    ``method="sqrtm"`` (default) is the protocol above. ``method="eigh"`` computes the same trace as
    ``Tr (sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2}`` from two symmetric eigendecompositions (eigenvalues clipped at
    0); for valid covariances it agrees with sqrtm to ~1e-10 relative and is several times faster at D = 2048
    (used for bootstrap replicates). It assumes symmetric PSD covariances.
    """
    if method not in ("sqrtm", "eigh"):
        raise ValueError(f"frechet_distance: method must be 'sqrtm' or 'eigh', got {method!r}")
    mu1 = np.atleast_1d(np.asarray(_to_numpy(mu1), dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(_to_numpy(mu2), dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(_to_numpy(sigma1), dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(_to_numpy(sigma2), dtype=np.float64))
    D = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != (D,):
        raise ValueError(f"frechet_distance: mu1 and mu2 must both have shape (D,), got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != (D, D) or sigma2.shape != (D, D):
        raise ValueError(
            f"frechet_distance: sigma1 and sigma2 must have shape {(D, D)}, got {sigma1.shape} and {sigma2.shape}"
        )
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"frechet_distance: {name} contains non-finite values")

    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product(_psd_sqrt(sigma1), sigma2)
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"frechet_distance: sqrtm(sigma1 @ sigma2) is not finite (near-singular product); "
            f"adding eps={eps} to the diagonal of both covariances",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(D) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: sqrtm has a significant imaginary component "
                f"(max |imag| = {np.max(np.abs(covmean.imag)):.3g}); covariances are not valid"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # scipy 1.17 warns that sqrtm's `disp` argument is deprecated (removal in 1.18); the plain call returns the matrix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's own "singular matrix" notice; we check finiteness
        return scipy.linalg.sqrtm(a)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding-level eigenvalues clipped to 0)."""
    w, V = np.linalg.eigh((sigma + sigma.T) / 2)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def _trace_sqrt_product(sigma1_half: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr sqrtm(Σ1 Σ2) = Tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}: Σ1Σ2 is similar to the symmetric PSD middle matrix."""
    M = sigma1_half @ sigma2 @ sigma1_half
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0, None)).sum())


def _to_numpy(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a)


def fid_from_features(features: ArrayLike, mu_ref: ArrayLike, sigma_ref: ArrayLike, *, method: str = "sqrtm") -> float:
    """FID of generated ``features: (N, D)`` against reference statistics (mu_ref: (D,), sigma_ref: (D, D)).

    ``method``: ``"sqrtm"`` (the protocol, default), ``"eigh"`` or ``"auto"`` (see ``PreparedReference.fid``).
    """
    if method == "sqrtm":
        mu, sigma = feature_statistics(features)
        return frechet_distance(mu, sigma, mu_ref, sigma_ref)
    return PreparedReference.from_stats(mu_ref, sigma_ref).fid(features, method=method)


FID_METHODS = ("sqrtm", "eigh", "auto")


@dataclasses.dataclass(frozen=True)
class PreparedReference:
    """Reference statistics with the symmetric root of ``sigma`` computed once, for many FIDs against them.

    ``fid(features, method)``:
        * ``"sqrtm"``: ``frechet_distance`` on the features' statistics: the protocol (EDM fid.py:82-86).
        * ``"eigh"``: the same number from symmetric eigendecompositions only,
          ``Tr sqrtm(Σ_g Σ_r) = Tr (R Σ_g R)^{1/2}`` with ``R = Σ_r^{1/2}`` (``Σ_g Σ_r`` is similar to that PSD
          matrix). With ``N − 1 < D`` samples ``Σ_g = Cᵀ C / (N − 1)`` (C: centred features, N × D) has rank < D,
          and ``Σ_g Σ_r = Cᵀ (C Σ_r) / (N − 1)`` has the same non-zero eigenvalues as the small symmetric PSD
          ``C Σ_r Cᵀ / (N − 1)`` (N × N; AB and BA share them), so the cost is one N × D × D product: no D × D
          eigendecomposition, and no scipy sqrtm of a singular product (minutes at D = 2048 on 2 cores, and
          ill-conditioned there). ``sigma_half`` is computed on first use only (N > D or the bootstrap).
        * ``"auto"``: ``"sqrtm"`` when ``N > D`` (full-rank covariance: the protocol, e.g. 50,000 images at D =
          2048), else ``"eigh"``.
    """

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    trace: float

    @classmethod
    def from_stats(cls, mu: ArrayLike, sigma: ArrayLike) -> PreparedReference:
        mu = np.asarray(_to_numpy(mu), dtype=np.float64)
        sigma = np.asarray(_to_numpy(sigma), dtype=np.float64)
        _check_stats("PreparedReference", mu, sigma)
        return cls(mu=mu, sigma=sigma, trace=float(np.trace(sigma)))

    @functools.cached_property
    def sigma_half(self) -> np.ndarray:
        """(D, D) symmetric PSD root of sigma (one eigendecomposition, computed once)."""
        return _psd_sqrt(self.sigma)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def fid(self, features: ArrayLike, method: str = "auto") -> float:
        """FID of ``features: (N, D)``, N >= 2, against these statistics (class docstring for ``method``)."""
        if method not in FID_METHODS:
            raise ValueError(f"PreparedReference.fid: method must be one of {FID_METHODS}, got {method!r}")
        f = _as_features("features", features)
        n, d = f.shape
        if d != self.dim:
            raise ValueError(f"PreparedReference.fid: features have D={d}, the reference has D={self.dim}")
        if n < 2:
            raise ValueError(f"PreparedReference.fid: need at least 2 samples, got N={n}")
        if method == "auto":
            method = "sqrtm" if n > d else "eigh"
        mu = f.mean(axis=0)
        if method == "sqrtm":
            _, sigma = feature_statistics(f)
            return frechet_distance(mu, sigma, self.mu, self.sigma)
        centred = f - mu
        diff = mu - self.mu
        tr_sigma = float((centred * centred).sum()) / (n - 1)
        if n - 1 < d:  # low rank: the non-zero eigenvalues are those of C Σ_r Cᵀ / (N − 1), N × N
            small = centred @ self.sigma @ centred.T / (n - 1)
            ev = np.linalg.eigvalsh((small + small.T) / 2)
        else:
            sigma = centred.T @ centred / (n - 1)
            m = self.sigma_half @ ((sigma + sigma.T) / 2) @ self.sigma_half
            ev = np.linalg.eigvalsh((m + m.T) / 2)
        tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
        return float(diff @ diff + tr_sigma + self.trace - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------------------------------------
# KID


@dataclasses.dataclass(frozen=True)
class KIDResult:
    """KID estimate: mean and (population, ddof=0) standard deviation of the per-subset unbiased MMD² values."""

    mean: float
    std: float
    num_subsets: int
    subset_size: int


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD² with k(a, b) = (gamma·aᵀb + coef0)^degree; x, y: (m, D) (Bińkowski et al. 2018, eq. 3)."""
    m = x.shape[0]
    k_xx = (x @ x.T * gamma + coef0) ** degree  # (m, m)
    k_yy = (y @ y.T * gamma + coef0) ** degree  # (m, m)
    k_xy = (x @ y.T * gamma + coef0) ** degree  # (m, m)
    sum_xx = k_xx.sum() - np.trace(k_xx)  # off-diagonal terms only
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid(
    features1: ArrayLike,
    features2: ArrayLike,
    num_subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
    *,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
) -> KIDResult:
    """Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs").

    For each of ``num_subsets`` subsets, draw ``subset_size`` rows of each feature set without replacement and take the
    unbiased MMD² estimate with the cubic polynomial kernel ``k(a, b) = (aᵀb / D + 1)³``; report the mean and the
    standard deviation (ddof=0) over subsets. Defaults and estimator follow torch-fidelity
    (torch_fidelity/metric_kid.py: ``mmd2(mmd_est="unbiased")``, ``polynomial_kernel(gamma=1/D, coef0=1, degree=3)``,
    100 subsets of 1000) and clean-fid (cleanfid/fid.py ``kernel_distance``, same kernel and estimator). The subset
    indices come from the injected torch ``generator`` (required), so values differ from those libraries' numpy RNG
    streams but not in expectation. Unlike clean-fid, a ``subset_size`` larger than either set is an error
    (as in torch-fidelity), not silently reduced.

    features1: (N1, D), features2: (N2, D). KID is unbiased, so it can be slightly negative for equal distributions.
    """
    if generator is None:
        raise ValueError("kid: pass generator= (a seeded torch.Generator); the global RNG is never used")
    f1 = _as_features("features1", features1)
    f2 = _as_features("features2", features2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"kid: feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
    if not isinstance(num_subsets, int) or num_subsets < 1:
        raise ValueError(f"kid: num_subsets must be an int >= 1, got {num_subsets!r}")
    if not isinstance(subset_size, int) or subset_size < 2:
        raise ValueError(f"kid: subset_size must be an int >= 2, got {subset_size!r}")
    if subset_size > min(len(f1), len(f2)):
        raise ValueError(
            f"kid: subset_size={subset_size} exceeds the number of samples (features1: {len(f1)}, "
            f"features2: {len(f2)}); pass a smaller subset_size"
        )
    gamma = 1.0 / f1.shape[1] if gamma is None else float(gamma)
    mmds = np.empty(num_subsets)
    for i in range(num_subsets):
        idx1 = torch.randperm(len(f1), generator=generator)[:subset_size].numpy()
        idx2 = torch.randperm(len(f2), generator=generator)[:subset_size].numpy()
        mmds[i] = _polynomial_mmd2_unbiased(f1[idx1], f2[idx2], degree, gamma, coef0)
    return KIDResult(mean=float(mmds.mean()), std=float(mmds.std()), num_subsets=num_subsets, subset_size=subset_size)


# ---------------------------------------------------------------------------------------------------------------------
# Error bars


@dataclasses.dataclass(frozen=True)
class FIDErrorBars:
    """FID over several disjoint seed sets plus a bootstrap interval.

    Attributes:
        fids: FID of each seed set against the same reference statistics, in input order.
        mean: mean of ``fids`` (what SiD reports, over 10 sets).
        std: sample standard deviation of ``fids`` (ddof=1; NaN for a single set): the run-to-run noise a
            promotion decision must beat.
        min: minimum of ``fids`` (what EDM reports, over 3 sets of 50k: README.md:136, docs/edm.md#a33-fid-protocol).
        bootstrap_low, bootstrap_high: basic (pivotal) bootstrap interval, at level ``confidence``, for the Fréchet
            distance between the generator's feature distribution and the fixed reference statistics in the limit of
            many generated samples; from resampling the rows of ``feature_sets[0]``.
        bootstrap_bias: mean bootstrap replicate minus the point estimate of ``feature_sets[0]``: the estimated
            finite-N upward bias of the plug-in FID at this sample count.
        bootstrap_fids: the sorted bootstrap replicates.
        num_samples: rows per seed set.
    """

    fids: tuple[float, ...]
    mean: float
    std: float
    min: float
    bootstrap_low: float
    bootstrap_high: float
    bootstrap_bias: float
    confidence: float
    num_bootstrap: int
    bootstrap_fids: tuple[float, ...]
    num_samples: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the replicate list)."""
        d = dataclasses.asdict(self)
        d.pop("bootstrap_fids")
        d["fids"] = list(self.fids)
        d["num_samples"] = list(self.num_samples)
        return d


def fid_error_bars(
    feature_sets: Sequence[ArrayLike],
    mu_ref: ArrayLike,
    sigma_ref: ArrayLike,
    *,
    num_bootstrap: int = 50,
    confidence: float = 0.95,
    generator: torch.Generator | None = None,
    method: str = "sqrtm",
    prepared: PreparedReference | None = None,
) -> FIDErrorBars:
    """FID mean ± std and min over disjoint seed sets, and a bootstrap interval.

    ``feature_sets``: K arrays ``(N_k, D)``, each the features of images generated from a disjoint range of seeds
    (EDM: seeds 0-49999, 50000-99999, 100000-149999). Papers differ in what they report: EDM the **minimum of 3**
    (EDM README.md:136), SiD the **mean of 10**; this returns both, plus the std (ddof=1), so the choice is explicit.

    Bootstrap: ``num_bootstrap`` times, resample the rows of ``feature_sets[0]`` with replacement (indices from the
    injected ``generator``, required when ``num_bootstrap > 0``) and recompute the FID against the fixed reference.
    The plug-in FID is biased upwards at finite N (a bias of order 1/N; Chong & Forsyth 2020, "Effectively Unbiased
    FID") and the replicates carry that bias once more, so the plain percentile interval of the replicates is
    shifted away from the truth (in a 20-d Gaussian test with N = 1000 it never covered it). The interval returned
    is the basic bootstrap interval ``[2·F − q_hi, 2·F − q_lo]`` (Davison & Hinkley 1997, "basic bootstrap"
    limits) with ``F`` the point estimate and ``q`` the replicate quantiles, which corrects that bias to first
    order (it may extend below 0). It targets the large-N FID of the generator against the reference statistics,
    and covers the sampling noise of the generated set only (the reference statistics are taken as exact); for
    comparing runs at the protocol's fixed N use the seed-set std. Each replicate costs one covariance and one
    symmetric eigendecomposition (``method="eigh"`` of ``frechet_distance``; seconds at D = 2048).

    ``method`` computes the per-set FIDs (``PreparedReference.fid``: ``"sqrtm"`` = the protocol, ``"auto"`` = sqrtm
    when N > D else the exact eigh form); the replicates always use the eigh form. ``prepared`` (the same mu_ref /
    sigma_ref with their root computed once) saves one D × D eigendecomposition per call.
    """
    if method not in FID_METHODS:
        raise ValueError(f"fid_error_bars: method must be one of {FID_METHODS}, got {method!r}")
    if len(feature_sets) < 1:
        raise ValueError("fid_error_bars: feature_sets must contain at least one (N, D) array")
    if not 0 < confidence < 1:
        raise ValueError(f"fid_error_bars: confidence must be in (0, 1), got {confidence!r}")
    if not isinstance(num_bootstrap, int) or num_bootstrap < 0:
        raise ValueError(f"fid_error_bars: num_bootstrap must be an int >= 0, got {num_bootstrap!r}")
    if num_bootstrap > 0 and generator is None:
        raise ValueError("fid_error_bars: pass generator= (a seeded torch.Generator) for the bootstrap")
    sets = [_as_features(f"feature_sets[{k}]", f) for k, f in enumerate(feature_sets)]
    mu_ref = np.asarray(_to_numpy(mu_ref), dtype=np.float64)
    sigma_ref = np.asarray(_to_numpy(sigma_ref), dtype=np.float64)
    if prepared is not None and not (np.array_equal(prepared.mu, mu_ref) and np.array_equal(prepared.sigma, sigma_ref)):
        raise ValueError("fid_error_bars: prepared= holds other statistics than mu_ref / sigma_ref")
    if method == "sqrtm":
        fids = tuple(fid_from_features(f, mu_ref, sigma_ref) for f in sets)
    else:
        prepared = prepared or PreparedReference.from_stats(mu_ref, sigma_ref)
        fids = tuple(prepared.fid(f, method=method) for f in sets)
    arr = np.asarray(fids)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else math.nan

    f0 = sets[0]
    n = f0.shape[0]
    boot = np.empty(num_bootstrap)
    if num_bootstrap > 0:
        # Replicates use the eigh form of the trace with the reference root computed once (PreparedReference).
        prepared = prepared or PreparedReference.from_stats(mu_ref, sigma_ref)
    for b in range(num_bootstrap):
        idx = torch.randint(0, n, (n,), generator=generator).numpy()
        boot[b] = prepared.fid(f0[idx], method="eigh")
    boot.sort()
    if num_bootstrap > 0:
        alpha = 1 - confidence
        q_lo, q_hi = (float(v) for v in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
        low, high = 2 * fids[0] - q_hi, 2 * fids[0] - q_lo
        bias = float(boot.mean()) - fids[0]
    else:
        low = high = bias = math.nan
    return FIDErrorBars(
        fids=fids,
        mean=float(arr.mean()),
        std=std,
        min=float(arr.min()),
        bootstrap_low=low,
        bootstrap_high=high,
        bootstrap_bias=bias,
        confidence=float(confidence),
        num_bootstrap=num_bootstrap,
        bootstrap_fids=tuple(float(v) for v in boot),
        num_samples=tuple(int(f.shape[0]) for f in sets),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Reference statistics files


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """Reference feature statistics: mu (D,) float64, sigma (D, D) float64, free-form meta, file sha256, and the
    number of images they summarise when the file records it (``num_images`` entry; EDM's files do not)."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict[str, Any]
    sha256: str
    num_images: int | None = None


def save_reference_stats(
    path: str | os.PathLike,
    mu: ArrayLike,
    sigma: ArrayLike,
    meta: dict[str, Any] | None = None,
    *,
    num_images: int | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> str:
    """Write reference statistics in EDM's npz layout (``mu``, ``sigma``; EDM fid.py:150-155), atomically.

    ``meta`` (JSON-able: detector, dataset hash, sample count, ...) is stored as one extra string entry ``meta_json``
    (a plain unicode array, no pickle); ``num_images`` as an int64 scalar entry ``num_images``; ``extra`` as further
    numeric arrays (e.g. a feature subset for KID). Readers of EDM's format that only ask for ``mu``/``sigma`` are
    unaffected. The zip members carry a fixed timestamp (``np.savez`` stamps the current time), so the same
    statistics always give the same bytes and the same sha256. The file is written to a temporary name in the same
    folder, fsynced and renamed over ``path``. Returns the sha256 of the written file.
    """
    mu = np.asarray(_to_numpy(mu), dtype=np.float64)
    sigma = np.asarray(_to_numpy(sigma), dtype=np.float64)
    _check_stats("save_reference_stats", mu, sigma)
    entries: dict[str, np.ndarray] = {
        "mu": mu,
        "sigma": sigma,
        "meta_json": np.array(json.dumps(meta or {}, sort_keys=True)),
    }
    if num_images is not None:
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 2:
            raise ValueError(f"save_reference_stats: num_images must be an int >= 2, got {num_images!r}")
        entries["num_images"] = np.array(int(num_images), dtype=np.int64)
    for name, arr in (extra or {}).items():
        arr = np.asarray(arr)
        if name in entries or not name.isidentifier():
            raise ValueError(f"save_reference_stats: bad or reserved extra entry name {name!r}")
        if not (np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)):
            raise ValueError(f"save_reference_stats: extra entry {name!r} must be numeric, got {arr.dtype}")
        entries[name] = arr
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in entries.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)  # keeps 0-d arrays 0-d
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    data = buf.getvalue()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_reference_stats(path: str | os.PathLike, expected_sha256: str | None = None) -> ReferenceStats:
    """Read reference statistics written by ``save_reference_stats`` or EDM's ``fid.py ref`` (e.g. cifar10-32x32.npz).

    The file's sha256 is checked against ``expected_sha256`` (if given) before anything is parsed; the npz is opened
    with ``allow_pickle=False``, so an object array raises instead of being unpickled. ``mu`` must be (D,) and
    ``sigma`` (D, D), real, finite and symmetric.
    """
    path = pathlib.Path(path)
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ValueError(f"load_reference_stats: sha256 of {path} is {digest}, expected {expected_sha256}")
    if not data.startswith(b"PK\x03\x04"):  # npz = zip; a .npy, pickle or HTML error page is refused here
        raise ValueError(f"load_reference_stats: {path} is not an npz (zip) file")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            keys = set(npz.files)
            if not {"mu", "sigma"} <= keys:
                raise ValueError(f"load_reference_stats: {path} must contain 'mu' and 'sigma', found {sorted(keys)}")
            mu = npz["mu"]
            sigma = npz["sigma"]
            meta_json = str(npz["meta_json"][()]) if "meta_json" in keys else "{}"
            num_images = int(npz["num_images"][()]) if "num_images" in keys else None
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise ValueError(f"load_reference_stats: {path} holds a pickled object array, refused: {e}") from e
        raise
    except (zipfile.BadZipFile, EOFError, OSError) as e:  # truncated / not an npz at all
        raise ValueError(f"load_reference_stats: {path} is not a readable npz file ({type(e).__name__}: {e})") from e
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise ValueError(f"load_reference_stats: mu/sigma must be floating point, got {mu.dtype} / {sigma.dtype}")
    mu = mu.astype(np.float64)
    sigma = sigma.astype(np.float64)
    _check_stats(f"load_reference_stats({path})", mu, sigma)
    return ReferenceStats(mu=mu, sigma=sigma, meta=json.loads(meta_json), sha256=digest, num_images=num_images)


def _check_stats(where: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{where}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{where}: mu/sigma contain non-finite values")
    scale = max(float(np.abs(sigma).max(initial=0.0)), 1e-300)
    if float(np.abs(sigma - sigma.T).max(initial=0.0)) > 1e-8 * scale:
        raise ValueError(f"{where}: sigma is not symmetric")
