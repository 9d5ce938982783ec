"""Samplers against Gaussian closed forms: EDM Heun order, gamma-sampler moments, RNG bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from ctm_core.diffusion.gaussian import ExactStudent, GaussianData
from ctm_core.diffusion.samplers import (
    StackedRandomGenerator,
    edm_sampler,
    euler_step,
    gamma_sampler,
    heun_step,
    student_as_denoiser,
    student_heun_sampler,
)
from ctm_core.diffusion.schedules import karras_interp, karras_sigmas

torch.manual_seed(0)
DTYPE = torch.float64


def make_data(d: int = 4, seed: int = 0) -> GaussianData:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=DTYPE)
    Sigma = A @ A.T / d * 0.25 + 0.01 * torch.eye(d, dtype=DTYPE)  # non-diagonal
    mu = 0.3 * torch.randn(d, generator=g, dtype=DTYPE)
    return GaussianData(mu, Sigma)


class Recorder:
    """Wraps a denoiser or a student and records every sigma / (t, s) it is called with."""

    def __init__(self, inner, **attrs):
        self.inner, self.calls = inner, []
        for k, v in attrs.items():
            setattr(self, k, v)

    def __call__(self, x, sigma, class_labels=None):
        assert x.dtype == DTYPE
        sigma = torch.as_tensor(sigma)
        assert sigma.ndim == 0 and sigma.dtype == DTYPE  # EDM calls with a 0-dim float64 sigma
        self.calls.append(float(sigma))
        return self.inner(x, sigma, class_labels)

    def G(self, x_t, t, s, class_labels=None):
        assert t.shape == s.shape == (x_t.shape[0],)
        self.calls.append((float(t[0]), float(s[0])))
        return self.inner.G(x_t, t, s, class_labels)


class CountingNoise:
    def __init__(self, seed: int = 0):
        self.generator, self.count = torch.Generator().manual_seed(seed), 0

    def __call__(self, x):
        self.count += 1
        return torch.randn(x.shape, dtype=x.dtype, generator=self.generator)


# ---------------------------------------------------------------------------------------------------------------------
# Schedules


def test_karras_sigmas_values():
    s18 = karras_sigmas(18)
    edm18 = [
        80,
        57.5860,
        40.7856,
        28.3746,
        19.3525,
        12.9101,
        8.40094,
        5.31519,
        3.25682,
        1.92334,
        1.08817,
        0.585348,
        0.296442,
        0.139516,
        0.0599473,
        0.0229345,
        0.00752802,
        0.002,
    ]  # docs/edm.md#a4-heun-sampler
    torch.testing.assert_close(s18, torch.tensor(edm18, dtype=DTYPE), rtol=1e-5, atol=0)
    assert s18[0] == 80.0 and s18[-1] == 0.002 and s18.dtype == DTYPE
    torch.testing.assert_close(karras_sigmas(3)[1], torch.tensor(2.5152, dtype=DTYPE), rtol=1e-4, atol=0)  # CTM NFE 2
    torch.testing.assert_close(
        karras_sigmas(5)[1:4], torch.tensor([17.528, 2.5152, 0.16975], dtype=DTYPE), rtol=1e-4, atol=0
    )
    assert karras_sigmas(4, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="num"):
        karras_sigmas(1)
    with pytest.raises(ValueError, match="sigma_max"):
        karras_sigmas(4, sigma_min=1.0, sigma_max=0.5)


def test_karras_sigmas_is_the_interpolation_at_i_over_n_minus_1():
    """One formula: the grid is karras_interp(i/(N-1)) bit for bit, pin_ends only overwrites the two end points."""
    for N in range(2, 41):
        for sigma_min, sigma_max, rho in ((0.002, 80.0, 7.0), (0.02, 100.0, 7.0), (0.01, 50.0, 3.0)):
            i = torch.arange(N, dtype=DTYPE)
            raw = karras_interp(i / (N - 1), sigma_min, sigma_max, rho)
            assert torch.equal(karras_sigmas(N, sigma_min, sigma_max, rho, pin_ends=False), raw)
            pinned = karras_sigmas(N, sigma_min, sigma_max, rho)
            assert pinned[0] == sigma_max and pinned[-1] == sigma_min and torch.equal(pinned[1:-1], raw[1:-1])
            assert torch.equal(karras_sigmas(N, sigma_min, sigma_max, rho, dtype=torch.float32), pinned.float())
    u = torch.tensor([0.0, 0.25, 1.0], dtype=DTYPE)
    r_max, r_min = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    assert torch.equal(karras_interp(u, 0.002, 80.0, 7.0), (r_max + u * (r_min - r_max)) ** 7)


# ---------------------------------------------------------------------------------------------------------------------
# The shared ODE step


def test_heun_step_is_edm_algorithm_1_bit_for_bit():
    data = make_data()
    x = torch.randn(5, data.d, dtype=DTYPE, generator=torch.Generator().manual_seed(3)) * 10

    def D(x, sigma):
        return data.denoiser(x, sigma)

    for t, t_next in ((torch.tensor(10.0, dtype=DTYPE), torch.tensor(4.0, dtype=DTYPE)), (2.0, 0.5)):
        d = (x - D(x, t)) / t
        x_euler = x + (t_next - t) * d
        d_prime = (x_euler - D(x_euler, t_next)) / t_next
        assert torch.equal(heun_step(D, x, t, t_next), x + (t_next - t) * (0.5 * d + 0.5 * d_prime))
        assert torch.equal(heun_step(D, x, t, t_next, second_order=False), x_euler)
        assert torch.equal(euler_step(D, x, t, t_next), x_euler)
    # per-sample (B,) levels broadcast over the trailing dims and equal the per-row scalar steps
    t = torch.linspace(1.0, 20.0, 5, dtype=DTYPE)
    t_next = t / 3
    rows = [heun_step(D, x[b : b + 1], t[b], t_next[b]) for b in range(5)]
    torch.testing.assert_close(heun_step(D, x, t, t_next), torch.cat(rows), rtol=1e-13, atol=0)  # batched matmul


def test_edm_sampler_is_a_loop_of_heun_steps():
    data = make_data()
    latents = torch.randn(3, data.d, dtype=DTYPE, generator=torch.Generator().manual_seed(4))

    def D(x, sigma, class_labels=None):
        return data.denoiser(x, sigma)

    N = 6
    t = torch.cat([karras_sigmas(N, pin_ends=False), torch.zeros(1, dtype=DTYPE)])
    x = latents * t[0]
    for i in range(N):
        x = heun_step(lambda y, s: D(y, s), x, t[i], t[i + 1], second_order=i < N - 1)
    assert torch.equal(edm_sampler(D, latents, num_steps=N), x)


# ---------------------------------------------------------------------------------------------------------------------
# EDM sampler


def test_edm_sampler_second_order_convergence():
    """Heun on the exact Gaussian denoiser converges to the exact flow with observed order >= 2.

    The exact result: flow from sigma_max to sigma_min, then the final Euler step to 0, which is
    x_{N-1} - sigma_min (x_{N-1} - D(x_{N-1})) / sigma_min = D(x_{N-1}; sigma_min).
    """
    data = make_data()
    latents = torch.randn(8, data.d, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    exact = data.denoiser(data.flow(latents * 80.0, 80.0, 0.002), 0.002)
    errors = []
    for N in (8, 16, 32, 64):
        out = edm_sampler(data.denoiser, latents, num_steps=N)
        assert out.dtype == DTYPE and out.shape == latents.shape
        errors.append(float((out - exact).norm() / exact.norm()))
    orders = [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]
    assert errors[-1] < 5e-3, errors  # the smallest eigenvalue (~0.01) makes the low-sigma end stiff
    assert min(orders) >= 1.9, (errors, orders)


def test_edm_sampler_nfe_sigmas_and_noise_calls():
    data = make_data()
    latents = torch.randn(3, data.d, dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    for N in (2, 5, 18):
        net, noise = Recorder(data.denoiser), CountingNoise()
        edm_sampler(net, latents, randn_like=noise, num_steps=N)
        t = karras_sigmas(N).tolist()
        expected = [t[0]] + [v for v in t[1:] for _ in range(2)]  # t_0, then (t_{i+1} Heun, t_{i+1} Euler), ...
        assert len(net.calls) == 2 * N - 1
        torch.testing.assert_close(torch.tensor(net.calls), torch.tensor(expected), rtol=1e-12, atol=0)
        assert noise.count == N  # drawn every step even with S_churn = 0
    with pytest.raises(ValueError, match="num_steps"):
        edm_sampler(data.denoiser, latents, num_steps=1)


def test_edm_sampler_clamps_to_denoiser_range():
    data = make_data()
    net = Recorder(data.denoiser, sigma_min=0.02, sigma_max=50.0)
    edm_sampler(net, torch.zeros(2, data.d), num_steps=4)
    assert net.calls[0] == pytest.approx(50.0) and net.calls[-1] == pytest.approx(0.02)


def test_edm_sampler_stochastic_churn_reproducible():
    data = make_data()
    latents = torch.randn(4, data.d, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    kw = dict(num_steps=8, S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)
    net = Recorder(data.denoiser)
    a = edm_sampler(net, latents, randn_like=CountingNoise(7), **kw)
    b = edm_sampler(data.denoiser, latents, randn_like=CountingNoise(7), **kw)
    c = edm_sampler(data.denoiser, latents, randn_like=CountingNoise(8), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    # Churned levels t_hat = t_i (1 + gamma) with gamma = min(40/8, sqrt(2)-1) where 0.05 <= t_i <= 50.
    t = karras_sigmas(8).tolist()
    gamma = math.sqrt(2) - 1
    t_hat = [ti * (1 + gamma) if 0.05 <= ti <= 50 else ti for ti in t]
    torch.testing.assert_close(torch.tensor(net.calls[0::2]), torch.tensor(t_hat), rtol=1e-12, atol=0)
    # With the noise injected, reproduce the first churned step by hand.
    z = torch.randn(4, data.d, dtype=DTYPE, generator=torch.Generator().manual_seed(11))
    single = edm_sampler(data.denoiser, latents, randn_like=lambda x: z, num_steps=2, S_churn=1.0)
    g1 = min(1.0 / 2, math.sqrt(2) - 1)
    x0 = latents * 80.0
    th = 80.0 * (1 + g1)
    x_hat = x0 + math.sqrt(th**2 - 80.0**2) * z
    d_cur = (x_hat - data.denoiser(x_hat, th)) / th
    x1 = x_hat + (0.002 - th) * d_cur
    x1 = x_hat + (0.002 - th) * 0.5 * (d_cur + (x1 - data.denoiser(x1, 0.002)) / 0.002)
    th1 = 0.002 * (1 + g1)
    x_hat1 = x1 + math.sqrt(th1**2 - 0.002**2) * z
    ref = x_hat1 - th1 * (x_hat1 - data.denoiser(x_hat1, th1)) / th1
    torch.testing.assert_close(single, ref, rtol=1e-10, atol=1e-10)


def test_student_heun_sampler_uses_g_at_s_equals_t():
    data = make_data()
    latents = torch.randn(3, data.d, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    a = student_heun_sampler(ExactStudent(data), latents, num_steps=6)
    b = edm_sampler(data.denoiser, latents, num_steps=6)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    den = student_as_denoiser(ExactStudent(data))
    torch.testing.assert_close(den(latents, torch.tensor(0.7, dtype=DTYPE)), data.denoiser(latents, 0.7))


# ---------------------------------------------------------------------------------------------------------------------
# gamma sampler


def propagated_moments(data: GaussianData, sigmas: list[float], gamma: float):
    """Exact output mean/covariance: x_T ~ N(0, sigma_0^2 I); each G is x -> mu + M (x - mu); noise adds a^2 I."""
    d, I = data.d, torch.eye(data.d, dtype=DTYPE)
    m, C = torch.zeros(d, dtype=DTYPE), sigmas[0] ** 2 * I
    smin = sigmas[-1]
    for i in range(len(sigmas) - 1):
        s = math.sqrt(1 - gamma**2) * (sigmas[i + 1] - smin) + smin
        M = data.flow_matrix(sigmas[i], s)
        m, C = data.mu + M @ (m - data.mu), M @ C @ M.T
        if i < len(sigmas) - 2:
            C = C + (sigmas[i + 1] ** 2 - s**2) * I
    return m, C


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_gamma_sampler_moments(gamma, nfe):
    data = make_data(d=3, seed=5)
    n = 20000
    latents = torch.randn(n, data.d, dtype=DTYPE, generator=torch.Generator().manual_seed(6))
    noise = CountingNoise(100 + nfe)
    x = gamma_sampler(ExactStudent(data), latents, nfe=nfe, gamma=gamma, randn_like=noise)
    assert x.dtype == DTYPE and x.shape == (n, data.d)
    assert noise.count == (nfe - 1 if gamma > 0 else 0)
    m, C = propagated_moments(data, karras_sigmas(nfe + 1).tolist(), gamma)
    se_m = (C.diagonal() / n).sqrt()
    assert ((x.mean(0) - m).abs() <= 5 * se_m).all(), (x.mean(0), m)
    se_C = ((C.diagonal()[:, None] * C.diagonal()[None] + C**2) / n).sqrt()
    assert ((torch.cov(x.T) - C).abs() <= 6 * se_C).all(), (torch.cov(x.T), C)
    if gamma == 0.0:  # deterministic jumps compose to the single exact flow
        torch.testing.assert_close(x, data.flow(latents * 80.0, 80.0, 0.002), rtol=1e-10, atol=1e-10)
    if gamma == 1.0 and nfe > 1:  # CM multistep re-noises to the exact marginal: Cov -> Sigma + sigma_min^2 I
        I = torch.eye(data.d, dtype=DTYPE)
        torch.testing.assert_close(C, data.Sigma + 0.002**2 * I, rtol=0.05, atol=1e-3)


def test_gamma_sampler_honours_user_sigmas():
    data = make_data(d=3)
    latents = torch.randn(2, data.d, dtype=DTYPE)
    sigmas = [60.0, 7.0, 1.5, 0.3, 0.01]
    net = Recorder(ExactStudent(data))
    gamma_sampler(net, latents, sigmas=sigmas)  # nfe derived from len(sigmas)
    assert net.calls == list(zip(sigmas[:-1], sigmas[1:]))
    net = Recorder(ExactStudent(data))
    sigmas_t = torch.tensor(sigmas, dtype=DTYPE)
    out = gamma_sampler(net, latents, nfe=4, gamma=0.5, sigmas=sigmas_t, randn_like=CountingNoise())
    s = [math.sqrt(0.75) * (v - 0.01) + 0.01 for v in sigmas[1:]]
    torch.testing.assert_close(torch.tensor(net.calls), torch.tensor(list(zip(sigmas[:-1], s))), rtol=1e-12, atol=0)
    assert net.calls[-1][1] == 0.01 and out.dtype == DTYPE
    net = Recorder(ExactStudent(data))
    gamma_sampler(net, latents, nfe=2, gamma=1.0, randn_like=CountingNoise())
    assert [c[1] for c in net.calls] == [0.002, 0.002]  # CM multistep always jumps to sigma_min
    assert net.calls[1][0] == pytest.approx(2.5152, rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(nfe=0), "nfe"),
        (dict(nfe=2.0), "nfe"),
        (dict(gamma=1.5), "gamma"),
        (dict(gamma=-0.1), "gamma"),
        (dict(sigmas=[1.0, 2.0, 0.1]), "sigmas"),
        (dict(sigmas=[[2.0, 1.0]]), "sigmas"),
        (dict(sigmas=[2.0, 1.0, 0.0]), "sigmas"),
        (dict(sigmas=[80.0]), "sigmas"),
        (dict(sigmas=[80.0, 1.0, 0.002], nfe=3), "sigmas"),
    ],
)
def test_gamma_sampler_argument_errors(kwargs, name):
    data = make_data(d=3)
    with pytest.raises(ValueError, match=name):
        gamma_sampler(ExactStudent(data), torch.zeros(2, 3, dtype=DTYPE), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Per-sample random streams


def test_stacked_random_generator_independent_of_batch():
    a = StackedRandomGenerator("cpu", [5, 7, 9])
    b = StackedRandomGenerator("cpu", [9])
    c = StackedRandomGenerator("cpu", torch.tensor([7, 9, 5, 11]))
    la, lb, lc = a.randn([3, 3, 4, 4]), b.randn([1, 3, 4, 4]), c.randn([4, 3, 4, 4])
    torch.testing.assert_close(la[2], lb[0], rtol=0, atol=0)
    torch.testing.assert_close(la[2], lc[1], rtol=0, atol=0)
    torch.testing.assert_close(la[0], lc[2], rtol=0, atol=0)
    # Later draws (labels, churn noise) stay per-sample too.
    torch.testing.assert_close(a.randint(10, [3])[2], b.randint(10, [1])[0])
    x = torch.zeros(3, 2, dtype=DTYPE)
    nz = a.randn_like(x)
    assert nz.dtype == DTYPE and nz.shape == (3, 2)
    torch.testing.assert_close(nz[2], b.randn_like(x[:1])[0], rtol=0, atol=0)
    # seed % 2**32, as in EDM.
    torch.testing.assert_close(
        StackedRandomGenerator("cpu", [2**32 + 5]).randn([1, 3]),
        StackedRandomGenerator("cpu", [5]).randn([1, 3]),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="size"):
        a.randn([2, 3])


def test_sampler_images_do_not_depend_on_batch():
    data = make_data(d=4)
    rnd_a, rnd_b = StackedRandomGenerator("cpu", [1, 2, 3]), StackedRandomGenerator("cpu", [3])
    kw = dict(num_steps=4, S_churn=10.0)
    xa = edm_sampler(data.denoiser, rnd_a.randn([3, 4]), randn_like=rnd_a.randn_like, **kw)
    xb = edm_sampler(data.denoiser, rnd_b.randn([1, 4]), randn_like=rnd_b.randn_like, **kw)
    torch.testing.assert_close(xa[2:], xb, rtol=1e-12, atol=1e-12)
