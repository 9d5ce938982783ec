"""S3 end to end against a real S3 API server (moto) on 127.0.0.1: DVC remote, Ray Train storage, MLflow artifacts,
and the distill stage reading its data and teacher from ``s3://`` (what ``ray job submit --working-dir .`` needs).

Environment contract (infra/README.md §1): dummy AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION; MLFLOW_S3_ENDPOINT_URL only on the MLflow server. Secrets never land in a committed file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout + r.stderr


# --- (a) DVC remote on S3 -----------------------------------------------------------------------------------------
def test_dvc_push_pull_roundtrip(remote, s3, inputs, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    # the dvc processes get NO AWS credentials in their env: only .dvc/config.local has them
    env = remote.base_env()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        env.pop(k, None)
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.org",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.org",
    )
    dvc = str(VENV_BIN / "dvc")
    _run(["git", "init", "-q"], repo, env)
    _run([dvc, "init", "-q"], repo, env)
    shutil.copytree(inputs["data"], repo / "data" / "prepared")
    shutil.copytree(inputs["teacher"], repo / "artifacts" / "teacher")
    want = {
        "data/prepared": remote.tree_bytes(repo / "data" / "prepared"),
        "artifacts/teacher": remote.tree_bytes(repo / "artifacts" / "teacher"),
    }
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
    keys = remote.list_keys(s3["client"], s3["bucket"], "dvcstore/")
    n_files = sum(len(v) for v in want.values())
    assert len([k for k in keys if not k.endswith(".dir")]) == n_files, (out, keys)
    assert any(k.endswith(".dir") for k in keys)  # directory manifests
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "prepared")
    shutil.rmtree(repo / "artifacts" / "teacher")
    _run([dvc, "pull"], repo, env)
    for rel, files in want.items():
        assert remote.tree_bytes(repo / rel) == files, rel
    # nothing secret in any file git would commit
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=repo, env=env, capture_output=True, text=True
    ).stdout.split()
    for rel in tracked:
        p = repo / rel
        if p.is_file() and p.stat().st_size < 1_000_000:
            assert b"secret_access_key" not in p.read_bytes(), rel


# --- (b) Ray Train storage_path on s3:// -------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_storage_on_s3_and_resume(remote, s3, inputs, ray_head, tmp_path, monkeypatch):
    """run_distill with ``ray.storage_path: s3://...`` on the shared Ray head; a re-run resumes without retraining."""
    import ray

    from pipelines.distill import run_distill
    from pipelines.support.params import load_params

    prefix = f"s3://{s3['bucket']}/ray"
    params_path = remote.write_params(tmp_path, {"ray": {"address": ray_head.gcs_address, "storage_path": prefix}})
    from pipelines.support.ray_env import _refresh_ray_auth_config

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
            rec = run_distill(
                params, data_dir=str(inputs["data"]), teacher_dir=str(inputs["teacher"]), out_dir=str(tmp_path / out)
            )
        finally:
            ray.shutdown()
        return rec, time.monotonic() - t0

    try:
        rec1, wall1 = run("student1")
        keys1 = remote.list_keys(s3["client"], s3["bucket"], f"ray/{rec1['ray_run_name']}/")
        rec2, wall2 = run("student2")  # same name + storage: resumes at the final step, trains nothing
    finally:
        monkeypatch.undo()
        _refresh_ray_auth_config()
        remote.set_aws_env(monkeypatch, s3["endpoint"], tmp_path)
    name = rec1["ray_run_name"]
    assert rec1["ray_storage_path"] == prefix and rec1["steps"] == params.distill.steps
    assert rec1["checkpoint_path"].startswith(f"{s3['bucket']}/ray/{name}/checkpoint_")
    ckpts = sorted({k.split("/")[2] for k in keys1 if k.split("/")[2].startswith("checkpoint_0")})
    assert ckpts == ["checkpoint_000018", "checkpoint_000024"], keys1  # CheckpointConfig(num_to_keep=2)
    assert f"ray/{name}/checkpoint_manager_snapshot.json" in keys1
    assert all(f"ray/{name}/{c}/trainer_state.pt" in keys1 for c in ckpts)
    assert all(f"ray/{name}/{c}/complete.json" in keys1 for c in ckpts)  # verified, marker written last

    assert rec2["ray_run_name"] == name and rec2["checkpoint_path"] == rec1["checkpoint_path"]
    assert rec2["mlflow_run_id"] == rec1["mlflow_run_id"]
    assert remote.list_keys(s3["client"], s3["bucket"], f"ray/{name}/checkpoint_") == [
        k for k in keys1 if k.startswith(f"ray/{name}/checkpoint_")
    ]  # no new checkpoint was written
    w1, w2 = remote.student_weights(tmp_path / "student1"), remote.student_weights(tmp_path / "student2")
    # S3 storage changes nothing in the numbers
    assert w1 == w2 and remote.match_reference(w1, wall1, "test_s3 storage")
    print(f"\n[s3 storage] run {wall1:.1f} s, resume-only re-run {wall2:.1f} s, {len(keys1)} objects under {prefix}")


