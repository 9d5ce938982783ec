"""Tests pinning the CTM training-step semantics (docs/ctm.md#2-training-step and the traps of docs/ctm.md#8-traps) in
ctm_core.training.losses."""

from __future__ import annotations

import math

import pytest
import torch

from ctm_core.nets.toy import ToyCTMStudent
from ctm_core.training import losses
from ctm_core.training.losses import (
    adaptive_weight,
    ctm_distance,
    ctm_dsm_backward,
    ctm_dsm_loss,
    ctm_loss,
    dsm_loss,
    dsm_sigmas,
    karras_grid,
    sample_ctm_indices,
    sample_num_heun_steps,
    teacher_heun_solve,
)

SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention on the shared cores
    yield
    torch.set_num_threads(old)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def isotropic_gaussian_denoiser(mu: torch.Tensor, var: float):
    """Exact E[x0 | x_σ] for x0 ~ N(mu, var·I): mu + var/(var+σ²)·(x − mu)."""

    def D(x, sigma, class_labels=None):
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) ** 2
        return mu + var / (var + s2) * (x - mu)

    return D


class CountingDenoiser:
    def __init__(self, D):
        self.D, self.calls, self.sigmas = D, 0, []

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        self.sigmas.append(sigma.detach().clone())
        return self.D(x, sigma, class_labels)


class Recorder:
    """Delegates G/g/last_layer_weight to ``net`` and records every call."""

    def __init__(self, net, name: str, log: list):
        self.net, self.name, self.log = net, name, log
        self.sigma_min, self.sigma_max, self.sigma_data = net.sigma_min, net.sigma_max, net.sigma_data
        self.llw_calls = 0

    def _rec(self, fn, x, t, s, class_labels=None):
        out = getattr(self.net, fn)(x, t, s, class_labels=class_labels)
        self.log.append(
            dict(
                net=self.name,
                fn=fn,
                x=x.detach().clone(),
                t=t.detach().clone(),
                s=s.detach().clone(),
                x_requires_grad=x.requires_grad,
                grad_enabled=torch.is_grad_enabled(),
                out=out.detach().clone(),
                out_requires_grad=out.requires_grad,
            )
        )
        return out

    def G(self, x, t, s, class_labels=None):
        return self._rec("G", x, t, s, class_labels)

    def g(self, x, t, s, class_labels=None):
        return self._rec("g", x, t, s, class_labels)

    def last_layer_weight(self):
        self.llw_calls += 1
        return self.net.last_layer_weight()


def make_nets(dim=3, seed=0, perturb_target=True):
    torch.manual_seed(seed)
    student = ToyCTMStudent((dim,), hidden=32, depth=2, emb_channels=16)
    with torch.no_grad():
        student.model.out.weight.normal_(0, 0.3)  # a non-trivial F so that online/target differences show
    target = ToyCTMStudent((dim,), hidden=32, depth=2, emb_channels=16)
    target.load_state_dict(student.state_dict())
    if perturb_target:
        with torch.no_grad():
            for p in target.parameters():
                p.add_(0.05 * torch.randn_like(p))
    target.requires_grad_(False)
    return student, target


# ------------------------------------------------------------------------------------------------- sampling of k, n, m


def test_grid_is_official_n18():
    grid = karras_grid(18, SIGMA_MIN, SIGMA_MAX, RHO)
    expected = [
        80,
        57.586,
        40.786,
        28.375,
        19.353,
        12.910,
        8.401,
        5.315,
        3.257,
        1.923,
        1.088,
        0.585,
        0.296,
        0.140,
        0.060,
        0.023,
        0.0075,
        0.002,
    ]
    assert grid.dtype == torch.float64 and grid[-1].item() == SIGMA_MIN and grid[0].item() == SIGMA_MAX
    # the FACTS values are rounded to 3-4 digits
    torch.testing.assert_close(grid, torch.tensor(expected, dtype=torch.float64), rtol=4e-3, atol=5e-4)


def test_karras_grid_is_the_one_schedule():
    from ctm_core.diffusion.schedules import karras_sigmas

    assert karras_grid is karras_sigmas
    for N in range(2, 41):
        assert torch.equal(karras_grid(N, SIGMA_MIN, SIGMA_MAX, RHO), karras_sigmas(N, SIGMA_MIN, SIGMA_MAX, RHO))


