"""Samplers: EDM's stochastic Heun sampler for teachers, CTM's gamma-sampler and Heun-with-g for students.

Shape legend: ``B`` batch, ``C`` channels, ``H``/``W`` spatial size, ``L`` label dimension.

Protocols (docs/api.md#protocols):
- denoiser: ``D(x, sigma, class_labels=None)``, ``x`` (B, ...), ``sigma`` (B,) or 0-dim -> D(x; sigma), same shape as x.
- student: object with ``G(x_t, t, s, class_labels=None)`` (the CTM jump x_t -> x_s) and
  ``g(x_t, t, s, class_labels=None)`` with ``G = (s/t) x_t + (1 - s/t) g``.

All trajectories are kept in float64 (docs/style.md#9-explicit-precision); randomness is injected through ``randn_like``
(never the global RNG unless the caller passes ``torch.randn_like`` itself, the default, as in EDM's ``edm_sampler``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ctm_core.diffusion.schedules import karras_sigmas
from ctm_core.nets.utils import append_dims, check_positive

__all__ = [
    "StackedRandomGenerator",
    "edm_sampler",
    "euler_step",
    "gamma_sampler",
    "heun_step",
    "student_as_denoiser",
    "student_heun_sampler",
]

RandnLike = Callable[[torch.Tensor], torch.Tensor]
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x float64 (B, ...), sigma) -> D(x; sigma) float64


# ----------------------------------------------------------------------------------------------------------------------
# One step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 4).


def _per_sample(t, x: torch.Tensor):
    """A (B,) noise level as (B, 1, ...) so it broadcasts against x (B, ...); scalars and 0-dim tensors unchanged."""
    return append_dims(t, x.ndim) if getattr(t, "ndim", 0) else t


def heun_step(
    denoise: Denoise, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, *, second_order: bool = True
) -> torch.Tensor:
    """One step of EDM's Heun solver from noise level t to t_next (Karras et al. 2022, Algorithm 1, lines 4-8).

    d = (x - D(x; t)) / t, Euler x' = x + (t_next - t) d; with ``second_order`` the trapezoidal correction
    x_next = x + (t_next - t) (d/2 + d'/2), d' = (x' - D(x'; t_next)) / t_next (needs t_next > 0). ``edm_sampler``
    (and with it ``student_heun_sampler``) and the CTM teacher solver (``training.losses.teacher_heun_solve``) step
    through here, so they share one operation order to the last bit.

    Args:
        denoise: ``denoise(x, sigma) -> D(x; sigma)`` in x's dtype; called with ``t``/``t_next`` as given.
        x: (B, ...) float64 state at noise level t.
        t, t_next: 0-dim tensors (or floats), or (B,) per-sample levels.
    Returns:
        (B, ...) state at t_next: 2 denoiser calls, or 1 without ``second_order``.
    """
    t_, t_next_ = _per_sample(t, x), _per_sample(t_next, x)
    d = (x - denoise(x, t)) / t_
    x_next = x + (t_next_ - t_) * d
    if not second_order:
        return x_next
    d_prime = (x_next - denoise(x_next, t_next)) / t_next_
    return x + (t_next_ - t_) * (0.5 * d + 0.5 * d_prime)


def euler_step(denoise: Denoise, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One Euler step x + (t_next - t) * ((x - D(x; t)) / t) of the PF-ODE: ``heun_step`` without the correction."""
    return heun_step(denoise, x, t, t_next, second_order=False)


# ----------------------------------------------------------------------------------------------------------------------
# Per-sample random streams.


