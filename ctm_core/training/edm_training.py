"""EDM teacher training: the EDM loss and a trainer built on ``ctm_core.training.loop.Trainer``.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", §5 and Table 1:

    ln σ ~ N(P_mean, P_std²) (P_mean −1.2, P_std 1.2),   λ(σ) = (σ² + σ_d²)/(σ·σ_d)²,
    L = E λ(σ)·‖D_θ(x + σ·n; σ) − x‖²,  n ~ N(0, I).

The loss here is the per-sample mean over the non-batch dims (EDM sums and divides by the batch; the two differ
by the constant C·H·W). Works with any denoiser ``D(x, sigma, class_labels=None)`` (``EDMPrecond`` or
``ctm_core.nets.toy.ToyEDMDenoiser``). Exporting the teacher uses ``ctm_core.io.teacher_format.save_teacher``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ctm_core.config import TeacherTrainParams
from ctm_core.nets.utils import append_dims
from ctm_core.training.ema import edm_ema_beta, update_ema_
from ctm_core.training.loop import Trainer

__all__ = ["edm_sigmas", "edm_loss", "EDMTrainer", "export_teacher"]


def edm_sigmas(
    batch: int,
    generator: torch.Generator,
    *,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """σ = exp(P_mean + P_std·z), z ~ N(0, 1): (B,)."""
    z = torch.randn(batch, generator=generator, dtype=torch.float64)
    return (P_mean + P_std * z).exp().to(dtype)


def edm_loss(
    denoiser: Callable,
    x0: torch.Tensor,
    generator: torch.Generator,
    *,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample EDM loss λ(σ)·mean (D(x0 + σn; σ) − x0)²: x0 (B, ...) -> (B,). Noise from ``generator`` (CPU)."""
    B = x0.shape[0]
    sigma = edm_sigmas(B, generator, P_mean=P_mean, P_std=P_std, dtype=x0.dtype).to(x0.device)
    n = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # (B,)
    D_x = denoiser(x0 + append_dims(sigma, x0.ndim) * n, sigma, class_labels=class_labels)
    return weight * (D_x.float() - x0.float()).square().reshape(B, -1).mean(dim=1)


class EDMTrainer(Trainer):
    """Trains an EDM denoiser on the `teacher.train` section (Adam by default, as EDM train.py) with EDM's EMA: a
    half-life of ``config.ema_halflife_kimg`` thousand images with a ramp-up of ``config.ema_rampup_ratio``
    (``ctm_core.training.ema.edm_ema_beta``, a new rate every step); no target network.

    The EMA is kept in the loop's ``EMABank`` slot under the key ``EMA_KEY`` (a placeholder rate, never used as
    one), so checkpoints store and restore it like the student's EMAs."""

    kind = "edm"
    loss_fields = ("P_mean", "P_std", "sigma_data")

    def __init__(self, config: TeacherTrainParams, denoiser: nn.Module, data, **kwargs):
        if not isinstance(config, TeacherTrainParams):
            raise TypeError(f"config must be a TeacherTrainParams (ctm_core.config), got {type(config).__name__}")
        sd = getattr(denoiser, "sigma_data", config.sigma_data)
        if float(sd) != config.sigma_data:
            raise ValueError(
                f"sigma_data: expected the denoiser's {sd}, got {config.sigma_data} (fix: set teacher.train.sigma_data)"
            )
        super().__init__(config, denoiser, data, **kwargs)

    EMA_KEY = 0.0  # the EMABank slot of the one teacher EMA; its rate comes from edm_ema_beta each step

    def ema_rates(self) -> tuple[float, ...]:
        return (self.EMA_KEY,)

    def ema_beta(self) -> float:
        """β of the EMA update after the current step (images seen before it: step · batch)."""
        c = self.config
        return edm_ema_beta(self.step * c.batch, c.batch, c.ema_halflife_kimg, c.ema_rampup_ratio)

    def after_optimizer_step(self) -> None:
        update_ema_(self.emas[self.EMA_KEY], self.model, self.ema_beta())

    def microbatch_loss(self, x0, labels, ctx: dict[str, Any], generator: torch.Generator):
        c = self.config
        loss = edm_loss(
            self.model, x0, generator, P_mean=c.P_mean, P_std=c.P_std, sigma_data=c.sigma_data, class_labels=labels
        ).mean()
        return loss, {"loss_edm": loss.detach()}

    def ema_model(self) -> nn.Module:
        """The EMA weights (the teacher that is exported)."""
        return self.emas[self.EMA_KEY]


def export_teacher(net: nn.Module, out_dir: str | os.PathLike) -> dict:
    """Write ``net`` (an ``EDMPrecond`` with ``init_kwargs``, usually an EMA copy) in the teacher format via
    ``ctm_core.io.teacher_format.save_teacher`` (the format's owner); returns the written config dict."""
    from ctm_core.io.teacher_format import save_teacher

    init_kwargs = getattr(net, "init_kwargs", None)
    if init_kwargs is None:
        raise ValueError(f"export_teacher needs a precond with init_kwargs (e.g. EDMPrecond), got {type(net).__name__}")
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return save_teacher(type(net).__name__, dict(init_kwargs), state, out_dir)
