"""DVC stage `distill`: CTM distillation of the teacher into a student with Ray Train (TorchTrainer, Train V2).

    python -m pipelines.distill --params params.yaml --best-params artifacts/best_params.yaml \\
        --data data/prepared --teacher artifacts/teacher --out artifacts/student

The same entrypoint runs under ``ray job submit --working-dir . -- python -m pipelines.distill ...`` (Ray sets
RAY_ADDRESS there and it joins that cluster); without an address it starts a local Ray from the ``ray`` section.

Resumption: the Ray run name is ``distill-<hash of the distill section, data and teacher>`` and lives under
``ray.storage_path``, so re-running the stage after a kill (or a dead worker, through ``FailureConfig``) continues
from the last reported checkpoint instead of starting over (STACK_FACTS §1.4). The checkpoint holds the whole
trainer state (ctm_core.trainer), so the resumed run ends with the same weights.

Data parallelism: every worker reads the full prepared train split through Ray Data (``read_parquet`` +
``get_dataset_shard``; the split is not sharded so every rank sees the same global batches), sorts it by the
``index`` column, and processes the microbatches ``i ≡ rank (mod world)`` of each global batch. All randomness is
keyed by (seed, step, microbatch), so a microbatch's noise, k, t, s and dropout do not depend on which rank runs it,
and gradients are summed across ranks with ``all_reduce``: W workers compute the same update as 1 worker, up to
float summation order (adaptive weights are per microbatch in both cases, as in the official code).

Outputs (``--out``, written atomically): the student folder of ``ctm_core.student_format`` (online + eval-EMA
weights) and ``run.json`` (MLflow run id, Ray run name and storage, final checkpoint path, last metrics).

Checkpoints you can trust. Each report writes ``<storage>/<run>/checkpoint_<step:06d>/trainer_state.pt`` through
Ray's own upload path (``StorageContext.persist_current_checkpoint``), then, through the same pyarrow filesystem,
checks that every file landed with its size and only then writes ``complete.json`` (step, size and sha256 of each
file) LAST. Why: pyarrow 25's ``fs.copy_files`` (Ray 2.60's upload) returns normally when the S3 server dies in the
middle of the PUT, and Ray logs "Checkpoint successfully created" for an object that does not exist
(tests/test_faults.py). A failed check raises ``CheckpointStorageError`` (the storage path and the fix on one
line) inside ``ray.train.report``, so Ray never registers that checkpoint; ``FailureConfig`` retries, and when the
run gives up the stage exits 1 with that line. On every (re)start the workers resume from the newest checkpoint
whose ``complete.json`` is present and whose files match its sha256, skipping half-written ones; a checkpoint
without the marker is only used for runs written before the marker existed (with a warning).

Inputs on S3 (``ray job submit --working-dir .`` never uploads data/ or artifacts/): ``--data s3://.../prepared``
and ``--teacher s3://.../teacher`` (the folders the prepare and teacher stages write, e.g. after
``aws s3 sync data/prepared s3://bucket/ctm/prepared``). Before Ray starts, the driver downloads ``card.json`` and
the train shards into ``$CTM_INPUT_CACHE`` (default ``<repo>/.cache/inputs``), checking each shard against the
card's sha256, and the teacher (``config.json`` + ``teacher.safetensors``, checked against ``weights_sha256``);
errors (no credentials, no bucket, missing key, wrong sha256) stop it with one line. Ray Data then reads the
card's train shards from S3 (every node can), and the workers get the verified teacher bytes through the object
store. The Ray run name is the same as for the same inputs on local disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ParamsError, apply_trial, distill_train_config, load_params, params_hash

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

CKPT_FILE = "trainer_state.pt"
MARKER_FILE = "complete.json"  # written last, after the checkpoint's files were checked in storage
MARKER_FORMAT = "ctm-checkpoint/v1"
_CHUNK = 1 << 20


class CheckpointStorageError(RuntimeError):
    """A checkpoint could not be written to, or read back from, ``ray.storage_path`` (one line: path, cause, fix)."""


class DistillRunError(RuntimeError):
    """The Ray run failed after its ``FailureConfig`` retries (one line: run, storage, root cause, fix)."""


class InputError(ValueError):
    """An ``s3://`` input could not be fetched or failed verification (one line: path, cause, fix)."""


