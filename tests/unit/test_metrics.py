"""Tests for ctm_core.eval.metrics: Fréchet distance vs an independent implementation and closed forms, KID, error bars,
uint8 quantisation semantics and reference-statistics files."""

from __future__ import annotations

import math
import pathlib
import zipfile

import numpy as np
import pytest
import torch

from ctm_core.eval import metrics
from ctm_core.eval.metrics import (
    feature_statistics,
    fid_error_bars,
    fid_from_features,
    frechet_distance,
    images_to_levels,
    images_to_uint8,
    kid,
    load_reference_stats,
    save_reference_stats,
)

SEED = 1234


def _rng(seed: int = SEED) -> np.random.Generator:
    return np.random.default_rng(seed)


def _random_spd(rng: np.random.Generator, D: int, cond: float = 10.0) -> np.ndarray:
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    eig = np.geomspace(1.0, 1.0 / cond, D)
    return (Q * eig) @ Q.T


def _frechet_eigh(mu1, sigma1, mu2, sigma2) -> float:
    """Independent Fréchet distance: Tr sqrtm(Σ1Σ2) = Tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}, via symmetric eigh only."""
    w, V = np.linalg.eigh(sigma1)
    s1_half = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    M = s1_half @ sigma2 @ s1_half
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0, None)).sum()
    d = mu1 - mu2
    return float(d @ d + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _frechet_scipy(f1: np.ndarray, f2: np.ndarray) -> float:
    """Independent FID from raw features: np.cov statistics and scipy.linalg.sqrtm of the product (the textbook form,
    Heusel et al. 2017), real part; no code shared with ctm_core.eval.metrics."""
    import scipy.linalg

    m1, m2 = f1.mean(axis=0), f2.mean(axis=0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    return float(np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(np.real(covmean)))


# ------------------------------------------------------------------------------------------------ Fréchet distance


@pytest.mark.parametrize("D,N", [(16, 200), (64, 500)])
def test_fid_matches_independent_scipy_sqrtm_implementation(D, N):
    from ctm_core.eval.metrics import PreparedReference

    rng = _rng(11)
    f1 = rng.standard_normal((N, D)) @ rng.standard_normal((D, D)) * 0.3 + rng.standard_normal(D)
    f2 = rng.standard_normal((N, D)) * rng.uniform(0.5, 2.0, D) + 0.2
    want = _frechet_scipy(f1, f2)
    mu2, s2 = feature_statistics(f2)
    assert fid_from_features(f1, mu2, s2) == pytest.approx(want, rel=1e-6)
    prep = PreparedReference.from_stats(mu2, s2)
    for method in ("sqrtm", "eigh", "auto"):
        assert prep.fid(f1, method=method) == pytest.approx(want, rel=1e-6), method
        assert fid_from_features(f1, mu2, s2, method=method) == pytest.approx(want, rel=1e-6), method


def test_prepared_reference_low_rank_path_fewer_samples_than_dims():
    """N − 1 < D: the N × N Gram form equals the full D × D eigh form; finite, no sqrtm of a singular product."""
    from ctm_core.eval.metrics import PreparedReference

    rng = _rng(5)
    D = 256
    mu_r, s_r = feature_statistics(rng.standard_normal((400, D)) * 0.5)
    prep = PreparedReference.from_stats(mu_r, s_r)
    for n in (2, 8, 100):
        f = rng.standard_normal((n, D)) + 0.1
        got = prep.fid(f, method="auto")
        mu, s = feature_statistics(f)
        # the full D × D eigh form adds sqrt(|rounding|) ~ 1e-7 per null direction: agreement to ~1e-7 relative
        assert np.isfinite(got) and got == pytest.approx(_frechet_eigh(mu, s, mu_r, s_r), rel=1e-6), n
        # exact for rank-deficient Σ: Tr (R Σ R)^{1/2} is the nuclear norm of C R / sqrt(n − 1) (an SVD)
        w, V = np.linalg.eigh(s_r)
        cr = (f - f.mean(axis=0)) @ ((V * np.sqrt(np.clip(w, 0, None))) @ V.T) / np.sqrt(n - 1)
        d = f.mean(axis=0) - mu_r
        exact = d @ d + np.trace(s) + np.trace(s_r) - 2 * np.linalg.svd(cr, compute_uv=False).sum()
        assert got == pytest.approx(exact, rel=1e-9), n
    f = rng.standard_normal((8, D))
    assert abs(PreparedReference.from_stats(*feature_statistics(f)).fid(f, method="eigh")) < 1e-8 * np.trace(
        feature_statistics(f)[1]
    )  # a set against its own (rank-7) statistics
    with pytest.raises(ValueError, match="D=3"):
        prep.fid(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="method"):
        prep.fid(f, method="svd")


def test_fid_error_bars_auto_method_with_few_samples_in_high_dimension():
    """2048-d features with 6 images (the tiny Inception test regime): finite FIDs, bootstrap and seed sets."""
    from ctm_core.eval.metrics import PreparedReference

    rng = _rng(9)
    D = 2048
    ref_f = np.abs(rng.standard_normal((12, D)))
    mu_r, s_r = feature_statistics(ref_f)
    prep = PreparedReference.from_stats(mu_r, s_r)
    sets = [np.abs(rng.standard_normal((6, D))) + 0.05 for _ in range(2)]
    r = fid_error_bars(
        sets, mu_r, s_r, num_bootstrap=4, generator=torch.Generator().manual_seed(0), method="auto", prepared=prep
    )
    assert all(np.isfinite(r.fids)) and np.isfinite(r.bootstrap_low) and np.isfinite(r.std)
    assert "sigma_half" not in vars(prep)  # N < D everywhere: no 2048² eigendecomposition was needed
    # the definition Tr sqrtm(Σ_g Σ_r) = Σ sqrt(eig(Σ_g Σ_r)) over its (≤ 5) non-zero eigenvalues, here from numpy's
    # general (non-symmetric) eigensolver on (C Σ_r) Cᵀ / 5, which shares them
    f = sets[0]
    c = f - f.mean(axis=0)
    ev = np.linalg.eigvals((c @ s_r) @ c.T / 5)  # (6, 6), general (non-symmetric) eigensolver
    d = f.mean(axis=0) - mu_r
    want = d @ d + (c * c).sum() / 5 + np.trace(s_r) - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum()
    assert r.fids[0] == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="prepared"):
        fid_error_bars(sets, mu_r * 2, s_r, num_bootstrap=0, method="auto", prepared=prep)


@pytest.mark.parametrize("D,N", [(8, 100), (32, 300)])
def test_frechet_matches_independent_eigh_implementation(D, N):
    rng = _rng()
    f1 = rng.standard_normal((N, D)) @ rng.standard_normal((D, D)) + rng.standard_normal(D)
    f2 = rng.standard_normal((N, D)) * rng.uniform(0.5, 2.0, D) + 0.3
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = _frechet_eigh(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)
    # symmetric in its two arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-6)
    # the eigh fast path (used by bootstrap replicates) agrees with the sqrtm protocol
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(ours, rel=1e-9)


def test_frechet_singular_covariance_fewer_samples_than_dims():
    rng = _rng()
    f1, f2 = rng.standard_normal((40, 64)), rng.standard_normal((40, 64)) * 1.3 + 0.1
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_frechet_eigh(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_of_a_set_against_itself_is_zero():
    rng = _rng()
    f = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16)) * 3.0
    mu, sigma = feature_statistics(f)
    scale = np.trace(sigma)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * scale
    assert abs(fid_from_features(f, mu, sigma)) < 1e-6 * scale


