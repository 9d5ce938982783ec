"""Fault injection on real processes (bounded in time): each test prints one ``FAULT ...`` line with what was killed,
when (step), steps lost, time to recover and whether the final weights matched an uninterrupted run.

1. kill -9 the Ray Train worker mid-distill -> ``FailureConfig`` restarts the worker group from the last checkpoint;
   final weights bitwise equal to the uninterrupted reference run (CPU, same seed).
2. SIGKILL the process group of a real ``dvc repro distill`` (in a temporary git copy of the project) after the
   first checkpoint -> the next ``dvc repro`` resumes the same Ray run (same name and storage) from step > 0, DVC
   clears the dead process's rwlock entry by itself, and the final weights equal the uninterrupted run's.
3. the S3 server goes down in the middle of a checkpoint upload (a TCP proxy in front of moto resets the PUT of that
   checkpoint's ``trainer_state.pt`` and then refuses connections):
   a. ``persist_checkpoint_verified`` (what the distill workers upload with) raises a one-line
      ``CheckpointStorageError`` naming the S3 path and the fix, writes no ``complete.json``; the last good checkpoint
      stays valid and is the one ``newest_complete_checkpoint`` picks; the retry after the server returns succeeds.
      FOUND (recorded in the FAULT line, not asserted): Ray's own upload (pyarrow 25 ``fs.copy_files`` inside
      ``StorageContext.persist_current_checkpoint``) returns normally and logs "Checkpoint successfully created" for
      an object that was never written, which is why the stage verifies and writes the marker itself.
   b. the same during a real distill run with ``ray.storage_path: s3://...``: the run exits 1 with that line, the
      re-run after the server returns resumes from the last complete checkpoint and ends with the reference weights.
4. a truncated or tampered teacher object on S3 is rejected by sha256 with nothing left in the cache (the http and
   cut-stream variants are in tests/stages/test_fetch.py: test_http_bad_bytes_rejected_and_not_cached,
   test_http_truncated_stream_retried_then_fails).

Runs 1, 2 and 3b join the shared local Ray head (fixture ``ray_head``, tests/plugins/remote.py) and compare
against ``remote.reference_run()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CKPT_EVERY = 6  # TINY_DISTILL checkpoint_every
STEP_RX = r"RayTrainWorker pid=(\d+)\)\S*\s+INFO pipelines\.support\.ray_train: step (\d+)"


def _steps_by_pid(proc) -> dict[int, int]:
    """Last ``step N`` line logged by each worker PID (pipelines.support.ray_train)."""
    last: dict[int, int] = {}
    for m in re.finditer(STEP_RX, proc.text()):
        pid, step = int(m[1]), int(m[2])
        last[pid] = max(last.get(pid, 0), step)
    return last


@pytest.mark.slow
def test_kill_train_worker_restarts_from_checkpoint(remote, ray_head, inputs, tmp_path):
    ref = remote.reference_run()
    params = remote.write_params(tmp_path, {"ray": {"address": ray_head.gcs_address}})
    proc = remote.Proc(
        remote.distill_cmd(params, tmp_path / "student", inputs),
        remote.head_run_env(ray_head, tmp_path),
        log=tmp_path / "distill.log",
    )
    try:
        # mid-interval: after the first checkpoint was reported, two steps into the next interval
        hit = proc.wait_for(
            rf"RayTrainWorker pid=(\d+)\)\S*\s+INFO pipelines\.support\.ray_train: step {CKPT_EVERY + 2}\b", timeout=240
        )
        assert hit is not None, proc.tail()
        pid = int(hit[1][1])
        deadline = time.monotonic() + 60  # and the controller registered checkpoint 1 (else nothing to resume)
        while not list((tmp_path / "ray_results").glob("distill-*/checkpoint_manager_snapshot.json")):
            assert proc.p.poll() is None and time.monotonic() < deadline, proc.tail()
            time.sleep(0.02)
        assert pid in remote.train_worker_pids(ray_head.temp_dir), "the worker to kill must belong to our Ray head"
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
    weights = remote.student_weights(tmp_path / "student")
    remote.report_fault(
        fault="kill -9 RayTrainWorker",
        pid=pid,
        killed_after_step=killed_at,
        resumed_from_step=resumed,
        steps_lost=lost,
        recovery_s=round(t_resumed - t_kill, 1),
        run_wall_s=round(time.monotonic() - proc.t0, 1),
        reference_wall_s=round(ref["wall_s"], 1),
        reference=ref.get("source"),
        weights_match=weights == ref["weights"],
    )
    assert resumed > 0 and resumed % CKPT_EVERY == 0
    assert 0 <= lost <= CKPT_EVERY  # at most one checkpoint interval
    assert weights == ref["weights"]  # bitwise equal to the uninterrupted run
    remote.register_checkpoints(tmp_path / "ray_results")


def _rerun_until_done(remote, cmd: list[str], env: dict[str, str], log: Path, **kw) -> tuple:
    """Run the stage again: (process, time of its "resumed from step N" line, N, exit code)."""
    proc = remote.Proc(cmd, env, log=log, **kw)
    try:
        res = proc.wait_for(r"resumed from step (\d+)", timeout=240)
        assert res is not None, proc.tail()
        rc = proc.finish(timeout=240)
    finally:
        proc.kill()
    return proc, res[0], int(res[1][1]), rc


def _wait_first_checkpoint(proc, runs_dir: Path, timeout: float = 240) -> None:
    """Until the controller registered a checkpoint (snapshot written) and the next interval is under way."""
    deadline = time.monotonic() + timeout
    while not (
        list(runs_dir.glob("distill-*/checkpoint_manager_snapshot.json"))
        and max(_steps_by_pid(proc).values(), default=0) >= CKPT_EVERY + 2
    ):
        assert proc.p.poll() is None and time.monotonic() < deadline, proc.tail()
        time.sleep(0.05)


def _stage_processes(marker: str) -> list[int]:
    """PIDs whose command line runs ``pipelines.distill`` and names ``marker`` (the temp repo)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "pipelines.distill" in cmd and marker in cmd:
            out.append(p.pid)
    return out