# --------------------------------------------------------------------------------------------------------------
# Checkpoints in storage: verified upload, completion marker, newest complete checkpoint


_STORAGE_FIX = ("fix: make ray.storage_path reachable and writable from every Ray node (S3: the endpoint "
                "AWS_ENDPOINT_URL, the credentials, the bucket; local: free disk space), then re-run the stage: it "
                "resumes from the last complete checkpoint")


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def storage_uri(fs, path: str) -> str:
    """A user-facing URI for ``path`` on the pyarrow filesystem ``fs`` (``s3://bucket/key`` or a local path)."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.S3FileSystem):
        return f"s3://{path}"
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name}://{path}"


def _storage_error(action: str, fs, path: str, e: BaseException) -> CheckpointStorageError:
    return CheckpointStorageError(f"checkpoint storage error: {action} {storage_uri(fs, path)} failed "
                                  f"({_one_line(e)}); {_STORAGE_FIX}")


def persist_checkpoint_verified(storage, checkpoint, checkpoint_dir_name: str, *, step: int):
    """Ray's upload of ``checkpoint`` into ``<run>/<checkpoint_dir_name>``, checked, then the completion marker.

    Used as ``ray.train.report(checkpoint_upload_fn=...)`` on rank 0. ``storage`` is the run's
    ``ray.train.get_context().get_storage()`` (Ray's ``StorageContext``: ``storage_filesystem``,
    ``build_checkpoint_path_from_name``, ``persist_current_checkpoint``; ray/train/v2/_internal/execution/storage.py).
    Order: delete an older attempt's marker in that folder, upload, stat every file (type and size) through the
    same filesystem, write ``complete.json`` (step + size + sha256 per file), stat it. Returns Ray's persisted
    ``Checkpoint``; raises ``CheckpointStorageError`` if any step fails or a file is missing or short.
    """
    import pyarrow.fs as pafs

    from pipelines.io_utils import sha256_file

    fs = storage.storage_filesystem
    dest = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    local = Path(checkpoint.path)
    files = {p.relative_to(local).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(local.rglob("*")) if p.is_file()}
    if not files or MARKER_FILE in files:
        raise ValueError(f"checkpoint {local}: expected files other than {MARKER_FILE}, got {sorted(files)}")
    marker_path = f"{dest}/{MARKER_FILE}"
    try:  # a marker left by an earlier attempt at this step must not vouch for what is written now
        if fs.get_file_info(marker_path).type != pafs.FileType.NotFound:
            fs.delete_file(marker_path)
    except OSError as e:
        raise _storage_error("clearing the completion marker of", fs, dest, e) from e
    try:
        persisted = storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
    except OSError as e:
        raise _storage_error("uploading the checkpoint to", fs, dest, e) from e
    try:
        infos = fs.get_file_info([f"{dest}/{rel}" for rel in files])
    except OSError as e:
        raise _storage_error("checking the uploaded checkpoint", fs, dest, e) from e
    bad = []
    for (rel, meta), info in zip(files.items(), infos, strict=True):
        if info.type != pafs.FileType.File:
            bad.append(f"{rel} missing")
        elif info.size != meta["size"]:
            bad.append(f"{rel} has {info.size} of {meta['size']} bytes")
    if bad:
        raise CheckpointStorageError(
            f"checkpoint storage error: the upload to {storage_uri(fs, dest)} is incomplete although Ray reported "
            f"it done ({', '.join(bad)}); {_STORAGE_FIX}")
    data = (json.dumps({"format": MARKER_FORMAT, "step": int(step), "files": files}, indent=2, sort_keys=True)
            + "\n").encode()
    try:
        with fs.open_output_stream(marker_path) as f:
            f.write(data)
        info = fs.get_file_info(marker_path)
    except OSError as e:
        raise _storage_error("writing the completion marker of", fs, dest, e) from e
    if info.type != pafs.FileType.File or info.size != len(data):
        raise CheckpointStorageError(f"checkpoint storage error: the completion marker {storage_uri(fs, marker_path)} "
                                     f"did not land ({info}); {_STORAGE_FIX}")
    return persisted


def read_marker(fs, checkpoint_path: str) -> dict[str, Any] | None:
    """The checkpoint's ``complete.json`` if present and well-formed, else None (an incomplete checkpoint)."""
    try:
        with fs.open_input_stream(f"{checkpoint_path}/{MARKER_FILE}") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _storage_error("reading", fs, f"{checkpoint_path}/{MARKER_FILE}", e) from e
    try:
        marker = json.loads(raw)
        ok = (marker.get("format") == MARKER_FORMAT and isinstance(marker.get("step"), int)
              and isinstance(marker.get("files"), dict) and marker["files"]
              and all(isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str)
                      for m in marker["files"].values())
              and all(not k.startswith("/") and ".." not in k.split("/") for k in marker["files"]))
    except (ValueError, AttributeError):
        return None
    return marker if ok else None


