"""`ray job submit` against a real local Ray head (token auth, own temp dir and ports, stopped by PID).

1. The CLI path documented in infra/README §4: ``ray job submit --working-dir <repo>`` of the distill entrypoint with
   absolute data/teacher/out paths and an absolute MLflow sqlite URI; client token mode as README §3 says.
2. The DVC-stage path: ``python -m pipelines.distill`` with ``ray.submit: true`` submits through
   ``pipelines.support.submit.submit_job`` (explicit Authorization header, no RAY_AUTH_MODE on the client), streams
   the logs and blocks. The client is killed mid-job (a killed ``dvc repro``) and re-run: it attaches to the same job
   (deterministic submission id) instead of submitting a duplicate, and returns 0.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipelines.support import submit

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _mlflow_runs(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT name, status FROM runs").fetchall()


def _mlflow_metric_steps(db: Path, key: str) -> list[int]:
    with sqlite3.connect(db) as con:
        return sorted(r[0] for r in con.execute("SELECT DISTINCT step FROM metrics WHERE key = ?", (key,)))


# --- pure helpers ------------------------------------------------------------------------------------------------
def test_runtime_env_has_no_secrets_unless_asked(tmp_path):
    env = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_ENDPOINT_URL": "http://m:9000",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "RAY_AUTH_TOKEN": "tok",
        "HOME": "/root",
    }
    rt = submit.build_runtime_env(ROOT, env)
    assert rt["working_dir"] == str(ROOT)
    assert rt["env_vars"] == {
        "AWS_ENDPOINT_URL": "http://m:9000",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "CTM_INSIDE_RAY_JOB": "1",
    }
    assert "s3cr3t" not in json.dumps(rt) and "tok" not in json.dumps(rt["env_vars"])
    assert {"data/", "artifacts/", "ray_results/", "mlruns/"} <= set(rt["excludes"])
    rt = submit.build_runtime_env(ROOT, {**env, submit.FORWARD_SECRETS_FLAG: "1"})
    assert rt["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and "RAY_AUTH_TOKEN" not in rt["env_vars"]


def test_submission_id_and_paths(tmp_path, monkeypatch):
    from pipelines.support.params import load_params

    p = load_params(ROOT / "params.yaml", check_env=False)
    a = submit.submission_id("distill", "pipelines.distill", ["--out", "x"], p, 1)
    assert a == submit.submission_id("distill", "pipelines.distill", ["--out", "x"], p, 1)
    assert a.startswith("distill-") and a.endswith("-a1")
    assert a != submit.submission_id("distill", "pipelines.distill", ["--out", "y"], p, 1)
    assert a[:-1] + "2" == submit.submission_id("distill", "pipelines.distill", ["--out", "x"], p, 2)
    argv, notes = submit.absolutize_argv(
        ["--params", "params.yaml", "--data", "data/prepared", "--out=/abs/o", "--teacher", "s3://b/t"], ROOT, cwd=ROOT
    )
    assert argv == [
        "--params",
        "params.yaml",
        "--data",
        str(ROOT / "data" / "prepared"),
        "--out=/abs/o",
        "--teacher",
        "s3://b/t",
    ]  # tracked params travel; git-ignored data is sent as an abs path
    assert len(notes) == 1 and "--data" in notes[0]
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with pytest.raises(FileNotFoundError, match="RAY_AUTH_TOKEN_PATH"):
        submit.find_auth_token(p)
    (tmp_path / "tok").write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert submit.find_auth_token(p)[0] == "abc"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "xyz")
    assert submit.find_auth_token(p) == ("xyz", "RAY_AUTH_TOKEN")


# --- against the real head ---------------------------------------------------------------------------------------
def test_wrong_token_is_one_clear_line(ray_head, monkeypatch, capsys):
    from pipelines.support.params import load_params

    p = load_params(ROOT / "params.yaml", check_env=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    monkeypatch.setenv("RAY_ADDRESS", ray_head.dashboard_url)
    assert submit.submit_job(p, "pipelines.distill", ["--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("submit: ") and "token" in err[0].lower(), err


@pytest.mark.slow
def test_ray_job_submit_cli(remote, ray_head, inputs, tmp_path):
    params = remote.write_params(tmp_path)  # ray.address null: inside the job Ray's RAY_ADDRESS joins the cluster
    out, db = tmp_path / "student", tmp_path / "mlflow.db"
    job_id = f"ctm-cli-{uuid.uuid4().hex[:8]}"
    rt = {
        "env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "CTM_INSIDE_RAY_JOB": "1", "DVC_ROOT": str(tmp_path)},
        "excludes": submit.EXCLUDES,
    }
    env = remote.base_env(
        RAY_ADDRESS=ray_head.dashboard_url, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(ray_head.token_path)
    )
    cmd = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--submission-id",
        job_id,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        json.dumps(rt),
        "--",
        "python",
        "-m",
        "pipelines.distill",
        "--params",
        str(params),
        "--data",
        str(inputs["data"]),
        "--teacher",
        str(inputs["teacher"]),
        "--out",
        str(out),
    ]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    st = subprocess.run([str(VENV_BIN / "ray"), "job", "status", job_id], env=env, capture_output=True, text=True)
    assert "succeeded" in (st.stdout + st.stderr).lower()
    record = json.loads((out / "run.json").read_text())
    assert record["steps"] == 24 and record["ray_storage_path"] == str(tmp_path / "ray_results")
    # the job computes what a local run does
    assert remote.match_reference(remote.student_weights(out), wall, "ray job submit")
    remote.register_checkpoints(tmp_path / "ray_results")
    runs = _mlflow_runs(db)
    assert (record["ray_run_name"], "FINISHED") in runs, runs
    assert _mlflow_metric_steps(db, "train/loss") == list(range(1, 25))
    print(f"\n[job submit CLI] {job_id} SUCCEEDED in {wall:.1f} s")


@pytest.mark.slow
def test_stage_submits_blocks_and_reattaches(remote, ray_head, inputs, tmp_path):
    """`ray.submit: true`: the stage submits, streams, blocks; a killed client re-attaches to the running job."""
    params = remote.write_params(tmp_path, {"ray": {"submit": True}})
    out, db = tmp_path / "student", tmp_path / "mlflow.db"
    # explicit token handling: no RAY_AUTH_MODE on the client, only the token file (Ray's own client would send
    # no header then); RAY_ADDRESS is the dashboard URL
    env = remote.base_env(
        RAY_ADDRESS=ray_head.dashboard_url,
        RAY_AUTH_TOKEN_PATH=str(ray_head.token_path),
        MLFLOW_TRACKING_URI=f"sqlite:///{db}",
    )
    cmd = remote.distill_cmd(params, out, inputs)
    first = remote.Proc(cmd, env, log=tmp_path / "client1.log")
    try:
        m = first.wait_for(r"submit: job (\S+) submitted", timeout=120)
        assert m is not None, first.tail()
        job_id = m[1][1]
        assert first.wait_for(r"pipelines\.support\.ray_train: step \d+", timeout=180) is not None, first.tail()
        first.kill()  # the dvc repro / client dies; the job goes on on the cluster
        t_kill = time.monotonic()
    finally:
        first.kill()
    second = remote.Proc(cmd, env, log=tmp_path / "client2.log")
    rc = second.finish(timeout=300)
    text = second.text()
    assert rc == 0, text[-4000:]
    assert f"submit: job {job_id} is already RUNNING" in text or f"submit: job {job_id} is already PENDING" in text, (
        text[-3000:]
    )
    assert f"submit: job {job_id} SUCCEEDED" in text
    assert "submitted" not in text  # attached, no duplicate job
    assert remote.match_reference(remote.student_weights(out), time.monotonic() - first.t0, "stage submit")
    record = json.loads((out / "run.json").read_text())
    assert (record["ray_run_name"], "FINISHED") in _mlflow_runs(db)
    print(
        f"\n[stage submit] client killed mid-job, re-run attached to {job_id}; finished "
        f"{time.monotonic() - t_kill:.1f} s after the kill"
    )
