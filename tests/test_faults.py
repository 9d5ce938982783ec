"""Fault injection on real processes (bounded in time): each test prints one ``FAULT ...`` line with what was killed,
when (step), steps lost, time to recover and whether the final weights matched an uninterrupted run.

1. kill -9 the Ray Train worker mid-distill -> ``FailureConfig`` restarts the worker group from the last checkpoint;
   final weights bitwise equal to the uninterrupted reference run (CPU, same seed).
2. kill -9 the driver (``python -m pipelines.distill``, i.e. what ``dvc repro`` runs) after a checkpoint -> the next
   run resumes the same Ray run (same name and storage) from step > 0 and ends with the same weights.
3. the S3 server goes down in the middle of a checkpoint upload (a TCP proxy in front of moto resets the PUT and
   refuses connections) -> through the pyarrow S3 filesystem Ray builds for ``storage_path``: a clear OSError, the
   last good checkpoint in the bucket stays valid, the retry after the server returns succeeds (through Ray's
   ``StorageContext.persist_current_checkpoint``). FOUND: that Ray upload path itself (pyarrow 25 ``copy_files``)
   swallows the error and logs "Checkpoint successfully created" for an object that was never written; pinned by a
   strict xfail so a fixed pyarrow/Ray flips it.
4. a truncated or tampered teacher object on S3 is rejected by sha256 with nothing left in the cache (the http and
   cut-stream variants are in tests/test_fetch.py: test_http_bad_bytes_rejected_and_not_cached,
   test_http_truncated_stream_retried_then_fails).

Runs 1 and 2 join the shared local Ray head (tests/conftest_remote.py) and compare against ``reference_run()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time

import pytest

from tests.conftest_remote import (  # noqa: F401 - fixtures are used by name
    CutProxy,
    Proc,
    distill_cmd,
    checkpoint_dirs,
    head_run_env,
    register_checkpoints,
    inputs,
    list_keys,
    moto_server,
    ray_head,
    reference_run,
    report_fault,
    s3,
    student_weights,
    train_worker_pids,
    write_params,
)

CKPT_EVERY = 6  # TINY_DISTILL checkpoint_every
STEP_RX = r"RayTrainWorker pid=(\d+)\)\S*\s+\[distill\] step (\d+)"


def _steps_by_pid(proc: Proc) -> dict[int, int]:
    """Last ``[distill] step N`` logged by each worker PID."""
    last: dict[int, int] = {}
    for m in re.finditer(STEP_RX, proc.text()):
        pid, step = int(m[1]), int(m[2])
        last[pid] = max(last.get(pid, 0), step)
    return last


@pytest.mark.slow
def test_kill_train_worker_restarts_from_checkpoint(ray_head, inputs, tmp_path):
    ref = reference_run()
    params = write_params(tmp_path, {"ray": {"address": ray_head.gcs_address}})
    proc = Proc(distill_cmd(params, tmp_path / "student", inputs), head_run_env(ray_head, tmp_path),
                log=tmp_path / "distill.log")
    try:
        # mid-interval: after the first checkpoint was reported, two steps into the next interval
        hit = proc.wait_for(r"RayTrainWorker pid=(\d+)\)\S*\s+\[distill\] step %d\b" % (CKPT_EVERY + 2),
                            timeout=240)
        assert hit is not None, proc.tail()
        pid = int(hit[1][1])
        deadline = time.monotonic() + 60  # and the controller registered checkpoint 1 (else nothing to resume)
        while not list((tmp_path / "ray_results").glob("distill-*/checkpoint_manager_snapshot.json")):
            assert proc.p.poll() is None and time.monotonic() < deadline, proc.tail()
            time.sleep(0.02)
        assert pid in train_worker_pids(ray_head.temp_dir), "the worker to kill must belong to our Ray head"
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        res = proc.wait_for(r"resumed from step (\d+)", timeout=240, after=t_kill)
        assert res is not None, proc.tail()
        t_resumed, resumed = res[0], int(res[1][1])
        rc = proc.finish(timeout=240)
    finally:
        proc.kill()
    assert rc == 0, proc.tail()
    killed_at = _steps_by_pid(proc)[pid]
    lost = killed_at - resumed
    weights = student_weights(tmp_path / "student")
    report_fault(fault="kill -9 RayTrainWorker", pid=pid, killed_after_step=killed_at, resumed_from_step=resumed,
                 steps_lost=lost, recovery_s=round(t_resumed - t_kill, 1),
                 run_wall_s=round(time.monotonic() - proc.t0, 1), reference_wall_s=round(ref["wall_s"], 1), reference=ref.get("source"),
                 weights_match=weights == ref["weights"])
    assert resumed > 0 and resumed % CKPT_EVERY == 0
    assert 0 <= lost <= CKPT_EVERY  # at most one checkpoint interval
    assert weights == ref["weights"]  # bitwise equal to the uninterrupted run
    register_checkpoints(tmp_path / "ray_results")


@pytest.mark.slow
def test_kill_driver_then_rerun_resumes_same_run(ray_head, inputs, tmp_path):
    ref = reference_run()
    params = write_params(tmp_path, {"ray": {"address": ray_head.gcs_address}})
    cmd, env = distill_cmd(params, tmp_path / "student", inputs), head_run_env(ray_head, tmp_path)
    first = Proc(cmd, env, log=tmp_path / "distill1.log")
    runs_dir = tmp_path / "ray_results"
    try:
        # "after a checkpoint": the controller has registered it (snapshot written), and the next interval started
        deadline = time.monotonic() + 240
        while not (list(runs_dir.glob("distill-*/checkpoint_manager_snapshot.json"))
                   and max(_steps_by_pid(first).values(), default=0) >= CKPT_EVERY + 2):
            assert first.p.poll() is None and time.monotonic() < deadline, first.tail()
            time.sleep(0.05)
    finally:
        first.kill()  # SIGKILL to the driver's process group: what killing `dvc repro` does to the stage
    t_kill = time.monotonic()
    killed_at = max(_steps_by_pid(first).values())
    assert not (tmp_path / "student").exists()
    names = [p.name for p in runs_dir.iterdir() if p.is_dir()]
    assert len(names) == 1 and (runs_dir / names[0] / "checkpoint_manager_snapshot.json").is_file()

    second = Proc(cmd, env, log=tmp_path / "distill2.log")
    try:
        res = second.wait_for(r"resumed from step (\d+)", timeout=240)
        assert res is not None, second.tail()
        t_resumed, resumed = res[0], int(res[1][1])
        rc = second.finish(timeout=240)
    finally:
        second.kill()
    assert rc == 0, second.tail()
    record = json.loads((tmp_path / "student" / "run.json").read_text())
    weights = student_weights(tmp_path / "student")
    report_fault(fault="kill -9 driver (python -m pipelines.distill)", killed_after_step=killed_at,
                 resumed_from_step=resumed, steps_lost=killed_at - resumed, recovery_s=round(t_resumed - t_kill, 1),
                 rerun_wall_s=round(time.monotonic() - second.t0, 1), reference_wall_s=round(ref["wall_s"], 1), reference=ref.get("source"),
                 weights_match=weights == ref["weights"])
    assert resumed > 0 and resumed % CKPT_EVERY == 0
    assert record["ray_run_name"] == names[0]  # the same Ray run, not a fresh one
    assert [p.name for p in runs_dir.iterdir() if p.is_dir()] == names
    assert record["steps"] == 24
    assert weights == ref["weights"]


def _checkpoint_setup(s3, monkeypatch):
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    ckpts = checkpoint_dirs()
    proxy = CutProxy(s3["server"].port).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # what Ray's pyarrow S3 filesystem talks to
    ctx = StorageContext(storage_path=f"s3://{s3['bucket']}/ray", experiment_dir_name="distill-fault3")
    ctx.persist_current_checkpoint(Checkpoint.from_directory(str(ckpts[0])), "checkpoint_000006")  # the last good
    return ckpts, proxy, ctx


def _assert_last_good_valid(s3, ckpts, tmp_path) -> int:
    from ctm_core.trainer import load_checkpoint_file

    key = "ray/distill-fault3/checkpoint_000006/trainer_state.pt"
    body = s3["client"].get_object(Bucket=s3["bucket"], Key=key)["Body"].read()  # directly from moto
    assert body == (ckpts[0] / "trainer_state.pt").read_bytes()
    (tmp_path / "good.pt").write_bytes(body)
    return int(load_checkpoint_file(tmp_path / "good.pt")["step"])


NEXT_KEY = "ray/distill-fault3/checkpoint_000012/trainer_state.pt"


def test_s3_down_mid_checkpoint_upload(s3, monkeypatch, tmp_path):
    """The S3 endpoint dies a third into the next checkpoint's upload (multipart PUT reset, then connection refused),
    written through the pyarrow S3 filesystem Ray Train builds for ``storage_path``: a clear OSError naming the key
    and the network failure, the last good checkpoint intact, and the retry after the server returns succeeds."""
    from ray.train import Checkpoint

    ckpts, proxy, ctx = _checkpoint_setup(s3, monkeypatch)
    data = (ckpts[1] / "trainer_state.pt").read_bytes()
    dest = f"{ctx.storage_fs_path}/distill-fault3/checkpoint_000012/trainer_state.pt"
    try:
        proxy.cut_after(len(data) // 3)
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:
            with ctx.storage_filesystem.open_output_stream(dest) as f:
                f.write(data)
        t_err = time.monotonic() - t0
        msg = " ".join(str(ei.value).split())
        assert proxy.cut_at is not None  # the cut really happened mid-upload
        assert "trainer_state.pt" in msg and re.search(r"(?i)(NETWORK_CONNECTION|connect)", msg), msg
        keys = list_keys(s3["client"], s3["bucket"], "ray/distill-fault3/")
        assert NEXT_KEY not in keys, keys  # an interrupted multipart upload leaves no partial object
        last_good_step = _assert_last_good_valid(s3, ckpts, tmp_path)
        proxy.start()  # the server comes back: the retry (Ray's own upload path) succeeds
        t1 = time.monotonic()
        ctx.persist_current_checkpoint(Checkpoint.from_directory(str(ckpts[1])), "checkpoint_000012")
        t_retry = time.monotonic() - t1
        assert s3["client"].get_object(Bucket=s3["bucket"], Key=NEXT_KEY)["Body"].read() == data
    finally:
        proxy.stop()
    report_fault(fault="S3 endpoint down mid checkpoint PUT", cut_after_bytes=len(data) // 3,
                 checkpoint_bytes=len(data), error_after_s=round(t_err, 1), error=msg[:200],
                 last_good_step=last_good_step, last_good_valid=True, retry_s=round(t_retry, 1), retry_ok=True)


@pytest.mark.xfail(strict=True, reason="pyarrow 25 fs.copy_files (used by Ray 2.60 StorageContext."
                   "persist_current_checkpoint) swallows the S3 upload error: Ray logs 'Checkpoint successfully "
                   "created' for an object that was never written")
def test_ray_persist_checkpoint_raises_when_s3_dies(s3, monkeypatch, tmp_path):
    from ray.train import Checkpoint

    ckpts, proxy, ctx = _checkpoint_setup(s3, monkeypatch)
    try:
        proxy.cut_after((ckpts[1] / "trainer_state.pt").stat().st_size // 3)
        try:
            ctx.persist_current_checkpoint(Checkpoint.from_directory(str(ckpts[1])), "checkpoint_000012")
            raised = None
        except OSError as e:
            raised = e
        assert proxy.cut_at is not None
        keys = list_keys(s3["client"], s3["bucket"], "ray/distill-fault3/")
        silent = raised is None and NEXT_KEY not in keys
        if silent:
            step = _assert_last_good_valid(s3, ckpts, tmp_path)
            print("\nFAULT fault=S3 down mid Ray persist_current_checkpoint | raised=False | object_written=False "
                  f"| ray_logged_success=True | last_good_step={step} | last_good_valid=True")
        assert raised is not None, "Ray reported the checkpoint persisted, but the object is missing from S3"
    finally:
        proxy.stop()


def test_s3_truncated_or_tampered_teacher_rejected(s3, tmp_path):
    from pipelines.fetch import ChecksumMismatchError, fetch

    payload = bytes(range(256)) * 2048
    sha = hashlib.sha256(payload).hexdigest()
    c, bucket = s3["client"], s3["bucket"]
    c.put_object(Bucket=bucket, Key="teachers/truncated.pkl", Body=payload[: len(payload) // 2])
    c.put_object(Bucket=bucket, Key="teachers/tampered.pkl", Body=payload[:-1] + b"X")
    cache = tmp_path / "cache"
    for key in ("truncated", "tampered"):
        with pytest.raises(ChecksumMismatchError, match=f"expected {sha}"):
            fetch(f"s3://{bucket}/teachers/{key}.pkl", cache, sha256=sha, progress=False, timeout_s=5.0, retries=1,
                  backoff_s=0.01)
    left = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert left == []
    report_fault(fault="truncated/tampered teacher on S3", rejected_by="sha256", files_left_in_cache=len(left))

