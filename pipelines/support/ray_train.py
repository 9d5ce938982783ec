"""CTM distillation on Ray Train (TorchTrainer, Train V2): the per-worker loop shared by the distill and tune stages.

Data parallelism: every worker streams the prepared train split (``ctm_core.data.stream.ShardStream``,
docs/data_streaming.md): the global batch of a step is a function of (seed, rows consumed) alone, and a worker
reads only the shards holding the rows of its microbatches ``i ≡ rank (mod world)``, verifying each shard's sha256
as it reads it, from the local folder or from S3 (``data_uri``). All randomness is keyed by (seed, step,
microbatch), so a microbatch's noise, k, t, s and dropout do not depend on which rank runs it, and gradients are
summed across ranks once per step by bucketed asynchronous all-reduces launched during the last microbatch's
backward (``ctm_core.training.grad_sync``): W workers compute the same update as 1 worker, up to float summation
order.

Checkpoints (``pipelines.support.checkpoints``): every ``distill.checkpoint_every`` steps rank 0 reports the whole
trainer state through ``persist_checkpoint_verified`` (Ray's upload, checked file by file, then ``complete.json``
written last). On every (re)start the workers resume from the newest checkpoint whose files match its marker, so a
resumed run ends with the same weights as an uninterrupted one.

The loop config carries the `distill` section itself (``DistillParams``, pickled by Ray), never a renamed copy.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.support.checkpoints import (
    _STORAGE_FIX,
    CKPT_FILE,
    MARKER_FILE,
    CheckpointStorageError,
    download_checkpoint,
    newest_complete_checkpoint,
    persist_checkpoint_verified,
    read_marker,
    storage_uri,
)

if TYPE_CHECKING:
    from ctm_core.data.card import DatasetCard

__all__ = ["QualityProbe", "check_inputs", "torch_trainer", "train_loop_per_worker"]

logger = logging.getLogger(__name__)


def check_inputs(data_dir: Path, teacher_dir: Path) -> dict[str, Any]:
    """The prepared data's card, after checking the teacher folder loads and matches the data's geometry."""
    from ctm_core.data.prepared import load_card
    from ctm_core.io.teacher_format import load_edm_checkpoint

    card = load_card(data_dir)  # names the missing stage output
    if not (teacher_dir / "teacher.safetensors").is_file():
        raise FileNotFoundError(f"{teacher_dir}/teacher.safetensors not found: run the teacher stage first")
    teacher = load_edm_checkpoint(teacher_dir)  # verifies the weights sha256 and the architecture
    im = card.image
    if (teacher.img_channels, teacher.img_resolution) != (im.channels, im.height):
        raise ValueError(
            f"teacher geometry ({teacher.img_channels} channels, {teacher.img_resolution} px) does not match the "
            f"prepared data ({im.channels} channels, {im.height} px): retrain or fetch a matching teacher"
        )
    if teacher.label_dim not in (0, card.labels.label_dim):
        raise ValueError(f"teacher label_dim {teacher.label_dim} != data label_dim {card.labels.label_dim}")
    return card


def torch_trainer(loop_config: dict[str, Any], *, params, workers: int, run_config):
    """A ``TorchTrainer`` of ``train_loop_per_worker`` on `workers` ranks (they stream the card's shards themselves:
    ``_train_stream``)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "use_gpu": params.ray.use_gpu,
            "threads_per_worker": max(1, int(params.ray.cpus_per_worker)),
            **loop_config,
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=params.ray.use_gpu, resources_per_worker={"CPU": params.ray.cpus_per_worker}
        ),
        run_config=run_config,
    )


# --------------------------------------------------------------------------------------------------------------
# Worker side (runs inside Ray Train workers)


def _train_stream(config: dict[str, Any], cfg):
    """The train split as a ``ShardStream`` (docs/data_streaming.md): from ``data_uri`` (s3://, streamed) when
    given, else the local ``data_dir``; every rank builds the same one (same card, seed and window)."""
    from ctm_core.data.stream import ShardStream

    root = config.get("data_uri") or config["data_dir"]
    return ShardStream(config["card"], root, seed=cfg.seed, window_shards=cfg.stream_window_shards)


