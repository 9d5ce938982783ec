"""Telling a gradient sync which parameters' gradients are final, while the last backward still runs.

``FinalGrads`` wraps the last backward pass of an optimizer step: a post-accumulate hook on each parameter calls
``finalize(i)`` (e.g. adding back gradients held aside) and then ``on_final(p)`` as soon as the pass has accumulated
into ``p.grad`` (a leaf's gradient is accumulated once per backward, after all its uses are summed), so a bucketed
all-reduce (``ctm_core.training.grad_sync``) can send it while the backward computes the rest. ``rest()`` does
the same afterwards for every parameter the pass did not reach or that the caller still had to assemble.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager

import torch

__all__ = ["FinalGrads"]


class FinalGrads:
    """Each parameter of ``params`` finalized and reported exactly once.

    Args:
        params: the trained parameters, (P,) in a fixed order.
        on_final: ``on_final(p)`` once ``p.grad`` will not change any more this step; None = no reporting (the
            gradients are still finalized, in ``rest()``).
        finalize: ``finalize(i)`` turns ``params[i].grad`` into its final value (called just before ``on_final``).
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        on_final: Callable[[torch.nn.Parameter], None] | None = None,
        finalize: Callable[[int], None] | None = None,
    ):
        self.params, self.on_final, self.finalize = params, on_final, finalize
        self.done: set[int] = set()

    def _report(self, i: int) -> None:
        if i in self.done:
            raise RuntimeError(f"parameter {i}: its gradient was finalized twice in one step")
        self.done.add(i)
        if self.finalize is not None:
            self.finalize(i)
        if self.on_final is not None:
            self.on_final(self.params[i])

    @contextmanager
    def during_last_backward(self, exclude: Collection[int] = ()) -> Iterator[None]:
        """Around the step's last backward: parameters not in ``exclude`` are reported when the pass accumulates
        them. Without ``on_final`` nothing is hooked (the arithmetic is the same either way)."""
        if self.on_final is None:
            yield
            return
        handles = [
            p.register_post_accumulate_grad_hook(lambda _p, i=i: self._report(i))
            for i, p in enumerate(self.params)
            if i not in exclude
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def rest(self) -> None:
        """Finalize and report every parameter not reported yet, in order."""
        if self.on_final is None and self.finalize is None:
            return  # nothing to do per parameter (the loop's plain one-backward step)
        for i in range(len(self.params)):
            if i not in self.done:
                self._report(i)