def checkpoint_dirs(fs, run_path: str) -> list[str]:
    """Paths of the ``checkpoint_*`` folders directly under the run folder ``run_path`` (sorted by name)."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    except OSError as e:
        raise _storage_error("listing the checkpoints under", fs, run_path, e) from e
    return sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def complete_checkpoints(fs, run_path: str) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(complete, incomplete): ``(path, marker)`` of the checkpoints with a valid marker, highest step first, and
    the paths of those without one (half-written, or written before the marker existed)."""
    complete, incomplete = [], []
    for path in checkpoint_dirs(fs, run_path):
        marker = read_marker(fs, path)
        if marker is None:
            incomplete.append(path)
        else:
            complete.append((path, marker))
    complete.sort(key=lambda pm: (pm[1]["step"], pm[0]), reverse=True)
    return complete, incomplete


def download_checkpoint(fs, checkpoint_path: str, marker: dict[str, Any] | None, dest: Path) -> str | None:
    """Copy the checkpoint's files into ``dest``; with a marker, check each file's size and sha256.

    Returns None when the copy is complete and matches, else the reason (the partial copy is left to the caller).
    """
    names = list(marker["files"]) if marker else None
    if names is None:  # legacy checkpoint (no marker): take what is there
        import pyarrow.fs as pafs

        try:
            infos = fs.get_file_info(pafs.FileSelector(checkpoint_path, recursive=True))
        except OSError as e:
            raise _storage_error("listing", fs, checkpoint_path, e) from e
        names = [i.path[len(checkpoint_path) + 1:] for i in infos if i.type == pafs.FileType.File]
    for rel in names:
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        h, size = hashlib.sha256(), 0
        try:
            with fs.open_input_stream(f"{checkpoint_path}/{rel}") as src, open(out, "wb") as dst:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    h.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
        except FileNotFoundError:
            return f"{rel} missing"
        except OSError as e:
            raise _storage_error("downloading", fs, f"{checkpoint_path}/{rel}", e) from e
        if marker:
            want = marker["files"][rel]
            if size != want["size"] or h.hexdigest() != want["sha256"]:
                return f"{rel} has {size} bytes, sha256 {h.hexdigest()[:12]}..., expected {want['size']} bytes, " \
                       f"sha256 {want['sha256'][:12]}..."
    return None