def test_frechet_equal_covariance_gives_squared_mean_shift():
    rng = _rng()
    D = 12
    sigma = _random_spd(rng, D)
    mu1 = rng.standard_normal(D)
    delta = rng.standard_normal(D) * 0.7
    expected = float(delta @ delta)
    assert frechet_distance(mu1, sigma, mu1 + delta, sigma) == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_frechet_diagonal_covariances_closed_form():
    rng = _rng()
    D = 10
    a, b = rng.uniform(0.1, 4.0, D), rng.uniform(0.1, 4.0, D)
    mu1, mu2 = rng.standard_normal(D), rng.standard_normal(D)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    for method in ("sqrtm", "eigh"):
        got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
        assert got == pytest.approx(expected, rel=1e-10), method


def test_frechet_accepts_torch_and_validates_shapes():
    rng = _rng()
    a = rng.uniform(0.5, 2, 4)
    got = frechet_distance(torch.zeros(4), torch.diag(torch.tensor(a)), np.ones(4), np.eye(4))
    assert got == pytest.approx(4 + ((np.sqrt(a) - 1) ** 2).sum(), rel=1e-10)
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        frechet_distance(np.zeros(4), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


def test_frechet_singular_product_warns_and_uses_eps_offset(monkeypatch):
    # Force the first sqrtm to fail (non-finite) as a near-singular product can; the retry adds eps·I (pytorch-fid).
    real_sqrtm = metrics._sqrtm
    calls = []

    def flaky(a):
        calls.append(a.copy())
        return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics, "_sqrtm", flaky)
    a, b = np.array([1.0, 2.0]), np.array([3.0, 0.5])
    with pytest.warns(RuntimeWarning, match="eps"):
        got = frechet_distance(np.zeros(2), np.diag(a), np.zeros(2), np.diag(b), eps=1e-3)
    np.testing.assert_allclose(calls[1], np.diag((a + 1e-3) * (b + 1e-3)))
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + 2 * (np.sqrt(a * b) - np.sqrt((a + 1e-3) * (b + 1e-3))).sum()
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_rejects_large_imaginary_residue(monkeypatch):
    monkeypatch.setattr(metrics, "_sqrtm", lambda a: np.eye(a.shape[0]) * (1 + 0.5j))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))
    monkeypatch.setattr(metrics, "_sqrtm", lambda a: np.eye(a.shape[0]) * (1 + 1e-9j))
    assert frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2)) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ statistics


