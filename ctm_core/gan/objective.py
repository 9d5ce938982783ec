"""GAN phase of CTM: hinge losses, the adaptive GAN weight, the discriminator optimizer (docs/ctm.md#26-gan-phase).

The discriminator networks live in ``ctm_core/gan/discriminator.py`` and DiffAugment in ``ctm_core/gan/diffaug.py``;
this file holds what the trainer calls:

- ``d_hinge_loss(d, real, fake, generator)``: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))
  (C cm/karras_diffusion.py ``get_GAN_loss``, learn_generator=False), with independent DiffAugment draws for
  real and fake (``gan_different_augment=True``) and ``fake`` detached;
- ``g_loss(d, fake, generator)``: mean(-D(fake)) (``get_GAN_loss``, learn_generator=True);
- ``adaptive_gan_weight(L_ctm, L_g, W)`` = clip(clamp(||grad_W L_ctm|| / (||grad_W L_g|| + 1e-4), 0, 1e4),
  0.01, 10), detached (``calculate_adaptive_weight`` + ``th.clip(d_weight, 0.01, 10.)``);
- ``make_d_optimizer``: RAdam(lr=2e-3, betas=(0.5, 0.9)) over the trainable D parameters (C cm/train_util.py
  :123-125, d_lr C cm/script_util.py:49);
- ``build_discriminator('projected' | 'scratch', ...)``.

Each D returns a list of (B, n_k) logit tensors; a loss is the mean over the list of per-tensor means, which
equals the official mean over per-sample logit rows (C karras_diffusion.py ``get_GAN_loss``).

Alternation (the trainer's job, docs/ctm.md#26-gan-phase): even steps update G with CTM + DSM + lambda_GAN * g_loss,
odd steps update D only with ``d_hinge_loss``; real = clean data x_0, fake = the CTM estimate x_est.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ctm_core.gan.diffaug import DiffAugmentParams, apply_diffaugment, diff_augment, sample_diffaugment_params
from ctm_core.gan.discriminator import (
    OFFICIAL_BACKBONES,
    DeiTDistilled,
    Discriminator,
    EfficientNetLite,
    ProjectedDiscriminator,
    ScratchDiscriminator,
)

__all__ = [
    "Discriminator",
    "ProjectedDiscriminator",
    "ScratchDiscriminator",
    "DeiTDistilled",
    "EfficientNetLite",
    "OFFICIAL_BACKBONES",
    "DiffAugmentParams",
    "apply_diffaugment",
    "diff_augment",
    "sample_diffaugment_params",
    "hinge_d_loss_from_logits",
    "g_loss_from_logits",
    "d_hinge_loss",
    "g_loss",
    "adaptive_gan_weight",
    "make_d_optimizer",
    "build_discriminator",
    "D_LR",
    "D_BETAS",
]

D_LR = 2e-3  # d_lr, C cm/script_util.py:49
D_BETAS = (0.5, 0.9)  # C cm/train_util.py:123-125
ADAPTIVE_EPS = 1e-4  # calculate_adaptive_weight denominator
ADAPTIVE_MAX = 1e4  # clamp(., 0, 1e4)
GAN_WEIGHT_CLIP = (0.01, 10.0)  # th.clip(d_weight, 0.01, 10.) for lambda_GAN only


def _check_logits(name: str, logits: Sequence[torch.Tensor]) -> None:
    if len(logits) == 0:
        raise ValueError(f"{name}: expected a non-empty list of logit tensors, got an empty list")


def hinge_d_loss_from_logits(logits_real: Sequence[torch.Tensor], logits_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean_k mean(relu(1 - l_real_k)) + mean_k mean(relu(1 + l_fake_k)) -> scalar."""
    _check_logits("hinge_d_loss_from_logits(logits_real)", logits_real)
    _check_logits("hinge_d_loss_from_logits(logits_fake)", logits_fake)
    loss_real = sum(F.relu(1.0 - l).mean() for l in logits_real) / len(logits_real)
    loss_fake = sum(F.relu(1.0 + l).mean() for l in logits_fake) / len(logits_fake)
    return loss_real + loss_fake


