"""Bits/dim of quantised images under a denoiser, the way the likelihood stage measures it.

`bits_per_dim_levels` turns the exact PF-ODE log-density of `ctm_core.diffusion.likelihood.log_likelihood` into
bits/dim of integer images with any number of levels (the field's convention for 8-bit data; bins centred on the
levels for others, such as the 17-level digits); `score_bits_per_dim` averages it over images with its error bars.
See docs/evaluation.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

__all__ = ["bits_per_dim_levels", "protocol_text", "score_bits_per_dim"]


def bits_per_dim_levels(
    denoiser: Callable[..., torch.Tensor],
    levels: torch.Tensor,
    num_levels: int,
    *,
    dequantize: str,
    generator: torch.Generator,
    **likelihood_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image bits/dim of integer images with `num_levels` levels; returns (bpd (B,), Hutchinson stderr (B,)).

    Power-of-two levels (8-bit data): `ctm_core.diffusion.likelihood.bits_per_dim` with bits = log2(L), the field's
    convention (bins of width 2/L on [-1, 1], `+ bits − 1` offset) so numbers compare with published ones.

    Other L (17-level digits): the data were mapped by prepare to the L points x_k = k·Δ − 1 with Δ = 2/(L − 1),
    so the model's bins are the cells of width Δ CENTRED on those points, B_k = [x_k − Δ/2, x_k + Δ/2) (the
    outer cells stick out of [-1, 1] by Δ/2). With uniform dequantisation x = x_k + (u − ½)Δ, u ~ U[0,1)^D:

        P(k) = ∫_{B_k} p(x) dx,   −log P(k) ≤ E_u[−log p(x)] − D log Δ      (Jensen; Theis et al. 2016)
        bpd  = (−log p(x) − D log Δ) / (D ln 2),

    i.e. −log2 p(x)/D + log2((L − 1)/2). Check: the uniform density on the L cells, p = (LΔ)^(−D), gives exactly
    log2 L bits (4.09 for digits), the cost of a uniform guess. `dequantize='none'` uses the bin centres (u = ½):
    the point density times the bin volume, an approximation rather than a bound. The log-density comes from
    `ctm_core.diffusion.likelihood.log_likelihood` (exact PF-ODE, sigma from sigma_min to sigma_max).

    levels: (B, C, H, W) integers in 0..L−1. The dequantisation noise is drawn from `generator` first, then the
    Hutchinson probes (the same order as `bits_per_dim`).
    """
    from ctm_core.diffusion.likelihood import bits_per_dim, log_likelihood

    L = int(num_levels)
    if L < 2:
        raise ValueError(f"num_levels: expected an int >= 2, got {num_levels!r}")
    q = torch.as_tensor(levels).to(torch.int64)
    if L & (L - 1) == 0:
        bpd, se = bits_per_dim(
            denoiser,
            q,
            bits=L.bit_length() - 1,
            dequantize=dequantize,
            generator=generator,
            return_stderr=True,
            **likelihood_kwargs,
        )
        return bpd, se
    if dequantize not in ("uniform", "none"):
        raise ValueError(f"dequantize: expected 'uniform' or 'none', got {dequantize!r}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= L):
        raise ValueError(f"levels: expected values in [0, {L - 1}], got [{int(q.min())}, {int(q.max())}]")
    delta = 2.0 / (L - 1)
    if dequantize == "uniform":
        u = torch.rand(q.shape, generator=generator, dtype=torch.float64, device=generator.device).to(q.device)
    else:
        u = torch.full(q.shape, 0.5, dtype=torch.float64, device=q.device)
    x = (q.to(torch.float64) + u - 0.5) * delta - 1.0  # (B, C, H, W)
    D = q[0].numel()
    log_p, stderr = log_likelihood(denoiser, x, generator=generator, return_stderr=True, **likelihood_kwargs)
    bpd = -(log_p + D * math.log(delta)) / (D * math.log(2.0))
    return bpd, stderr / (D * math.log(2.0))


def score_bits_per_dim(
    name: str,
    denoiser: Callable[..., torch.Tensor],
    levels: torch.Tensor,
    num_levels: int,
    *,
    sigma_min: float,
    sigma_max: float,
    seed: int,
    dequantize: str,
    divergence: str,
    num_probes: int,
    rtol: float,
    atol: float,
    progress: bool = False,
) -> dict[str, float]:
    """Mean bits/dim of `levels` (B, C, H, W) under `denoiser` as flat metrics: `bpd_<name>`, its standard error over
    images `bpd_<name>_stderr` (B > 1; includes the dequantisation and Hutchinson noise), the Hutchinson-only part
    `bpd_<name>_hutchinson_stderr` (hutchinson with num_probes > 1) and `bpd_<name>_seconds`.

    One `torch.Generator` seeded with `seed`: the same images get the same dequantisation noise under every network.
    """
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with tqdm(total=len(levels), desc=f"bits/dim {name}", unit="img", disable=not progress, leave=False) as bar:
        bpd, se = bits_per_dim_levels(
            denoiser,
            levels,
            num_levels,
            dequantize=dequantize,
            generator=gen,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            divergence=divergence,
            num_probes=num_probes,
            rtol=rtol,
            atol=atol,
        )
        bar.update(len(levels))
    n = len(bpd)
    out = {f"bpd_{name}": float(bpd.mean())}
    if n > 1:
        out[f"bpd_{name}_stderr"] = float(bpd.std(unbiased=True)) / math.sqrt(n)
    if divergence == "hutchinson" and num_probes > 1:
        out[f"bpd_{name}_hutchinson_stderr"] = float(se.pow(2).sum().sqrt()) / n
    out[f"bpd_{name}_seconds"] = time.perf_counter() - t0
    return out


def protocol_text(num_levels: int) -> str:
    """The discretisation used for data with `num_levels` levels (from `bits_per_dim_levels`' doc), one paragraph."""
    paras = [" ".join(p.split()) for p in bits_per_dim_levels.__doc__.split("\n\n")]
    L = int(num_levels)
    body = paras[1] if L & (L - 1) == 0 else " ".join(paras[2:5])
    return (
        f"Exact PF-ODE likelihood (ctm_core.diffusion.likelihood.log_likelihood; not the official ELBO, sony/ctm#13); "
        f"teacher D(x; sigma), student g(x, sigma, sigma); {L} levels: {body}"
    )
