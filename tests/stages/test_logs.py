"""Quiet logs: a stage run non-interactively (stderr a pipe, as under `dvc repro > log` or CI) prints each line once,
no progress-bar escape codes, and none of the Ray messages a user cannot act on (the local cluster is configured at
the source: `pipelines.support.ray_env.quiet_local_env`)."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.support.ray_env import quiet_local_env

ROOT = Path(__file__).resolve().parents[2]
NOISE = (
    "PreemptionWatcher",  # Ray Train's preemption watcher actor (a core_worker error at every start)
    "maximum expected startup concurrency",  # the raylet's worker-count warning
    "RayDeprecationWarning",  # Ray Data's own deprecation, triggered by Ray Train's DatasetManager
    "exclude_resources",
    "Reporting training result",  # Ray Train's INFO line per report (a file-path logger, under our root logger)
    "\x1b[A",  # nested tqdm bars moving the cursor up
    "\r",  # any progress bar redrawing a line
)


def test_quiet_env_keeps_what_the_user_set(monkeypatch):
    for k in ("RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "PYTHONWARNINGS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_worker_maximum_startup_concurrency", "7")
    env = quiet_local_env(4)
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0" and env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert "RAY_worker_maximum_startup_concurrency" not in env  # the user's 7 stays
    monkeypatch.delenv("RAY_worker_maximum_startup_concurrency")
    assert quiet_local_env(4)["RAY_worker_maximum_startup_concurrency"] == "16"
    assert env["PYTHONWARNINGS"] == "ignore:`ExecutionOptions.exclude_resources`:DeprecationWarning"
    monkeypatch.setenv("PYTHONWARNINGS", "error::ResourceWarning")
    assert quiet_local_env(4)["PYTHONWARNINGS"].startswith("error::ResourceWarning,ignore:")


@pytest.mark.slow
def test_distill_stage_log_has_each_line_once_and_no_ray_noise(tmp_path):
    """The real distill stage (2 Ray Train workers on a local cluster, tiny nets) with stderr piped."""
    import torch
    import yaml

    from ctm_core.io.teacher_format import save_teacher
    from ctm_core.nets.precond import EDMPrecond
    from pipelines.prepare import prepare_dataset

    prepare_dataset("sklearn-digits", None, tmp_path / "data", heldout_fraction=0.1, seed=0, shard_size=512)
    torch.manual_seed(0)
    kw = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    teacher = EDMPrecond(img_resolution=8, img_channels=1, label_dim=0, dropout=0.0, **kw)
    save_teacher("EDMPrecond", teacher.init_kwargs, teacher.state_dict(), tmp_path / "teacher")
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["distill"].update(steps=6, batch=8, microbatch=2, checkpoint_every=3, log_every=1, K=4, N=6)
    doc["ray"].update(
        num_workers=2, storage_path=str(tmp_path / "ray"), temp_dir=f"/tmp/ray_lg{os.getpid()}", dashboard_port=8293
    )
    doc["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_ROOT": str(tmp_path)}
    for k in ("RAY_ADDRESS", "PYTHONWARNINGS", "CTM_PROGRESS", "RAY_TRAIN_ENABLE_PRINT_PATCH"):
        env.pop(k, None)
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.distill", "--params", "params.yaml", "--data", "data"]
        + ["--teacher", "teacher", "--out", "student"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = out.stdout + out.stderr
    (tmp_path / "distill.log").write_text(log)  # to read when it fails
    assert out.returncode == 0, log[-4000:]
    steps = [line for line in log.splitlines() if "ray_train: step " in line]
    assert len(steps) == 6, log[-4000:]  # log_every 1: steps 1..6, each once
    repeated = [line for line, n in collections.Counter(log.splitlines()).items() if n > 1 and "step" in line]
    assert not repeated, repeated
    found = {noise: next(line for line in log.splitlines(True) if noise in line) for noise in NOISE if noise in log}
    assert not found, found
