"""Closed forms of ctm_core.diffusion.gaussian checked against direct linear algebra and ODE invariants."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch

from ctm_core.diffusion.gaussian import ExactStudent, GaussianData

torch.manual_seed(0)
DTYPE = torch.float64


def make_data(d: int = 5, seed: int = 0, zero_mean: bool = False) -> GaussianData:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=DTYPE)
    Sigma = A @ A.T / d * 0.3 + 0.02 * torch.eye(d, dtype=DTYPE)  # non-diagonal, well conditioned
    mu = torch.zeros(d, dtype=DTYPE) if zero_mean else 0.3 * torch.randn(d, generator=g, dtype=DTYPE)
    return GaussianData(mu, Sigma)


def test_denoiser_matches_linear_solve():
    data = make_data()
    x = torch.randn(7, data.d, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 3.0, 20.0, 80.0], dtype=DTYPE)
    D = data.denoiser(x, sigma)
    I = torch.eye(data.d, dtype=DTYPE)
    for b in range(7):
        ref = data.mu + data.Sigma @ torch.linalg.solve(data.Sigma + sigma[b] ** 2 * I, x[b] - data.mu)
        torch.testing.assert_close(D[b], ref, rtol=1e-12, atol=1e-12)
    # A scalar sigma broadcasts; images (B, C, H, W) are flattened and the shape is kept.
    torch.testing.assert_close(data.denoiser(x, 0.5), data.denoiser(x, torch.full((7,), 0.5, dtype=DTYPE)))
    data4 = make_data(d=12)
    x_img = torch.randn(2, 3, 2, 2, dtype=DTYPE)
    out = data4.denoiser(x_img, 1.0)
    assert out.shape == (2, 3, 2, 2)
    torch.testing.assert_close(out.reshape(2, 12), data4.denoiser(x_img.reshape(2, 12), 1.0))
    with pytest.raises(ValueError, match="x must be"):
        data.denoiser(torch.zeros(2, 4, dtype=DTYPE), 1.0)


def test_flow_matches_scipy_sqrtm_and_composes():
    data = make_data()
    x = torch.randn(4, data.d, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    t, u, s = 80.0, 1.3, 0.002
    I = torch.eye(data.d, dtype=DTYPE).numpy()
    S = data.Sigma.numpy()
    M = torch.from_numpy((scipy.linalg.sqrtm(S + s**2 * I) @ scipy.linalg.inv(scipy.linalg.sqrtm(S + t**2 * I))).real)
    ref = data.mu + (x - data.mu) @ M.T
    torch.testing.assert_close(data.flow(x, t, s), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(data.flow_matrix(t, s), M, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(data.flow(data.flow(x, t, u), u, s), data.flow(x, t, s), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(data.flow(x, u, u), x)


def test_flow_solves_the_pf_ode():
    """d/ds flow(x, t, s) = (x_s - D(x_s; s)) / s (Karras et al. 2022, eq. 4), by central differences."""
    data = make_data()
    x = torch.randn(3, data.d, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    t = 5.0
    for s in (0.05, 0.7, 2.0):
        h = 1e-5 * s
        deriv = (data.flow(x, t, s + h) - data.flow(x, t, s - h)) / (2 * h)
        x_s = data.flow(x, t, s)
        torch.testing.assert_close(deriv, (x_s - data.denoiser(x_s, s)) / s, rtol=1e-7, atol=1e-8)


def test_flow_transports_marginals():
    """M (Sigma + t^2 I) M^T = Sigma + s^2 I: the exact flow maps p_t to p_s."""
    data = make_data()
    I = torch.eye(data.d, dtype=DTYPE)
    M = data.flow_matrix(10.0, 0.3)
    torch.testing.assert_close(M @ (data.Sigma + 100.0 * I) @ M.T, data.Sigma + 0.09 * I, rtol=1e-10, atol=1e-12)


def test_log_prob_and_sample():
    data = make_data()
    x = torch.randn(6, data.d, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    I = torch.eye(data.d, dtype=DTYPE)
    for sigma in (0.0, 0.002, 1.5):
        ref = torch.distributions.MultivariateNormal(data.mu, data.Sigma + sigma**2 * I).log_prob(x)
        torch.testing.assert_close(data.log_prob(x, sigma), ref, rtol=1e-10, atol=1e-10)
    n = 40000
    y = data.sample(n, torch.Generator().manual_seed(5))
    assert y.shape == (n, data.d) and y.dtype == DTYPE
    se_mean = (data.Sigma.diagonal() / n).sqrt()
    assert ((y.mean(0) - data.mu).abs() <= 5 * se_mean).all()
    se_cov = ((data.Sigma.diagonal()[:, None] * data.Sigma.diagonal()[None] + data.Sigma**2) / n).sqrt()
    assert ((torch.cov(y.T) - data.Sigma).abs() <= 6 * se_cov).all()
    torch.testing.assert_close(data.sample(n, torch.Generator().manual_seed(5)), y)  # reproducible


def test_exact_student_parameterization():
    data = make_data()
    student = ExactStudent(data)
    x = torch.randn(4, data.d, dtype=DTYPE, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([80.0, 3.0, 0.5, 1.0], dtype=DTYPE)
    s = torch.tensor([0.002, 1.0, 0.5, 0.999999], dtype=DTYPE)
    G = student.G(x, t, s)
    g = student.g(x, t, s)
    torch.testing.assert_close(G, data.flow(x, t, s))
    ratio = (s / t)[:, None]
    torch.testing.assert_close(G, ratio * x + (1 - ratio) * g, rtol=1e-12, atol=1e-12)
    # g(x, t, t) = D(x; t), and g is continuous at s -> t.
    torch.testing.assert_close(g[2], data.denoiser(x[2:3], 0.5)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g[3], data.denoiser(x[3:4], 1.0)[0], rtol=1e-5, atol=1e-5)


def test_pf_ode_closed_form():
    data = make_data()
    x = data.sample(5, torch.Generator().manual_seed(7))
    smin, smax = 0.002, 80.0
    I = torch.eye(data.d, dtype=DTYPE).numpy()
    S = data.Sigma.numpy()
    A = torch.from_numpy(
        (scipy.linalg.sqrtm(S + smax**2 * I) @ scipy.linalg.inv(scipy.linalg.sqrtm(S + smin**2 * I))).real
    )
    x_T = data.mu + (x - data.mu) @ A.T
    I_d = torch.eye(data.d, dtype=DTYPE)
    prior = torch.distributions.MultivariateNormal(torch.zeros(data.d, dtype=DTYPE), smax**2 * I_d)
    ref = prior.log_prob(x_T) + torch.logdet(A)
    torch.testing.assert_close(data.pf_ode_log_likelihood_closed_form(x), ref, rtol=1e-10, atol=1e-10)
    # For mu = 0 this is (up to the prior mismatch ~ Sigma / sigma_max^2) log N(x; 0, Sigma + sigma_min^2 I).
    data0 = make_data(zero_mean=True)
    x0 = data0.sample(5, torch.Generator().manual_seed(8))
    got, exact = data0.pf_ode_log_likelihood_closed_form(x0), data0.log_prob(x0, smin)
    assert ((got - exact).abs() <= 1e-3 * exact.abs()).all()
    assert math.isfinite(float(got.sum()))
