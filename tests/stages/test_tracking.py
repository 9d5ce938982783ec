"""pipelines.support.tracking against a real MLflow SQLite store (pre-migrated once per session, copied per test)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from ctm_core.config import MlflowParams  # noqa: E402
from pipelines.support.tracking import (  # noqa: E402
    EXPERIMENT_KIND_TAG,
    RUN_KEY_TAG,
    data_hash_from_lock,
    flatten,
    log_dict_json,
    log_figure_png,
    log_prepared_dataset,
    nested_run,
    resolve_tracking_uri,
    run_name,
    run_tags,
    stage_run,
    start_run,
)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An empty mlflow.db with all alembic migrations applied (~4 s, paid once)."""
    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def repo(tmp_path, migrated_db, monkeypatch) -> Path:
    """A tiny git repo with one commit, a dvc.lock and a copy of the migrated DB; cwd elsewhere."""
    for k in ("MLFLOW_TRACKING_URI", "DVC_STAGE", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(k, raising=False)
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(migrated_db, root / "mlflow.db")
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    (root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: python -m pipelines.prepare\n    outs:\n"
        "    - path: data/prepared\n      hash: md5\n      md5: 0123456789abcdef0123456789abcdef.dir\n"
    )
    git = lambda *a: subprocess.run(["git", *a], cwd=root, check=True, capture_output=True)
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # like a Ray trial dir: nothing may land relative to the cwd
    yield root
    mlflow.set_tracking_uri(None)


def test_resolve_tracking_uri_absolute(repo, monkeypatch):
    uri = resolve_tracking_uri(MlflowParams(), repo)
    assert uri == f"sqlite:///{repo.resolve()}/mlflow.db" and uri.startswith("sqlite:////")
    assert resolve_tracking_uri({"tracking_uri": "sqlite:///sub/x.db"}, repo) == f"sqlite:///{repo.resolve()}/sub/x.db"
    assert resolve_tracking_uri(MlflowParams(tracking_uri="http://127.0.0.1:5000"), repo) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(None, repo).endswith("/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")  # env wins over params
    assert resolve_tracking_uri(MlflowParams(tracking_uri="sqlite:////x.db"), repo) == "http://mlflow.internal:5000"


def test_run_tags(repo, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "distill")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    tags = run_tags("distill", "ab" * 32, repo)
    assert tags["git.commit"] == head == tags["mlflow.source.git.commit"]
    assert tags["git.dirty"] == "false"
    assert tags["dvc.stage"] == "distill" and tags["ctm.params_hash"] == "ab" * 32
    assert tags["data.hash"] == data_hash_from_lock(repo) == "0123456789abcdef0123456789abcdef.dir"
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # a tracked file changes -> dirty
    assert run_tags("distill", "ab" * 32, repo)["git.dirty"] == "true"
    not_git = repo.parent / "cwd"
    assert run_tags("x", "0" * 64, not_git)["git.commit"] == "unknown"


def test_start_run_creates_then_resumes_same_run(repo):
    uri = resolve_tracking_uri(None, repo)
    name = run_name("distill", "cd" * 32)
    assert name == "distill-cdcdcdcdcdcd"
    tags = run_tags("distill", "cd" * 32, repo)
    with start_run(name, tracking_uri=uri, experiment_name="ctm-test", tags=tags, repo_root=repo) as run:
        first_id = run.info.run_id
        mlflow.log_params(flatten({"lr": 4e-4, "gan": {"enabled": False}, "eval_emas": [0.999, 0.9999]}))
        mlflow.log_metric("loss", 1.0, step=0)
    with start_run(name, tracking_uri=uri, experiment_name="ctm-test", tags=tags, repo_root=repo) as run:
        assert run.info.run_id == first_id  # resumed, not duplicated
        mlflow.log_params(flatten({"lr": 4e-4}))  # same value again is allowed
        mlflow.log_metric("loss", 0.5, step=1)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ctm-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [first_id]
    r = runs[0]
    assert r.info.status == "FINISHED" and r.info.run_name == name
    assert r.data.tags[RUN_KEY_TAG] == name and r.data.tags["git.commit"] == tags["git.commit"]
    assert r.data.params == {"lr": "0.0004", "gan.enabled": "False", "eval_emas": "[0.999, 0.9999]"}
    assert [m.value for m in client.get_metric_history(first_id, "loss")] == [1.0, 0.5]
    # artifacts live next to the DB, not under the cwd
    assert exp.artifact_location == (repo / "mlruns").resolve().as_uri()
    assert not any((repo.parent / "cwd").iterdir())
    # another params hash -> another run
    with start_run(run_name("distill", "ef" * 32), tracking_uri=uri, experiment_name="ctm-test", repo_root=repo) as run:
        assert run.info.run_id != first_id
    assert len(client.search_runs([exp.experiment_id])) == 2


def test_failed_body_marks_run_failed_and_resume_reopens(repo):
    uri = resolve_tracking_uri(None, repo)
    with pytest.raises(RuntimeError, match="boom"):
        with start_run("evaluate-000000000000", tracking_uri=uri, experiment_name="ctm-test", repo_root=repo):
            raise RuntimeError("boom")
    client = MlflowClient(tracking_uri=uri)
    (r,) = client.search_runs([client.get_experiment_by_name("ctm-test").experiment_id])
    assert r.info.status == "FAILED"
    with start_run("evaluate-000000000000", tracking_uri=uri, experiment_name="ctm-test", repo_root=repo) as run:
        assert run.info.run_id == r.info.run_id
    assert client.get_run(r.info.run_id).info.status == "FINISHED"


def test_log_figure_png_and_dict_json(repo, tmp_path):
    from PIL import Image

    png = tmp_path / "grid.png"
    Image.new("L", (16, 16), color=128).save(png)
    uri = resolve_tracking_uri(None, repo)
    with start_run("evaluate-111111111111", tracking_uri=uri, experiment_name="ctm-test", repo_root=repo) as run:
        log_figure_png(png, artifact_path="grids")
        log_dict_json({"fd_nfe1": 1.5}, "metrics.json")
        with pytest.raises(ValueError, match=r"^path: expected an existing \.png"):
            log_figure_png(tmp_path / "missing.png")
        with pytest.raises(ValueError, match=r"^artifact_file: expected a name ending in \.json"):
            log_dict_json({}, "metrics.yaml")
        run_id = run.info.run_id
    client = MlflowClient(tracking_uri=uri)
    paths = sorted(a.path for a in client.list_artifacts(run_id))
    paths += [a.path for a in client.list_artifacts(run_id, "grids")]
    assert paths == ["grids", "metrics.json", "grids/grid.png"]
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/metrics.json") == {"fd_nfe1": 1.5}


def test_stage_run_names_by_params_hash(repo, monkeypatch):
    from ctm_core.config import params_hash
    from pipelines.support.params import load_params  # noqa: E402

    monkeypatch.setenv("DVC_ROOT", str(repo))  # DVC sets it; the DB lives at the repo root, not the cwd
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml", check_env=False)
    with stage_run("distill", params, ("distill",)) as run:
        first = run.info.run_id
    with stage_run("distill", params, ("distill",)) as run:
        assert run.info.run_id == first
        assert run.data.tags["ctm.params_hash"] == params_hash({"distill": params.section("distill")})
    assert run.info.run_name == f"distill-{params_hash({'distill': params.section('distill')})[:12]}"
    assert (repo / "mlflow.db").stat().st_size > 0 and not (repo.parent / "cwd" / "mlflow.db").exists()


def test_experiments_open_on_training_runs(repo):
    """The MLflow 3 UI picks an experiment's default page from the tag mlflow.experimentKind: every experiment the
    stages create, or find untagged, is a custom-model (training runs) experiment."""
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("made-by-hand")
    with start_run("a", tracking_uri=uri, experiment_name="fresh", repo_root=repo):
        pass
    with start_run("b", tracking_uri=uri, experiment_name="made-by-hand", repo_root=repo):
        pass
    for name in ("fresh", "made-by-hand"):
        assert client.get_experiment_by_name(name).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_prepared_dataset_is_the_runs_input_and_evaluations_are_nested_runs(repo, tmp_path):
    import hashlib
    import json
    import warnings

    from pipelines.support.datasets import prepare_dataset

    data = tmp_path / "prepared"
    prepare_dataset("sklearn-digits", None, data, heldout_fraction=0.1, seed=0, shard_size=4096, progress=False)
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    with start_run("distill-x", tracking_uri=uri, experiment_name="e", repo_root=repo) as parent:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no MLflow warning reaches the stage's log
            digest = log_prepared_dataset(data)
    assert digest == hashlib.sha256((data / "card.json").read_bytes()).hexdigest()[:32]
    client = MlflowClient(uri)
    (inp,) = client.get_run(parent.info.run_id).inputs.dataset_inputs
    assert inp.dataset.digest == digest and inp.dataset.name == "sklearn-digits 8x8x1 (1797 images)"
    assert [t.value for t in inp.tags if t.key == "mlflow.data.context"] == ["training"]
    assert json.loads(inp.dataset.source) == {"uri": str(data.resolve())}
    # two evaluations of the same student: two child runs, each metric once per run
    for value in (1.0, 2.0):
        with nested_run(parent.info.run_id, "evaluate-abc", tracking_uri=uri, tags={"ctm.stage": "evaluate"}):
            mlflow.log_metrics({"fd_nfe1": value})
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.metrics["fd_nfe1"] for c in children) == [1.0, 2.0]
    assert all(len(client.get_metric_history(c.info.run_id, "fd_nfe1")) == 1 for c in children)
    assert "fd_nfe1" not in client.get_run(parent.info.run_id).data.metrics
    # s3:// data: the driver's cache holds only the card; the input names the S3 folder the workers stream
    uri2 = f"sqlite:///{repo / 'mlflow-s3.db'}"
    with start_run("distill-y", tracking_uri=uri2, experiment_name="e", repo_root=repo) as run_s3:
        log_prepared_dataset(data, source="s3://bucket/ctm/prepared")
    (inp,) = MlflowClient(uri2).get_run(run_s3.info.run_id).inputs.dataset_inputs
    assert inp.dataset.digest == digest and json.loads(inp.dataset.source) == {"uri": "s3://bucket/ctm/prepared"}
    assert inp.dataset.source_type == "s3"
