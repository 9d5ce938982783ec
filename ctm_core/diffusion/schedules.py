"""Noise-level (sigma) schedules: the one Karras rho-interpolation every grid and sigma draw of the project uses.

Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models", eq. (5):

    sigma(u) = (sigma_max^(1/rho) + u * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,   u in [0, 1],

so sigma(0) = sigma_max and sigma(1) = sigma_min. The N-point grid is t_i = sigma(i / (N-1)), i = 0..N-1, ordered from
sigma_max (index 0) down to sigma_min (index N-1). Same grid in NVlabs/edm generate.py:35-37 and in the CTM code
(Kim-Dongjun/ctm-cifar10 cm/karras_diffusion.py:119-130; docs/ctm.md#0-notation-and-time-grid); the CTM DSM loss draws u
~ U[0, 0.7].
"""

from __future__ import annotations

import torch

from ctm_core.nets.utils import check_positive

__all__ = ["karras_interp", "karras_sigmas"]


def karras_interp(u: torch.Tensor, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """sigma(u) of eq. (5), elementwise for u in [0, 1] (any shape; float64): u = 0 -> sigma_max, u = 1 -> sigma_min.

    Evaluated literally, (r_max + u * (r_min - r_max)) ** rho with r = sigma ** (1 / rho), so every caller gets the
    same bits for the same u.
    """
    r_max, r_min = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (r_max + u * (r_min - r_max)) ** rho


def karras_sigmas(
    num: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    pin_ends: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Karras rho-grid sigma(i / (num - 1)), i = 0..num-1: (num,), descending from ``sigma_max`` to ``sigma_min``.

    No trailing 0 is appended (samplers that need ``t_N = 0`` append it themselves). The grid is computed in float64
    and then cast to ``dtype``. ``pin_ends`` sets the end points to exactly ``sigma_max``/``sigma_min`` (the power of
    a root can be one ulp off, e.g. 0.002 + 3e-18); ``edm_sampler`` passes False so that its time steps agree with
    EDM's (which does not pin them) to the last bit.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"num must be an int >= 2 (the grid includes both sigma_max and sigma_min), got {num!r}")
    check_positive("sigma_min", sigma_min)
    check_positive("rho", rho)
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_max must be > sigma_min, got sigma_max={sigma_max!r}, sigma_min={sigma_min!r}")
    i = torch.arange(num, dtype=torch.float64, device=device)  # (num,)
    sigmas = karras_interp(i / (num - 1), sigma_min, sigma_max, rho)
    if pin_ends:
        sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas.to(dtype)
