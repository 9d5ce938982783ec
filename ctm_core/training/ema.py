"""Exponential moving averages of the student: the CTM target network θ⁻ and the evaluation EMAs.

θ_ema ← μ·θ_ema + (1 − μ)·θ after every generator step (Kim-Dongjun/ctm-cifar10 cm/nn.py:57-68,
cm/train_util.py:997-1018; docs/ctm.md#28-ema-and-optimiser), computed as one fused
``torch._foreach_lerp_(θ_ema, θ, 1 − μ)``. Buffers are copied, not averaged. The target network is used only in the
outer jumps of the CTM loss.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["frozen_copy", "update_ema_", "EMABank"]


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
