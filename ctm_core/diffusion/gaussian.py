"""Closed forms for Gaussian data x_0 ~ N(mu, Sigma) under the VE/EDM forward process x_sigma = x_0 + sigma * eps.

Used as the analytic test problem (docs/style.md#17a-closed-form-tests) for samplers, likelihoods and CTM losses. With
Sigma = U diag(lam) U^T (eigendecomposition), every quantity is a spectral function of Sigma:

- marginal:     p_sigma = N(mu, Sigma + sigma^2 I)
- denoiser:     D(x; sigma) = E[x_0 | x_sigma = x] = mu + Sigma (Sigma + sigma^2 I)^{-1} (x - mu)
- PF-ODE:       dx/dsigma = (x - D(x; sigma)) / sigma  (Karras et al. 2022, eq. 4 with s(t)=1, sigma(t)=t), whose
                exact flow map from level t to level s is
                Phi_{t->s}(x) = mu + (Sigma + s^2 I)^{1/2} (Sigma + t^2 I)^{-1/2} (x - mu)
                (each eigen-direction solves dy/dsigma = sigma y / (lam + sigma^2)).
- CTM:          G(x_t, t, s) = Phi_{t->s}(x_t) (Kim et al. 2024, eq. 5), and g from G = (s/t) x_t + (1 - s/t) g;
                g(x, t, t) = D(x; t) (the limit s -> t).

Vectors are flattened pixels: x is (B, d) or (B, C, H, W) with d = C*H*W; outputs keep the input's shape. All
tensors are float64.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ExactStudent", "GaussianData"]


class GaussianData:
    """Gaussian data N(mu, Sigma) on flattened vectors of dimension d.

    Args:
        mu: (d,) mean.
        Sigma: (d, d) symmetric positive semi-definite covariance.
    """

    def __init__(self, mu: torch.Tensor, Sigma: torch.Tensor) -> None:
        mu = torch.as_tensor(mu, dtype=torch.float64)
        Sigma = torch.as_tensor(Sigma, dtype=torch.float64)
        if mu.ndim != 1:
            raise ValueError(f"mu must be a (d,) vector, got shape {tuple(mu.shape)}")
        d = mu.shape[0]
        if Sigma.shape != (d, d):
            raise ValueError(f"Sigma must be ({d}, {d}) to match mu, got shape {tuple(Sigma.shape)}")
        if not torch.allclose(Sigma, Sigma.T, rtol=1e-10, atol=1e-12):
            raise ValueError("Sigma must be symmetric")
        lam, U = torch.linalg.eigh(Sigma)
        if float(lam.min()) < -1e-10 * max(1.0, float(lam.abs().max())):
            raise ValueError(f"Sigma must be positive semi-definite, got smallest eigenvalue {float(lam.min())}")
        self.mu, self.Sigma, self.d = mu, Sigma, d
        self.lam = lam.clamp(min=0.0)  # (d,) eigenvalues of Sigma
        self.U = U  # (d, d) eigenvectors (columns)

    # -- helpers -------------------------------------------------------------------------------------------------------

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B, d) float64, checking that the trailing dims hold d numbers."""
        x = torch.as_tensor(x)
        if x.ndim < 2 or x[0].numel() != self.d:
            raise ValueError(f"x must be (B, d) or (B, C, H, W) with d = C*H*W = {self.d}, got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.d).to(torch.float64)

    @staticmethod
    def _per_sample(sigma, B: int) -> torch.Tensor:
        """sigma (scalar, 0-dim or (B,)) -> (B, 1) float64."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.ndim == 0:
            sigma = sigma.expand(B)
        if sigma.shape != (B,):
            raise ValueError(f"sigma must be a scalar or have shape ({B},), got shape {tuple(sigma.shape)}")
        return sigma.reshape(B, 1)

    def _spectral(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """mu + U diag(factor_b) U^T (x_b - mu) for each row b; x (B, d), factor (B, d)."""
        y = (x - self.mu) @ self.U  # (B, d) coordinates in the eigenbasis
        return self.mu + (factor * y) @ self.U.T

    # -- closed forms --------------------------------------------------------------------------------------------------

    def denoiser(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact D(x; sigma) = mu + Sigma (Sigma + sigma^2 I)^{-1} (x - mu). x: (B, ...) -> same shape, float64."""
        xf = self._flat(x)  # (B, d)
        s2 = self._per_sample(sigma, xf.shape[0]) ** 2  # (B, 1)
        return self._spectral(xf, self.lam / (self.lam + s2)).reshape(x.shape)

    __call__ = denoiser

    def flow(self, x_t: torch.Tensor, t, s) -> torch.Tensor:
        """Exact PF-ODE map from level t to level s: mu + (Sigma + s^2 I)^{1/2} (Sigma + t^2 I)^{-1/2} (x_t - mu)."""
        xf = self._flat(x_t)
        B = xf.shape[0]
        t2, s2 = self._per_sample(t, B) ** 2, self._per_sample(s, B) ** 2
        return self._spectral(xf, torch.sqrt((self.lam + s2) / (self.lam + t2))).reshape(x_t.shape)

    def flow_matrix(self, t: float, s: float) -> torch.Tensor:
        """(d, d) matrix M with flow(x, t, s) = mu + M (x - mu)."""
        return self.U @ torch.diag(torch.sqrt((self.lam + s**2) / (self.lam + t**2))) @ self.U.T

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log N(x; mu, Sigma + sigma^2 I) per sample, (B,). Needs Sigma + sigma^2 I nonsingular."""
        xf = self._flat(x)
        B = xf.shape[0]
        var = self.lam + self._per_sample(sigma, B) ** 2  # (B, d) eigenvalues of the marginal covariance
        y = (xf - self.mu) @ self.U
        return -0.5 * ((y**2 / var).sum(1) + torch.log(var).sum(1) + self.d * math.log(2 * math.pi))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws from N(mu, Sigma), (n, d) float64. Pass a seeded ``generator`` for reproducibility."""
        z = torch.randn(n, self.d, dtype=torch.float64, generator=generator)
        return self.mu + (z * self.lam.sqrt()) @ self.U.T

    def pf_ode_log_likelihood_closed_form(
        self, x: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0
    ) -> torch.Tensor:
        """What the PF-ODE likelihood computes exactly for this data, per sample (B,).

        The ODE maps x at sigma_min to x_T = mu + A (x - mu), A = (Sigma + sigma_max^2 I)^{1/2} (Sigma +
        sigma_min^2 I)^{-1/2}, and the prior is N(0, sigma_max^2 I) (not the true marginal N(mu, Sigma +
        sigma_max^2 I)), so log p = log N(x_T; 0, sigma_max^2 I) + log det A.
        """
        xf = self._flat(x)
        x_T = self.flow(xf, sigma_min, sigma_max)  # (B, d)
        log_det_A = 0.5 * torch.log((self.lam + sigma_max**2) / (self.lam + sigma_min**2)).sum()
        log_norm = self.d * (math.log(sigma_max) + 0.5 * math.log(2 * math.pi))
        log_prior = -0.5 * ((x_T / sigma_max) ** 2).sum(1) - log_norm
        return log_prior + log_det_A


class ExactStudent:
    """The ideal CTM student for Gaussian data: G(x_t, t, s) is the exact PF-ODE flow map.

    ``g`` follows G's parameterization G = (s/t) x_t + (1 - s/t) g (Kim et al. 2024, eq. 5), i.e.
    g = (G - (s/t) x_t) / (1 - s/t), and g(x, t, t) = D(x; t) (the s -> t limit). t, s: scalars or (B,).
    """

    def __init__(self, data: GaussianData) -> None:
        self.data = data

    def G(self, x_t: torch.Tensor, t, s, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.data.flow(x_t, t, s)

    __call__ = G

    def g(self, x_t: torch.Tensor, t, s, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        xf = self.data._flat(x_t)
        B = xf.shape[0]
        t_, s_ = GaussianData._per_sample(t, B), GaussianData._per_sample(s, B)  # (B, 1)
        same = t_ == s_  # (B, 1)
        ratio = s_ / t_
        G = self.data.flow(xf, t_.squeeze(1), s_.squeeze(1))
        g_jump = (G - ratio * xf) / torch.where(same, torch.ones_like(ratio), 1.0 - ratio)
        D = self.data.denoiser(xf, t_.squeeze(1))
        return torch.where(same, D, g_jump).reshape(x_t.shape)