def test_teacher_heun_solve_is_a_loop_of_the_shared_heun_step():
    """Per-sample k Heun steps in float64 through ctm_core.diffusion.samplers.heun_step, teacher called in x's dtype."""
    from ctm_core.diffusion.samplers import heun_step

    grid = karras_grid(18, SIGMA_MIN, SIGMA_MAX, RHO)
    g = gen(4)
    x0 = torch.randn(6, 3, generator=g)
    n = torch.tensor([0, 3, 7, 10, 12, 14])
    calls = []

    def teacher(x, sigma, class_labels=None):
        calls.append((x.dtype, sigma.dtype, tuple(sigma.shape)))
        return x / (1 + sigma[:, None] ** 2)

    x_t = x0 * grid[n].float()[:, None]
    got = teacher_heun_solve(teacher, x_t, grid, n, 3)
    assert got.dtype == torch.float32 and len(calls) == 6
    assert set(calls) == {(torch.float32, torch.float32, (6,))}

    def D(x, sigma):
        return teacher(x.float(), sigma.float()).double()

    x = x_t.double()
    for j in range(3):
        x = heun_step(D, x, grid[n + j], grid[n + j + 1])
    assert torch.equal(got, x.float())


def test_k_distribution_is_proportional_to_k():
    from scipy.stats import chisquare

    K, draws = 17, 15000
    g = gen(1)
    ks = torch.tensor([sample_num_heun_steps(K, g) for _ in range(draws)])
    assert ks.min() >= 1 and ks.max() <= K
    counts = torch.bincount(ks, minlength=K + 1)[1:].double()
    expected = torch.arange(1, K + 1, dtype=torch.float64) / (K * (K + 1) / 2) * draws
    stat, p = chisquare(counts.numpy(), expected.numpy())
    print(f"P(k) ∝ k: chi2={stat:.1f}, p={p:.3f}, mean k={ks.double().mean():.3f} (expected {(2 * K + 1) / 3:.3f})")
    assert p > 1e-3
    assert abs(ks.double().mean().item() - (2 * K + 1) / 3) < 0.1
    # a uniform P(k) would be rejected by the same test
    assert chisquare(counts.numpy(), [draws / K] * K).pvalue < 1e-12


def test_indices_ranges_and_s_equal_u_possible():
    N, B = 18, 20000
    for k in (1, 5, 17):
        n, m = sample_ctm_indices(B, N, k, gen(k))
        assert n.min() == 0 and n.max() == N - 1 - k
        assert bool((m >= n + k).all()) and bool((m <= N - 1).all())
        assert bool((m == n + k).any()), "s = u must be possible"
        assert bool((m == N - 1).any()), "s = sigma_min must be possible"
        # n uniform over {0..N-1-k}
        freq = torch.bincount(n, minlength=N - k).double() / B
        assert (freq - 1 / (N - k)).abs().max() < 0.02
    # m uniform over {n+k..N-1} given n
    n, m = sample_ctm_indices(B, N, 3, gen(9))
    sel = m[n == 2]  # m ∈ {5..17}: 13 values
    freq = torch.bincount(sel - 5, minlength=13).double() / sel.numel()
    assert (freq - 1 / 13).abs().max() < 0.04


def test_cm_mode_fixes_s_to_sigma_min():
    n, m = sample_ctm_indices(1000, 18, 4, gen(), mode="cm")
    assert bool((m == 17).all())


# ------------------------------------------------------------------------------------------------- teacher solver


def test_teacher_heun_exactly_2k_calls_and_per_sample_vectorisation():
    torch.manual_seed(0)
    grid = karras_grid(18, SIGMA_MIN, SIGMA_MAX, RHO)
    D = CountingDenoiser(isotropic_gaussian_denoiser(torch.tensor([0.3, -0.2]), 0.25))
    n = torch.tensor([0, 3, 10, 14])
    x_t = torch.randn(4, 2) * grid[n].float()[:, None]
    for k in (1, 3):
        D.calls = 0
        x_u = teacher_heun_solve(D, x_t, grid, n, k)
        assert D.calls == 2 * k
        # same as solving every sample alone with scalar grid values (an independent float64 loop)
        for i in range(4):
            x = x_t[i : i + 1].double()
            for j in range(k):
                a, b = grid[n[i] + j].item(), grid[n[i] + j + 1].item()
                d = (x - D.D(x, torch.tensor([a]))) / a
                xp = x + (b - a) * d
                d2 = (xp - D.D(xp, torch.tensor([b]))) / b
                x = x + (b - a) * (d + d2) / 2
            torch.testing.assert_close(x_u[i : i + 1], x.float(), rtol=1e-5, atol=1e-5)