# --- (c) MLflow server with S3 artifacts --------------------------------------------------------------------------
def test_mlflow_server_artifacts_on_s3(remote, s3, tmp_path, monkeypatch):
    import mlflow
    import requests

    port = remote.free_port()
    server_env = remote.base_env(
        MLFLOW_S3_ENDPOINT_URL=s3["endpoint"],
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    server_env.pop("AWS_ENDPOINT_URL", None)
    cmd = [
        str(VENV_BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{s3['bucket']}/mlflow",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
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
        keys = remote.list_keys(s3["client"], s3["bucket"], "mlflow/")
        want = f"mlflow/{exp.experiment_id}/{run.info.run_id}/artifacts/distill/student_card.json"
        assert want in keys, keys
        body = s3["client"].get_object(Bucket=s3["bucket"], Key=want)["Body"].read()
        assert body == artifact.read_bytes()
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="distill/student_card.json", dst_path=str(tmp_path / "dl")
        )
        assert Path(local).read_bytes() == artifact.read_bytes()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker, by PID (own session)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


# --- (d) distill inputs from s3:// ---------------------------------------------------------------------------------
def _upload_inputs(remote, s3, inputs, prefix: str = "ctm") -> tuple[str, str]:
    remote.upload_tree(s3["client"], s3["bucket"], f"{prefix}/prepared", inputs["data"])
    remote.upload_tree(s3["client"], s3["bucket"], f"{prefix}/teacher", inputs["teacher"])
    return f"s3://{s3['bucket']}/{prefix}/prepared", f"s3://{s3['bucket']}/{prefix}/teacher"


@pytest.mark.slow
def test_distill_reads_s3_inputs(remote, s3, inputs, ray_head, tmp_path):
    """``--data s3://.../prepared --teacher s3://.../teacher`` (uploaded with boto3): the card and the teacher
    verified into the cache before Ray starts, the workers stream the shards from S3 and get the teacher through the
    object store; same Ray run name and bitwise the same weights as the same inputs on local disk."""
    import json

    from ctm_core.config import params_hash
    from ctm_core.data.prepared import load_card
    from pipelines.distill import run_identity
    from pipelines.support.io_utils import read_json, sha256_file
    from pipelines.support.params import load_params

    ref = remote.reference_run()
    data_uri, teacher_uri = _upload_inputs(remote, s3, inputs)
    params = remote.write_params(tmp_path, {"ray": {"address": ray_head.gcs_address}})
    cache = tmp_path / "cache"
    cmd = remote.distill_cmd(params, tmp_path / "student", {"data": data_uri, "teacher": teacher_uri})
    proc = remote.Proc(
        cmd, remote.head_run_env(ray_head, tmp_path, CTM_INPUT_CACHE=str(cache)), log=tmp_path / "distill.log"
    )
    try:
        rc = proc.finish(timeout=300)
    finally:
        proc.kill()
    assert rc == 0, proc.tail()
    record = json.loads((tmp_path / "student" / "run.json").read_text())
    assert record["inputs"] == {"data": data_uri, "teacher": teacher_uri}
    card = load_card(inputs["data"])
    d = load_params(params).distill
    teacher_sha = read_json(inputs["teacher"] / "config.json")["weights_sha256"]
    want = f"distill-{params_hash(run_identity(d, card, teacher_sha, 1))[:12]}"
    assert record["ray_run_name"] == want  # where the inputs live does not change the run
    assert remote.student_weights(tmp_path / "student") == ref["weights"]
    # the driver cached the card only: the workers streamed the shards from S3
    assert [p.name for p in cache.glob("prepared/*/**/*") if p.is_file()] == ["card.json"]
    assert sha256_file(next(cache.glob("prepared/*/card.json"))) == sha256_file(inputs["data"] / "card.json")
    assert len(list(cache.glob("teacher/*/teacher.safetensors"))) == 1
    assert not list(cache.glob("tmp/*"))  # no partial download left behind
    print(f"\n[s3 inputs] distill from s3:// inputs {time.monotonic() - proc.t0:.1f} s, same weights as local")


def test_s3_data_resolves_to_its_card_and_streams_verified_shards(remote, s3, inputs, tmp_path):
    """``s3://`` data: the driver caches card.json only (no shard downloaded); the workers' ``ShardStream`` reads the
    same rows from S3 as from disk, and a shard replaced on S3 by same-size wrong bytes passes the driver's existence
    check but stops the stream at its first read with the sha256 line."""
    import torch

    from ctm_core.data.card import DatasetCard
    from ctm_core.data.stream import ShardStream
    from pipelines.distill import InputError, resolve_inputs

    c, bucket = s3["client"], s3["bucket"]
    data_uri, _ = _upload_inputs(remote, s3, inputs)
    cache = tmp_path / "cache"
    got = resolve_inputs(data_uri, str(inputs["teacher"]), cache_dir=cache)
    assert got.data_uri == data_uri and got.data_dir.parent == cache / "prepared"
    assert [p.name for p in cache.rglob("*") if p.is_file()] == ["card.json"]  # no .parquet, nothing in tmp/
    assert (got.data_dir / "card.json").read_bytes() == (inputs["data"] / "card.json").read_bytes()

    card = DatasetCard.read(got.data_dir)
    rows = torch.arange(0, 64, 2)
    s3_x, s3_y = ShardStream(card, data_uri, seed=3, window_shards=2).read_global_batch(64, rows)
    disk_x, disk_y = ShardStream(card, inputs["data"], seed=3, window_shards=2).read_global_batch(64, rows)
    assert torch.equal(s3_x, disk_x) and (s3_y is None) == (disk_y is None)
    assert s3_y is None or torch.equal(s3_y, disk_y)

    shard = card.splits["train"].shards[0]
    blob = bytearray((inputs["data"] / shard.path).read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit flipped: same size, wrong bytes
    c.put_object(Bucket=bucket, Key=f"ctm/prepared/{shard.path}", Body=bytes(blob))
    resolve_inputs(data_uri, str(inputs["teacher"]), cache_dir=cache)  # exists: the driver does not read bytes
    with pytest.raises(InputError) as ei:
        ShardStream(card, data_uri, seed=3, window_shards=2).read_global_batch(64, rows)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{data_uri}/{shard.path}: sha256 expected {shard.sha256} (card.json)")
    assert "the shards changed after the prepare stage wrote them" in msg


def test_s3_inputs_rejected_before_ray(remote, s3, inputs, tmp_path):
    """Bad ``s3://`` inputs stop the stage with one line naming the path and the fix, before Ray starts, and leave
    nothing unverified in the cache."""
    import yaml

    from pipelines.distill import InputError, resolve_inputs

    c, bucket = s3["client"], s3["bucket"]
    data_uri, teacher_uri = _upload_inputs(remote, s3, inputs)
    cache = tmp_path / "cache"

    def err(data: str, teacher: str) -> str:
        with pytest.raises(InputError) as ei:
            resolve_inputs(data, teacher, cache_dir=cache)
        msg = str(ei.value)
        assert "\n" not in msg
        return msg

    assert "'no-such-bucket-ctm' does not exist" in err("s3://no-such-bucket-ctm/prepared", str(inputs["teacher"]))
    msg = err(f"s3://{bucket}/wrong/prepared", str(inputs["teacher"]))
    assert f"s3://{bucket}/wrong/prepared/card.json" in msg and "fix: --data must be the folder" in msg
    msg = err(str(inputs["data"]), f"s3://{bucket}/wrong/teacher")
    assert f"s3://{bucket}/wrong/teacher/config.json" in msg and "fix: --teacher must be the folder" in msg

    # a shard the card lists is missing on S3: named with the fix by its HEAD request, the card is not cached
    shard = sorted(p for p in (inputs["data"] / "train").glob("*.parquet"))[0]
    c.delete_object(Bucket=bucket, Key=f"ctm/prepared/train/{shard.name}")
    msg = err(data_uri, str(inputs["teacher"]))
    assert msg.startswith(f"S3 object not found: {data_uri}/train/{shard.name} (listed in card.json;"), msg
    assert f"fix: upload the whole folder the prepare stage writes again (aws s3 sync data/prepared {data_uri})" in msg
    assert not list(cache.glob("prepared/**/*.parquet")) and not list(cache.glob("prepared/*/card.json"))
    # a tampered teacher (one weight byte flipped): rejected by weights_sha256, nothing cached
    blob = bytearray((inputs["teacher"] / "teacher.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    c.put_object(Bucket=bucket, Key="ctm/teacher/teacher.safetensors", Body=bytes(blob))
    msg = err(str(inputs["data"]), teacher_uri)
    assert f"teacher {teacher_uri} failed verification" in msg and "nothing cached" in msg
    assert not list(cache.glob("teacher/*"))
    assert not [p for p in cache.glob("tmp/**/*") if p.is_file()]

    # the CLI without credentials: exit 2, one line naming the S3 path and the variables to set, Ray never started
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raytmp = Path(f"/tmp/rt_s3in{os.getpid()}")
    raw["ray"]["temp_dir"] = str(raytmp)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = remote.base_env(
        CTM_INPUT_CACHE=str(cache),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL=s3["endpoint"],
        AWS_DEFAULT_REGION="us-east-1",
    )
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(k, None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.distill",
            "--params",
            str(tmp_path / "params.yaml"),
            "--data",
            data_uri,
            "--teacher",
            teacher_uri,
            "--out",
            str(tmp_path / "student"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert f"{data_uri}/card.json" in lines[0] and "AWS_ACCESS_KEY_ID" in lines[0], lines[0]
    assert not raytmp.exists() and not (tmp_path / "student").exists()