def test_feature_statistics_unbiased_float64():
    rng = _rng()
    f = rng.standard_normal((50, 6)).astype(np.float32) * 2 + 5
    mu, sigma = feature_statistics(torch.from_numpy(f))
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert mu.shape == (6,) and sigma.shape == (6, 6)
    f64 = f.astype(np.float64)
    np.testing.assert_allclose(sigma, np.cov(f64, rowvar=False, ddof=1), rtol=1e-12)
    # EDM's one-pass formula (EDM fid.py:59-77): (Σ fᵀf − n·mu·muᵀ) / (n − 1)
    n = len(f64)
    edm = (f64.T @ f64 - n * np.outer(f64.mean(0), f64.mean(0))) / (n - 1)
    np.testing.assert_allclose(sigma, edm, rtol=1e-9)
    # unbiased: for two points the variance is (x1 - x2)^2 / 2, not / 4
    _, s2 = feature_statistics(np.array([[0.0], [2.0]]))
    assert s2[0, 0] == 2.0
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        feature_statistics(np.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        feature_statistics(np.array([[0.0], [np.inf]]))


# ------------------------------------------------------------------------------------------------ KID


def _mmd2_unbiased_bruteforce(x, y, D):
    k = lambda a, b: (a @ b / D + 1.0) ** 3
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_bruteforce_unbiased_mmd_when_subset_is_whole_set():
    rng = _rng()
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)) + 0.5
    res = kid(x, y, num_subsets=3, subset_size=7, generator=torch.Generator().manual_seed(0))
    expected = _mmd2_unbiased_bruteforce(x, y, 3)
    assert res.mean == pytest.approx(expected, rel=1e-10)
    assert res.std == pytest.approx(0.0, abs=1e-12)  # every "subset" is a permutation of the full sets


