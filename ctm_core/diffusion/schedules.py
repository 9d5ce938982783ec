"""Noise-level (sigma) grids shared by the samplers, the teacher solver and the likelihood code.

Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models", eq. (5):

    t_i = (sigma_max^(1/rho) + i/(N-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,   i = 0..N-1,

ordered from sigma_max (index 0) down to sigma_min (index N-1). Same grid in NVlabs/edm generate.py:35-37 and in the
CTM code (Kim-Dongjun/ctm-cifar10 cm/karras_diffusion.py:119-130; CTM_FACTS §0).
"""

from __future__ import annotations

import torch

from ctm_core.nets.utils import check_positive

__all__ = ["karras_sigmas"]


def karras_sigmas(
    num: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Karras rho-grid of ``num`` noise levels, descending from ``sigma_max`` to ``sigma_min`` (both included).

    Returns a (num,) tensor. No trailing 0 is appended (samplers that need ``t_N = 0`` append it themselves).
    The grid is computed in float64 and then cast to ``dtype``.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"num must be an int >= 2 (the grid includes both sigma_max and sigma_min), got {num!r}")
    check_positive("sigma_min", sigma_min)
    check_positive("rho", rho)
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_max must be > sigma_min, got sigma_max={sigma_max!r}, sigma_min={sigma_min!r}")
    sigmas = _karras_grid(num, sigma_min, sigma_max, rho, device=device)
    # Pin the end points exactly (the power of a root can be off by one ulp, e.g. 0.002 + 3e-18).
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas.to(dtype)


def _karras_grid(
    num: int, sigma_min: float, sigma_max: float, rho: float, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Unvalidated float64 Karras grid, evaluated literally as in eq. (5) (end points not pinned).

    ``edm_sampler`` uses this form so that its time steps agree with EDM's to the last bit.
    """
    i = torch.arange(num, dtype=torch.float64, device=device)  # (num,)
    r_max, r_min = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (r_max + i / (num - 1) * (r_min - r_max)) ** rho
