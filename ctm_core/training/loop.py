"""The single-process training loop shared by CTM distillation (`trainer.CTMTrainer`) and EDM teacher training.

One iteration (docs/ctm.md#27-total-loss, docs/ctm.md#28-ema-and-optimiser; Kim-Dongjun/ctm-cifar10
cm/train_util.py:972-1115):
    batch ← data source;  per microbatch: microbatch_backward(...) accumulates ∇(loss·b/B) (default: one backward
    of microbatch_loss(...))
    optimizer step (lr warm-up optional, no clipping by default);  EMA/target updates;  step += 1

Reproducibility: all randomness is keyed, not carried. The iteration's k comes from a CPU ``torch.Generator``
seeded by (seed, step); each microbatch's noise/times/σ from one seeded by (seed, step, microbatch index); dropout
(the global torch RNG) is re-seeded from the same key inside ``torch.random.fork_rng``, so the caller's RNG is
untouched. The data order is a seeded permutation per epoch with a saved position. Hence a resumed run is bitwise
identical to an uninterrupted one on CPU, and a microbatch's randomness does not depend on which rank runs it.

Configuration: the trainer reads its params.yaml section by the keys' names (``ctm_core.config``): CTM takes
``DistillParams`` (``cfg.N``, ``cfg.K``, ``cfg.target_ema``, ...), EDM ``TeacherTrainParams``. ``cfg.batch`` is
the global batch; each of the W ranks draws its share ``cfg.batch // W`` from the data source.

Data parallelism (``world_size`` W > 1, used by pipelines.support.ray_train): every rank builds the same data
source (same seed and rank argument), takes W of its batches per step as one global batch of ``cfg.batch``, runs
the microbatches i ≡ rank (mod W), scales each microbatch loss by b/(global batch) and sums the gradients with
``grad_sync`` (an all-reduce, started during the last microbatch's backward) before the optimizer step, so W ranks
make the same update as one process, up to float summation order. ``metric_sync`` sums the per-rank metric
contributions likewise.

A checkpoint holds everything needed to continue exactly and is loadable with ``torch.load(weights_only=True)``;
saving is atomic (temp file in the same folder + os.replace). ``load_checkpoint`` resumes a run of the same loss;
``continue_from`` starts a later phase (the GAN phase) from an earlier phase's state (docs/gan.md).

The library does no logging/tracking: metrics go to ``metrics_callback(step, {name: float})``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ctm_core.io.atomic import atomic_write
from ctm_core.nets.utils import append_dims
from ctm_core.training.ema import EMABank
from ctm_core.training.final_grads import FinalGrads
from ctm_core.training.loss_scale import DynamicLossScale

__all__ = [
    "derive_seed",
    "random_hflip",
    "TensorDataSource",
    "atomic_torch_save",
    "load_checkpoint_file",
    "build_optimizer",
    "Trainer",
]

CHECKPOINT_FORMAT = "ctm_core.training.trainer/2"  # /2: the config is the params.yaml section


def derive_seed(seed: int, rank: int, stream: str, *extra: int) -> int:
    """A 63-bit seed for one named random stream of one rank (independent of the others)."""
    digest = hashlib.sha256(repr((int(seed), int(rank), stream, *map(int, extra))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------------------------
# Data


class TensorDataSource:
    """In-memory dataset with a seeded permutation per epoch and a resumable position (epoch, index).

    ``next_batch()`` returns (x (B, ...), labels (B, L) or None) on CPU; batches run across epoch ends.
    """

    def __init__(
        self, data: torch.Tensor, labels: torch.Tensor | None = None, *, batch_size: int, seed: int, rank: int = 0
    ):
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"data must have shape (num_samples, ...), got {tuple(data.shape)}")
        if labels is not None and labels.shape[0] != data.shape[0]:
            raise ValueError(f"labels must have {data.shape[0]} rows like data, got {labels.shape[0]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.data, self.labels = data, labels
        self.batch_size, self.seed, self.rank = int(batch_size), int(seed), int(rank)
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, "data", epoch))
            self._perm, self._perm_epoch = torch.randperm(self.data.shape[0], generator=gen), epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts, need = [], self.batch_size
        while need > 0:
            perm = self._permutation(self.epoch)
            take = perm[self.index : self.index + need]
            parts.append(take)
            need -= take.numel()
            self.index += take.numel()
            if self.index >= perm.numel():
                self.epoch, self.index = self.epoch + 1, 0
        idx = torch.cat(parts)
        return self.data[idx], (None if self.labels is None else self.labels[idx])

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def random_hflip(
    x: torch.Tensor, generator: torch.Generator, rows: torch.Tensor | None = None, batch: int | None = None
) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2: x (n, C, H, W) -> (n, C, H, W).

    One U[0, 1) draw per image of the batch from ``generator`` (a CPU generator; image b is flipped when its draw is
    < 0.5), so image b's flip depends only on the generator's key and b (official: random_flip, p = 0.5;
    docs/ctm.md#28-ema-and-optimiser). ``rows`` (n,): x holds these rows of a batch of ``batch`` images (one rank's
    microbatches); default: x is the whole batch."""
    flip = torch.rand(x.shape[0] if batch is None else int(batch), generator=generator) < 0.5  # (B,)
    if rows is not None:
        flip = flip[rows]  # (n,)
    return torch.where(append_dims(flip.to(x.device), x.ndim), x.flip(-1), x)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the destination folder, fsync, then ``os.replace``.

    An exception during the write leaves any previous file at ``path`` untouched and removes the temp file.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with a format check."""
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: expected a training checkpoint of format {CHECKPOINT_FORMAT!r}, got {got!r}")
    return state


def build_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    """RAdam (official CTM, C train_util.py:111-113) or Adam (EDM teacher): betas (0.9, 0.999), eps 1e-8, no
    weight decay in both (the official settings)."""
    params = [p for p in params if p.requires_grad]
    cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[name]
    return cls(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Generic loop


class Trainer:
    """Generic loop: subclasses implement ``iteration_context()`` and ``microbatch_loss(x0, labels, ctx, generator)``.

    Args:
        config: the params.yaml section (``DistillParams`` / ``TeacherTrainParams``); the loop reads ``batch``,
            ``microbatch``, ``steps``, ``lr``, ``lr_warmup_steps``, ``optimizer``, ``grad_clip_norm``, ``precision``,
            ``channels_last``, ``compile``, ``checkpoint_every``, ``log_every`` and ``seed``.
        model: the trained network (student or denoiser); moved to ``device``.
        data: a data source (the same on every rank) with ``state_dict()``, ``load_state_dict()`` and either
            ``read_global_batch(B, rows)`` (the given rows of the next global batch of B samples: a rank reads only
            its microbatches, ``ctm_core.data.stream.ShardStream``) or ``next_batch()`` (``TensorDataSource``:
            batches of ``config.batch // world_size`` samples, W of them per global batch).
        rank, world_size: data-parallel position; rank runs microbatches i ≡ rank (mod world_size) of the global
            batch of ``config.batch`` samples. Progress bars only on rank 0.
        grad_sync: ``grad_sync(params)`` sums the gradients over ranks in place (all-reduce) before the step; if it
            has ``start(params) -> ready``, ``ready(p)`` is given to the last microbatch's backward so the sum
            overlaps it (``ctm_core.training.grad_sync.BucketedAllReduce``).
        metric_sync: ``metric_sync({name: 0-dim tensor}) -> dict`` sums the per-rank metric contributions.
        metrics_callback: called as ``cb(step, {name: float})`` every ``config.log_every`` steps.
        discriminator, d_optimizer: optional slot for the GAN phase (saved/restored with the checkpoint).
        progress: draw a tqdm bar while training (rank 0 only).
    """

    kind = "base"
    # Fields that define the loss: a checkpoint made with other values cannot be resumed by this trainer.
    loss_fields: tuple[str, ...] = ()

    def __init__(
        self,
        config,
        model: nn.Module,
        data,
        *,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        grad_sync: Callable[[list[nn.Parameter]], None] | None = None,
        metric_sync: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        metrics_callback: Callable[[int, dict[str, float]], None] | None = None,
        discriminator: nn.Module | None = None,
        d_optimizer: torch.optim.Optimizer | None = None,
        progress: bool = True,
        loss_scale: DynamicLossScale | None = None,
    ):
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(
                f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}"
            )
        self.config = config
        self.microbatch = int(config.microbatch or max(1, config.batch // world_size))  # b; null = per-rank batch
        per = world_size * self.microbatch
        if config.batch % per:
            raise ValueError(
                f"batch: expected a multiple of world_size × microbatch ({world_size} × {self.microbatch} = {per}), "
                f"got {config.batch} (fix: change batch, microbatch or the number of ranks)"
            )
        self.batch_per_rank = config.batch // world_size
        self.progress = bool(progress)
        self.device = torch.device(device)
        self.rank, self.world_size = int(rank), int(world_size)
        self.grad_sync, self.metric_sync = grad_sync, metric_sync
        self.metrics_callback = metrics_callback
        self.data = data
        self.step = 0

        mf = torch.channels_last if config.channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=mf)
        self.model.train()
        self.emas = EMABank(self.model, self.ema_rates())
        self.optimizer = build_optimizer(self.model.parameters(), config.optimizer, config.lr)
        self.discriminator, self.d_optimizer = discriminator, d_optimizer
        # fp16 activations (a model with use_fp16 on CUDA) train with the official dynamic loss scale.
        runs_fp16 = self.device.type == "cuda" and bool(getattr(model, "use_fp16", False))
        self.loss_scale = loss_scale if loss_scale is not None else (DynamicLossScale() if runs_fp16 else None)

        if config.precision == "bf16" and self.device.type != "cuda":
            warnings.warn("precision='bf16' autocast applies on CUDA only; running fp32 on " + str(self.device))
        self.autocast_enabled = config.precision == "bf16" and self.device.type == "cuda"
        if self.device.type == "cuda":  # TF32 tensor cores for the fp32 convolutions and matmuls
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def keyed_generator(self, stream: str, *keys: int) -> torch.Generator:
        """A CPU generator seeded by (seed, stream, step, *keys): the same on every rank and after a resume."""
        return torch.Generator().manual_seed(derive_seed(self.config.seed, 0, stream, self.step, *keys))

    def _seed_dropout(self, microbatch: int) -> None:
        """Re-seed the (forked) global RNG that dropout draws from, keyed like ``keyed_generator``."""
        seed = derive_seed(self.config.seed, 0, "dropout", self.step, microbatch)
        torch.random.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            with torch.cuda.device(self._cuda_index):
                torch.cuda.manual_seed(seed)

    # -- hooks ---------------------------------------------------------------------------------------------------
    def ema_rates(self) -> tuple[float, ...]:
        """Rates of the evaluation EMAs kept next to the online weights."""
        raise NotImplementedError

    def iteration_context(self) -> dict[str, Any]:
        """Per-iteration random quantities shared by all microbatches and ranks (e.g. CTM's k)."""
        return {}

    def microbatch_loss(
        self, x0: torch.Tensor, labels: torch.Tensor | None, ctx: dict[str, Any], generator: torch.Generator
    ):
        """Return (scalar loss = mean over the microbatch, {name: 0-dim detached tensor})."""
        raise NotImplementedError

    def microbatch_backward(
        self,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        ctx: dict[str, Any],
        generator: torch.Generator,
        scale: float,
        on_final_grad: Callable[[nn.Parameter], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Accumulate ∇(scale · microbatch loss) into the model's ``.grad``; return the metrics.

        The default runs ``microbatch_loss`` under the autocast of ``precision`` and one backward; a subclass may
        backpropagate its loss in parts (CTM: one graph at a time) as long as the accumulated gradient is the same.
        ``on_final_grad`` (the step's last microbatch, with a gradient sync): call it once per trained parameter as
        soon as its ``.grad`` is final, during the backward where possible (``ctm_core.training.final_grads``).
        """
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast_enabled):
            loss, metrics = self.microbatch_loss(x0, labels, ctx, generator)
        final = FinalGrads([p for p in self.model.parameters() if p.requires_grad], on_final_grad)
        with final.during_last_backward():
            (loss * scale).backward()
        final.rest()
        return metrics

    def augment_batch(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``rows`` (n,) of the global batch, x (n, C, H, W), as the step trains on them (e.g. CTM's random
        flips); ``rows=None``: x is the whole global batch (B, C, H, W). Default: unchanged."""
        return x

    def after_optimizer_step(self) -> None:
        self.emas.update(self.model)

    def is_generator_step(self) -> bool:
        """False on discriminator-only steps (GAN phase); those call ``discriminator_step`` instead."""
        return True

    def discriminator_step(self, x: torch.Tensor, labels: torch.Tensor | None, ctx: dict[str, Any]):
        raise NotImplementedError

    def my_microbatches(self) -> range:
        """Indices of the global batch's microbatches this rank runs (i ≡ rank mod world_size)."""
        num = self.config.batch // self.microbatch
        return range(self.rank, num, self.world_size)

    def _my_rows(self) -> torch.Tensor:
        """Rows of the global batch in this rank's microbatches, in ``my_microbatches()`` order: (n·b,) int64."""
        b = self.microbatch
        return torch.cat([torch.arange(i * b, (i + 1) * b) for i in self.my_microbatches()])

    def _my_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's microbatches of the step's global batch, augmented: x (n·b, ...), labels (n·b, L) or None.

        The j-th microbatch of ``my_microbatches()`` is rows [j·b, (j+1)·b). A source with ``read_global_batch``
        reads only these rows (docs/data_streaming.md#design); a ``next_batch()`` source yields the whole batch."""
        rows = self._my_rows()
        if hasattr(self.data, "read_global_batch"):
            x, labels = self.data.read_global_batch(self.config.batch, rows)
            if x.shape[0] != rows.numel():
                raise ValueError(f"data source returned {x.shape[0]} samples, expected {rows.numel()} rows")
        else:
            x, labels = self._global_batch()
            x, labels = x[rows], (None if labels is None else labels[rows])
        return self.augment_batch(x, rows), labels

    def _global_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = [self.data.next_batch() for _ in range(self.world_size)]
        for x, _ in parts:
            if x.shape[0] != self.batch_per_rank:
                raise ValueError(
                    f"data source returned {x.shape[0]} samples, expected batch // world_size = {self.batch_per_rank}"
                )
        x = torch.cat([p[0] for p in parts])
        labels = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        return x, labels

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def compile_modules(self) -> list[nn.Module]:
        return [self.model]

    # -- helpers -------------------------------------------------------------------------------------------------
    @property
    def _cuda_index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _maybe_compile(self) -> None:
        if self.config.compile and not getattr(self, "_compiled", False):
            for m in self.compile_modules():
                getattr(m, "model", m).compile()  # in place: state_dict keys unchanged
            self._compiled = True

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def current_lr(self) -> float:
        cfg = self.config
        if cfg.lr_warmup_steps > 0:
            return cfg.lr * min(1.0, (self.step + 1) / cfg.lr_warmup_steps)
        return cfg.lr

    def _unscale_grads(self) -> bool:
        """Undo the fp16 loss scale (``loss_scale``): True when the gradients are finite, then divided by the scale;
        False on an overflow (the step is skipped). Always True without a loss scale."""
        if self.loss_scale is None:
            return True
        finite = self.loss_scale.unscale_(p for p in self.model.parameters() if p.requires_grad)
        self.loss_scale.update(finite)
        return finite

    def _isolated_global_rng(self):
        return torch.random.fork_rng(devices=[self._cuda_index] if self.device.type == "cuda" else [])

    # -- one iteration -------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over the global batch (``config.batch`` samples) in ``microbatch`` chunks, of which
        this rank runs ``my_microbatches()``; returns the metrics (batch means)."""
        self._maybe_compile()
        b = self.microbatch
        B = self.config.batch  # global batch
        with self._isolated_global_rng():
            self.model.train()
            x, labels = self._my_batch()  # this rank's microbatches, in my_microbatches() order
            ctx = self.iteration_context()
            lr = self.current_lr()
            if not self.is_generator_step():
                sums = self.discriminator_step(x, labels, ctx)
                self.step += 1
                return sums
            self.optimizer.zero_grad(set_to_none=True)
            loss_scale = 1.0 if self.loss_scale is None else self.loss_scale.scale
            sums: dict[str, torch.Tensor] = {}
            params = [p for p in self.model.parameters() if p.requires_grad]
            mine = self.my_microbatches()
            for j, i in enumerate(mine):
                xb = self._prepare(x[j * b : (j + 1) * b])
                lb = None if labels is None else labels[j * b : (j + 1) * b].to(self.device)
                self._seed_dropout(i)
                # The last microbatch's backward starts the gradient sum (docs/data_streaming.md#gradient-sync).
                start = getattr(self.grad_sync, "start", None) if j == len(mine) - 1 else None
                metrics = self.microbatch_backward(
                    xb,
                    lb,
                    ctx,
                    self.keyed_generator("loss", i),
                    b / B * loss_scale,
                    on_final_grad=None if start is None else start(params),
                )
                for name, v in metrics.items():
                    sums[name] = sums.get(name, 0.0) + v.detach().float() * (b / B)
            if self.grad_sync is not None:
                self.grad_sync(params)
            if self.metric_sync is not None:
                sums = self.metric_sync(sums)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self._unscale_grads():
                if self.config.grad_clip_norm > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip_norm)
                self.optimizer.step()
                self.after_optimizer_step()
            else:  # an fp16 overflow: no step, no EMA update, a smaller scale (docs/presets.md#mixed-precision)
                self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        sums["lr"] = torch.tensor(lr)
        if self.loss_scale is not None:
            sums["log2_loss_scale"] = torch.tensor(self.loss_scale.log2_scale)
        for name, v in ctx.items():
            if isinstance(v, (int, float)):
                sums[name] = torch.tensor(float(v))
        return sums

    def train(self, num_steps: int | None = None, *, checkpoint_path: str | os.PathLike | None = None) -> int:
        """Run until ``step == self.step + num_steps`` (default: up to ``config.steps``); returns the step.

        Saves ``checkpoint_path`` every ``config.checkpoint_every`` steps and at the end (when given).
        """
        from tqdm.auto import tqdm

        end = self.config.steps if num_steps is None else self.step + int(num_steps)
        every = self.config.checkpoint_every
        bar = tqdm(
            total=max(0, end - self.step),
            disable=not self.progress or self.rank != 0,
            desc=f"{self.kind} training",
            dynamic_ncols=True,
        )
        while self.step < end:
            metrics = self.train_step()
            bar.update(1)
            if self.metrics_callback is not None and self.step % self.config.log_every == 0:
                self.metrics_callback(self.step, {k: float(v) for k, v in metrics.items()})
            if checkpoint_path is not None and every > 0 and self.step % every == 0 and self.step < end:
                self.save_checkpoint(checkpoint_path)
        bar.close()
        if checkpoint_path is not None:
            self.save_checkpoint(checkpoint_path)
        return self.step

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # All randomness is keyed by (seed, step, microbatch) (see the module docstring): nothing else to store.
        rng = {"scheme": "keyed(seed, step, microbatch)", "seed": self.config.seed}
        state = {
            "format": CHECKPOINT_FORMAT,
            "kind": self.kind,
            "step": self.step,
            "model": self.model.state_dict(),
            "emas": self.emas.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "discriminator": None if self.discriminator is None else _discriminator_state(self.discriminator),
            "d_optimizer": None if self.d_optimizer is None else self.d_optimizer.state_dict(),
            "loss_scale": None if self.loss_scale is None else self.loss_scale.state_dict(),
            "rng": rng,
            "data": self.data.state_dict(),
            "config": self.config.model_dump(mode="json"),  # plain types: loads with weights_only=True
        }
        state.update(self.extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint kind: expected {self.kind!r}, got {state.get('kind')!r}")
        if (state["discriminator"] is None) != (self.discriminator is None):
            raise ValueError(
                "checkpoint discriminator slot: presence differs between checkpoint and trainer (fix: a CTM+DSM "
                "checkpoint starts the GAN phase through continue_from(), not load_checkpoint())"
            )
        # The loss definition must match; optimizer/EMA-rate/batch settings follow the current config (a later
        # phase, e.g. the GAN fine-tune, resumes with another lr or batch; docs/ctm.md#29-recipes-and-phases).
        saved, mine = state["config"], self.config.model_dump(mode="json")
        differ = [f"{k} {saved.get(k)!r} -> {mine[k]!r}" for k in self.loss_fields if saved.get(k) != mine[k]]
        if differ:
            raise ValueError(
                f"checkpoint config: the loss is defined differently ({', '.join(differ)}; saved -> current) "
                f"(fix: resume with the checkpoint's values of {', '.join(self.loss_fields)}, or start a new run)"
            )
        self._check_seed(state)
        self._load_carried(state)
        if self.discriminator is not None:
            _load_discriminator_state(self.discriminator, state["discriminator"])
            if self.d_optimizer is not None and state["d_optimizer"] is not None:
                self.d_optimizer.load_state_dict(state["d_optimizer"])

    def continue_from(self, state: dict[str, Any]) -> None:
        """Start a later training phase from an earlier phase's final checkpoint (docs/gan.md#what-carries-over).

        The official second phase (the GAN phase) resumes a CTM+DSM run (C cm/train_util.py:199-330): it carries
        the online weights, the EMAs, the optimizer state and the step counter, and builds a fresh discriminator.
        So does this: model, EMAs, optimizer state (moments; the learning rate is this config's), step counter,
        data position and the subclass's extra state (CTM: the target network θ⁻) are loaded, the discriminator
        slot keeps what this trainer was built with. Unlike ``load_state_dict`` the loss fields may differ (e.g.
        ImageNet's K 39 -> 20); the kind, the seed and the EMA rates must match.
        """
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint kind: expected {self.kind!r}, got {state.get('kind')!r}")
        if state["discriminator"] is not None:
            raise ValueError(
                "continue_from: expected a checkpoint without a discriminator (an earlier phase), got one with a "
                "discriminator (fix: resume a GAN-phase checkpoint with load_checkpoint())"
            )
        self._check_seed(state)
        self._load_carried(state)

    def _check_seed(self, state: dict[str, Any]) -> None:
        if state["rng"].get("seed") != self.config.seed:
            raise ValueError(
                f"checkpoint seed: expected {self.config.seed!r} (the trainer's), got {state['rng'].get('seed')!r} "
                "(fix: resume with the checkpoint's seed: another one would not continue the same random streams)"
            )

    def _load_carried(self, state: dict[str, Any]) -> None:
        """What every resume and phase change loads: weights, EMAs, optimizer, data position, step, extra state."""
        self.model.load_state_dict(state["model"])
        self.emas.load_state_dict(state["emas"])
        # torch keeps the given moment tensors (no copy when dtype and device match): copy, never alias the caller's
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.data.load_state_dict(state["data"])
        self.step = int(state["step"])
        if self.loss_scale is not None and state.get("loss_scale") is not None:
            self.loss_scale.load_state_dict(state["loss_scale"])  # the scale continues, as a bitwise resume needs
        self.load_extra_state(state)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        atomic_torch_save(self.state_dict(), path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_checkpoint_file(path))


def _discriminator_state(d: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a discriminator: ``checkpoint_state()`` where it has one (the projected D leaves
    out its pretrained feature networks, rebuilt from their pinned files), else its whole state_dict."""
    return d.checkpoint_state() if hasattr(d, "checkpoint_state") else d.state_dict()


def _load_discriminator_state(d: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if hasattr(d, "load_checkpoint_state"):
        d.load_checkpoint_state(state)
    else:
        d.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# CTM distillation