def newest_complete_checkpoint(fs, run_path: str, dest: Path, *, legacy=None, log=None) -> tuple[str, int] | None:
    """Download the newest checkpoint of the run whose files match its ``complete.json`` into ``dest``.

    Half-written checkpoints (no marker, or files that do not match it) are skipped with a log line. ``legacy``:
    Ray's registered checkpoint (``ray.train.get_checkpoint()``), used only when no checkpoint of the run has a
    marker and it has none either (a run started before markers existed). Returns ``(path, step or -1)`` or None.
    ``log``: called with each message (default: print). No builtin as a default value: run as ``python -m``, this
    module is ``__main__`` and cloudpickle ships it to the workers by value, and Ray may have swapped
    ``builtins.print`` by then ("Can't pickle <built-in function print>: it's not the same object").
    """
    if log is None:
        def log(m: str) -> None:
            print(m, flush=True)
    complete, incomplete = complete_checkpoints(fs, run_path)
    newest = complete[0][1]["step"] if complete else -1
    use_legacy = legacy is not None and newest < 0 and read_marker(legacy.filesystem, legacy.path) is None
    for path in incomplete:
        if not (use_legacy and path.rstrip("/") == str(legacy.path).rstrip("/")):
            log(f"[distill] {storage_uri(fs, path)} has no {MARKER_FILE} (half-written): not loading it")
    for path, marker in complete:
        reason = download_checkpoint(fs, path, marker, dest)
        if reason is None:
            return path, int(marker["step"])
        log(f"[distill] {storage_uri(fs, path)} does not match its {MARKER_FILE} ({reason}): not loading it")
        _empty_dir(dest)
    if use_legacy:
        log(f"[distill] WARNING: resuming from {storage_uri(legacy.filesystem, legacy.path)}, which has no "
            f"{MARKER_FILE} (written before checkpoints were verified): its completeness is not checked")
        reason = download_checkpoint(legacy.filesystem, legacy.path, None, dest)
        if reason is None:
            return legacy.path, -1
        _empty_dir(dest)
    return None


def _empty_dir(folder: Path) -> None:
    import shutil

    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# --------------------------------------------------------------------------------------------------------------
# Worker side (runs inside Ray Train workers; also callable in-process for tests)


def _load_train_split(data_dir: str, card: dict[str, Any]):
    """The prepared train split as (x float32 (N, C, H, W) in [-1, 1], one-hot labels (N, L) or None).

    Read through Ray Data when inside a Ray Train worker, else directly from the shards.
    """
    import numpy as np
    import torch

    from pipelines.prepare import levels_to_unit, load_prepared

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
        raise ValueError(f"{data_dir}: read {len(images)} training images, card.json lists {want}: the shards "
                         "changed after they were verified; re-run the prepare stage or re-upload the folder")
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
        g.copy_(flat[offset:offset + n].view_as(g))
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
    import torch
    import torch.distributed as dist

    import ray.train
    from ctm_core.student import CTMStudent
    from ctm_core.teacher_format import load_edm_checkpoint
    from ctm_core.train_config import CTMTrainConfig
    from ctm_core.trainer import CTMTrainer, TensorDataSource, derive_seed

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
        cfg, student, teacher, data, device=device, rank=rank, world_size=world if distributed else 1,
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
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{trainer.step:06d}",
                             checkpoint_upload_fn=upload)
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
            chosen = newest_complete_checkpoint(fs, run_path, Path(tmp), legacy=ray.train.get_checkpoint(),
                                                log=lambda m: print(m, flush=True))
        if distributed:
            import torch.distributed as dist

            box = [chosen]
            dist.broadcast_object_list(box, src=0)
            chosen = box[0]
            if rank != 0 and chosen is not None:
                marker = read_marker(fs, chosen[0]) if chosen[1] >= 0 else None
                reason = download_checkpoint(fs, chosen[0], marker, Path(tmp))
                if reason is not None:
                    raise CheckpointStorageError(f"checkpoint storage error: rank {rank} read "
                                                 f"{storage_uri(fs, chosen[0])} differently from rank 0 ({reason}); "
                                                 f"{_STORAGE_FIX}")
        if chosen is None:
            return
        trainer.load_checkpoint(Path(tmp) / CKPT_FILE)
    if chosen[1] >= 0 and trainer.step != chosen[1]:
        raise CheckpointStorageError(f"checkpoint storage error: {storage_uri(fs, chosen[0])} holds step "
                                     f"{trainer.step} but its {MARKER_FILE} says {chosen[1]}; {_STORAGE_FIX}")
    print(f"[distill rank {rank}] resumed from step {trainer.step} ({storage_uri(fs, chosen[0])})", flush=True)


