"""Dynamic loss scaling for fp16 activations, the way official CTM trains (docs/presets.md#mixed-precision).

Official (C cm/fp16_util.py:191-260, cm/train_util.py:41): fp32 master weights, the loss multiplied by
2^lg_loss_scale before the backward, lg_loss_scale starting at 20 (INITIAL_LOG_LOSS_SCALE); when a gradient is inf
or NaN the step is skipped (no optimizer step, no EMA update) and lg_loss_scale drops by 1, otherwise the gradients
are divided by the scale, the optimizer steps and lg_loss_scale grows by 0.001.

Here the trained weights are fp32 already (the UNets cast per layer), so they are the master weights. One difference,
chosen for exactness: the scale applied is 2^floor(log2_scale), a power of two, so multiplying and dividing by it is
exact in binary floating point (an fp32 run with the scaler is bitwise the run without it, and CTM's adaptive weight
reads ‖∇_W L_CTM‖ from the same backward, ctm_core.training.losses.ctm_dsm_backward); log2_scale itself moves as
the official one does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["BACKOFF", "GROWTH", "INITIAL_LOG2_SCALE", "DynamicLossScale"]

INITIAL_LOG2_SCALE = 20.0  # C cm/train_util.py:41 INITIAL_LOG_LOSS_SCALE
GROWTH = 1e-3  # C cm/fp16_util.py fp16_scale_growth: + per step without overflow
BACKOFF = 1.0  # C cm/fp16_util.py: lg_loss_scale -= 1 on overflow


class DynamicLossScale:
    """The loss scale of fp16 training: ``scale`` multiplies the loss, ``unscale_`` checks and divides the gradients,
    ``update`` moves log2_scale. State (for bitwise resume): ``state_dict()`` = {"log2_scale": float}."""

    def __init__(self, log2_scale: float = INITIAL_LOG2_SCALE, *, growth: float = GROWTH, backoff: float = BACKOFF):
        if not (math.isfinite(log2_scale) and growth >= 0 and backoff > 0):
            raise ValueError(
                f"DynamicLossScale: expected finite log2_scale, growth >= 0, backoff > 0, got {log2_scale}, "
                f"{growth}, {backoff}"
            )
        self.log2_scale, self.growth, self.backoff = float(log2_scale), float(growth), float(backoff)

    @property
    def scale(self) -> float:
        """2^floor(log2_scale): the factor the loss is multiplied by (exact to undo)."""
        return math.ldexp(1.0, math.floor(self.log2_scale))

    @torch.no_grad()
    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide every ``.grad`` by ``scale`` in place; False (gradients left as they are) when any is inf/NaN."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if finite:
            inv = 1.0 / self.scale
            for g in grads:
                g.mul_(inv)
        return finite

    def update(self, finite: bool) -> None:
        """After a step: grow log2_scale by ``growth``, or drop it by ``backoff`` when the step was skipped."""
        self.log2_scale += self.growth if finite else -self.backoff

    def state_dict(self) -> dict[str, float]:
        return {"log2_scale": self.log2_scale}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.log2_scale = float(state["log2_scale"])
