"""CTM distillation on Gaussian data, where the exact flow map is known (docs/style.md#17a-closed-form-tests).

x0 ~ N(mu, Sigma) in d = 2; the teacher is the exact denoiser D(x; σ) = mu + Sigma(Sigma + σ²I)⁻¹(x − mu), and the
ideal student is Φ_{t→s}(x) = mu + (Sigma + s²I)^{1/2}(Sigma + t²I)^{-1/2}(x − mu) (ctm_core.diffusion.gaussian).
A toy MLP student trained with the CTM (l2) + DSM loss must bring G(x_t, t, s) much closer to Φ.
"""

from __future__ import annotations

import time

import pytest
import torch

from ctm_core.config import DistillParams
from ctm_core.diffusion.gaussian import GaussianData
from ctm_core.nets.toy import ToyCTMStudent
from ctm_core.training.losses import karras_grid
from ctm_core.training.trainer import CTMTrainer, TensorDataSource

MU = torch.tensor([0.3, -0.2], dtype=torch.float64)
SIGMA = torch.tensor([[0.25, 0.1], [0.1, 0.15]], dtype=torch.float64)
STEPS, BATCH = 900, 128


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def flow_map_relative_error(student, data: GaussianData, grid: torch.Tensor, per_pair: int = 256) -> float:
    """Mean over all grid pairs t_n > t_m of sqrt(E‖G(x_t,t,s) − Φ(x_t)‖² / E‖Φ(x_t) − mu‖²), x_t = x0 + tε."""
    g = torch.Generator().manual_seed(123)
    errs = []
    with torch.no_grad():
        for n in range(len(grid) - 1):
            for m in range(n + 1, len(grid)):
                t, s = grid[n].expand(per_pair), grid[m].expand(per_pair)
                x_t = data.sample(per_pair, g) + t[:, None] * torch.randn(
                    per_pair, data.d, dtype=torch.float64, generator=g
                )
                exact = data.flow(x_t, t, s)
                G = student.G(x_t.float(), t.float(), s.float()).double()
                errs.append(((G - exact).square().sum(1).mean() / (exact - data.mu).square().sum(1).mean()).sqrt())
    return torch.stack(errs).mean().item()


def one_step_moments_error(student, data: GaussianData, num: int = 4000) -> tuple[float, float]:
    """1-step samples G(σ_max z, σ_max, σ_min): (‖mean − mu‖, ‖cov − Sigma‖_F/‖Sigma‖_F)."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(num, data.d, generator=g) * student.sigma_max
    with torch.no_grad():
        x = student.G(z, torch.full((num,), student.sigma_max), torch.full((num,), student.sigma_min)).double()
    return (x.mean(0) - data.mu).norm().item(), ((torch.cov(x.T) - data.Sigma).norm() / data.Sigma.norm()).item()


def test_ctm_learns_the_exact_gaussian_flow_map():
    data = GaussianData(MU, SIGMA)
    train = data.sample(8192, torch.Generator().manual_seed(1)).float()
    torch.manual_seed(0)  # student init only; training randomness comes from the trainer's seeded generators
    student = ToyCTMStudent((2,), hidden=64, depth=3, emb_channels=32)
    cfg = DistillParams(
        distance="l2",
        N=18,
        K=17,
        lr=1e-3,
        target_ema=0.99,  # short run: a faster target than the official 0.999
        eval_emas=[0.99],
        batch=BATCH,
        microbatch=BATCH,
        steps=STEPS,
        seed=0,
    )
    teacher = data.denoiser
    trainer = CTMTrainer(cfg, student, teacher, TensorDataSource(train, batch_size=BATCH, seed=0), progress=False)
    grid = karras_grid(18, 0.002, 80.0, 7.0)

    before = flow_map_relative_error(trainer.model, data, grid)
    mean_before, cov_before = one_step_moments_error(trainer.model, data)
    t0 = time.time()
    trainer.train(STEPS)
    elapsed = time.time() - t0
    after = flow_map_relative_error(trainer.model, data, grid)
    mean_after, cov_after = one_step_moments_error(trainer.model, data)
    print(
        f"\nGaussian d=2, {STEPS} steps x batch {BATCH} in {elapsed:.1f}s: flow-map relative error "
        f"{before:.4f} -> {after:.4f} ({before / after:.1f}x); "
        f"1-step mean err {mean_before:.3f} -> {mean_after:.3f}, "
        f"cov rel err {cov_before:.3f} -> {cov_after:.3f}"
    )
    assert before / after >= 5.0
    assert mean_after < 0.1 and cov_after < 0.3