class _QualityProbe:
    """Optional hook of the tune stage (``config["quality"]``): ``fd_nfe1`` at every report, on rank 0.

    ``quality`` = {"dir": folder with ``classifier/`` (``ctm_core.feature_classifier``) and ``reference_stats.npz``
    (``ctm_core.metrics.save_reference_stats``), both written by ``pipelines.tune``; "classifier_sha256",
    "reference_sha256": their expected digests; "num_samples", "batch", "seed": image i uses seed ``seed + i``;
    "ema": None (online weights) or an ``eval_emas`` rate}. The samples are made exactly as the evaluate stage
    makes its ``fd_nfe1`` (1-step γ=0 jump, ``pipelines.evaluate.sample_method``), clamped and quantised to the
    data's levels. Non-finite samples (a diverged trial) are mapped to mid-grey before clamping, so such a trial gets
    a large but finite FD that schedulers and searchers can rank; their fraction is reported as
    ``fd_nfe1_nonfinite``.
    """

    def __init__(self, quality: dict[str, Any], card: dict[str, Any], device):
        from ctm_core.feature_classifier import load_classifier
        from ctm_core.metrics import load_reference_stats

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

        from ctm_core.feature_classifier import classifier_features
        from ctm_core.metrics import feature_statistics, frechet_distance, images_to_levels
        from pipelines.evaluate import Method, sample_method

        net = trainer.model if self.ema is None else trainer.emas[float(self.ema)]
        was_training = net.training
        net.eval()
        try:
            x = sample_method(Method("fd_nfe1", "gamma", 1, 0.0), net, None, seeds=self.seeds, batch=self.batch,
                              img_shape=self.img_shape, label_dim=int(getattr(net, "label_dim", 0)),
                              device=self.device)
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
        raise ParamsError("distill.gan.enabled", "the GAN phase is not wired into the Ray stage yet, got true "
                          "(fix: set it to false; ctm_core.gan / CTMTrainer(discriminator=...) provide it)")
    if d.distance == "lpips":
        raise ParamsError("distill.distance", "'lpips' needs VGG16 + LPIPS weights, which the stage does not fetch "
                          "yet (fix: use l2 or pseudo_huber; ctm_core.lpips.LPIPS.from_files for library use)")
    return d


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Local, verified copies of the distill inputs; ``*_uri`` are the ``s3://`` sources (None for local paths)."""

    data_dir: Path
    teacher_dir: Path
    data_uri: str | None = None
    teacher_uri: str | None = None


def input_cache_dir() -> Path:
    """``$CTM_INPUT_CACHE``, else ``<repo root>/.cache/inputs`` (git-ignored)."""
    from pipelines import tracking

    env = os.environ.get("CTM_INPUT_CACHE")
    return Path(env).expanduser().resolve() if env else tracking.default_repo_root() / ".cache" / "inputs"


def resolve_inputs(data: str, teacher: str, cache_dir: str | os.PathLike[str] | None = None) -> Inputs:
    """Local folders as they are; ``s3://`` folders downloaded and verified into the cache (module doc).

    Raises ``InputError`` (one line naming the S3 path and the fix) before anything starts.
    """
    is_s3 = [str(v).startswith("s3://") for v in (data, teacher)]
    if not any(is_s3):
        return Inputs(Path(data).resolve(), Path(teacher).resolve())
    cache = Path(cache_dir) if cache_dir is not None else input_cache_dir()
    data_dir = _fetch_prepared(str(data).rstrip("/"), cache) if is_s3[0] else Path(data).resolve()
    teacher_dir = _fetch_teacher(str(teacher).rstrip("/"), cache) if is_s3[1] else Path(teacher).resolve()
    return Inputs(data_dir, teacher_dir, str(data).rstrip("/") if is_s3[0] else None,
                  str(teacher).rstrip("/") if is_s3[1] else None)