def test_kid_zero_for_same_distribution_positive_for_shift():
    rng = _rng()
    D = 8
    a, b = rng.standard_normal((400, D)), rng.standard_normal((400, D))
    g = torch.Generator().manual_seed(0)
    same = kid(a, b, num_subsets=20, subset_size=100, generator=g)
    assert abs(same.mean) <= 2 * same.std
    shifted = kid(a, b + 1.0, num_subsets=20, subset_size=100, generator=torch.Generator().manual_seed(0))
    assert shifted.mean > 0 and shifted.mean > 5 * same.std
    assert shifted.mean > 10 * abs(same.mean)
    # deterministic under a fixed generator
    again = kid(a, b, num_subsets=20, subset_size=100, generator=torch.Generator().manual_seed(0))
    assert again == same


def test_kid_argument_checks():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="generator"):
        kid(x, x, 2, 3)
    with pytest.raises(ValueError, match="subset_size=10"):
        kid(x, x, 2, 10, torch.Generator())
    with pytest.raises(ValueError, match="dimensions differ"):
        kid(x, np.zeros((5, 3)), 2, 3, torch.Generator())


# ------------------------------------------------------------------------------------------------ error bars


def _gaussian_sets(seed, shift, K=3, N=2000, D=3):
    rng = _rng(seed)
    return [rng.standard_normal((N, D)) + shift for _ in range(K)]


def test_fid_error_bars_summary_and_determinism():
    shift = np.array([0.5, 0.0, 0.0])
    sets = _gaussian_sets(7, shift)
    mu_ref, sigma_ref = np.zeros(3), np.eye(3)
    r1 = fid_error_bars(sets, mu_ref, sigma_ref, num_bootstrap=30, generator=torch.Generator().manual_seed(5))
    r2 = fid_error_bars(sets, mu_ref, sigma_ref, num_bootstrap=30, generator=torch.Generator().manual_seed(5))
    assert r1 == r2
    r3 = fid_error_bars(sets, mu_ref, sigma_ref, num_bootstrap=30, generator=torch.Generator().manual_seed(6))
    assert r3.bootstrap_fids != r1.bootstrap_fids and r3.fids == r1.fids
    per_set = [fid_from_features(f, mu_ref, sigma_ref) for f in sets]
    assert r1.fids == pytest.approx(per_set, rel=1e-12)
    assert r1.mean == pytest.approx(np.mean(per_set), rel=1e-12)
    assert r1.std == pytest.approx(np.std(per_set, ddof=1), rel=1e-12)
    assert r1.min == min(per_set)
    assert r1.num_samples == (2000, 2000, 2000)
    assert r1.bootstrap_low <= r1.bootstrap_high
    # a replicate equals the protocol FID of the resampled set (same generator stream as inside fid_error_bars)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 2000, (2000,), generator=g).numpy()
    first = fid_from_features(sets[0][idx], mu_ref, sigma_ref)
    assert np.isclose(np.asarray(r1.bootstrap_fids), first, rtol=1e-9, atol=0).sum() == 1
    assert list(r1.bootstrap_fids) == sorted(r1.bootstrap_fids)
    d = r1.to_dict()
    assert "bootstrap_fids" not in d and d["fids"] == list(r1.fids)


