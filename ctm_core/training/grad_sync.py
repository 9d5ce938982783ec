"""Summing gradients over data-parallel ranks: bucketed, asynchronous all-reduces, once per optimizer step.

``Trainer`` calls ``grad_sync(params)`` once per step, after the last microbatch's backward (never per microbatch:
the accumulation needs no ``no_sync``). Why not DDP and why not hooks that overlap the backward:
docs/data_streaming.md#gradient-sync (the staged CTM + DSM backward runs two backward passes per microbatch and
assembles each gradient after them, so no gradient is final while a backward runs).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["BucketedAllReduce"]


class BucketedAllReduce:
    """``sync(params)``: sum ``p.grad`` over the ranks of ``group`` in place, in buckets of about ``bucket_mib``.

    Gradients are packed into buckets in reverse parameter order (the output layers first, as DDP does), each
    bucket's ``all_reduce`` is launched asynchronously as soon as it is packed, so packing the next bucket and
    unpacking the finished ones overlap the communication; extra memory is the buckets in flight (at most the
    gradients once, in ``bucket_mib`` pieces), not one flat copy made before any communication starts.
    ``seconds`` / ``calls`` accumulate the wall time spent in sync (the benchmark's sync_ms_per_step).
    """

    def __init__(self, bucket_mib: float = 25.0, group=None):
        if bucket_mib <= 0:
            raise ValueError(f"bucket_mib: expected > 0, got {bucket_mib!r}")
        self.bucket_bytes = int(bucket_mib * 2**20)
        self.group = group
        self.seconds, self.calls = 0.0, 0

    def _buckets(self, grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        buckets: list[list[torch.Tensor]] = []
        size, key = 0, None
        for g in reversed(grads):
            nbytes = g.numel() * g.element_size()
            if not buckets or (g.dtype, g.device) != key or size + nbytes > self.bucket_bytes:
                buckets.append([])
                size, key = 0, (g.dtype, g.device)
            buckets[-1].append(g)
            size += nbytes
        return buckets

    def __call__(self, params: Iterable[torch.nn.Parameter]) -> None:
        t0 = time.perf_counter()
        grads = [p.grad for p in params if p.grad is not None]
        pending = []
        for bucket in self._buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])  # (sum of numel,)
            pending.append((dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True), flat, bucket))
        for work, flat, bucket in pending:
            work.wait()
            offset = 0
            for g in bucket:
                n = g.numel()
                g.copy_(flat[offset : offset + n].view_as(g))
                offset += n
        self.seconds += time.perf_counter() - t0
        self.calls += 1