@pytest.mark.slow
def test_kill_dvc_repro_then_rerun_resumes_same_run(remote, ray_head, inputs, tmp_path):
    """SIGKILL the whole ``dvc repro distill`` process group after the first checkpoint; ``dvc repro`` again."""
    ref = remote.reference_run()
    repo = remote.copy_repo(tmp_path / "repo")
    remote.write_params(repo, {"ray": {"address": ray_head.gcs_address}})  # TINY_DISTILL on the shared head
    shutil.copytree(inputs["data"], repo / "data" / "prepared")  # the reference run's inputs
    shutil.copytree(inputs["teacher"], repo / "artifacts" / "teacher")
    env = remote.head_run_env(ray_head, repo, PYTHONPATH=str(repo), DVC_NO_ANALYTICS="1")
    env.pop("DVC_ROOT")  # dvc sets it for the stage
    dvc = [sys.executable, "-m", "dvc"]
    # prepare/teacher outputs are already there (the reference's): record them in dvc.lock instead of re-running
    r = subprocess.run(
        [*dvc, "commit", "-f", "prepare", "teacher"], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    runs_dir = repo / "ray_results"

    first = remote.Proc([*dvc, "repro", "distill"], env, cwd=repo, log=tmp_path / "repro1.log")
    try:
        _wait_first_checkpoint(first, runs_dir)
    finally:
        first.kill()  # SIGKILL to dvc's process group: dvc, the stage's shell and the distill driver
    t_kill = time.monotonic()
    killed_at = max(_steps_by_pid(first).values())
    deadline = time.monotonic() + 10
    while _stage_processes(str(repo)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _stage_processes(str(repo)), "the distill driver survived the kill"
    assert not (repo / "artifacts" / "student").exists()
    names = [p.name for p in runs_dir.iterdir() if p.is_dir()]
    assert len(names) == 1 and (runs_dir / names[0] / "checkpoint_manager_snapshot.json").is_file()
    rwlock = repo / ".dvc" / "tmp" / "rwlock"
    stale = json.loads(rwlock.read_text()) if rwlock.is_file() else {}
    stale_entries = sum(len(v) for v in stale.values()) if isinstance(stale, dict) else 0

    second, t_resumed, resumed, rc = _rerun_until_done(
        remote, [*dvc, "repro", "distill"], env, tmp_path / "repro2.log", cwd=repo
    )
    out = second.text()
    assert rc == 0, second.tail()
    lock_cleared = "had been killed. Auto removed it from the lock file" in out
    record = json.loads((repo / "artifacts" / "student" / "run.json").read_text())
    weights = remote.student_weights(repo / "artifacts" / "student")
    remote.report_fault(
        fault="SIGKILL dvc repro process group during distill",
        killed_after_step=killed_at,
        resumed_from_step=resumed,
        steps_lost=killed_at - resumed,
        recovery_s=round(t_resumed - t_kill, 1),
        rerun_wall_s=round(time.monotonic() - second.t0, 1),
        reference_wall_s=round(ref["wall_s"], 1),
        stale_rwlock_entries=stale_entries,
        dvc_cleared_stale_lock=lock_cleared,
        same_ray_run=record["ray_run_name"] == names[0],
        weights_match=weights == ref["weights"],
    )
    assert resumed > 0 and resumed % CKPT_EVERY == 0 and killed_at - resumed <= CKPT_EVERY
    assert record["ray_run_name"] == names[0]  # the same Ray run, not a fresh one
    assert [p.name for p in runs_dir.iterdir() if p.is_dir()] == names  # and the same storage folder
    assert record["steps"] == 24
    assert "Stage 'tune' didn't change, skipping" in out  # only the interrupted stage runs again
    assert weights == ref["weights"]
    st = subprocess.run([*dvc, "status", "distill"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert st.returncode == 0 and "changed" not in st.stdout, st.stdout + st.stderr


# --- fault 3: the S3 server dies mid checkpoint upload ---------------------------------------------------------
NEXT_KEY = "ray/distill-fault3/checkpoint_000012/trainer_state.pt"
NEXT_PATTERN = b"checkpoint_000012/trainer_state.pt"  # in the request line of that object's PUT


def _fake_checkpoint(folder: Path, seed: int, size: int = 3_000_000) -> Path:
    folder.mkdir(parents=True)
    (folder / "trainer_state.pt").write_bytes(random.Random(seed).randbytes(size))
    return folder


def test_s3_down_mid_checkpoint_upload(remote, s3, monkeypatch, tmp_path):
    """The S3 endpoint dies a third into the PUT of checkpoint 12's ``trainer_state.pt``: Ray's upload alone says
    nothing (recorded), our verified upload raises one clear line, 6 stays the newest complete checkpoint, and the
    retry after the server returns writes 12 with its marker."""
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    from pipelines.distill import (
        MARKER_FILE,
        CheckpointStorageError,
        newest_complete_checkpoint,
        persist_checkpoint_verified,
        read_marker,
    )

    good, nxt = _fake_checkpoint(tmp_path / "c6", 6), _fake_checkpoint(tmp_path / "c12", 12)
    data = (nxt / "trainer_state.pt").read_bytes()
    c, bucket = s3["client"], s3["bucket"]  # this boto3 client talks to moto directly, not through the proxy
    proxy = remote.CutProxy(s3["server"].port).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # what Ray's pyarrow S3 filesystem talks to
    ctx = StorageContext(storage_path=f"s3://{bucket}/ray", experiment_dir_name="distill-fault3")
    fs, run = ctx.storage_filesystem, ctx.experiment_fs_path
    uri12 = f"s3://{bucket}/ray/distill-fault3/checkpoint_000012"
    logs: list[str] = []
    try:
        persist_checkpoint_verified(ctx, Checkpoint.from_directory(str(good)), "checkpoint_000006", step=6)

        # Ray 2.60's upload path on its own (what the stage used before): does it notice?
        proxy.cut_on(NEXT_PATTERN, len(data) // 3)
        try:
            ctx.persist_current_checkpoint(Checkpoint.from_directory(str(nxt)), "checkpoint_000012")
            ray_raised = False
        except OSError:
            ray_raised = True
        assert proxy.cut_at is not None and not proxy.listening
        ray_wrote_object = NEXT_KEY in remote.list_keys(c, bucket, "ray/distill-fault3/")
        proxy.start()

        # ours, same cut
        proxy.cut_at = None
        proxy.cut_on(NEXT_PATTERN, len(data) // 3)
        t0 = time.monotonic()
        with pytest.raises(CheckpointStorageError) as ei:
            persist_checkpoint_verified(ctx, Checkpoint.from_directory(str(nxt)), "checkpoint_000012", step=12)
        t_err = time.monotonic() - t0
        msg = str(ei.value)
        assert proxy.cut_at is not None  # the cut really happened mid-upload
        assert "\n" not in msg and uri12 in msg and "fix:" in msg and "re-run the stage" in msg, msg
        keys = remote.list_keys(c, bucket, "ray/distill-fault3/")
        assert f"ray/distill-fault3/checkpoint_000012/{MARKER_FILE}" not in keys, keys
        # the last good checkpoint in the bucket is intact and vouched for by its marker
        body6 = c.get_object(Bucket=bucket, Key="ray/distill-fault3/checkpoint_000006/trainer_state.pt")["Body"]
        assert body6.read() == (good / "trainer_state.pt").read_bytes()

        proxy.start()  # the server comes back
        (tmp_path / "dl").mkdir()
        picked = newest_complete_checkpoint(fs, run, tmp_path / "dl", log=logs.append)
        assert picked == (f"{run}/checkpoint_000006", 6), (picked, logs)
        assert (tmp_path / "dl" / "trainer_state.pt").read_bytes() == (good / "trainer_state.pt").read_bytes()
        assert any(uri12 in line and "not loading" in line for line in logs), logs  # the half-written one
        t1 = time.monotonic()
        persist_checkpoint_verified(ctx, Checkpoint.from_directory(str(nxt)), "checkpoint_000012", step=12)
        t_retry = time.monotonic() - t1
        assert c.get_object(Bucket=bucket, Key=NEXT_KEY)["Body"].read() == data
        assert read_marker(fs, f"{run}/checkpoint_000012")["step"] == 12
        shutil.rmtree(tmp_path / "dl")
        (tmp_path / "dl").mkdir()
        assert newest_complete_checkpoint(fs, run, tmp_path / "dl", log=logs.append)[1] == 12

        # a marked checkpoint whose file was later cut short is skipped too (sha256 against the marker)
        c.put_object(Bucket=bucket, Key=NEXT_KEY, Body=data[: len(data) // 2])
        shutil.rmtree(tmp_path / "dl")
        (tmp_path / "dl").mkdir()
        assert newest_complete_checkpoint(fs, run, tmp_path / "dl", log=logs.append)[1] == 6
        assert any("does not match its complete.json" in line for line in logs), logs
    finally:
        proxy.stop()
    remote.report_fault(
        fault="S3 endpoint down mid checkpoint PUT (unit)",
        cut_after_bytes=len(data) // 3,
        checkpoint_bytes=len(data),
        ray_upload_raised=ray_raised,
        ray_upload_wrote_object=ray_wrote_object,
        our_error_after_s=round(t_err, 1),
        error=msg[:160],
        last_good_step=6,
        last_good_valid=True,
        retry_s=round(t_retry, 2),
        retry_ok=True,
    )


@pytest.mark.slow
def test_s3_down_mid_checkpoint_during_distill(remote, s3, ray_head, inputs, tmp_path):
    """A real distill run with its checkpoints on S3 (through the cutting proxy): the server dies during checkpoint
    12's upload, the run stops with one clear line, and the re-run after the server returns resumes from 6."""
    ref = remote.reference_run()
    c, bucket = s3["client"], s3["bucket"]
    proxy = remote.CutProxy(s3["server"].port).start()
    # the endpoint rides in the URI, so the driver and the head's workers (whose env points at moto) use the proxy
    storage = f"s3://{bucket}/ray?endpoint_override=127.0.0.1:{proxy.port}&scheme=http&region=us-east-1"
    params = remote.write_params(
        tmp_path, {"ray": {"address": ray_head.gcs_address, "storage_path": storage, "max_failures": 1}}
    )
    cmd, env = remote.distill_cmd(params, tmp_path / "student", inputs), remote.head_run_env(ray_head, tmp_path)
    try:
        proxy.cut_on(b"checkpoint_000012/trainer_state.pt", 1_000_000)  # of ~4.3 MB
        first = remote.Proc(cmd, env, log=tmp_path / "distill1.log")
        try:
            rc1 = first.finish(timeout=400)
        finally:
            first.kill()
        t_fail = time.monotonic()
        assert proxy.cut_at is not None, first.tail()
        assert rc1 == 1, first.tail()
        errors = [line for _, line in first.lines if line.startswith("ERROR pipelines.distill: ")]
        assert len(errors) == 1, first.tail()
        err = errors[0]
        # Our upload check ("checkpoint storage error: ...") usually fires first; when the cut hits Ray's own
        # controller snapshot first, the stage's line names the run's storage and the same storage fix.
        assert f"s3://{bucket}/ray" in err and "fix:" in err and "ray.storage_path" in err, err
        keys = remote.list_keys(c, bucket, "ray/")
        names = sorted({k.split("/")[1] for k in keys if k.split("/")[1].startswith("distill-")})
        assert len(names) == 1, keys
        name = names[0]
        assert f"ray/{name}/checkpoint_000006/complete.json" in keys, keys  # the last good one
        assert f"ray/{name}/checkpoint_000012/complete.json" not in keys, keys
        killed_at = max(_steps_by_pid(first).values())

        proxy.start()  # the server is back: run the stage again
        second, t_resumed, resumed, rc2 = _rerun_until_done(remote, cmd, env, tmp_path / "distill2.log")
    finally:
        proxy.stop()
    assert rc2 == 0, second.tail()
    record = json.loads((tmp_path / "student" / "run.json").read_text())
    weights = remote.student_weights(tmp_path / "student")
    remote.report_fault(
        fault="S3 endpoint down mid checkpoint PUT during distill",
        cut_during="checkpoint_000012 upload",
        killed_after_step=killed_at,
        failed_after_s=round(t_fail - first.t0, 1),
        error=err[:200],
        resumed_from_step=resumed,
        steps_lost=killed_at - resumed,
        recovery_s=round(t_resumed - t_fail, 1),
        rerun_wall_s=round(time.monotonic() - second.t0, 1),
        weights_match=weights == ref["weights"],
    )
    assert resumed == CKPT_EVERY  # the last complete checkpoint, never the half-written 12
    assert record["ray_run_name"] == name and record["steps"] == 24
    assert f"{bucket}/ray/{name}/checkpoint_000024" == record["checkpoint_path"]
    assert weights == ref["weights"]


def test_s3_truncated_or_tampered_teacher_rejected(remote, s3, tmp_path):
    from pipelines.support.fetch import ChecksumMismatchError, fetch

    payload = bytes(range(256)) * 2048
    sha = hashlib.sha256(payload).hexdigest()
    c, bucket = s3["client"], s3["bucket"]
    c.put_object(Bucket=bucket, Key="teachers/truncated.pkl", Body=payload[: len(payload) // 2])
    c.put_object(Bucket=bucket, Key="teachers/tampered.pkl", Body=payload[:-1] + b"X")
    cache = tmp_path / "cache"
    for key in ("truncated", "tampered"):
        with pytest.raises(ChecksumMismatchError, match=f"expected {sha}"):
            fetch(
                f"s3://{bucket}/teachers/{key}.pkl",
                cache,
                sha256=sha,
                progress=False,
                timeout_s=5.0,
                retries=1,
                backoff_s=0.01,
            )
    left = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert left == []
    remote.report_fault(fault="truncated/tampered teacher on S3", rejected_by="sha256", files_left_in_cache=len(left))