def _s3_download(uri: str, tmp_dir: Path, what: str) -> tuple[Path, str]:
    """Stream ``uri`` into a temp file under ``tmp_dir`` (boto3, retries: ``pipelines.fetch``); (path, sha256)."""
    from pipelines.fetch import FetchError, _download_to_temp, _open_s3, _with_retries

    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _with_retries(lambda: _download_to_temp(lambda: _open_s3(uri, 30.0, 3), tmp_dir, uri, False),
                             uri, 3, 0.5)
    except FetchError as e:
        msg = _one_line(e)
        if msg.startswith("S3 object not found"):
            msg += f" ({what})"
        raise InputError(msg) from None


def _install(tmp: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)


def _fetch_prepared(uri: str, cache: Path) -> Path:
    """``card.json`` + the train shards of a prepared folder on S3, each shard checked against the card."""
    from pipelines.io_utils import read_json, sha256_file
    from pipelines.prepare import CARD_FORMAT

    tmp_dir = cache / "tmp"
    card_tmp, card_sha = _s3_download(f"{uri}/card.json", tmp_dir,
                                      "fix: --data must be the folder the prepare stage writes (card.json + "
                                      "train/*.parquet), e.g. after aws s3 sync data/prepared <that URI>")
    try:
        card = read_json(card_tmp)
        if card.get("format") != CARD_FORMAT:
            raise InputError(f"{uri}/card.json: expected format {CARD_FORMAT!r}, got {card.get('format')!r} "
                             "(fix: point --data at a folder written by the prepare stage)")
        folder = cache / "prepared" / card_sha[:16]
        for shard in card["splits"]["train"]["shards"]:
            dest = folder / shard["path"]
            if dest.is_file() and sha256_file(dest) == shard["sha256"]:
                continue  # verified copy from an earlier run
            tmp, got = _s3_download(f"{uri}/{shard['path']}", tmp_dir, "listed in card.json")
            if got != shard["sha256"]:
                tmp.unlink(missing_ok=True)
                raise InputError(f"sha256 mismatch for {uri}/{shard['path']}: expected {shard['sha256']} (card.json), "
                                 f"got {got}; the object is truncated or was modified (nothing cached): re-upload "
                                 "the prepared folder (aws s3 sync / dvc push) or re-run the prepare stage")
            _install(tmp, dest)
        _install(card_tmp, folder / "card.json")  # last: a folder with card.json has its train shards
    finally:
        card_tmp.unlink(missing_ok=True)
    return folder


