"""PF-ODE likelihoods against Gaussian closed forms; bits/dim against exact discrete probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from ctm_core.diffusion.gaussian import ExactStudent, GaussianData
from ctm_core.diffusion.likelihood import bits_per_dim, log_likelihood, student_as_denoiser

torch.manual_seed(0)
DTYPE = torch.float64


def make_data(d: int = 6, seed: int = 0, zero_mean: bool = False) -> GaussianData:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=DTYPE)
    Sigma = A @ A.T / d * 0.3 + 0.01 * torch.eye(d, dtype=DTYPE)  # non-diagonal
    mu = torch.zeros(d, dtype=DTYPE) if zero_mean else 0.3 * torch.randn(d, generator=g, dtype=DTYPE)
    return GaussianData(mu, Sigma)


@pytest.mark.parametrize("method", ["RK45", "DOP853"])
def test_exact_divergence_matches_closed_form(method):
    data = make_data()
    x = data.sample(5, torch.Generator().manual_seed(1))
    got = log_likelihood(data.denoiser, x, method=method)
    ref = data.pf_ode_log_likelihood_closed_form(x)
    assert got.shape == (5,) and got.dtype == DTYPE
    assert ((got - ref).abs() <= 1e-3 * ref.abs()).all(), (got, ref)


def test_zero_mean_matches_true_density_and_image_shapes():
    data = make_data(d=8, zero_mean=True)
    x = data.sample(4, torch.Generator().manual_seed(2)).reshape(4, 2, 2, 2)  # (B, C, H, W)
    got = log_likelihood(data.denoiser, x)
    ref = data.log_prob(x, 0.002)  # log N(x; 0, Sigma + sigma_min^2 I)
    assert ((got - ref).abs() <= 1e-3 * ref.abs()).all(), (got, ref)


def test_student_as_denoiser_gives_same_likelihood():
    data = make_data(d=4, seed=3)
    x = data.sample(3, torch.Generator().manual_seed(3))
    a = log_likelihood(data.denoiser, x)
    b = log_likelihood(student_as_denoiser(ExactStudent(data)), x)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_hutchinson_within_its_standard_error():
    data = make_data(d=6, seed=4)
    x = data.sample(4, torch.Generator().manual_seed(4))
    ref = data.pf_ode_log_likelihood_closed_form(x)
    got, se = log_likelihood(
        data.denoiser,
        x,
        divergence="hutchinson",
        num_probes=16,
        generator=torch.Generator().manual_seed(5),
        return_stderr=True,
    )
    assert (se > 0).all() and (se < 1.0).all()
    assert ((got - ref).abs() <= 4 * se + 1e-3 * ref.abs()).all(), (got, ref, se)
    # Same generator seed -> same probes -> same result.
    again = log_likelihood(
        data.denoiser, x, divergence="hutchinson", num_probes=16, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(got, again)
    _, se_exact = log_likelihood(data.denoiser, x, return_stderr=True)
    assert (se_exact == 0).all()


def discrete_log_prob(data: GaussianData, q: torch.Tensor, bits: int, sigma: float) -> torch.Tensor:
    """log P(q) of N(mu, diag(Sigma) + sigma^2 I) integrated over the bins [2q/2^b - 1, 2(q+1)/2^b - 1)."""
    std = (data.Sigma.diagonal() + sigma**2).sqrt()
    qf = q.reshape(q.shape[0], -1).to(DTYPE)
    lo = (2 * qf / 2**bits - 1 - data.mu) / std
    hi = (2 * (qf + 1) / 2**bits - 1 - data.mu) / std
    return torch.log(torch.special.ndtr(hi) - torch.special.ndtr(lo)).sum(1)


@pytest.mark.parametrize("bits, dequantize, tol", [(8, "none", 2e-4), (5, "none", 3e-3), (8, "uniform", 0.03)])
def test_bits_per_dim_matches_exact_discrete_probability(bits, dequantize, tol):
    """bpd ~ -log2 P(q) / D for diagonal Gaussian data; a wrong bin-width offset is off by >= ~0.006 bits
    (2/255 vs 2/256) and by 1 bit for log2(256) instead of log2(128). mu = 0 keeps the N(0, sigma_max^2) prior
    mismatch (~2e-3 bits for mu ~ 0.1) out of the comparison."""
    g = torch.Generator().manual_seed(6)
    d = 4
    std = torch.tensor([0.3, 0.45, 0.35, 0.5], dtype=DTYPE)
    data = GaussianData(torch.zeros(d, dtype=DTYPE), torch.diag(std**2))
    x = data.sample(6, g).clamp(-0.999, 0.999)
    q = ((x + 1) / 2 * 2**bits).floor().to(torch.int64).reshape(6, 1, 2, 2)  # (B, C, H, W)
    bpd = bits_per_dim(data.denoiser, q, bits=bits, dequantize=dequantize, generator=g)
    ref = -discrete_log_prob(data, q, bits, 0.002) / (d * math.log(2))
    assert bpd.shape == (6,)
    if dequantize == "none":
        assert ((bpd - ref).abs() <= tol).all(), (bpd, ref)
    else:  # Jensen: E_u[bpd] >= -log2 P(q)/D; one u draw per image, so compare the batch mean
        assert abs(float((bpd - ref).mean())) <= tol, (bpd, ref)


def test_bits_per_dim_formula_and_stderr():
    data = make_data(d=4, seed=7)
    q = torch.tensor([[[[0, 255], [128, 37]]], [[[200, 90], [3, 250]]]])  # (2, 1, 2, 2) uint8 values
    bpd, se = bits_per_dim(
        data.denoiser,
        q,
        dequantize="none",
        divergence="hutchinson",
        num_probes=4,
        generator=torch.Generator().manual_seed(8),
        return_stderr=True,
    )
    x = (q.to(DTYPE) + 0.5) / 256 * 2 - 1
    lp = log_likelihood(
        data.denoiser, x, divergence="hutchinson", num_probes=4, generator=torch.Generator().manual_seed(8)
    )
    torch.testing.assert_close(bpd, -lp / (4 * math.log(2)) + 7)
    assert (se > 0).all()


def test_argument_errors():
    data = make_data(d=4)
    x = data.sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(data.denoiser, x, divergence="skilling")
    with pytest.raises(ValueError, match="generator"):
        log_likelihood(data.denoiser, x, divergence="hutchinson")
    with pytest.raises(ValueError, match="sigma_max"):
        log_likelihood(data.denoiser, x, sigma_min=1.0, sigma_max=0.5)
    q = torch.zeros(2, 1, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="images_uint8"):
        bits_per_dim(data.denoiser, q + 256, dequantize="none")
    with pytest.raises(ValueError, match="images_uint8"):
        bits_per_dim(data.denoiser, q.float(), dequantize="none")
    with pytest.raises(ValueError, match="dequantize"):
        bits_per_dim(data.denoiser, q, dequantize="gaussian")
    with pytest.raises(ValueError, match="generator"):
        bits_per_dim(data.denoiser, q)