def g_loss_from_logits(logits_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean_k mean(-l_fake_k) -> scalar."""
    _check_logits("g_loss_from_logits", logits_fake)
    return sum((-l).mean() for l in logits_fake) / len(logits_fake)


def d_hinge_loss(d: Discriminator, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Discriminator hinge loss. real = x_0, fake = x_est (detached here): (B, C, H, W) in [-1, 1] -> scalar.

    Fake and real are passed through D in two calls (separate BatchNorm statistics, as officially), each
    with its own DiffAugment draws from ``generator`` (fake first, then real).
    """
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            f"d_hinge_loss: real and fake images differ in shape: {tuple(real.shape)} vs {tuple(fake.shape)}"
        )
    logits_fake = d(fake.detach(), generator)
    logits_real = d(real.detach(), generator)
    return hinge_d_loss_from_logits(logits_real, logits_fake)


def g_loss(d: Discriminator, fake: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Generator loss mean(-D(fake)); gradients flow through D's (frozen) feature networks into ``fake``.

    D's own parameters also receive gradients; the trainer zeroes them (or freezes D) before its D step.
    """
    return g_loss_from_logits(d(fake, generator))


def adaptive_gan_weight(L_ctm: torch.Tensor, L_g: torch.Tensor, last_layer_weight: torch.Tensor) -> torch.Tensor:
    """lambda_GAN = clip(clamp(||dL_ctm/dW|| / (||dL_g/dW|| + 1e-4), 0, 1e4), 0.01, 10), detached (0-dim).

    L_ctm, L_g: scalars (microbatch means); W = the student's last-layer weight (``last_layer_weight()``).
    Both graphs are retained (C karras_diffusion.py ``calculate_adaptive_weight``, ``get_GAN_loss``).
    """
    if L_ctm.ndim != 0 or L_g.ndim != 0:
        raise ValueError(
            f"adaptive_gan_weight: expected scalar losses, got shapes {tuple(L_ctm.shape)}, {tuple(L_g.shape)}"
        )
    grads = []
    for name, loss in (("L_ctm", L_ctm), ("L_g", L_g)):
        (grad,) = torch.autograd.grad(loss, last_layer_weight, retain_graph=True, allow_unused=True)
        if grad is None:
            raise ValueError(f"adaptive_gan_weight: {name} does not depend on last_layer_weight")
        grads.append(grad)
    weight = torch.linalg.vector_norm(grads[0]) / (torch.linalg.vector_norm(grads[1]) + ADAPTIVE_EPS)
    weight = torch.clamp(weight, 0.0, ADAPTIVE_MAX)
    return torch.clip(weight, *GAN_WEIGHT_CLIP).detach()


def make_d_optimizer(d: Discriminator, lr: float = D_LR, betas: tuple[float, float] = D_BETAS) -> torch.optim.RAdam:
    """RAdam over the trainable discriminator parameters (heads only for the projected D)."""
    if not lr > 0:
        raise ValueError(f"make_d_optimizer: lr must be > 0, got {lr!r}")
    return torch.optim.RAdam(d.trainable_parameters(), lr=lr, betas=tuple(betas), weight_decay=0.0)


def build_discriminator(
    kind: str,
    *,
    img_resolution: int,
    img_channels: int = 3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    weights: Mapping[str, str | os.PathLike] | None = None,
    random_init: bool = False,
    **kwargs,
) -> Discriminator:
    """Build ``'projected'`` (official; needs ``weights`` for both backbones or ``random_init=True``) or
    ``'scratch'`` (offline, no pretrained weights). Extra kwargs go to the class constructor."""
    if kind == "projected":
        if img_channels != 3:
            raise ValueError(
                f"build_discriminator('projected'): the feature networks take RGB, got img_channels={img_channels}"
            )
        return ProjectedDiscriminator(
            weights=weights, random_init=random_init, generator=generator, device=device, **kwargs
        )
    if kind == "scratch":
        if weights:
            raise ValueError(f"build_discriminator('scratch'): takes no pretrained weights, got {sorted(weights)}")
        return ScratchDiscriminator(img_resolution, img_channels, generator=generator, device=device, **kwargs)
    raise ValueError(f"build_discriminator: kind must be one of ['projected', 'scratch'], got {kind!r}")