def _fetch_teacher(uri: str, cache: Path) -> Path:
    """``config.json`` + ``teacher.safetensors`` from S3, checked against ``weights_sha256`` before caching."""
    import shutil

    from ctm_core.teacher_format import CONFIG_FILE, WEIGHTS_FILE, load_edm_checkpoint
    from pipelines.io_utils import read_json, sha256_file

    fix = ("fix: --teacher must be the folder the teacher stage writes (teacher.safetensors + config.json), e.g. "
           "after aws s3 sync artifacts/teacher <that URI>")
    tmp_dir = cache / "tmp"
    cfg_tmp, cfg_sha = _s3_download(f"{uri}/{CONFIG_FILE}", tmp_dir, fix)
    try:
        try:
            cfg = read_json(cfg_tmp)
        except ValueError as e:
            raise InputError(f"{uri}/{CONFIG_FILE}: not JSON ({_one_line(e)}); {fix}") from None
        folder = cache / "teacher" / str(cfg.get("weights_sha256") or cfg_sha)[:16]
        stamp = folder / "verified.json"  # sha256 of both files once load_edm_checkpoint accepted them
        if stamp.is_file() and (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file():
            seen = read_json(stamp)
            if (seen.get(CONFIG_FILE) == cfg_sha == sha256_file(folder / CONFIG_FILE)
                    and seen.get(WEIGHTS_FILE) == sha256_file(folder / WEIGHTS_FILE)):
                return folder
        staging = Path(tempfile.mkdtemp(prefix="teacher-", dir=tmp_dir))
        try:
            w_tmp, w_sha = _s3_download(f"{uri}/{WEIGHTS_FILE}", tmp_dir, fix)
            os.replace(w_tmp, staging / WEIGHTS_FILE)
            shutil.copyfile(cfg_tmp, staging / CONFIG_FILE)
            try:
                load_edm_checkpoint(staging)  # weights_sha256 + config/metadata agreement + architecture
            except (ValueError, KeyError, RuntimeError) as e:
                raise InputError(f"teacher {uri} failed verification ({_one_line(e)}); nothing cached: re-upload "
                                 "the teacher folder or re-run the teacher stage") from None
            (staging / "verified.json").write_text(json.dumps({CONFIG_FILE: cfg_sha, WEIGHTS_FILE: w_sha}))
            if folder.exists():
                shutil.rmtree(folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        cfg_tmp.unlink(missing_ok=True)
    return folder


def _check_inputs(data_dir: Path, teacher_dir: Path) -> dict[str, Any]:
    from ctm_core.teacher_format import load_edm_checkpoint
    from pipelines.prepare import load_card

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
    return {"distill": d.model_dump(), "data": [s["sha256"] for s in card["splits"]["train"]["shards"]],
            "teacher": teacher_weights_sha256, "workers": workers}


def run_distill(params, *, data_dir: str, teacher_dir: str, out_dir: str, best_params: str | None = None,
                num_workers: int | None = None) -> dict[str, Any]:
    """Validate, then fit a ``TorchTrainer`` and write the student folder; returns the run record."""
    import mlflow

    import ray
    import ray.train
    from ctm_core.student import CTMStudent
    from ctm_core.student_format import ema_variant, save_student
    from ctm_core.teacher_format import load_edm_checkpoint
    from pipelines import ray_env, tracking
    from pipelines.io_utils import read_json

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

    with tracking.start_run(name, tracking_uri=tracking_uri, experiment_name=params.mlflow.experiment_name,
                            tags=tracking.run_tags("distill", params_hash(ident), root), repo_root=root) as run:
        run_id = run.info.run_id
        client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
        logged = client.get_run(run_id).data.params
        new = {k: str(v) for k, v in tracking.flatten({"distill": d.model_dump(), "ray.num_workers": workers}).items()
               if k not in logged}
        if new:
            mlflow.log_params(new)
        info = ray_env.connect_or_start(params)
        try:
            from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            from ray.train import TrainingFailedError

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
                    "card": card, "train_config": train_cfg, "data_dir": str(data_dir_p),
                    "teacher_dir": str(teacher_dir_p), "teacher_ref": teacher_ref, "use_gpu": params.ray.use_gpu,
                    "threads_per_worker": max(1, int(params.ray.cpus_per_worker)),
                    "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                },
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=params.ray.use_gpu,
                                             resources_per_worker={"CPU": params.ray.cpus_per_worker}),
                run_config=RunConfig(name=name, storage_path=storage,
                                     failure_config=FailureConfig(max_failures=params.ray.max_failures),
                                     checkpoint_config=CheckpointConfig(num_to_keep=2)),
                datasets={"train": ds},
                dataset_config=ray.train.DataConfig(datasets_to_split=[]),
            )
            t0 = time.time()
            try:
                result = trainer.fit()
            except TrainingFailedError as e:
                cause = _root_cause(e)
                if "fix:" not in cause:
                    storage_related = any(t in cause for t in ("AWS Error", "checkpoint_manager_snapshot",
                                                                storage.split("?")[0].split("://")[-1]))
                    cause += f"; {_STORAGE_FIX}" if storage_related else \
                        "; fix the cause and re-run the stage: it resumes from the last complete checkpoint"
                raise DistillRunError(f"Ray run {name} under {storage} failed after ray.max_failures="
                                      f"{params.ray.max_failures} restarts: {cause}") from e
            wall = time.time() - t0
        finally:
            if not params.ray.address and not os.environ.get("RAY_ADDRESS"):
                ray_env.shutdown()
        ckpt_path, state = _final_state(storage, name, result.checkpoint)
        if state["step"] != d.steps:
            raise RuntimeError(f"final checkpoint is at step {state['step']}, expected distill.steps={d.steps}")
        student = CTMStudent.from_teacher(load_edm_checkpoint(teacher_dir_p), sigma_min=d.sigma_min,
                                          sigma_max=d.sigma_max)
        variants = {"online": state["model"]}
        for rate in d.eval_emas:
            variants[ema_variant(rate)] = _ema_state(state["emas"], rate)
        record = {
            "mlflow_run_id": run_id, "ray_run_name": name, "ray_storage_path": storage,
            "checkpoint_path": ckpt_path, "steps": int(state["step"]),
            "inputs": {"data": inputs.data_uri or str(data_dir_p), "teacher": inputs.teacher_uri or str(teacher_dir_p)},
            "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
            "fit_wall_s": round(wall, 2), "num_workers": workers, "ray": {k: info.get(k) for k in ("dashboard_url",)},
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


def _storage_fs(storage: str):
    """(pyarrow filesystem, path) for ``ray.storage_path``, resolved as Ray resolves it (``FileSystem.from_uri``;
    ray/train/v2/_internal/execution/storage.py ``get_fs_and_path``)."""
    import pyarrow.fs as pafs

    if "://" not in storage:
        return pafs.LocalFileSystem(), str(Path(storage).resolve())
    return pafs.FileSystem.from_uri(storage)


def _final_state(storage: str, name: str, registered) -> tuple[str, dict]:
    """The newest complete checkpoint of the run (checked against its marker) as (path, trainer state dict)."""
    from ctm_core.trainer import load_checkpoint_file

    fs, base = _storage_fs(storage)
    run_path = f"{base.rstrip('/')}/{name}"
    with tempfile.TemporaryDirectory() as tmp:
        chosen = newest_complete_checkpoint(fs, run_path, Path(tmp), legacy=registered,
                                            log=lambda m: print(m, file=sys.stderr, flush=True))
        if chosen is None:
            raise RuntimeError(f"Ray run {name} finished without a complete checkpoint under {storage}/{name} "
                               "(fix: re-run the stage; check ray.storage_path)")
        return chosen[0], load_checkpoint_file(Path(tmp) / CKPT_FILE)


def _ema_state(emas_state: dict, rate: float) -> dict:
    """The state_dict of the EMA with ``rate`` out of an ``EMABank`` state_dict (one sub-module per rate)."""
    from ctm_core.ema import EMABank

    prefix = f"models.{EMABank.key(rate)}."
    sub = {k[len(prefix):]: v for k, v in emas_state.items() if k.startswith(prefix)}
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
        print(f"distill: {_one_line(e)}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps({"distill": d.model_dump(), "data": card["splits"]["train"]["count"] if card else args.data,
                          "workers": params.ray.num_workers}, indent=2))
        return 0
    if params.ray.submit and not os.environ.get("CTM_INSIDE_RAY_JOB"):
        from pipelines.submit import submit_job  # blocks until the job ends, streaming its logs

        return submit_job(params, "pipelines.distill", sys.argv[1:] if argv is None else argv)
    try:
        record = run_distill(params, data_dir=args.data, teacher_dir=args.teacher, out_dir=args.out,
                             best_params=args.best_params)
    except (DistillRunError, CheckpointStorageError) as e:
        print(f"distill: {_one_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
