"""Small shared helpers: broadcasting and argument validation.

Shape legend used across ``ctm_core``: ``B`` batch, ``C`` channels, ``H``/``W`` spatial size,
``L`` label dimension.
"""

from __future__ import annotations

import torch


def append_dims(x: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so ``x`` broadcasts against a ``target_ndim``-dim tensor.

    Example: ``sigma`` of shape ``(B,)`` becomes ``(B, 1, 1, 1)`` for images ``(B, C, H, W)``.
    """
    missing = target_ndim - x.ndim
    if missing < 0:
        raise ValueError(f"append_dims: input has {x.ndim} dims, more than the target {target_ndim}")
    return x.reshape(*x.shape, *([1] * missing))


def check_positive(name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` > 0."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_in(name: str, value, allowed) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)!r}, got {value!r}")