def _sync_ms_over_ranks(ms: float) -> dict[str, float]:
    """The least and the most mean ``grad_sync`` time per step over the ranks (a collective: every rank calls it at
    the same report). The rank that arrives last at the all-reduce waits least: the min bounds the transfer itself,
    max - min is the time the other ranks wait for it (docs/data_streaming.md#gradient-sync)."""
    import torch
    import torch.distributed as dist

    vec = torch.tensor([ms, -ms], dtype=torch.float64)
    dist.all_reduce(vec, op=dist.ReduceOp.MAX)
    return {"perf/sync_ms_per_step_min": float(-vec[1]), "perf/sync_ms_per_step_max": float(vec[0])}


def _all_reduce_metrics(metrics: dict) -> dict:
    import torch
    import torch.distributed as dist

    names = sorted(metrics)
    vec = torch.stack([metrics[n].detach().float().reshape(()) for n in names])
    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    return dict(zip(names, vec, strict=True))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build ctm_core objects, resume from the latest checkpoint, train, report checkpoints.

    ``config``: "distill" (the ``DistillParams`` to train with), "card", "data_dir" (or "data_uri": an s3://
    prepared folder the workers stream from), "teacher_dir", "teacher_ref"
    (the teacher's bytes in the object store, for s3:// teachers), "use_gpu", "threads_per_worker"; for a GAN-phase
    run "continue_from_ref" (the CTM+DSM run's final trainer state in the object store) and "feature_weights" (the
    projected discriminator's fetched files); "init_ref" (``InitStudent``: the released student of
    distill.init_from, or None); and optionally
    "mlflow_run_id" + "tracking_uri" (rank 0 logs the curves there) and "quality" (``QualityProbe``).
    """
    import ray.train
    import torch
    import torch.distributed as dist

    from ctm_core.io.teacher_format import load_edm_checkpoint
    from ctm_core.training.grad_sync import BucketedAllReduce
    from ctm_core.training.trainer import CTMTrainer
    from pipelines.support.init_from import initial_student
    from pipelines.support.logs import setup_logging
    from pipelines.support.lpips_weights import build_lpips

    setup_logging()  # this worker process is an entry point of its own
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")

    card = config["card"]
    cfg = config["distill"]
    try:
        storage = ctx.get_storage()  # Ray's StorageContext: the pyarrow filesystem + paths of this run
    except NotImplementedError:  # Ray Train local mode (num_workers=0) persists nothing
        storage = None
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    world_size = world if distributed else 1
    # One data order on every rank: the trainer reads only this rank's microbatches of each global batch.
    data = _train_stream(config, cfg)
    grad_sync = BucketedAllReduce() if distributed else None

    if config.get("teacher_ref") is not None:  # s3:// teacher: the driver's verified bytes, via the object store
        teacher = load_edm_checkpoint(ray.get(config["teacher_ref"])).to(device)
    else:
        teacher = load_edm_checkpoint(config["teacher_dir"]).to(device)
    # The same student on every rank (and every restart) before the checkpoint, if any, overwrites it: the teacher's
    # weights with a seeded s-branch, or the released student of distill.init_from (pipelines.support.init_from).
    init = ray.get(config["init_ref"]) if config.get("init_ref") is not None else None
    student = initial_student(teacher, cfg, init)

    discriminator = d_optimizer = None
    if cfg.gan.enabled:  # the GAN phase (docs/gan.md): a fresh discriminator, seeded like every rank's student
        from pipelines.support.gan_phase import build_phase_discriminator

        discriminator, d_optimizer = build_phase_discriminator(cfg, card, device, config.get("feature_weights"))
    curves = _RankZeroLogger(config) if rank == 0 else None
    trainer = CTMTrainer(
        cfg,
        student,
        teacher,
        data,
        device=device,
        rank=rank,
        world_size=world_size,
        grad_sync=grad_sync,
        metric_sync=_all_reduce_metrics if distributed else None,
        metrics_callback=curves.log if curves else None,
        discriminator=discriminator,
        d_optimizer=d_optimizer,
        lpips=build_lpips(cfg, device) if cfg.distance == "lpips" else None,  # pinned files (driver: pin_lpips_weights)
        progress=False,
    )
    if storage is None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                trainer.load_checkpoint(Path(d) / CKPT_FILE)
            logger.info("rank %d resumed from step %d", rank, trainer.step)
    else:
        _resume(trainer, storage, rank, distributed)
    if trainer.step == 0 and config.get("continue_from_ref") is not None:
        # A new GAN-phase run: start from the CTM+DSM run's final state (the driver's verified copy, same on all ranks)
        trainer.continue_from(ray.get(config["continue_from_ref"]))
        logger.info("rank %d continues the CTM+DSM phase from step %d", rank, trainer.step)

    probe = QualityProbe(config["quality"], card, device) if rank == 0 and config.get("quality") else None
    total, every = cfg.steps, cfg.checkpoint_every
    timed_steps, timed_s, timed_cpu, warm = 0, 0.0, 0.0, False  # training after this worker's first chunk
    while trainer.step < total:
        t0, c0, s0 = time.perf_counter(), time.process_time(), trainer.step
        trainer.train(num_steps=min(every - trainer.step % every, total - trainer.step))
        if warm:
            timed_steps, timed_s = timed_steps + trainer.step - s0, timed_s + time.perf_counter() - t0
            timed_cpu += time.process_time() - c0
        warm = True
        metrics = {"step": trainer.step, **(curves.last if curves else {})}
        if timed_steps:  # what benchmarks/scale.py reads (docs/data_streaming.md#gradient-sync)
            metrics["perf/steps_per_s"] = timed_steps / timed_s
            # this process's CPU seconds (all its threads) per step and per wall second: work vs cores it got
            metrics["perf/cpu_s_per_step"] = timed_cpu / timed_steps
            metrics["perf/cpu_per_wall_s"] = timed_cpu / timed_s
        if grad_sync is not None and grad_sync.calls:
            metrics["perf/sync_ms_per_step"] = sync_ms = 1000 * grad_sync.seconds / grad_sync.calls
            metrics["perf/buckets_overlapped_per_step"] = grad_sync.overlapped / grad_sync.calls
            metrics.update(_sync_ms_over_ranks(sync_ms))
        if probe is not None:  # the tune stage's per-report quality (others wait at the report barrier)
            metrics.update(probe(trainer))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = upload = None
            if rank == 0:
                trainer.save_checkpoint(Path(tmp) / CKPT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                if storage is not None:
                    upload = _verified_upload(storage, trainer.step)
            # One folder per step: a retry of a failed upload rewrites the same folder (its marker removed first).
            ray.train.report(
                metrics,
                checkpoint=ckpt,
                checkpoint_dir_name=f"checkpoint_{trainer.step:06d}",
                checkpoint_upload_fn=upload,
            )


def _verified_upload(storage, step: int):
    def upload(checkpoint, checkpoint_dir_name):
        return persist_checkpoint_verified(storage, checkpoint, checkpoint_dir_name, step=step)

    return upload


def _resume(trainer, storage, rank: int, distributed: bool) -> None:
    """Load the newest complete checkpoint of this run (rank 0 picks it, every rank loads the same one).

    Rank 0 lists the run folder, downloads the newest checkpoint whose files match its ``complete.json`` and
    broadcasts its path; the other ranks download that path and must find the same sha256s. Ray's registered
    checkpoint (``get_checkpoint()``) is only a fallback for marker-less checkpoints of older runs.
    """
    import ray.train

    fs, run_path = storage.storage_filesystem, storage.experiment_fs_path
    with tempfile.TemporaryDirectory() as tmp:
        chosen = None
        if rank == 0:
            chosen = newest_complete_checkpoint(fs, run_path, Path(tmp), legacy=ray.train.get_checkpoint())
        if distributed:
            import torch.distributed as dist

            box = [chosen]
            dist.broadcast_object_list(box, src=0)
            chosen = box[0]
            if rank != 0 and chosen is not None:
                marker = read_marker(fs, chosen[0]) if chosen[1] >= 0 else None
                reason = download_checkpoint(fs, chosen[0], marker, Path(tmp))
                if reason is not None:
                    raise CheckpointStorageError(
                        f"checkpoint storage error: rank {rank} read {storage_uri(fs, chosen[0])} differently "
                        f"from rank 0 ({reason}); {_STORAGE_FIX}"
                    )
        if chosen is None:
            return
        trainer.load_checkpoint(Path(tmp) / CKPT_FILE)
    if chosen[1] >= 0 and trainer.step != chosen[1]:
        raise CheckpointStorageError(
            f"checkpoint storage error: {storage_uri(fs, chosen[0])} holds step "
            f"{trainer.step} but its {MARKER_FILE} says {chosen[1]}; {_STORAGE_FIX}"
        )
    logger.info("rank %d resumed from step %d (%s)", rank, trainer.step, storage_uri(fs, chosen[0]))


class QualityProbe:
    """Optional hook of the tune stage (``config["quality"]``): ``fd_nfe1`` at every report, on rank 0.

    ``quality`` = {"dir": folder with ``classifier/`` (``ctm_core.eval.classifier``) and ``reference_stats.npz``
    (``ctm_core.eval.metrics.save_reference_stats``), both written by the tune stage; "classifier_sha256",
    "reference_sha256": their expected digests; "num_samples", "batch", "seed": image i uses seed ``seed + i``;
    "ema": None (online weights) or an ``eval_emas`` rate}. The samples are made exactly as the evaluate stage
    makes its ``fd_nfe1`` (1-step γ=0 jump, ``ctm_core.eval.methods.sample_method``), clamped and quantised to the
    data's levels. Non-finite samples (a diverged trial) are mapped to mid-grey before clamping, so such a trial gets
    a large but finite FD that schedulers and searchers can rank; their fraction is reported as
    ``fd_nfe1_nonfinite``.
    """

    def __init__(self, quality: dict[str, Any], card: DatasetCard, device):
        from ctm_core.eval.classifier import load_classifier
        from ctm_core.eval.metrics import load_reference_stats

        folder = Path(quality["dir"])
        self.classifier = load_classifier(folder / "classifier", quality.get("classifier_sha256"))
        self.reference = load_reference_stats(folder / "reference_stats.npz", quality.get("reference_sha256"))
        start = int(quality.get("seed", 0))
        self.seeds = list(range(start, start + int(quality["num_samples"])))
        self.batch = int(quality.get("batch", len(self.seeds)))
        self.ema = quality.get("ema")
        im = card.image
        self.img_shape = (im.channels, im.height, im.width)
        self.num_levels = im.num_levels
        self.device = device

    def __call__(self, trainer) -> dict[str, float]:
        import torch

        from ctm_core.eval.classifier import classifier_features
        from ctm_core.eval.methods import Method, sample_method
        from ctm_core.eval.metrics import feature_statistics, frechet_distance, images_to_levels

        net = trainer.model if self.ema is None else trainer.emas[float(self.ema)]
        was_training = net.training
        net.eval()
        try:
            x = sample_method(
                Method("fd_nfe1", "gamma", 1, 0.0),
                net,
                None,
                seeds=self.seeds,
                batch=self.batch,
                img_shape=self.img_shape,
                label_dim=int(getattr(net, "label_dim", 0)),
                device=self.device,
            )
        finally:
            net.train(was_training)
        finite = torch.isfinite(x)
        x = torch.where(finite, x, torch.zeros_like(x)).clamp(-1, 1)  # (N, C, H, W)
        feats = classifier_features(self.classifier, images_to_levels(x, self.num_levels))
        fd = frechet_distance(*feature_statistics(feats), self.reference.mu, self.reference.sigma)
        return {"fd_nfe1": float(fd), "fd_nfe1_nonfinite": float((~finite).float().mean())}


class _RankZeroLogger:
    """Training curves from rank 0 into the stage's MLflow run (the driver does not write while fit() runs)."""

    def __init__(self, config: dict[str, Any]):
        self.last: dict[str, float] = {}
        self.client = None
        if config.get("mlflow_run_id"):
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=config["tracking_uri"])
            self.run_id = config["mlflow_run_id"]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.last = {f"train/{k}": float(v) for k, v in metrics.items()}
        logger.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in self.last.items()])
