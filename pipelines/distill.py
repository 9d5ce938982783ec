"""DVC stage `distill`: CTM distillation of the teacher into a student with Ray Train (TorchTrainer, Train V2).

    python -m pipelines.distill --params params.yaml --best-params artifacts/best_params.yaml \\
        --data data/prepared --teacher artifacts/teacher --out artifacts/student

The same entrypoint runs under ``ray job submit --working-dir . -- python -m pipelines.distill ...`` (Ray sets
RAY_ADDRESS there and it joins that cluster); without an address it starts a local Ray from the ``ray`` section.

Resumption: the Ray run name is ``distill-<hash of the distill section, data and teacher>`` and lives under
``ray.storage_path``, so re-running the stage after a kill (or a dead worker, through ``FailureConfig``) continues
from the last reported checkpoint instead of starting over (STACK_FACTS §1.4). The checkpoint holds the whole
trainer state (ctm_core.training.trainer), so the resumed run ends with the same weights.

Data parallelism: every worker reads the full prepared train split through Ray Data (``read_parquet`` +
``get_dataset_shard``; the split is not sharded so every rank sees the same global batches), sorts it by the
``index`` column, and processes the microbatches ``i ≡ rank (mod world)`` of each global batch. All randomness is
keyed by (seed, step, microbatch), so a microbatch's noise, k, t, s and dropout do not depend on which rank runs it,
and gradients are summed across ranks with ``all_reduce``: W workers compute the same update as 1 worker, up to
float summation order (adaptive weights are per microbatch in both cases, as in the official code).

Outputs (``--out``, written atomically): the student folder of ``ctm_core.io.student_format`` (online + eval-EMA
weights) and ``run.json`` (MLflow run id, Ray run name and storage, final checkpoint path, last metrics).

Checkpoints you can trust (``pipelines.support.checkpoints``): rank 0 reports through ``persist_checkpoint_verified`` (Ray's
upload, checked file by file, then a ``complete.json`` marker written last); a failed check raises
``CheckpointStorageError`` inside ``ray.train.report``, so Ray never registers that checkpoint; ``FailureConfig``
retries, and when the run gives up the stage exits 1 with that one line. On every (re)start the workers resume from
the newest checkpoint whose files match its marker, skipping half-written ones.

Inputs on S3 (``pipelines.support.remote_inputs``): ``--data s3://.../prepared`` and ``--teacher s3://.../teacher`` are
downloaded and verified before Ray starts (``ray job submit --working-dir .`` never uploads data/ or artifacts/); Ray
Data then reads the card's train shards from S3 and the workers get the verified teacher bytes through the object
store. The Ray run name is the same as for the same inputs on local disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ParamsError, apply_trial, distill_train_config, load_params, params_hash
from pipelines.support.checkpoints import (  # noqa: F401 - re-exported: the stage's checkpoint API
    _STORAGE_FIX,
    CKPT_FILE,
    MARKER_FILE,
    CheckpointStorageError,
    complete_checkpoints,
    download_checkpoint,
    newest_complete_checkpoint,
    persist_checkpoint_verified,
    read_marker,
    storage_fs,
    storage_uri,
)
from pipelines.support.io_utils import one_line
from pipelines.support.remote_inputs import InputError, Inputs, resolve_inputs  # noqa: F401 - re-exported

__all__ = [
    "MARKER_FILE",
    "CheckpointStorageError",
    "DistillRunError",
    "InputError",
    "Inputs",
    "complete_checkpoints",
    "main",
    "newest_complete_checkpoint",
    "persist_checkpoint_verified",
    "read_marker",
    "resolve_inputs",
    "run_distill",
    "run_identity",
    "storage_uri",
    "train_loop_per_worker",
]


class DistillRunError(RuntimeError):
    """The Ray run failed after its ``FailureConfig`` retries (one line: run, storage, root cause, fix)."""


# --------------------------------------------------------------------------------------------------------------
# Worker side (runs inside Ray Train workers; also callable in-process for tests)


def _load_train_split(data_dir: str, card: dict[str, Any]):
    """The prepared train split as (x float32 (N, C, H, W) in [-1, 1], one-hot labels (N, L) or None).

    Read through Ray Data when inside a Ray Train worker, else directly from the shards.
    """
    import numpy as np
    import torch

    from ctm_core.data.prepared import levels_to_unit, load_prepared

    im = card["image"]
    shape = (im["channels"], im["height"], im["width"])
    try:
        import ray.train

        shard = ray.train.get_dataset_shard("train")
    except Exception:  # not inside a Ray Train worker (or no dataset given): read the verified shards directly
        shard = None
    if shard is not None:
        images, labels, index = [], [], []
        for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
            images.extend(np.frombuffer(b, dtype=np.uint8).reshape(shape) for b in batch["image"])
            labels.append(batch["label"].astype(np.int64))
            index.append(batch["index"].astype(np.int64))
        order = np.argsort(np.concatenate(index), kind="stable")  # deterministic row order on every rank
        images = np.stack(images)[order]
        labels = np.concatenate(labels)[order]
    else:
        images, labels = load_prepared(data_dir, "train")
    want = card["splits"]["train"]["count"]
    if len(images) != want:
        raise ValueError(
            f"{data_dir}: read {len(images)} training images, card.json lists {want}: the shards "
            "changed after they were verified; re-run the prepare stage or re-upload the folder"
        )
    x = torch.from_numpy(levels_to_unit(images, im["num_levels"]))
    label_dim = card["labels"]["label_dim"]
    onehot = None
    if label_dim:
        onehot = torch.nn.functional.one_hot(torch.from_numpy(labels), label_dim).float()
    return x, onehot


def _all_reduce_grads(parameters) -> None:
    """Sum gradients over ranks (each rank holds the gradient of its own microbatches, already scaled by b/B)."""
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch_cat_flat(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def torch_cat_flat(tensors):
    import torch

    return torch.cat([t.reshape(-1) for t in tensors])


def _all_reduce_metrics(metrics: dict) -> dict:
    import torch
    import torch.distributed as dist

    names = sorted(metrics)
    vec = torch.stack([metrics[n].detach().float().reshape(()) for n in names])
    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    return dict(zip(names, vec, strict=True))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build ctm_core objects, resume from the latest checkpoint, train, report checkpoints."""
    import ray.train
    import torch
    import torch.distributed as dist

    from ctm_core.io.teacher_format import load_edm_checkpoint
    from ctm_core.nets.student import CTMStudent
    from ctm_core.training.train_config import CTMTrainConfig
    from ctm_core.training.trainer import CTMTrainer, TensorDataSource, derive_seed

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")

    card = config["card"]
    cfg = CTMTrainConfig.from_dict(config["train_config"])
    x, labels = _load_train_split(config["data_dir"], card)
    try:
        storage = ctx.get_storage()  # Ray's StorageContext: the pyarrow filesystem + paths of this run
    except NotImplementedError:  # Ray Train local mode (num_workers=0) persists nothing
        storage = None
    # rank=0 on every worker: all ranks share one data order; the trainer draws world_size per-rank batches of
    # it as the global batch and runs its own microbatches of that.
    data = TensorDataSource(x, labels, batch_size=cfg.run.batch_size, seed=cfg.run.seed, rank=0)

    if config.get("teacher_ref") is not None:  # s3:// teacher: the driver's verified bytes, via the object store
        teacher = load_edm_checkpoint(ray.get(config["teacher_ref"])).to(device)
    else:
        teacher = load_edm_checkpoint(config["teacher_dir"]).to(device)
    # The s-branch's fresh init comes from the global RNG (torch.nn init): seed it from the run seed so every
    # rank (and every restart) builds the identical student before the checkpoint, if any, overwrites it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.run.seed, 0, "student_init"))
        student = CTMStudent.from_teacher(teacher, sigma_min=cfg.ctm.sigma_min, sigma_max=cfg.ctm.sigma_max)

    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    logger = _RankZeroLogger(config) if rank == 0 else None
    trainer = CTMTrainer(
        cfg,
        student,
        teacher,
        data,
        device=device,
        rank=rank,
        world_size=world if distributed else 1,
        grad_sync=_all_reduce_grads if distributed else None,
        metric_sync=_all_reduce_metrics if distributed else None,
        metrics_callback=logger.log if logger else None,
    )
    if storage is None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                trainer.load_checkpoint(Path(d) / CKPT_FILE)
            print(f"[distill rank {rank}] resumed from step {trainer.step}", flush=True)
    else:
        _resume(trainer, storage, rank, distributed)

    probe = _QualityProbe(config["quality"], card, device) if rank == 0 and config.get("quality") else None
    total, every = cfg.run.total_steps, max(1, cfg.run.checkpoint_every_steps)
    while trainer.step < total:
        trainer.train(num_steps=min(every - trainer.step % every, total - trainer.step))
        metrics = {"step": trainer.step, **(logger.last if logger else {})}
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
    if logger is not None:
        logger.close()


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
            chosen = newest_complete_checkpoint(
                fs, run_path, Path(tmp), legacy=ray.train.get_checkpoint(), log=lambda m: print(m, flush=True)
            )
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
                        f"checkpoint storage error: rank {rank} read "
                        f"{storage_uri(fs, chosen[0])} differently from rank 0 ({reason}); "
                        f"{_STORAGE_FIX}"
                    )
        if chosen is None:
            return
        trainer.load_checkpoint(Path(tmp) / CKPT_FILE)
    if chosen[1] >= 0 and trainer.step != chosen[1]:
        raise CheckpointStorageError(
            f"checkpoint storage error: {storage_uri(fs, chosen[0])} holds step "
            f"{trainer.step} but its {MARKER_FILE} says {chosen[1]}; {_STORAGE_FIX}"
        )
    print(f"[distill rank {rank}] resumed from step {trainer.step} ({storage_uri(fs, chosen[0])})", flush=True)


