"""Exact likelihoods through the probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling through
SDEs", Appendix D.2; Karras et al. 2022, eq. 4 with sigma(t) = t), for EDM teachers and CTM students.

Protocol. For the VE/EDM process x_sigma = x_0 + sigma * eps, the PF-ODE is

    dx/dsigma = (x - D(x; sigma)) / sigma,   equivalently   dx/dlog(sigma) = x - D(x; sigma) =: v(x, sigma).

Integrating from sigma_min to sigma_max maps x to x_T, and the instantaneous change of variables gives

    log p_{sigma_min}(x) = log N(x_T; 0, sigma_max^2 I) + int_{log sigma_min}^{log sigma_max} div_x v(x(tau), tau) dtau,
    div_x v = D - tr(dD/dx)                                                        (D = number of dimensions).

p_{sigma_min} is the model's density of the data convolved with N(0, sigma_min^2 I) (the ODE is never run down to
sigma = 0, where the data density may not exist), with the prior N(0, sigma_max^2 I) standing in for the true
sigma_max marginal. The integral is taken in float64 with scipy's adaptive ``solve_ivp`` on the flattened batch
state [x, delta_logp] in the well-conditioned variable tau = log sigma.

How this differs from the official CTM code (docs/ctm.md#4-likelihood; sony/ctm code/eval_bpd.py:112-180): that code
integrates in its reparameterized time tau in [1e-3, 1] (so its sigma_min is 0.00205), with rtol = atol = 1e-3,
Hutchinson divergence only, the model in train() mode (dropout on), no dequantization, and a "residual" term whose
sigma is computed without ``**rho`` (0.413 instead of 0.00205; sony/ctm#13). Here: eval-mode is the caller's
choice, tolerances default to 1e-5, sigma_min is exact, there is no residual term, and dequantization is uniform.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ctm_core.diffusion.samplers import student_as_denoiser
from ctm_core.nets.utils import check_in, check_positive

__all__ = ["bits_per_dim", "log_likelihood", "student_as_denoiser"]

DIVERGENCES = ("exact", "hutchinson")
DEQUANTIZATIONS = ("uniform", "none")


def _rademacher(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """+-1 entries with probability 1/2 each, float64."""
    return torch.randint(0, 2, shape, generator=generator, device=generator.device).to(torch.float64) * 2.0 - 1.0


def log_likelihood(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    divergence: str = "exact",
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    generator: torch.Generator | None = None,
    return_stderr: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-sample log p_{sigma_min}(x) in nats by integrating the PF-ODE from sigma_min to sigma_max (module doc).

    Args:
        denoiser: D(x, sigma, class_labels) with x (B, ...) and sigma (B,) (a teacher precond in eval mode, a
            ``GaussianData``, or ``student_as_denoiser(student)`` for D = g(x, sigma, sigma)). It is called with a
            float64 x that requires grad; its output is cast to float64.
        x: (B, C, H, W) or (B, d) points (model scale, e.g. [-1, 1] images).
        class_labels: (B, L) or None.
        divergence: 'exact' (tr dD/dx from D backward passes per evaluation: only for small D) or 'hutchinson'
            (Skilling-Hutchinson estimator with ``num_probes`` Rademacher probes per sample, drawn once from
            ``generator`` and kept fixed along the trajectory; one backward pass per probe).
        num_probes: probes for 'hutchinson'. Each probe carries its own divergence integral along the same x
            trajectory; the result is their mean and the standard error is their std / sqrt(num_probes).
        rtol, atol: ``solve_ivp`` tolerances; method: 'RK45' or 'DOP853' (or any explicit solve_ivp method).
        generator: required for 'hutchinson' (no global RNG).
        return_stderr: also return the (B,) Monte-Carlo standard error of the Hutchinson mean (zeros for 'exact',
            NaN for a single probe).

    Returns:
        (B,) float64 log-densities, or (log_p, stderr) if ``return_stderr``.
    """
    check_in("divergence", divergence, DIVERGENCES)
    check_positive("sigma_min", sigma_min)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_max must be > sigma_min, got sigma_max={sigma_max!r}, sigma_min={sigma_min!r}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be an int >= 1, got {num_probes!r}")
    if divergence == "exact" and num_probes != 1:
        raise ValueError(f"num_probes applies to divergence='hutchinson' only, got num_probes={num_probes}")
    if divergence == "hutchinson" and generator is None:
        raise ValueError("divergence='hutchinson' needs generator= (a seeded torch.Generator); got None")
    if x.ndim < 2:
        raise ValueError(f"x must be (B, ...) with a batch dimension, got shape {tuple(x.shape)}")

    shape, device = tuple(x.shape), x.device
    B, D = shape[0], x[0].numel()
    K = num_probes
    eps = _rademacher((K, B, D), generator).to(device) if divergence == "hutchinson" else None  # (K, B, D)

    def velocity_and_divergence(tau: float, y: np.ndarray) -> np.ndarray:
        sigma = torch.full((B,), math.exp(tau), dtype=torch.float64, device=device)  # (B,)
        x_tau = torch.from_numpy(y[: B * D]).to(device).reshape(B, D)
        with torch.enable_grad():
            x_in = x_tau.detach().requires_grad_(True)
            D_x = denoiser(x_in.reshape(shape), sigma, class_labels).to(torch.float64).reshape(B, D)
            v = x_in - D_x  # (B, D) dx/dlog(sigma)
            if divergence == "exact":
                trace = torch.zeros(B, dtype=torch.float64, device=device)
                for j in range(D):
                    (grad,) = torch.autograd.grad(D_x[:, j].sum(), x_in, retain_graph=True, allow_unused=True)
                    if grad is not None:
                        trace = trace + grad[:, j]
                trace = trace.unsqueeze(0)  # (1, B)
            else:
                trace = torch.zeros(K, B, dtype=torch.float64, device=device)
                for k in range(K):
                    (grad,) = torch.autograd.grad((D_x * eps[k]).sum(), x_in, retain_graph=k < K - 1, allow_unused=True)
                    if grad is not None:
                        trace[k] = (grad * eps[k]).sum(1)  # eps^T (dD/dx) eps
        div_v = D - trace  # (K, B) div of v = x - D(x)
        return np.concatenate([v.detach().cpu().numpy().ravel(), div_v.detach().cpu().numpy().ravel()])

    n_div = K if divergence == "hutchinson" else 1
    y0 = np.concatenate([x.detach().to(torch.float64).cpu().numpy().ravel(), np.zeros(n_div * B)])
    sol = solve_ivp(
        velocity_and_divergence, (math.log(sigma_min), math.log(sigma_max)), y0, method=method, rtol=rtol, atol=atol
    )
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed to integrate the PF-ODE: {sol.message}")
    y_T = torch.from_numpy(sol.y[:, -1]).to(device)
    x_T = y_T[: B * D].reshape(B, D)
    delta_logp = y_T[B * D :].reshape(n_div, B)  # int div v dtau
    log_prior = -0.5 * ((x_T / sigma_max) ** 2).sum(1) - D * (math.log(sigma_max) + 0.5 * math.log(2 * math.pi))
    log_p_k = log_prior + delta_logp  # (n_div, B)
    log_p = log_p_k.mean(0)
    if not return_stderr:
        return log_p
    if n_div == 1:
        stderr = torch.zeros_like(log_p) if divergence == "exact" else torch.full_like(log_p, float("nan"))
    else:
        stderr = log_p_k.std(0, unbiased=True) / math.sqrt(n_div)
    return log_p, stderr


