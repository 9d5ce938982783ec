"""S3 end to end against a real S3 API server (moto) on 127.0.0.1: DVC remote, Ray Train storage, MLflow artifacts.

Environment contract (infra/README.md §1): dummy AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION; MLFLOW_S3_ENDPOINT_URL only on the MLflow server. Secrets never land in a committed file.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest_remote import (  # noqa: F401 - fixtures are used by name
    ROOT,
    VENV_BIN,
    base_env,
    free_port,
    inputs,
    list_keys,
    moto_server,
    ray_head,
    match_reference,
    s3,
    set_aws_env,
    student_weights,
    tree_bytes,
    write_params,
)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout + r.stderr


# --- (a) DVC remote on S3 -----------------------------------------------------------------------------------------
def test_dvc_push_pull_roundtrip(s3, inputs, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    # the dvc processes get NO AWS credentials in their env: only .dvc/config.local has them
    env = base_env()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        env.pop(k, None)
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1", DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org")
    dvc = str(VENV_BIN / "dvc")
    _run(["git", "init", "-q"], repo, env)
    _run([dvc, "init", "-q"], repo, env)
    shutil.copytree(inputs["data"], repo / "data" / "prepared")
    shutil.copytree(inputs["teacher"], repo / "artifacts" / "teacher")
    want = {"data/prepared": tree_bytes(repo / "data" / "prepared"),
            "artifacts/teacher": tree_bytes(repo / "artifacts" / "teacher")}
    url = f"s3://{s3['bucket']}/dvcstore"
    _run([dvc, "remote", "add", "-d", "storage", url], repo, env)
    _run([dvc, "remote", "modify", "storage", "endpointurl", s3["endpoint"]], repo, env)
    _run([dvc, "remote", "modify", "--local", "storage", "access_key_id", "testing"], repo, env)
    _run([dvc, "remote", "modify", "--local", "storage", "secret_access_key", "testing"], repo, env)
    config, local = (repo / ".dvc" / "config").read_text(), (repo / ".dvc" / "config.local").read_text()
    assert "access_key_id" not in config and "secret_access_key" not in config and url in config
    assert "secret_access_key = testing" in local
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=repo, env=env)
    assert ignored.returncode == 0, ".dvc/config.local must be git-ignored"
    _run([dvc, "add", "-q", "data/prepared", "artifacts/teacher"], repo, env)
    out = _run([dvc, "push"], repo, env)
    keys = list_keys(s3["client"], s3["bucket"], "dvcstore/")
    n_files = sum(len(v) for v in want.values())
    assert len([k for k in keys if not k.endswith(".dir")]) == n_files, (out, keys)
    assert any(k.endswith(".dir") for k in keys)  # directory manifests
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "prepared")
    shutil.rmtree(repo / "artifacts" / "teacher")
    _run([dvc, "pull"], repo, env)
    for rel, files in want.items():
        assert tree_bytes(repo / rel) == files, rel
    # nothing secret in any file git would commit
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=repo, env=env, capture_output=True,
                             text=True).stdout.split()
    for rel in tracked:
        p = repo / rel
        if p.is_file() and p.stat().st_size < 1_000_000:
            assert b"secret_access_key" not in p.read_bytes(), rel


# --- (b) Ray Train storage_path on s3:// -------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_storage_on_s3_and_resume(s3, inputs, ray_head, tmp_path, monkeypatch):
    """run_distill with ``ray.storage_path: s3://...`` on the shared Ray head; a re-run resumes without retraining."""
    import ray

    from pipelines.config import load_params
    from pipelines.distill import run_distill

    prefix = f"s3://{s3['bucket']}/ray"
    params_path = write_params(tmp_path, {"ray": {"address": ray_head.gcs_address, "storage_path": prefix}})
    from pipelines.ray_env import _refresh_ray_auth_config

    for k, v in ray_head.env.items():
        if k.startswith("RAY_AUTH"):
            monkeypatch.setenv(k, v)  # the driver joins a token-auth cluster
    _refresh_ray_auth_config()  # ray is imported already: make it re-read RAY_AUTH_* (as ray_env does)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    params = load_params(params_path)

    def run(out: str):
        t0 = time.monotonic()
        try:
            rec = run_distill(params, data_dir=str(inputs["data"]), teacher_dir=str(inputs["teacher"]),
                              out_dir=str(tmp_path / out))
        finally:
            ray.shutdown()
        return rec, time.monotonic() - t0

    try:
        rec1, wall1 = run("student1")
        keys1 = list_keys(s3["client"], s3["bucket"], f"ray/{rec1['ray_run_name']}/")
        rec2, wall2 = run("student2")  # same name + storage: resumes at the final step, trains nothing
    finally:
        monkeypatch.undo()
        _refresh_ray_auth_config()
        set_aws_env(monkeypatch, s3["endpoint"], tmp_path)
    name = rec1["ray_run_name"]
    assert rec1["ray_storage_path"] == prefix and rec1["steps"] == params.distill.steps
    assert rec1["checkpoint_path"].startswith(f"{s3['bucket']}/ray/{name}/checkpoint_")
    ckpts = sorted({k.split("/")[2] for k in keys1 if k.split("/")[2].startswith("checkpoint_2")})
    assert len(ckpts) == 2, keys1  # CheckpointConfig(num_to_keep=2)
    assert f"ray/{name}/checkpoint_manager_snapshot.json" in keys1
    assert all(f"ray/{name}/{c}/trainer_state.pt" in keys1 for c in ckpts)

    assert rec2["ray_run_name"] == name and rec2["checkpoint_path"] == rec1["checkpoint_path"]
    assert rec2["mlflow_run_id"] == rec1["mlflow_run_id"]
    assert list_keys(s3["client"], s3["bucket"], f"ray/{name}/checkpoint_") == \
        [k for k in keys1 if k.startswith(f"ray/{name}/checkpoint_")]  # no new checkpoint was written
    w1, w2 = student_weights(tmp_path / "student1"), student_weights(tmp_path / "student2")
    assert w1 == w2 and match_reference(w1, wall1, "test_s3 storage")  # S3 storage changes nothing in the numbers
    print(f"\n[s3 storage] run {wall1:.1f} s, resume-only re-run {wall2:.1f} s, {len(keys1)} objects under {prefix}")


# --- (c) MLflow server with S3 artifacts --------------------------------------------------------------------------
def test_mlflow_server_artifacts_on_s3(s3, tmp_path, monkeypatch):
    import mlflow
    import requests

    port = free_port()
    server_env = base_env(MLFLOW_S3_ENDPOINT_URL=s3["endpoint"], AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server_env.pop("AWS_ENDPOINT_URL", None)
    cmd = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{s3['bucket']}/mlflow", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        # the client has NO bucket credentials: the server proxies artifacts (mlflow-artifacts:/)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        artifact = tmp_path / "student_card.json"
        artifact.write_text('{"steps": 24}')
        exp = mlflow.set_experiment("s3-artifacts")
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(artifact), artifact_path="distill")
            mlflow.log_metric("fd_nfe1", 1.5)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        keys = list_keys(s3["client"], s3["bucket"], "mlflow/")
        want = f"mlflow/{exp.experiment_id}/{run.info.run_id}/artifacts/distill/student_card.json"
        assert want in keys, keys
        body = s3["client"].get_object(Bucket=s3["bucket"], Key=want)["Body"].read()
        assert body == artifact.read_bytes()
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="distill/student_card.json",
                                                    dst_path=str(tmp_path / "dl"))
        assert Path(local).read_bytes() == artifact.read_bytes()
    finally:
        import os

        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker, by PID (own session)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