def test_fid_error_bars_cover_true_value():
    # Generated ~ N(shift, I), reference exactly N(0, I): the true Fréchet distance is ‖shift‖². The plug-in FID is
    # biased upwards by ≈ D/N here (E‖mu_hat‖² = ‖shift‖² + D/N), which the basic bootstrap interval corrects.
    D, N, shift = 10, 500, 0.5
    true_fid = shift**2
    covered, covered_percentile, widths, biases = 0, 0, [], []
    reps = 30
    for s in range(reps):
        rng = _rng(100 + s)
        f = rng.standard_normal((N, D)) + np.r_[shift, np.zeros(D - 1)]
        r = fid_error_bars([f], np.zeros(D), np.eye(D), num_bootstrap=60, generator=torch.Generator().manual_seed(s))
        covered += r.bootstrap_low <= true_fid <= r.bootstrap_high
        q_lo, q_hi = np.quantile(r.bootstrap_fids, [0.025, 0.975])
        covered_percentile += q_lo <= true_fid <= q_hi
        widths.append(r.bootstrap_high - r.bootstrap_low)
        biases.append(r.bootstrap_bias)
    assert covered >= 0.8 * reps  # nominal 95%
    assert covered_percentile < 0.5 * reps  # why the plain percentile interval is not returned
    assert np.median(widths) < 0.3  # informative, not vacuous
    assert np.mean(biases) > 0  # the finite-N bias is detected with the right sign


def test_fid_error_bars_argument_checks():
    sets = [np.zeros((4, 2)) + np.arange(4)[:, None]]
    with pytest.raises(ValueError, match="generator"):
        fid_error_bars(sets, np.zeros(2), np.eye(2), num_bootstrap=2)
    r = fid_error_bars(sets, np.zeros(2), np.eye(2), num_bootstrap=0)
    assert math.isnan(r.std) and math.isnan(r.bootstrap_low)
    with pytest.raises(ValueError, match="confidence"):
        fid_error_bars(sets, np.zeros(2), np.eye(2), num_bootstrap=0, confidence=1.5)


# ------------------------------------------------------------------------------------------------ quantisation


def test_images_to_uint8_edm_rounding_at_bin_edges():
    x = torch.tensor([-1.5, -1.0, -1e-9, 0.0, 1e-9, 1.0 - 1e-9, 1.0, 1.5], dtype=torch.float64)
    got = images_to_uint8(x).tolist()
    # y = x·127.5 + 128, clipped, truncated: -1 → 0.5 → 0; 0 → 128 exactly; just below 0 → 127.99… → 127;
    # 1 → 255.5 → 255 (so the top bin is half a level wider, as in EDM).
    assert got == [0, 0, 127, 128, 128, 255, 255, 255]
    assert images_to_uint8(x).dtype == torch.uint8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_images_to_uint8_inverts_the_data_mapping(dtype):
    # Data → [-1, 1] with k/127.5 − 1 (EDM training_loop.py:128) → uint8 must give back k for every level.
    k = torch.arange(256, dtype=torch.float64)
    x = (k / 127.5 - 1).to(dtype)
    assert torch.equal(images_to_uint8(x), k.to(torch.uint8))


def test_images_to_uint8_ctm_truncation_differs():
    x = torch.tensor([-1.0, 0.0, 1.0 - 1e-9, 1.0], dtype=torch.float64)
    assert images_to_uint8(x, convention="ctm").tolist() == [0, 127, 254, 255]
    assert images_to_uint8(x).tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError, match="convention"):
        images_to_uint8(x, convention="round")
    with pytest.raises(ValueError, match="non-finite"):
        images_to_uint8(torch.tensor([0.0, float("nan")]))
    with pytest.raises(TypeError):
        images_to_uint8(torch.zeros(3, dtype=torch.uint8))


def test_images_to_levels_round_trip_and_agrees_with_uint8():
    L = 17
    k = torch.arange(L)
    x = k.to(torch.float64) / (L - 1) * 2 - 1
    assert torch.equal(images_to_levels(x, L), k.to(torch.uint8))
    assert images_to_levels(torch.tensor([-3.0, 3.0]), L).tolist() == [0, 16]
    g = torch.Generator().manual_seed(0)
    xr = torch.rand(1000, generator=g, dtype=torch.float64) * 2.2 - 1.1
    assert torch.equal(images_to_levels(xr, 256), images_to_uint8(xr))
    with pytest.raises(ValueError, match="num_levels"):
        images_to_levels(x, 1)


# ------------------------------------------------------------------------------------------------ reference stats