def test_teacher_heun_matches_exact_gaussian_flow():
    # x0 ~ N(mu, v I): the PF-ODE solution is x_u = mu + sqrt((v+u²)/(v+t²))·(x_t − mu).
    mu, v = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64), 0.3
    grid = karras_grid(40, SIGMA_MIN, SIGMA_MAX, RHO)
    D = isotropic_gaussian_denoiser(mu, v)
    n = torch.tensor([5, 20, 30])
    k = 6
    t, u = grid[n], grid[n + k]
    x_t = mu + torch.randn(3, 3, dtype=torch.float64, generator=gen(3)) * (v + t[:, None] ** 2).sqrt()
    x_u = teacher_heun_solve(D, x_t, grid, n, k)
    exact = mu + ((v + u**2) / (v + t**2)).sqrt()[:, None] * (x_t - mu)
    rel = (x_u - exact).norm(dim=1) / (exact - mu).norm(dim=1)
    assert rel.max() < 1e-2, rel
    # 2nd order: the grid with 2(N-1)+1 points contains the same nodes; twice the steps -> ~4x smaller error
    fine = karras_grid(79, SIGMA_MIN, SIGMA_MAX, RHO)
    torch.testing.assert_close(fine[2 * n], grid[n])
    x_u_fine = teacher_heun_solve(D, x_t, fine, 2 * n, 2 * k)
    rel_fine = (x_u_fine - exact).norm(dim=1) / (exact - mu).norm(dim=1)
    ratio = rel / rel_fine
    assert bool((ratio > 3.0).all() and (ratio < 5.5).all()), ratio


# ------------------------------------------------------------------------------------------------- CTM loss


def _run_ctm(mode="ctm", k=3, B=64, seed=0, distance="l2"):
    student, target = make_nets()
    log = []
    rs, rt = Recorder(student, "online", log), Recorder(target, "target", log)
    teacher = CountingDenoiser(isotropic_gaussian_denoiser(torch.zeros(3), 0.25))
    grid = karras_grid(18, SIGMA_MIN, SIGMA_MAX, RHO)
    x0 = torch.randn(B, 3, generator=gen(seed)) * 0.5
    out = ctm_loss(rs, rt, teacher, x0, k, gen(seed + 1), grid=grid, sigma_min=SIGMA_MIN, distance=distance, mode=mode)
    return student, target, log, teacher, out, x0, grid


def test_ctm_call_structure_gradient_paths_and_sigma_min_endpoint():
    k = 4
    student, target, log, teacher, out, x0, grid = _run_ctm(k=k)
    assert teacher.calls == 2 * k
    assert [(c["net"], c["fn"], c["grad_enabled"]) for c in log] == [
        ("online", "G", True),  # x_s = G_θ(x_t, t, s)
        ("target", "G", True),  # x_est = G_θ⁻(x_s, s, σ_min): NOT under no_grad
        ("online", "G", False),  # inner target jump: ONLINE weights under no_grad
        ("target", "G", False),  # outer target jump: EMA target
    ]
    est_outer, inner, tgt_outer = log[1], log[2], log[3]
    assert est_outer["x_requires_grad"] and est_outer["out_requires_grad"]
    assert not tgt_outer["x_requires_grad"] and not out.x_target.requires_grad
    # every jump to data ends at σ_min (not 0)
    for c in (est_outer, tgt_outer):
        assert bool((c["s"] == SIGMA_MIN).all())
    # the inner call jumps from u to s and its output is what the target's outer jump receives
    torch.testing.assert_close(inner["t"], out.u)
    torch.testing.assert_close(tgt_outer["x"], inner["out"])
    # times: σ_min ≤ s ≤ u < t on the grid, u = t_{n+k}
    assert bool((out.s >= SIGMA_MIN).all() and (out.s <= out.u).all() and (out.u < out.t).all())
    g32 = grid.float()
    idx_t = torch.searchsorted(-g32, -out.t)
    torch.testing.assert_close(out.u, g32[idx_t + k])

    out.loss.mean().backward()
    assert all(p.grad is None for p in target.parameters()), "the target network's params must get no grad"
    assert student.model.inp.weight.grad is not None and student.model.inp.weight.grad.abs().sum() > 0
    assert student.model.map_layer0_s.weight.grad.abs().sum() > 0  # the s-branch is trained