def bits_per_dim(
    denoiser: Callable[..., torch.Tensor],
    images_uint8: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    bits: int = 8,
    dequantize: str = "uniform",
    generator: torch.Generator | None = None,
    return_stderr: bool = False,
    **likelihood_kwargs,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-image bits per dimension of integer images under the PF-ODE density (``log_likelihood``).

    Protocol. Pixels q in {0, ..., 2^bits - 1} are dequantized, y = q + u with u ~ U[0, 1)^D (``dequantize=
    'uniform'``, drawn from ``generator``) or u = 1/2 (bin centres, ``'none'``), and mapped to the model's [-1, 1]
    range by x = 2 y / 2^bits - 1, so each bin has width 2 / 2^bits in x. The density of y is
    p_y(y) = p_x(x) (2 / 2^bits)^D (Jacobian of y -> x), hence

        bpd = -log2 p_y(y) / D = -(log p_x(x) + D log(2 / 2^bits)) / (D ln 2) = -log p_x(x) / (D ln 2) + bits - 1,

    i.e. +7 = log2(128) for 8-bit data, the offset the official code uses (docs/ctm.md#4-likelihood). By Jensen's
    inequality E_u[bpd] upper-bounds -log2 P(q) / D of the discrete model P(q) = int_bin p_x (Theis et al. 2016). p_x is
    the model density at sigma_min, i.e. of the data convolved with N(0, sigma_min^2 I) (see ``log_likelihood``).
    Note: the official code maps q -> q / 127.5 - 1 without dequantization (bin width 2/255, values at the
    bin edges of this partition), so its numbers are not identical to these.

    Args:
        denoiser: as in ``log_likelihood`` (use ``student_as_denoiser(student)`` for a CTM student).
        images_uint8: (B, C, H, W) integer images with values in [0, 2^bits - 1].
        bits: bits per pixel value (>= 1).
        dequantize: 'uniform' or 'none'.
        generator: needed for 'uniform' and for divergence='hutchinson' (dequantization noise is drawn first).
        return_stderr: also return the Hutchinson standard error, converted to bits per dim.
        **likelihood_kwargs: forwarded to ``log_likelihood`` (sigma_min, sigma_max, divergence, num_probes,
            rtol, atol, method).

    Returns:
        (B,) float64 bits per dimension (or (bpd, stderr)).
    """
    check_in("dequantize", dequantize, DEQUANTIZATIONS)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits must be an int >= 1, got {bits!r}")
    q = torch.as_tensor(images_uint8)
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"images_uint8 must have an integer dtype, got {q.dtype}")
    if q.ndim < 2:
        raise ValueError(f"images_uint8 must be (B, ...) with a batch dimension, got shape {tuple(q.shape)}")
    levels = 2**bits
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= levels):
        raise ValueError(
            f"images_uint8 values must lie in [0, {levels - 1}] for bits={bits}, "
            f"got range [{int(q.min())}, {int(q.max())}]"
        )
    if dequantize == "uniform":
        if generator is None:
            raise ValueError("dequantize='uniform' needs generator= (a seeded torch.Generator); got None")
        u = torch.rand(q.shape, generator=generator, dtype=torch.float64, device=generator.device).to(q.device)
    else:
        u = torch.full(q.shape, 0.5, dtype=torch.float64, device=q.device)
    x = (q.to(torch.float64) + u) / levels * 2.0 - 1.0  # (B, C, H, W) in [-1, 1)
    D = q[0].numel()
    out = log_likelihood(
        denoiser, x, class_labels, generator=generator, return_stderr=return_stderr, **likelihood_kwargs
    )
    log_p, stderr = out if return_stderr else (out, None)
    bpd = -(log_p + D * math.log(2.0 / levels)) / (D * math.log(2.0))
    if not return_stderr:
        return bpd
    return bpd, stderr / (D * math.log(2.0))