class StackedRandomGenerator:
    """One ``torch.Generator`` per sample, so that an image depends only on its own seed.

    Follows the scheme of NVlabs/edm generate.py:182-196 (docs/edm.md#a4-heun-sampler): generator ``b`` is seeded with
    ``seeds[b] % 2**32``; every draw of shape (B, ...) takes row ``b`` from generator ``b``. An image's latents,
    labels and churn noise therefore do not depend on the batch size or on its position in the batch.
    CPU and CUDA generators give different streams, so images depend on ``device``.

    Args:
        device: device of the generators and of the returned tensors.
        seeds: one int seed per sample (B,).
    """

    def __init__(self, device: torch.device | str, seeds: Sequence[int] | torch.Tensor) -> None:
        seeds = [int(v) for v in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
        if len(seeds) == 0:
            raise ValueError("seeds must contain at least one seed, got an empty sequence")
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(seed % (1 << 32)) for seed in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def _check_batch(self, size: Sequence[int]) -> list[int]:
        size = [int(v) for v in size]
        if len(size) == 0 or size[0] != len(self.generators):
            raise ValueError(f"size must start with the batch size {len(self.generators)} (one per seed), got {size}")
        return size

    def randn(self, size: Sequence[int], *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal draws of shape ``size`` = (B, ...), row b from generator b."""
        size = self._check_batch(size)
        return torch.stack(
            [torch.randn(size[1:], generator=gen, dtype=dtype, device=self.device) for gen in self.generators]
        )

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        """Standard normal draws with the shape, dtype and device of ``input`` (B, ...)."""
        return self.randn(input.shape, dtype=input.dtype).to(input.device)

    def randint(self, high: int, size: Sequence[int], *, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Uniform integers in [0, high) of shape ``size`` = (B, ...), row b from generator b."""
        size = self._check_batch(size)
        return torch.stack(
            [torch.randint(high, size[1:], generator=gen, dtype=dtype, device=self.device) for gen in self.generators]
        )


# ----------------------------------------------------------------------------------------------------------------------
# EDM sampler (teacher).


def _round_sigma(denoiser, sigma: torch.Tensor) -> torch.Tensor:
    """``denoiser.round_sigma`` if it has one (EDM preconds do; identity for EDM/VP/VE), else the identity."""
    fn = getattr(denoiser, "round_sigma", None)
    return torch.as_tensor(fn(sigma)) if callable(fn) else sigma


def edm_sampler(
    denoiser: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    randn_like: RandnLike = torch.randn_like,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2), with the semantics of NVlabs/edm generate.py:25-60.

    - ``sigma_min``/``sigma_max`` are clamped to ``denoiser.sigma_min``/``denoiser.sigma_max`` when the denoiser has
      them (e.g. VEPrecond raises sigma_min to 0.02).
    - Time steps t_0..t_{N-1}: the Karras rho-grid in float64 (eq. 5), passed through ``denoiser.round_sigma`` if
      present, then t_N = 0 appended.
    - x_0 = latents (float64) * t_0.
    - Step i: gamma_i = min(S_churn/N, sqrt(2)-1) if S_min <= t_i <= S_max else 0; t_hat = round_sigma(t_i (1+gamma_i));
      x_hat = x_i + sqrt(t_hat^2 - t_i^2) * S_noise * randn_like(x_i). ``randn_like`` is called at EVERY step, also
      where gamma_i = 0 (N calls in total), so random streams advance exactly as in EDM.
      Euler step to t_{i+1} with d = (x_hat - D(x_hat; t_hat)) / t_hat, then for i < N-1 the 2nd-order (Heun)
      correction with D(x_{i+1}; t_{i+1}). The last step (t_{N-1} -> 0) is Euler only: NFE = 2N - 1.
    - The denoiser is called as ``denoiser(x, sigma, class_labels)`` with a float64 x and a 0-dim float64 sigma;
      its output is cast to float64.

    Args:
        denoiser: callable D(x, sigma, class_labels) (a teacher precond or ``student_as_denoiser(student)``).
        latents: (B, C, H, W) standard normal latents (any float dtype).
        class_labels: (B, L) one-hot labels, or None.
        randn_like: noise source ``randn_like(x) -> tensor like x`` (e.g. ``StackedRandomGenerator.randn_like``).
        num_steps: N >= 2 (EDM divides by N - 1).

    Returns:
        (B, C, H, W) float64 samples at sigma = 0 (not clamped).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2 (EDM's grid divides by num_steps - 1), got {num_steps!r}")
    check_positive("rho", rho)
    if not S_churn >= 0 or not S_noise >= 0:
        raise ValueError(f"S_churn and S_noise must be >= 0, got S_churn={S_churn!r}, S_noise={S_noise!r}")
    # Clamp to the range the network supports (generate.py:31-32).
    sigma_min = max(sigma_min, float(getattr(denoiser, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(denoiser, "sigma_max", float("inf"))))
    check_positive("sigma_min", sigma_min)
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_max must be > sigma_min after clamping, got {sigma_max!r} <= {sigma_min!r}")

    # Time steps t_0 = sigma_max > ... > t_{N-1} = sigma_min, t_N = 0 (generate.py:35-37).
    grid = karras_sigmas(num_steps, sigma_min, sigma_max, rho, pin_ends=False, device=latents.device)  # (N,) float64
    t_steps = _round_sigma(denoiser, grid)
    t_steps = torch.cat([t_steps.to(torch.float64), torch.zeros_like(t_steps[:1], dtype=torch.float64)])  # (N+1,)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoiser(x, sigma, class_labels).to(torch.float64)

    gamma_max = min(S_churn / num_steps, math.sqrt(2.0) - 1.0)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: raise the noise level from t_cur to t_hat (Algorithm 2, lines 5-7).
        gamma = gamma_max if S_min <= float(t_cur) <= S_max else 0.0
        t_hat = _round_sigma(denoiser, t_cur + gamma * t_cur).to(torch.float64)
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
        # Euler step (line 8) and 2nd-order correction (lines 9-11), skipped at the last step where t_next = 0.
        x_next = heun_step(denoise, x_hat, t_hat, t_next, second_order=i < num_steps - 1)
    return x_next


# ----------------------------------------------------------------------------------------------------------------------
# CTM student samplers.


def _student_sigma_grid(
    nfe: int | None, sigmas, sigma_min: float, sigma_max: float, rho: float, device: torch.device
) -> torch.Tensor:
    """Validate ``nfe``/``sigmas`` and return the (nfe+1,) float64 grid sigma_0 > ... > sigma_nfe > 0."""
    if nfe is not None and (isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1):
        raise ValueError(f"nfe must be an int >= 1, got {nfe!r}")
    if sigmas is None:
        return karras_sigmas((1 if nfe is None else nfe) + 1, sigma_min, sigma_max, rho, device=device)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64, device=device)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D sequence of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must be finite and strictly decreasing, got {sigmas.tolist()}")
    if not float(sigmas[-1]) > 0:
        raise ValueError(f"sigmas must end at a positive sigma_min (G divides by t), got {float(sigmas[-1])}")
    if nfe is not None and sigmas.numel() != nfe + 1:
        raise ValueError(f"sigmas must have nfe + 1 = {nfe + 1} entries for nfe={nfe}, got {sigmas.numel()}")
    return sigmas


def gamma_sampler(
    student,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    nfe: int | None = None,
    gamma: float = 0.0,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    randn_like: RandnLike = torch.randn_like,
) -> torch.Tensor:
    """CTM gamma-sampling (Kim et al. 2024, Algorithm 2 / eq. (8)) as the official code runs it
    (docs/ctm.md#3-sampling).

    Grid sigma_0 = sigma_max > sigma_1 > ... > sigma_nfe = sigma_min: the Karras rho-grid with ``nfe + 1`` points,
    or ``sigmas`` if given. ``sigmas`` overrides ``sigma_min``/``sigma_max``/``rho``: its first entry is the start
    level and its last entry plays the role of sigma_min everywhere below; ``nfe`` defaults to ``len(sigmas) - 1``
    (and must equal it if also given). Without ``sigmas``, ``nfe`` defaults to 1.

    Starting from x = sigma_0 * latents (float64), for i = 0..nfe-1:

        s_i = sqrt(1 - gamma^2) * (sigma_{i+1} - sigma_min) + sigma_min        (the code's sigma_min offset)
        x   = G(x, sigma_i, s_i)
        x   = x + sqrt(sigma_{i+1}^2 - s_i^2) * z,   z = randn_like(x)          (not at the last step)

    gamma = 0 gives s_i = sigma_{i+1} and no noise: the deterministic long jumps (the code's ``exact`` sampler);
    gamma = 1 gives s_i = sigma_min and re-noising with sqrt(sigma_{i+1}^2 - sigma_min^2): CM multistep sampling
    (``cm_multistep``); 0 < gamma < 1 is the code's ``gamma_multistep``. ``randn_like`` is called once per step
    except the last, and only when gamma > 0 (so gamma = 0 draws no noise).

    ``student.G`` is called with a float64 ``x_t`` and float64 (B,) tensors ``t`` and ``s``; its output is cast to
    float64. The result is NOT clamped (the official code clamps the final sample to [-1, 1]; that is the caller's
    choice, e.g. ``x.clamp(-1, 1)`` before converting to images).

    Args:
        student: object with ``G(x_t, t, s, class_labels=None)``.
        latents: (B, C, H, W) (or (B, d)) standard normal latents.
        class_labels: (B, L) one-hot labels, or None.
        nfe: number of network evaluations (>= 1).
        gamma: in [0, 1].

    Returns:
        (B, ...) float64 samples at sigma_min.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    gamma = float(gamma)
    grid = _student_sigma_grid(nfe, sigmas, sigma_min, sigma_max, rho, latents.device)  # (nfe+1,)
    n_steps = grid.numel() - 1
    sigma_end = grid[-1]
    B = latents.shape[0]
    ones = torch.ones(B, dtype=torch.float64, device=latents.device)  # (B,)

    x = latents.to(torch.float64) * grid[0]
    for i in range(n_steps):
        t, sigma_next = grid[i], grid[i + 1]
        s = math.sqrt(1.0 - gamma**2) * (sigma_next - sigma_end) + sigma_end
        s = torch.minimum(s, sigma_next)  # guard against rounding above sigma_{i+1}
        x = student.G(x, t * ones, s * ones, class_labels).to(torch.float64)
        if i < n_steps - 1 and gamma > 0.0:
            x = x + (sigma_next**2 - s**2).clamp(min=0).sqrt() * randn_like(x)
    return x


class _StudentDenoiser:
    """Adapter: a CTM student as a denoiser D(x; sigma) = g(x, sigma, sigma) (docs/ctm.md#3-sampling,
    docs/ctm.md#4-likelihood)."""

    def __init__(self, student) -> None:
        if not callable(getattr(student, "g", None)):
            raise TypeError(f"student must have a callable g(x_t, t, s, class_labels=None), got {type(student)!r}")
        self.student = student
        for name in ("sigma_min", "sigma_max", "sigma_data", "label_dim", "img_resolution", "img_channels"):
            if hasattr(student, name):
                setattr(self, name, getattr(student, name))

    def __call__(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])  # (B,)
        return self.student.g(x, sigma, sigma, class_labels)


def student_as_denoiser(student) -> Callable[..., torch.Tensor]:
    """Wrap a student (with ``g(x_t, t, s, class_labels=None)``) as a denoiser ``D(x, sigma, class_labels=None)``.

    D(x; sigma) = g(x, sigma, sigma): the student's denoiser output with its s-embedding equal to t, which the
    official code uses as the score model for Heun sampling and likelihoods (docs/ctm.md#3-sampling,
    docs/ctm.md#4-likelihood). ``sigma`` may be 0-dim or (B,); it is expanded to a float64 (B,) tensor. The student's
    ``sigma_min``/``sigma_max`` (and other descriptive attributes) are forwarded, so ``edm_sampler`` clamps to them.
    """
    return _StudentDenoiser(student)


def student_heun_sampler(
    student,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    randn_like: RandnLike = torch.randn_like,
) -> torch.Tensor:
    """EDM's deterministic Heun sampler (S_churn = 0) with the student's g(x, sigma, sigma) as the denoiser.

    The official code's ``heun`` sampler with ``ctm=True`` (docs/ctm.md#3-sampling; C cm/sample_util.py:442-514): Karras
    grid with ``num_steps`` points plus t_N = 0, last step Euler, NFE = 2 * num_steps - 1. Implemented as
    ``edm_sampler(student_as_denoiser(student), ...)``; ``randn_like`` is still called once per step with zero
    scale, exactly as in ``edm_sampler``, so the output does not depend on it. Returns float64 (B, C, H, W).
    """
    return edm_sampler(
        student_as_denoiser(student),
        latents,
        class_labels,
        randn_like=randn_like,
        num_steps=num_steps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
        S_churn=0.0,
    )