def test_gradient_flows_through_target_input():
    """d x_est / d θ must include the Jacobian of θ⁻ w.r.t. its input (not just a detached x_s)."""
    student, target = make_nets()
    teacher = isotropic_gaussian_denoiser(torch.zeros(3), 0.25)
    grid = karras_grid(18, SIGMA_MIN, SIGMA_MAX, RHO)
    x0 = torch.randn(32, 3, generator=gen(5)) * 0.5
    out = ctm_loss(student, target, teacher, x0, 2, gen(6), grid=grid, sigma_min=SIGMA_MIN)
    out.loss.mean().backward()
    grad_true = student.model.out.weight.grad.clone()

    # Manual: L = mean d(G_θ⁻(x_s, s, σ_min), x_tgt). Chain rule with J = ∂G_θ⁻/∂x_s via autograd.
    student.zero_grad()
    x_t = x0 + out.t[:, None] * torch.randn(x0.shape, generator=_after_indices(gen(6), 32, 18, 2))
    x_s = student.G(x_t, out.t, out.s)
    x_s_leaf = x_s.detach().requires_grad_(True)
    est = target.G(x_s_leaf, out.s, torch.full_like(out.s, SIGMA_MIN))
    torch.testing.assert_close(est.detach(), out.x_est.detach())
    loss = (est - out.x_target).square().mean(dim=1).mean()
    (dx_s,) = torch.autograd.grad(loss, x_s_leaf)
    x_s.backward(dx_s, retain_graph=True)
    torch.testing.assert_close(student.model.out.weight.grad, grad_true, rtol=1e-4, atol=1e-7)
    # ...and differs from the gradient with the outer jump treated as identity in x_s (a detached target)
    student.zero_grad()
    (x_s - out.x_target).square().mean(dim=1).mean().backward()
    assert not torch.allclose(student.model.out.weight.grad, grad_true, rtol=1e-2)


def _after_indices(g: torch.Generator, B: int, N: int, k: int) -> torch.Generator:
    sample_ctm_indices(B, N, k, g)  # advance exactly as ctm_loss does before drawing ε
    return g


def test_inner_target_jump_uses_online_weights():
    student, target, log, teacher, out, x0, grid = _run_ctm(k=2)
    inner = log[2]
    x_u = inner["x"]
    s = out.s
    with torch.no_grad():
        expected_online = target.G(student.G(x_u, out.u, s), s, torch.full_like(s, SIGMA_MIN))
        wrong_ema = target.G(target.G(x_u, out.u, s), s, torch.full_like(s, SIGMA_MIN))
    torch.testing.assert_close(out.x_target, expected_online)
    moved = out.s < out.u  # where s = u both give x_u exactly
    assert moved.any()
    assert not torch.allclose(out.x_target[moved], wrong_ema[moved], atol=1e-5)
    # the teacher output x_u is the k-step Heun solution from x_t
    x_t = log[0]["x"]
    n = torch.searchsorted(-grid.float(), -out.t)
    torch.testing.assert_close(x_u, teacher_heun_solve(teacher.D, x_t, grid, n, 2))


def test_s_equal_u_gives_identity_inner_jump():
    student, _ = make_nets()
    x = torch.randn(8, 3)
    u = torch.full((8,), 1.923)
    assert torch.equal(student.G(x, u, u), x)


def test_cm_mode():
    student, target, log, teacher, out, x0, grid = _run_ctm(mode="cm", k=3)
    assert bool((out.s == SIGMA_MIN).all())
    # the inner jump then lands on σ_min and the outer jump G(x, σ_min, σ_min) is the identity
    torch.testing.assert_close(out.x_target, log[2]["out"])


