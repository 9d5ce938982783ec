"""Secrets stay secret: credentials in MLFLOW_TRACKING_URI or a presigned URL never reach tags, logged dicts,
error messages, Ray's runtime_env or `--print-runtime-env`; a Ray token file planted in the shared temp dir is not
reused; the bearer token never goes in clear to a non-loopback host without an explicit opt-in."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import stat
import tempfile

import pytest

from pipelines.support import ray_env, submit, tracking

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRESIGNED = "https://bucket.s3.amazonaws.com/data.zip?X-Amz-Credential=AKIAXYZ&X-Amz-Signature=s1gn4ture"
CRED_URI = "https://alice:hunter2@mlflow.example.com/?token=t0ken"
SECRETS = ("AKIAXYZ", "s1gn4ture", "hunter2", "alice", "t0ken", "pgpass", "S3CR3T")


def _clean(text: str) -> bool:
    return not any(s in text for s in SECRETS)


@pytest.fixture(autouse=True)
def _no_ambient(monkeypatch):
    for k in (
        "MLFLOW_TRACKING_URI",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_AUTH_MODE",
        submit.FORWARD_SECRETS_FLAG,
        submit.INSECURE_TOKEN_FLAG,
        *submit.SECRET_ENV,
    ):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")  # no ~/.ray/auth_token of the machine


# --- MLflow: tags, params, logged dicts, errors -------------------------------------------------------------------
def test_tags_params_and_logged_dicts_are_redacted(tmp_path, monkeypatch):
    tags = tracking.run_tags("prepare", "ab" * 32, tmp_path, extra={"data.path": PRESIGNED})
    assert tags["data.path"] == "https://bucket.s3.amazonaws.com/data.zip?***"
    flat = tracking.flatten({"data": {"path": PRESIGNED, "mirrors": [CRED_URI]}, "mlflow": {"tracking_uri": CRED_URI}})
    assert _clean(json.dumps(flat)) and flat["mlflow.tracking_uri"] == "https://***@mlflow.example.com/?***"
    import mlflow

    logged = {}
    monkeypatch.setattr(mlflow, "log_dict", lambda d, f: logged.update({f: d}))
    tracking.log_dict_json({"tracking_uri": CRED_URI, "card": {"source": PRESIGNED}, "n": 3}, "registry.json")
    assert _clean(json.dumps(logged)) and logged["registry.json"]["n"] == 3
    assert logged["registry.json"]["card"]["source"].startswith("https://bucket.s3.amazonaws.com/data.zip")
    assert tracking.public_tracking_uri("postgresql://u:pgpass@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert tracking.public_tracking_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"


def test_mlflow_errors_do_not_quote_credentials(monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = "http://alice:hunter2@127.0.0.1:9/?token=t0ken"  # port 9 (discard): nothing listens
    with pytest.raises(Exception) as plain:  # what MLflow itself says: the password and the token in clear
        MlflowClient(uri).get_experiment_by_name("e")
    assert "hunter2" in str(plain.value) and "t0ken" in str(plain.value)
    with pytest.raises(Exception) as ours:
        with tracking.start_run("x", tracking_uri=uri, experiment_name="e", repo_root=ROOT):
            pass
    assert _clean(str(ours.value)) and "127.0.0.1:9" in str(ours.value), str(ours.value)


# --- Ray job submission: runtime_env and --print-runtime-env -----------------------------------------------------
def test_runtime_env_never_carries_uri_credentials(caplog):
    env = {
        "MLFLOW_TRACKING_URI": CRED_URI,
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "MLFLOW_S3_ENDPOINT_URL": "https://k:S3CR3T@minio:9000/",
        "AWS_SECRET_ACCESS_KEY": "S3CR3T",
    }
    with caplog.at_level(logging.WARNING):
        rt = submit.build_runtime_env(ROOT, env)
    assert rt["env_vars"] == {
        "MLFLOW_TRACKING_URI": "https://mlflow.example.com/",  # usable, without the secret parts
        "MLFLOW_S3_ENDPOINT_URL": "https://minio:9000/",
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "CTM_INSIDE_RAY_JOB": "1",
    }
    assert _clean(json.dumps(rt)) and _clean(caplog.text)
    assert "MLFLOW_TRACKING_URI carries credentials" in caplog.text and "MLFLOW_TRACKING_PASSWORD" in caplog.text
    pg = submit.build_runtime_env(ROOT, {"MLFLOW_TRACKING_URI": "postgresql://u:pgpass@db:5432/mlflow"})
    assert pg["env_vars"]["MLFLOW_TRACKING_URI"] == "postgresql://db:5432/mlflow"
    # credentials the user already set as variables travel as variables, and only when asked
    fwd = submit.build_runtime_env(
        ROOT, {**env, "MLFLOW_TRACKING_PASSWORD": "hunter2", submit.FORWARD_SECRETS_FLAG: "1"}
    )
    assert fwd["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == "hunter2"
    assert fwd["env_vars"]["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com/"


def test_print_runtime_env_masks_secret_values(monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAXYZ")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3CR3T")
    monkeypatch.setenv("PGPASSWORD", "pgpass")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", CRED_URI)
    monkeypatch.setenv(submit.FORWARD_SECRETS_FLAG, "1")
    assert submit._main(["--print-runtime-env"]) == 0
    out = capsys.readouterr().out
    env_vars = json.loads(out)["env_vars"]
    assert _clean(out), out
    assert env_vars["AWS_SECRET_ACCESS_KEY"] == env_vars["AWS_ACCESS_KEY_ID"] == env_vars["PGPASSWORD"] == "***"
    assert env_vars["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com/"


# --- Ray token file ------------------------------------------------------------------------------------------------
class _Ray:
    def __init__(self, temp_dir):
        self.temp_dir = str(temp_dir)


class _P:
    def __init__(self, temp_dir):
        self.ray = _Ray(temp_dir)


def test_planted_token_file_is_not_reused(tmp_path):
    shared = tmp_path / "ray_ctm"
    shared.mkdir()
    planted = shared / "auth_token"
    planted.write_text("attacker-known-token\n")
    planted.chmod(0o644)
    assert planted.read_text().strip() == "attacker-known-token"  # what a plain reader would send as our token
    with pytest.raises(PermissionError) as info:
        submit.find_auth_token(_P(shared))
    msg = str(info.value)
    assert "\n" not in msg and str(planted) in msg and "mode 0644" in msg and "fix:" in msg, msg
    planted.unlink()
    planted.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_text("t")
    with pytest.raises(PermissionError, match="cannot open .* as a plain file"):
        submit.find_auth_token(_P(shared))
    planted.unlink()
    fd = os.open(planted, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # our own, private: used
    os.write(fd, b"mine\n")
    os.close(fd)
    assert submit.find_auth_token(_P(shared)) == ("mine", f"ray.temp_dir/auth_token ({planted})")
    if os.getuid() == 0:  # another user's file, even with mode 0600
        os.chown(planted, 12345, 12345)
        with pytest.raises(PermissionError, match="owner uid 12345"):
            submit.find_auth_token(_P(shared))


def test_local_cluster_refuses_planted_token_and_shared_dir(tmp_path):
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    shared = tmp_path / "ray_ctm"
    shared.mkdir(mode=0o700)
    planted = shared / "auth_token"
    planted.write_text("attacker-known-token")
    planted.chmod(0o644)
    try:
        with pytest.raises(ValueError) as info:
            ray_env._setup_token_auth(shared, "token")
        msg = str(info.value)
        assert "\n" not in msg and str(planted) in msg and "not 0600" in msg and "fix:" in msg, msg
        assert "RAY_AUTH_MODE" not in os.environ  # refused before any env change
        planted.unlink()
        assert ray_env._setup_token_auth(shared, "token") == "token"  # a fresh private file of our own
        assert stat.S_IMODE(planted.stat().st_mode) == 0o600 and len(planted.read_text()) == 64
        assert ray_env._setup_token_auth(shared, "token") == "token"  # ... which is reused next time
    finally:
        ray_env._saved_env.clear()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    foreign = pathlib.Path(tempfile.mkdtemp(prefix="rt_open_", dir="/tmp"))  # short: the socket-path limit
    try:
        if os.getuid() != 0:
            pytest.skip("needs root to hand the folder to another user")
        os.chown(foreign, 65534, 65534)  # a pre-created /tmp/ray_ctm of another user (nobody)
        with pytest.raises(ValueError, match=r"ray\.temp_dir: .* is not a folder of your own .*owner uid 65534.*fix:"):
            ray_env.init_local_ray(2, foreign, 8299)
        assert list(foreign.iterdir()) == []  # no token written there
    finally:
        shutil.rmtree(foreign, ignore_errors=True)


# --- bearer token transport ---------------------------------------------------------------------------------------
def test_token_not_sent_in_clear_to_remote_http(monkeypatch, capsys):
    from pipelines.support.params import load_params

    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.20.30.40:8265")
    p = load_params(ROOT / "params.yaml", check_env=False)
    assert submit.submit_job(p, "pipelines.distill", ["--dry-run"]) == 1  # refused before any connection
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to send the cluster token in clear to http://10.20.30.40:8265" in err[0], err
    assert submit.INSECURE_TOKEN_FLAG in err[0] and "0" * 64 not in err[0]
    for ok in ("https://head.example.com:8265", "http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265"):
        submit._check_token_transport(ok)
    monkeypatch.setenv(submit.INSECURE_TOKEN_FLAG, "1")  # the explicit opt-in
    submit._check_token_transport("http://10.20.30.40:8265")