class _QualityProbe:
    """Optional hook of the tune stage (``config["quality"]``): ``fd_nfe1`` at every report, on rank 0.

    ``quality`` = {"dir": folder with ``classifier/`` (``ctm_core.eval.classifier``) and ``reference_stats.npz``
    (``ctm_core.eval.metrics.save_reference_stats``), both written by ``pipelines.tune``; "classifier_sha256",
    "reference_sha256": their expected digests; "num_samples", "batch", "seed": image i uses seed ``seed + i``;
    "ema": None (online weights) or an ``eval_emas`` rate}. The samples are made exactly as the evaluate stage
    makes its ``fd_nfe1`` (1-step γ=0 jump, ``ctm_core.eval.methods.sample_method``), clamped and quantised to the
    data's levels. Non-finite samples (a diverged trial) are mapped to mid-grey before clamping, so such a trial gets
    a large but finite FD that schedulers and searchers can rank; their fraction is reported as
    ``fd_nfe1_nonfinite``.
    """

    def __init__(self, quality: dict[str, Any], card: dict[str, Any], device):
        from ctm_core.eval.classifier import load_classifier
        from ctm_core.eval.metrics import load_reference_stats

        folder = Path(quality["dir"])
        self.classifier = load_classifier(folder / "classifier", quality.get("classifier_sha256"))
        self.reference = load_reference_stats(folder / "reference_stats.npz", quality.get("reference_sha256"))
        start = int(quality.get("seed", 0))
        self.seeds = list(range(start, start + int(quality["num_samples"])))
        self.batch = int(quality.get("batch", len(self.seeds)))
        self.ema = quality.get("ema")
        im = card["image"]
        self.img_shape = (int(im["channels"]), int(im["height"]), int(im["width"]))
        self.num_levels = int(im["num_levels"])
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
        print(f"[distill] step {step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in self.last.items()])

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------------------
# Driver side


def _distill_section(params, best_params: str | None):
    """The distill section to use: artifacts/best_params.yaml (the tune stage's output) when given, else params."""
    d = params.distill
    if best_params:
        path = Path(best_params)
        if not path.is_file():
            raise ParamsError("--best-params", f"file {path} not found (fix: run the tune stage, or omit the flag)")
        raw = yaml.safe_load(path.read_text()) or {}
        section = raw.get("distill", raw)
        d = apply_trial(params.distill, section, num_workers=params.ray.num_workers)
    # Library features the Ray stage does not wire yet: refuse them here, before any work, not deep in a worker.
    if d.gan.enabled:
        raise ParamsError(
            "distill.gan.enabled",
            "the GAN phase is not wired into the Ray stage yet, got true "
            "(fix: set it to false; ctm_core.gan.objective / CTMTrainer(discriminator=...) provide it)",
        )
    if d.distance == "lpips":
        raise ParamsError(
            "distill.distance",
            "'lpips' needs VGG16 + LPIPS weights, which the stage does not fetch "
            "yet (fix: use l2 or pseudo_huber; ctm_core.gan.lpips.LPIPS.from_files for library use)",
        )
    return d


def _check_inputs(data_dir: Path, teacher_dir: Path) -> dict[str, Any]:
    from ctm_core.data.prepared import load_card
    from ctm_core.io.teacher_format import load_edm_checkpoint

    card = load_card(data_dir)  # names the missing stage output
    if not (teacher_dir / "teacher.safetensors").is_file():
        raise FileNotFoundError(f"{teacher_dir}/teacher.safetensors not found: run the teacher stage first")
    teacher = load_edm_checkpoint(teacher_dir)  # verifies the weights sha256 and the architecture
    im = card["image"]
    if (teacher.img_channels, teacher.img_resolution) != (im["channels"], im["height"]):
        raise ValueError(
            f"teacher geometry ({teacher.img_channels} channels, {teacher.img_resolution} px) does not match the "
            f"prepared data ({im['channels']} channels, {im['height']} px): retrain or fetch a matching teacher"
        )
    if teacher.label_dim not in (0, card["labels"]["label_dim"]):
        raise ValueError(f"teacher label_dim {teacher.label_dim} != data label_dim {card['labels']['label_dim']}")
    return card


def run_identity(d, card: dict[str, Any], teacher_weights_sha256: str | None, workers: int) -> dict[str, Any]:
    """What names the Ray run (``distill-<params_hash(identity)[:12]>``): the distill section, the train shards'
    sha256s, the teacher's weights sha256 and the worker count; where the inputs came from (disk or S3) is not."""
    return {
        "distill": d.model_dump(),
        "data": [s["sha256"] for s in card["splits"]["train"]["shards"]],
        "teacher": teacher_weights_sha256,
        "workers": workers,
    }


def run_distill(
    params,
    *,
    data_dir: str,
    teacher_dir: str,
    out_dir: str,
    best_params: str | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Validate, then fit a ``TorchTrainer`` and write the student folder; returns the run record."""
    import mlflow
    import ray
    import ray.train

    from ctm_core.io.student_format import ema_variant, save_student
    from ctm_core.io.teacher_format import load_edm_checkpoint
    from ctm_core.nets.student import CTMStudent
    from pipelines.support import ray_env, tracking
    from pipelines.support.io_utils import read_json

    root = tracking.default_repo_root()
    d = _distill_section(params, best_params)
    inputs = resolve_inputs(data_dir, teacher_dir)  # s3:// inputs: downloaded + verified before Ray starts
    data_dir_p, teacher_dir_p = inputs.data_dir, inputs.teacher_dir
    workers = int(num_workers or params.ray.num_workers)
    card = _check_inputs(data_dir_p, teacher_dir_p)
    teacher_cfg = read_json(teacher_dir_p / "config.json")
    train_cfg = distill_train_config(d, workers)
    train_cfg["run"]["progress"] = False
    ident = run_identity(d, card, teacher_cfg.get("weights_sha256"), workers)
    name = f"distill-{params_hash(ident)[:12]}"
    storage = ray_env.storage_path(params)
    tracking_uri = tracking.resolve_tracking_uri(params, root)

    with tracking.start_run(
        name,
        tracking_uri=tracking_uri,
        experiment_name=params.mlflow.experiment_name,
        tags=tracking.run_tags("distill", params_hash(ident), root),
        repo_root=root,
    ) as run:
        run_id = run.info.run_id
        client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
        logged = client.get_run(run_id).data.params
        new = {
            k: str(v)
            for k, v in tracking.flatten({"distill": d.model_dump(), "ray.num_workers": workers}).items()
            if k not in logged
        }
        if new:
            mlflow.log_params(new)
        info = ray_env.connect_or_start(params)
        try:
            from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
            from ray.train.torch import TorchTrainer

            ray.data.DataContext.get_current().enable_progress_bars = False
            # The card's train shards (verified): from S3 when the data came from S3 (every node can read it).
            base = inputs.data_uri or str(data_dir_p)
            ds = ray.data.read_parquet([f"{base}/{sh['path']}" for sh in card["splits"]["train"]["shards"]])
            teacher_ref = None
            if inputs.teacher_uri:  # the driver's cache is not on the other nodes: ship the verified bytes
                teacher_ref = ray.put((teacher_dir_p / "teacher.safetensors").read_bytes())
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={
                    "card": card,
                    "train_config": train_cfg,
                    "data_dir": str(data_dir_p),
                    "teacher_dir": str(teacher_dir_p),
                    "teacher_ref": teacher_ref,
                    "use_gpu": params.ray.use_gpu,
                    "threads_per_worker": max(1, int(params.ray.cpus_per_worker)),
                    "mlflow_run_id": run_id,
                    "tracking_uri": tracking_uri,
                },
                scaling_config=ScalingConfig(
                    num_workers=workers,
                    use_gpu=params.ray.use_gpu,
                    resources_per_worker={"CPU": params.ray.cpus_per_worker},
                ),
                run_config=RunConfig(
                    name=name,
                    storage_path=storage,
                    failure_config=FailureConfig(max_failures=params.ray.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                ),
                datasets={"train": ds},
                dataset_config=ray.train.DataConfig(datasets_to_split=[]),
            )
            t0 = time.time()
            try:
                result = trainer.fit()
            except TrainingFailedError as e:
                cause = _root_cause(e)
                if "fix:" not in cause:
                    storage_related = any(
                        t in cause
                        for t in ("AWS Error", "checkpoint_manager_snapshot", storage.split("?")[0].split("://")[-1])
                    )
                    cause += (
                        f"; {_STORAGE_FIX}"
                        if storage_related
                        else "; fix the cause and re-run the stage: it resumes from the last complete checkpoint"
                    )
                raise DistillRunError(
                    f"Ray run {name} under {storage} failed after ray.max_failures="
                    f"{params.ray.max_failures} restarts: {cause}"
                ) from e
            wall = time.time() - t0
        finally:
            if not params.ray.address and not os.environ.get("RAY_ADDRESS"):
                ray_env.shutdown()
        ckpt_path, state = _final_state(storage, name, result.checkpoint)
        if state["step"] != d.steps:
            raise RuntimeError(f"final checkpoint is at step {state['step']}, expected distill.steps={d.steps}")
        student = CTMStudent.from_teacher(
            load_edm_checkpoint(teacher_dir_p), sigma_min=d.sigma_min, sigma_max=d.sigma_max
        )
        variants = {"online": state["model"]}
        for rate in d.eval_emas:
            variants[ema_variant(rate)] = _ema_state(state["emas"], rate)
        record = {
            "mlflow_run_id": run_id,
            "ray_run_name": name,
            "ray_storage_path": storage,
            "checkpoint_path": ckpt_path,
            "steps": int(state["step"]),
            "inputs": {"data": inputs.data_uri or str(data_dir_p), "teacher": inputs.teacher_uri or str(teacher_dir_p)},
            "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
            "fit_wall_s": round(wall, 2),
            "num_workers": workers,
            "ray": {k: info.get(k) for k in ("dashboard_url",)},
            "teacher_weights_sha256": teacher_cfg.get("weights_sha256"),
        }
        save_student(out_dir, student.init_kwargs, variants, meta=record, extra_json={"run.json": record})
        mlflow.log_metric("distill/fit_wall_s", wall)
        mlflow.log_dict(record, "distill/run.json")
    return record


def _root_cause(e: BaseException) -> str:
    """One line for a Ray ``TrainingFailedError``: our storage error if a worker raised one, else the last line."""
    causes = [e]
    causes += list(getattr(e, "worker_failures", {}).values())
    if getattr(e, "controller_failure", None) is not None:
        causes.append(e.controller_failure)
    lines = [ln.strip() for c in causes for ln in str(c).splitlines() if ln.strip()]
    for ln in lines:
        i = ln.find("checkpoint storage error:")
        if i >= 0:
            return ln[i:]
    return lines[-1] if lines else type(e).__name__


def _final_state(storage: str, name: str, registered) -> tuple[str, dict]:
    """The newest complete checkpoint of the run (checked against its marker) as (path, trainer state dict)."""
    from ctm_core.training.trainer import load_checkpoint_file

    fs, base = storage_fs(storage)
    run_path = f"{base.rstrip('/')}/{name}"
    with tempfile.TemporaryDirectory() as tmp:
        chosen = newest_complete_checkpoint(
            fs, run_path, Path(tmp), legacy=registered, log=lambda m: print(m, file=sys.stderr, flush=True)
        )
        if chosen is None:
            raise RuntimeError(
                f"Ray run {name} finished without a complete checkpoint under {storage}/{name} "
                "(fix: re-run the stage; check ray.storage_path)"
            )
        return chosen[0], load_checkpoint_file(Path(tmp) / CKPT_FILE)


def _ema_state(emas_state: dict, rate: float) -> dict:
    """The state_dict of the EMA with ``rate`` out of an ``EMABank`` state_dict (one sub-module per rate)."""
    from ctm_core.training.ema import EMABank

    prefix = f"models.{EMABank.key(rate)}."
    sub = {k[len(prefix) :]: v for k, v in emas_state.items() if k.startswith(prefix)}
    if not sub:
        raise KeyError(f"EMA rate {rate} not in the checkpoint (have {sorted({k.split('.')[0] for k in emas_state})})")
    return sub


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.distill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--best-params", default=None, help="tune stage output (its distill section wins)")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--teacher", default="artifacts/teacher")
    ap.add_argument("--out", default="artifacts/student")
    ap.add_argument("--dry-run", action="store_true", help="validate params and inputs, print the plan, train nothing")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        d = _distill_section(params, args.best_params)
        submitting = params.ray.submit and not os.environ.get("CTM_INSIDE_RAY_JOB")
        if submitting and any(str(v).startswith("s3://") for v in (args.data, args.teacher)):
            card = None  # the job downloads and verifies them on the cluster (its credentials, not ours)
        else:
            inputs = resolve_inputs(args.data, args.teacher)
            card = _check_inputs(inputs.data_dir, inputs.teacher_dir)
    except (ParamsError, FileNotFoundError, ValueError) as e:
        print(f"distill: {one_line(e)}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(
            json.dumps(
                {
                    "distill": d.model_dump(),
                    "data": card["splits"]["train"]["count"] if card else args.data,
                    "workers": params.ray.num_workers,
                },
                indent=2,
            )
        )
        return 0
    if params.ray.submit and not os.environ.get("CTM_INSIDE_RAY_JOB"):
        from pipelines.support.submit import submit_job  # blocks until the job ends, streaming its logs

        return submit_job(params, "pipelines.distill", sys.argv[1:] if argv is None else argv)
    try:
        record = run_distill(
            params, data_dir=args.data, teacher_dir=args.teacher, out_dir=args.out, best_params=args.best_params
        )
    except (DistillRunError, CheckpointStorageError) as e:
        print(f"distill: {one_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