def test_reference_stats_round_trip(tmp_path: pathlib.Path):
    rng = _rng()
    mu, sigma = feature_statistics(rng.standard_normal((40, 5)))
    path = tmp_path / "sub" / "ref.npz"
    digest = save_reference_stats(path, mu, sigma, meta={"detector": "pt_inception", "num_images": 40})
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]  # no temporary files left behind
    ref = load_reference_stats(path, expected_sha256=digest)
    assert np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, sigma)
    assert ref.mu.dtype == np.float64 and ref.meta == {"detector": "pt_inception", "num_images": 40}
    assert ref.sha256 == digest
    # EDM's layout: plain np.savez(mu=..., sigma=...) with no meta entry loads too; readers see mu/sigma keys.
    edm = tmp_path / "edm.npz"
    np.savez(edm, mu=mu, sigma=sigma)
    assert load_reference_stats(edm).meta == {}
    with np.load(path) as f:
        assert {"mu", "sigma"} <= set(f.files)


def test_reference_stats_bytes_are_deterministic_with_num_images_and_extra(tmp_path: pathlib.Path):
    rng = _rng()
    mu, sigma = feature_statistics(rng.standard_normal((30, 4)))
    extra = {"kid_features": rng.standard_normal((5, 4)).astype(np.float32)}
    a = save_reference_stats(tmp_path / "a.npz", mu, sigma, meta={"k": 1}, num_images=30, extra=extra)
    import time

    time.sleep(1.1)  # np.savez would stamp another modification time into the zip
    b = save_reference_stats(tmp_path / "b.npz", mu, sigma, meta={"k": 1}, num_images=30, extra=extra)
    assert a == b and (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    ref = load_reference_stats(tmp_path / "a.npz", expected_sha256=a)
    assert ref.num_images == 30 and ref.meta == {"k": 1}
    with np.load(tmp_path / "a.npz", allow_pickle=False) as f:
        assert np.array_equal(f["kid_features"], extra["kid_features"]) and f["num_images"].shape == ()
    assert load_reference_stats(tmp_path / "a.npz").num_images == 30
    with pytest.raises(ValueError, match="num_images"):
        save_reference_stats(tmp_path / "c.npz", mu, sigma, num_images=1)
    with pytest.raises(ValueError, match="reserved"):
        save_reference_stats(tmp_path / "c.npz", mu, sigma, extra={"mu": np.zeros(4)})
    (tmp_path / "d.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:200])  # truncated download
    with pytest.raises(ValueError, match="not a readable npz"):
        load_reference_stats(tmp_path / "d.npz")
    np.save(tmp_path / "e.npy", mu)
    with pytest.raises(ValueError, match="not an npz"):
        load_reference_stats(tmp_path / "e.npy")


def test_reference_stats_tampered_file_rejected(tmp_path: pathlib.Path):
    mu, sigma = np.zeros(3), np.eye(3)
    path = tmp_path / "ref.npz"
    digest = save_reference_stats(path, mu, sigma)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:  # flip one byte inside the stored sigma array
        offset = z.getinfo("sigma.npy").header_offset + 100
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_reference_stats(path, expected_sha256=digest)


def test_reference_stats_pickled_object_array_refused(tmp_path: pathlib.Path):
    path = tmp_path / "evil.npz"
    np.savez(path, mu=np.array([{"a": 1}, None], dtype=object), sigma=np.eye(2))
    with pytest.raises(ValueError, match="pickle"):
        load_reference_stats(path)


def test_reference_stats_validation(tmp_path: pathlib.Path):
    with pytest.raises(ValueError, match="mu"):
        save_reference_stats(tmp_path / "a.npz", np.zeros(3), np.eye(2))
    path = tmp_path / "b.npz"
    np.savez(path, mu=np.zeros(2), sigma=np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="symmetric"):
        load_reference_stats(path)
    np.savez(path, mean=np.zeros(2))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        load_reference_stats(path)
