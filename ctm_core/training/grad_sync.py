"""Summing gradients over data-parallel ranks: bucketed, asynchronous all-reduces overlapped with the last backward.

Per optimizer step the trainer calls ``ready = grad_sync.start(params)`` before the last microbatch's backward,
passes ``ready`` down to it (``Trainer.microbatch_backward(..., on_final_grad=ready)``), and calls
``grad_sync(params)`` after it. The backward reports each parameter once its ``.grad`` is final (the earlier
microbatches and every pass of the staged CTM + DSM backward included), and a bucket's all-reduce starts as soon as
all its parameters are final, while the backward goes on (what DDP's reducer does). The earlier microbatches never
communicate (DDP's ``no_sync()``). Why not DDP itself: docs/data_streaming.md#gradient-sync.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

__all__ = ["BucketedAllReduce"]


class _Layout:
    """The buckets of one parameter list: indices per bucket, and each parameter's index and bucket."""

    def __init__(self, params: list[torch.nn.Parameter], buckets: list[list[int]]):
        self.buckets = buckets
        self.index = {id(p): i for i, p in enumerate(params)}
        self.bucket_of = {i: b for b, members in enumerate(buckets) for i in members}


class _Step:
    """One step's sum: which parameters are final, which buckets are in flight."""

    def __init__(self, params: list[torch.nn.Parameter], layout: _Layout):
        self.params, self.layout = params, layout
        self.missing = [len(members) for members in layout.buckets]  # parameters of each bucket not final yet
        self.final: set[int] = set()
        self.next = 0  # buckets are launched in index order, the same order on every rank
        self.pending: list[tuple[object, torch.Tensor, list[int]]] = []

    def mark(self, i: int) -> None:
        """Parameter i's gradient is final."""
        if i in self.final:
            raise RuntimeError(f"ready(p): parameter {i} reported twice in one step")
        self.final.add(i)
        self.missing[self.layout.bucket_of[i]] -= 1


class BucketedAllReduce:
    """``sync(params)``: sum ``p.grad`` over the ranks of ``group`` in place, in buckets.

    Buckets hold parameters in reverse order (the output layers, whose gradients the backward finishes first, in
    bucket 0), the first one about ``first_bucket_mib`` and the others ``bucket_mib`` (DDP's defaults, 1 and 25 MiB:
    a small first bucket starts communicating early). Buckets are launched in index order on every rank (the
    collectives must match), each as soon as its parameters are final and the buckets before it are launched. A
    parameter whose ``.grad`` is None on this step is summed as zeros and left None (every rank has the same None
    pattern: the same graph). Extra memory: the buckets in flight, at most the gradients once.

    Counters: ``seconds`` (wall time inside the sync's own calls: packing, launching, waiting, unpacking) and
    ``calls`` (steps) give the benchmark's sync_ms_per_step; ``overlapped`` counts the buckets launched during a
    backward, before ``sync(params)`` was called.
    """

    def __init__(self, bucket_mib: float = 25.0, first_bucket_mib: float = 1.0, group=None):
        for name, v in (("bucket_mib", bucket_mib), ("first_bucket_mib", first_bucket_mib)):
            if not v > 0:
                raise ValueError(f"{name}: expected > 0, got {v!r}")
        self.bucket_bytes = int(bucket_mib * 2**20)
        self.first_bucket_bytes = int(first_bucket_mib * 2**20)
        self.group = group
        self.seconds, self.calls, self.overlapped = 0.0, 0, 0
        self._layouts: dict[tuple[int, ...], _Layout] = {}
        self._step: _Step | None = None

    def _plan(self, params: list[torch.nn.Parameter]) -> _Layout:
        """Indices of ``params`` per bucket, reverse order, one dtype and device per bucket (made once per list)."""
        key = tuple(id(p) for p in params)
        if key not in self._layouts:
            buckets: list[list[int]] = []
            size, kind = 0, None
            for i in reversed(range(len(params))):
                p = params[i]
                nbytes = p.numel() * p.element_size()
                cap = self.first_bucket_bytes if len(buckets) <= 1 else self.bucket_bytes
                if not buckets or (p.dtype, p.device) != kind or (buckets[-1] and size + nbytes > cap):
                    buckets.append([])
                    size, kind = 0, (p.dtype, p.device)
                buckets[-1].append(i)
                size += nbytes
            self._layouts[key] = _Layout(params, buckets)
        return self._layouts[key]

    def start(self, params: Iterable[torch.nn.Parameter]) -> Callable[[torch.nn.Parameter], None]:
        """Begin one step's sum over ``params``; returns ``ready(p)``, to be called once per parameter whose
        ``.grad`` is final (it may launch buckets at once)."""
        params = list(params)
        self._step = _Step(params, self._plan(params))
        return self._ready

    def _ready(self, p: torch.nn.Parameter) -> None:
        t0 = time.perf_counter()
        st = self._step
        if st is None or id(p) not in st.layout.index:
            raise RuntimeError("ready(p): p is not a parameter of the step begun by start(params)")
        st.mark(st.layout.index[id(p)])
        self.overlapped += self._launch_ready(st)
        self.seconds += time.perf_counter() - t0

    def _launch_ready(self, st: _Step) -> int:
        launched = 0
        while st.next < len(st.layout.buckets) and st.missing[st.next] == 0:
            members = st.layout.buckets[st.next]
            parts = []
            for i in members:
                p = st.params[i]
                parts.append(p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()))
            flat = torch.cat(parts)  # (sum of numel,)
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            st.pending.append((work, flat, members))
            st.next += 1
            launched += 1
        return launched

    def __call__(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Finish the step begun by ``start(params)`` (or, without one, sum everything now): every parameter not
        reported is final; launch the remaining buckets, wait for all, write the sums back into ``.grad``."""
        t0 = time.perf_counter()
        params = list(params)
        st, self._step = self._step, None
        if st is None:
            st = _Step(params, self._plan(params))
        elif [id(p) for p in st.params] != [id(p) for p in params]:
            raise RuntimeError("sync(params): not the parameters given to start(params)")
        for i in range(len(params)):
            if i not in st.final:
                st.mark(i)
        self._launch_ready(st)
        for work, flat, members in st.pending:
            work.wait()
            offset = 0
            for i in members:
                g, n = params[i].grad, params[i].numel()
                if g is not None:
                    g.copy_(flat[offset : offset + n].view_as(g))
                offset += n
        self.seconds += time.perf_counter() - t0
        self.calls += 1
