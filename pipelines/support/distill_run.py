"""The distill stage's Ray run: fit a ``TorchTrainer`` on the `distill` section and return the final trainer state.

Resumption: the Ray run name is ``distill-<hash of the distill section, data, teacher and workers>`` and lives
under ``ray.storage_path``, so re-running the stage after a kill (or a dead worker, through ``FailureConfig``)
continues from the last complete checkpoint instead of starting over (docs/stack.md). The same entry point runs
under ``ray job submit`` (Ray sets RAY_ADDRESS and it joins that cluster); without an address it starts a local Ray
from the ``ray`` section. Inputs from S3 (``pipelines.support.remote_inputs``): the teacher and the data's card were
verified into a local cache before; the workers stream the card's train shards from S3 (``data_uri``) and get the
teacher through the object store. The Ray run name is the same as for the same inputs on local disk.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctm_core.config import DistillParams, Params, params_hash
from pipelines.support.checkpoints import _STORAGE_FIX, CKPT_FILE, newest_complete_checkpoint, storage_fs

if TYPE_CHECKING:
    from ctm_core.data.card import DatasetCard

__all__ = [
    "DistillRunError",
    "ema_state",
    "fit",
    "gan_run_name",
    "run_identity",
    "run_name",
    "section_identity",
    "shutdown_local_ray",
]

logger = logging.getLogger(__name__)


class DistillRunError(RuntimeError):
    """The Ray run failed after its ``FailureConfig`` retries (one line: run, storage, root cause, fix)."""


def run_identity(d: DistillParams, card: DatasetCard, teacher_weights_sha256: str | None, workers: int) -> dict:
    """What names the Ray run: the distill section, the train shards' sha256s, the teacher's weights sha256 and the
    worker count; where the inputs came from (disk or S3) is not, nor where the LPIPS files came from or are cached
    (their sha256 pins are)."""
    return {
        "distill": section_identity(d),
        "data": [s.sha256 for s in card.splits["train"].shards],
        "teacher": teacher_weights_sha256,
        "workers": workers,
    }


def section_identity(d: DistillParams) -> dict[str, Any]:
    """The distill section as it names a run: the LPIPS files by their sha256 pins only (the driver makes their
    paths absolute, which would tie a resume to the checkout's location), a released start file
    (`distill.init_from`, docs/official.md#5-continuing-training-from-a-released-checkpoint) by its sha256 only."""
    exclude: dict[str, Any] = {"lpips": {"vgg16_source", "linear_source", "cache_dir"}}
    # A released start file by its pin only; none: not in the identity at all (names from before the option hold).
    exclude["init_from"] = True if d.init_from.uri is None else {"uri", "cache_dir"}
    return d.model_dump(exclude=exclude)


def run_name(identity: dict[str, Any]) -> str:
    return f"distill-{params_hash(identity)[:12]}"


def gan_run_name(identity: dict[str, Any]) -> str:
    """The GAN phase's Ray run: the CTM+DSM run's identity plus the phase-2 section (docs/gan.md#the-two-phases)."""
    return f"distill-gan-{params_hash(identity)[:12]}"


def fit(
    params: Params,
    inputs,
    card: DatasetCard,
    *,
    workers: int,
    name: str,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    distill: DistillParams | None = None,
    continue_from: dict[str, Any] | None = None,
    feature_weights: dict[str, str] | None = None,
    ray_info: dict[str, Any] | None = None,
    init=None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train `distill` (default `params.distill`; a phase of ``ctm_core.config.gan_phases``) on Ray under the run
    `name` (resuming it); returns (final trainer state, run record). A GAN-phase run starts from `continue_from`
    (the CTM+DSM run's final state, docs/gan.md) unless it has checkpoints of its own. With `ray_info` (what
    ``ray_env.connect_or_start`` returned) the caller holds the Ray connection for several runs and shuts it down.
    `init` (``pipelines.support.init_from.InitStudent``): the released student every rank starts from.

    The record holds the Ray run name and storage, the final checkpoint path, the last metrics and the wall time.
    Raises ``DistillRunError`` when Ray gives up.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, TrainingFailedError

    from pipelines.support import ray_env
    from pipelines.support.ray_train import torch_trainer

    d = params.distill if distill is None else distill
    storage = ray_env.storage_path(params)
    info = ray_info if ray_info is not None else ray_env.connect_or_start(params)
    try:
        teacher_ref = None
        if inputs.teacher_uri:  # the driver's cache is not on the other nodes: ship the verified bytes
            teacher_ref = ray.put((inputs.teacher_dir / "teacher.safetensors").read_bytes())
        continue_from_ref = None if continue_from is None else ray.put(continue_from)
        init_ref = None if init is None else ray.put(init)
        trainer = torch_trainer(
            {
                "distill": d,
                "card": card,
                "data_dir": str(inputs.data_dir),
                # s3:// data: the workers stream the shards from S3 (every node can read it; docs/data_streaming.md)
                "data_uri": inputs.data_uri,
                "teacher_dir": str(inputs.teacher_dir),
                "teacher_ref": teacher_ref,
                "continue_from_ref": continue_from_ref,
                "init_ref": init_ref,
                "feature_weights": feature_weights,
                "mlflow_run_id": mlflow_run_id,
                "tracking_uri": tracking_uri,
            },
            params=params,
            workers=workers,
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=params.ray.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        t0 = time.time()
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            raise DistillRunError(
                f"Ray run {name} under {storage} failed after ray.max_failures={params.ray.max_failures} restarts: "
                f"{_root_cause(e, storage)}"
            ) from e
        wall = time.time() - t0
    finally:
        if ray_info is None:
            shutdown_local_ray(params)
    ckpt_path, state = _final_state(storage, name, result.checkpoint)
    if state["step"] != d.steps:
        raise RuntimeError(f"final checkpoint is at step {state['step']}, expected {d.steps} (the phase's end)")
    record = {
        "ray_run_name": name,
        "ray_storage_path": storage,
        "checkpoint_path": ckpt_path,
        "steps": int(state["step"]),
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
        "fit_wall_s": round(wall, 2),
        "num_workers": workers,
        "ray": {k: info.get(k) for k in ("dashboard_url",)},
    }
    return state, record


def shutdown_local_ray(params: Params) -> None:
    """Stop the local Ray that ``connect_or_start`` started (nothing when joining ray.address / RAY_ADDRESS)."""
    from pipelines.support import ray_env

    if not params.ray.address and not os.environ.get("RAY_ADDRESS"):
        ray_env.shutdown()


def _root_cause(e: BaseException, storage: str) -> str:
    """One line for a Ray ``TrainingFailedError``: our storage error if a worker raised one, else the last line,
    with the fix (the storage fix when the failure looks storage-related)."""
    causes = [e]
    causes += list(getattr(e, "worker_failures", {}).values())
    if getattr(e, "controller_failure", None) is not None:
        causes.append(e.controller_failure)
    lines = [ln.strip() for c in causes for ln in str(c).splitlines() if ln.strip()]
    cause = next((ln[ln.find("checkpoint storage error:") :] for ln in lines if "checkpoint storage error:" in ln), "")
    cause = cause or (lines[-1] if lines else type(e).__name__)
    if "fix:" in cause:
        return cause
    markers = ("AWS Error", "checkpoint_manager_snapshot", storage.split("?")[0].split("://")[-1])
    if any(t in cause for t in markers):
        return f"{cause}; {_STORAGE_FIX}"
    return f"{cause}; fix the cause and re-run the stage: it resumes from the last complete checkpoint"


def _final_state(storage: str, name: str, registered) -> tuple[str, dict]:
    """The newest complete checkpoint of the run (checked against its marker) as (path, trainer state dict)."""
    from ctm_core.training.loop import load_checkpoint_file

    fs, base = storage_fs(storage)
    run_path = f"{base.rstrip('/')}/{name}"
    with tempfile.TemporaryDirectory() as tmp:
        chosen = newest_complete_checkpoint(fs, run_path, Path(tmp), legacy=registered)
        if chosen is None:
            raise RuntimeError(
                f"Ray run {name} finished without a complete checkpoint under {storage}/{name} "
                "(fix: re-run the stage; check ray.storage_path)"
            )
        return chosen[0], load_checkpoint_file(Path(tmp) / CKPT_FILE)


def ema_state(emas_state: dict, rate: float) -> dict:
    """The state_dict of the EMA with ``rate`` out of an ``EMABank`` state_dict (one sub-module per rate)."""
    from ctm_core.training.ema import EMABank

    prefix = f"models.{EMABank.key(rate)}."
    sub = {k[len(prefix) :]: v for k, v in emas_state.items() if k.startswith(prefix)}
    if not sub:
        raise KeyError(f"EMA rate {rate} not in the checkpoint (have {sorted({k.split('.')[0] for k in emas_state})})")
    return sub
