"""Exponential moving averages: the CTM student's target network θ⁻ and evaluation EMAs, and the EDM teacher's EMA.

θ_ema ← μ·θ_ema + (1 − μ)·θ after every generator step (Kim-Dongjun/ctm-cifar10 cm/nn.py:57-68,
cm/train_util.py:997-1018; docs/ctm.md#28-ema-and-optimiser), computed as one fused
``torch._foreach_lerp_(θ_ema, θ, 1 − μ)``. Buffers are copied, not averaged. The target network is used only in the
outer jumps of the CTM loss. The distillation uses these fixed rates μ, as the official code does.

The EDM teacher's EMA has a rate per step instead (`edm_ema_beta`, docs/edm.md#a6-teacher-ema): a half-life counted
in training images, capped during a ramp-up at a fraction of the images seen so far, so that a short run does not
carry its random initial weights (a fixed 0.999 over 1 200 steps still weighs them by 0.999^1200 ≈ 0.30).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["frozen_copy", "update_ema_", "edm_ema_beta", "EMABank"]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parameter ``requires_grad=False`` (same train/eval mode)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


def _check_rate(name: str, rate: float) -> float:
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {rate!r}")
    return rate


@torch.no_grad()
def update_ema_(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """In place: ema_params ← lerp(ema_params, params, 1 − rate); buffers copied from ``model``."""
    rate = _check_rate("rate", rate)
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    if len(ema_params) != len(params):
        raise ValueError(f"update_ema_: ema has {len(ema_params)} parameters, model has {len(params)}")
    if ema_params:
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - rate)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def edm_ema_beta(cur_nimg: int, batch: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """EDM's EMA rate β for the update after the optimizer step that saw images ``cur_nimg .. cur_nimg + batch``.

        h = halflife_kimg · 1000  images,  h ← min(h, rampup_ratio · cur_nimg)  (ramp-up; skipped for None),
        β = 0.5^(batch / max(h, 1e-8))

    (NVlabs/edm training/training_loop.py:37-38 defaults 500 kimg and 0.05, its "Update EMA" block after the
    optimizer step; docs/edm.md#a6-teacher-ema). After h images the old weights weigh one half. ``cur_nimg`` counts
    the images of the steps before this one, so the first update (cur_nimg 0) with a ramp-up has β = 0: the EMA
    starts as a copy of the trained weights, never of the initial ones.
    """
    if batch < 1 or cur_nimg < 0 or not halflife_kimg > 0:
        raise ValueError(
            f"edm_ema_beta: expected batch >= 1, cur_nimg >= 0, halflife_kimg > 0, "
            f"got {batch!r}, {cur_nimg!r}, {halflife_kimg!r}"
        )
    if rampup_ratio is not None and not rampup_ratio > 0:
        raise ValueError(f"edm_ema_beta: rampup_ratio must be > 0 or None, got {rampup_ratio!r}")
    h = halflife_kimg * 1000.0  # half-life in images
    if rampup_ratio is not None:
        h = min(h, cur_nimg * rampup_ratio)
    return 0.5 ** (batch / max(h, 1e-8))


class EMABank(nn.Module):
    """Several EMA copies of one model, keyed by their rate (``'0.999'``, ``'0.9999'``…).

    ``bank[rate]`` returns the copy; ``update(model)`` lerps all of them; ``state_dict`` nests the copies
    under ``models.<key>`` (the key is ``repr(float(rate))`` with '.' replaced by '_').
    """

    def __init__(self, model: nn.Module, rates=(0.999, 0.9999)):
        super().__init__()
        self.rates = tuple(_check_rate("ema rate", r) for r in rates)
        self.models = nn.ModuleDict({self.key(r): frozen_copy(model) for r in self.rates})

    @staticmethod
    def key(rate: float) -> str:
        return repr(float(rate)).replace(".", "_")

    def __getitem__(self, rate: float) -> nn.Module:
        return self.models[self.key(rate)]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for r in self.rates:
            update_ema_(self.models[self.key(r)], model, r)