# ------------------------------------------------------------------------------------------------- distances


def test_distances():
    x, y = torch.randn(4, 3, 8, 8, generator=gen(1)), torch.randn(4, 3, 8, 8, generator=gen(2))
    torch.testing.assert_close(ctm_distance(x, y, "l2"), ((x - y) ** 2).mean(dim=(1, 2, 3)))
    c = 0.00054 * math.sqrt(3 * 8 * 8)
    torch.testing.assert_close(
        ctm_distance(x, y, "pseudo_huber"), (((x - y) ** 2).sum(dim=(1, 2, 3)) + c**2).sqrt() - c
    )
    assert ctm_distance(x, x, "pseudo_huber").abs().max() < 1e-6
    seen = []

    def fake_lpips(a, b):
        seen.append((a.shape, b.shape))
        return ((a - b) ** 2).mean(dim=(1, 2, 3), keepdim=True)

    d = ctm_distance(x, y, "lpips", lpips=fake_lpips)
    assert seen == [((4, 3, 224, 224), (4, 3, 224, 224))] and d.shape == (4,)
    with pytest.raises(ValueError, match="lpips"):
        ctm_distance(x, y, "lpips")
    with pytest.raises(ValueError, match="distance"):
        ctm_distance(x, y, "l1")


# ------------------------------------------------------------------------------------------------- DSM and adaptive λ


def test_dsm_sigmas_split():
    B = 20001
    sigma = dsm_sigmas(B, gen(4), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO).double()
    half = B // 2
    ln = sigma[:half].log()
    assert abs(ln.mean().item() + 1.2) < 0.05 and abs(ln.std().item() - 1.2) < 0.05
    kar = sigma[half:]
    lo = (SIGMA_MAX ** (1 / RHO) + 0.7 * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
    assert abs(lo - 0.318) < 1e-3
    assert kar.min() >= lo * (1 - 1e-6) and kar.max() <= SIGMA_MAX
    assert kar.min() < lo * 1.05 and kar.max() > 70  # covers the range
    # v ~ U[0, 0.7] in the ρ-root domain
    v = (SIGMA_MAX ** (1 / RHO) - kar ** (1 / RHO)) / (SIGMA_MAX ** (1 / RHO) - SIGMA_MIN ** (1 / RHO))
    assert abs(v.mean().item() - 0.35) < 0.01


def test_dsm_calls_g_with_s_equal_sigma_and_edm_weight():
    student, _ = make_nets()
    log = []
    rs = Recorder(student, "online", log)
    x0 = torch.randn(16, 3, generator=gen(7)) * 0.5
    loss = dsm_loss(rs, x0, gen(8), sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO)
    assert len(log) == 1 and log[0]["fn"] == "g"
    sigma = log[0]["t"]
    assert torch.equal(log[0]["s"], sigma)
    lam = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    torch.testing.assert_close(loss, lam * ((log[0]["out"] - x0) ** 2).mean(dim=1))


def test_adaptive_weight_uses_last_layer_weight():
    student, target = make_nets()
    log = []
    rs, rt = Recorder(student, "online", log), Recorder(target, "target", log)
    teacher = isotropic_gaussian_denoiser(torch.zeros(3), 0.25)
    grid = karras_grid(18, SIGMA_MIN, SIGMA_MAX, RHO)
    x0 = torch.randn(32, 3, generator=gen(11)) * 0.5
    kw = dict(grid=grid, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, sigma_data=SIGMA_DATA)
    total, metrics, _ = ctm_dsm_loss(rs, rt, teacher, x0, 3, gen(12), **kw)
    assert rs.llw_calls == 1 and rt.llw_calls == 0
    # recompute by hand with the same random stream
    g2 = gen(12)
    l_ctm = ctm_loss(student, target, teacher, x0, 3, g2, grid=grid, sigma_min=SIGMA_MIN).loss.mean()
    l_dsm = dsm_loss(student, x0, g2, sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO).mean()
    W = student.model.out.weight
    gc = torch.autograd.grad(l_ctm, W, retain_graph=True)[0].norm()
    gd = torch.autograd.grad(l_dsm, W, retain_graph=True)[0].norm()
    lam = (gc / (gd + 1e-4)).clamp(0, 1e4)
    torch.testing.assert_close(metrics["lambda_dsm"], lam)
    torch.testing.assert_close(total, l_ctm + lam * l_dsm)
    # with a different W the weight differs (it is really the last layer that matters)
    other = adaptive_weight(l_ctm, l_dsm, student.model.inp.weight)
    assert not torch.allclose(other, lam)
    assert not metrics["lambda_dsm"].requires_grad
    # clamp
    w = torch.nn.Parameter(torch.ones(2))
    big = adaptive_weight((w * 1e6).sum(), (w * 1e-9).sum(), w)
    assert big.item() == 1e4


def test_cm_mode_has_no_dsm_and_mode_validated():
    student, target = make_nets()
    log = []
    rs = Recorder(student, "online", log)
    teacher = isotropic_gaussian_denoiser(torch.zeros(3), 0.25)
    grid = karras_grid(18, SIGMA_MIN, SIGMA_MAX, RHO)
    x0 = torch.randn(8, 3)
    kw = dict(grid=grid, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, sigma_data=SIGMA_DATA)
    _, metrics, _ = ctm_dsm_loss(rs, target, teacher, x0, 2, gen(), mode="cm", **kw)
    assert "loss_dsm" not in metrics and all(c["fn"] == "G" for c in log)
    with pytest.raises(ValueError, match="mode"):
        ctm_dsm_loss(student, target, teacher, x0, 2, gen(), mode="ct", **kw)


def test_losses_module_uses_no_global_rng():
    student, target = make_nets(perturb_target=False)
    teacher = isotropic_gaussian_denoiser(torch.zeros(3), 0.25)
    grid = karras_grid(18, SIGMA_MIN, SIGMA_MAX, RHO)
    x0 = torch.randn(8, 3)
    kw = dict(grid=grid, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, sigma_data=SIGMA_DATA)
    state = torch.get_rng_state()
    a, _, _ = ctm_dsm_loss(student, target, teacher, x0, 3, gen(3), **kw)
    assert torch.equal(state, torch.get_rng_state())
    b, _, _ = ctm_dsm_loss(student, target, teacher, x0, 3, gen(3), **kw)
    assert torch.equal(a, b)
    assert losses.__all__  # public API exported


@pytest.mark.parametrize("scale", [0.25, 1 / 3])  # a power of two (λ read at W in the CTM backward) and not
@pytest.mark.parametrize("checkpoint_inner", [True, False])
def test_ctm_dsm_backward_is_one_backward_of_the_summed_loss(scale, checkpoint_inner):
    """Gradients accumulated onto earlier ones, metrics and λ_DSM: bitwise those of (ctm_dsm_loss · scale).backward(),
    with the same random draws (the generators end in the same state)."""
    teacher = isotropic_gaussian_denoiser(torch.zeros(3), 0.25)
    grid = karras_grid(18, SIGMA_MIN, SIGMA_MAX, RHO)
    x0 = torch.randn(16, 3, generator=gen(4)) * 0.5
    kw = dict(grid=grid, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, sigma_data=SIGMA_DATA, dsm_weight=0.7)
    grads = {}
    for arm in ("one", "staged"):
        student, target = make_nets()
        for p in student.parameters():  # an earlier microbatch's gradient
            p.grad = torch.randn(p.shape, generator=gen(5)) * 1e-3
        g = gen(6)
        if arm == "one":
            total, metrics, _ = ctm_dsm_loss(student, target, teacher, x0, 3, g, **kw)
            (total * scale).backward()
        else:
            metrics, out = ctm_dsm_backward(
                student, target, teacher, x0, 3, g, scale=scale, checkpoint_inner=checkpoint_inner, **kw
            )
            assert not out.x_est.requires_grad
            assert all(p.grad is None for p in target.parameters())
        grads[arm] = ([p.grad.clone() for p in student.parameters()], metrics, g.get_state())
    (ga, ma, sa), (gb, mb, sb) = grads["one"], grads["staged"]
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    assert set(ma) == set(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert torch.equal(sa, sb)
