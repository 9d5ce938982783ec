"""ctm_core.config + pipelines.support.params: the default params validate; bad edits fail with one line naming the
key; params.yaml and the schema have the same keys; params_hash; the `python -m pipelines.config` CLI.

Plus one `ray`-marked test of pipelines.support.ray_env: a real local Ray (2 logical CPUs, dashboard, token auth)
that runs one task and leaves no process behind.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pydantic
import pytest
import yaml

from ctm_core.config import (
    PROTOCOL_NUM_SAMPLES,
    DistillParams,
    Params,
    ParamsError,
    TeacherTrainParams,
    check_batch_split,
    params_hash,
    with_changes,
)
from pipelines.support.params import load_params, resolve_path

ROOT = pathlib.Path(__file__).resolve().parents[2]

PARAMS = ROOT / "params.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No ambient Ray / AWS settings; boto3 must not probe the EC2 metadata service."""
    for k in (
        "RAY_ADDRESS",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
    ):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_default_params_validate():
    p = load_params(PARAMS)
    assert p.data.source == "sklearn-digits" and p.teacher.source == "train"
    assert p.distill.K < p.distill.N and p.distill.batch % (p.ray.num_workers * p.distill.microbatch) == 0
    assert p.repo_root == ROOT
    # every stage section has its own seed where the stage is random
    for section in ("data", "distill", "tune", "evaluate", "likelihood"):
        assert "seed" in p.section(section)
    assert "seed" in p.section("teacher")["train"]


def test_params_yaml_matches_code_defaults():
    """params.yaml is the source of truth; the typed defaults mirror it so a missing key never changes results."""
    assert load_params(PARAMS).model_dump() == Params().model_dump()


def test_yaml_floats_and_overrides(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("distill:\n  lr: 1e-4\n  K: 8\n")  # YAML 1.1 would read 1e-4 as a string
    p = load_params(f, {"distill.N": 10, "evaluate": {"nfe": [1, 3]}})
    assert p.distill.lr == pytest.approx(1e-4) and isinstance(p.distill.lr, float)
    assert (p.distill.N, p.distill.K, p.evaluate.nfe) == (10, 8, [1, 3])
    assert p.repo_root == tmp_path.resolve()
    assert p.ray.num_workers == 2  # missing sections/keys take the defaults


_CLOSED_PORT = _free_port()  # bound then released: nothing listens there

# (dotted override or nested dict, the key the message must start with, a fragment of the message)
BAD_EDITS = [
    ({"distill.K": "17"}, "distill.K", "expected an integer"),  # wrong type: string
    ({"distill.steps": 1.5}, "distill.steps", "expected an integer"),  # wrong type: float
    ({"ray.use_gpu": "yes"}, "ray.use_gpu", "true or false"),  # wrong type (YAML 'yes' is fine, the string is not)
    ({"distill.eval_emas": 0.999}, "distill.eval_emas", "a list"),
    ({"bogus": {"x": 1}}, "bogus", "unknown key"),  # unknown top-level section
    ({"distill.lambda_dsm": 1.0}, "distill.lambda_dsm", "unknown key"),  # unknown nested key
    ({"teacher.train.model.width": 64}, "teacher.train.model.width", "unknown key"),  # unknown, 3 levels deep
    (
        {"tune.space.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3, "log": True}},
        "tune.space.lr.log",
        "unknown key",
    ),
    ({"distill.sigma_min": 80.0}, "distill.sigma_min", "must be < distill.sigma_max (80.0)"),
    ({"distill.sigma_min": 100.0}, "distill.sigma_min", "must be < distill.sigma_max"),
    ({"distill.K": 12}, "distill.K", "must be < distill.N (12), got 12"),
    ({"distill.K": 0}, "distill.K", "must be >= 1"),
    (
        {"distill.batch": 48, "distill.microbatch": 16, "ray.num_workers": 2},
        "distill.batch",
        "divisible by ray.num_workers × distill.microbatch (2 × 16 = 32)",
    ),
    ({"distill.microbatch": 24}, "distill.microbatch", "must divide distill.batch (32)"),
    ({"evaluate.nfe": [1, 0, 4]}, "evaluate.nfe[1]", "must be an integer >= 1, got 0"),
    ({"evaluate.nfe": [1, 2.5]}, "evaluate.nfe[1]", "expected an integer"),
    ({"evaluate.gammas": [0.0, 1.5]}, "evaluate.gammas[1]", "must be in [0, 1], got 1.5"),
    ({"evaluate.gammas": [-0.1]}, "evaluate.gammas[0]", "must be in [0, 1]"),
    ({"distill.lr": -1e-4}, "distill.lr", "must be > 0.0"),
    ({"teacher.train.lr": 0.0}, "teacher.train.lr", "must be > 0.0"),
    ({"distill.distance": "lpipz"}, "distill.distance", "expected one of 'l2', 'pseudo_huber' or 'lpips'"),
    ({"distill.mode": "ctm2"}, "distill.mode", "expected one of"),
    ({"data.source": "imagefolder"}, "data.path", "required for data.source 'imagefolder'"),
    (
        {"data.source": "cifar10-python", "data.path": "https://example.com/cifar-10-python.tar.gz"},
        "data.sha256",
        "required to download data.path",
    ),
    ({"teacher.source": "https://example.com/edm.pkl"}, "teacher.sha256", "required when teacher.source"),
    ({"teacher.source": "file:///tmp/edm.pkl"}, "teacher.sha256", "sha256: record"),
    (
        {"teacher.source": "edm-cifar10-64x64-uncond-vp", "teacher.sha256": "record"},
        "teacher.source",
        "unknown release name",
    ),
    ({"teacher.source": "/data/edm.pkl", "teacher.sha256": "record"}, "teacher.source", "must be file:// URIs"),
    ({"teacher.source": "ftp://host/edm.pkl", "teacher.sha256": "record"}, "teacher.source", "expected 'train'"),
    (
        {"teacher.source": "edm-cifar10-32x32-uncond-vp", "teacher.sha256": "abc123"},
        "teacher.sha256",
        "64 hex digits or 'record'",
    ),
    (
        {"tune.enabled": True, "tune.space.K": {"type": "choice", "values": [8, 18]}},
        "tune.space.K",
        "value 18 makes distill.K",
    ),
    ({"tune.space.lr": {"type": "loguniform", "low": 0.0, "high": 1e-3}}, "tune.space.lr.low", "low > 0"),
    ({"tune.space.nope": {"type": "uniform", "low": 0.0, "high": 1.0}}, "tune.space.nope", "not a distill key"),
    ({"tune.scheduler.grace_period": 5}, "tune.scheduler.grace_period", "must be <= tune.scheduler.max_t (4)"),
    ({"tune.report_every": 300}, "tune.report_every", "must be <= tune.steps (200)"),
    ({"tune.scheduler.max_t": 5}, "tune.scheduler.max_t", "must be <= tune.steps // tune.report_every (4 reports"),
    ({"ray.address": "http://127.0.0.1:8265"}, "ray.address", "job-submission URL"),
    ({"evaluate.teacher_nfe": 36}, "evaluate.teacher_nfe", "must be odd"),
    ({"evaluate.ema": 0.5}, "evaluate.ema", "must be one of distill.eval_emas"),
    ({"ray.num_cpus": 2}, "ray.num_cpus", "must be > ray.num_workers × ray.cpus_per_worker (2)"),
    ({"ray.submit": True}, "ray.submit", "needs a cluster"),
    ({"ray.address": f"127.0.0.1:{_CLOSED_PORT}"}, "ray.address", "cannot reach"),
    ({"ray.address": f"ray://127.0.0.1:{_CLOSED_PORT}"}, "ray.address", "cannot reach"),
    ({"ray.storage_path": "s3://bucket/ray"}, "ray.storage_path", "needs S3 credentials"),
    ({"teacher.source": "s3://bucket/edm.pkl", "teacher.sha256": "record"}, "teacher.source", "S3 credentials"),
    ({"mlflow.experiment_name": ""}, "mlflow.experiment_name", "must be a non-empty string"),
    ({"distill.eval_emas": []}, "distill.eval_emas", "must have at least 1 item"),
]


@pytest.mark.parametrize("edit,key,fragment", BAD_EDITS, ids=[f"{i:02d}-{e[1]}" for i, e in enumerate(BAD_EDITS)])
def test_bad_edit_rejected_naming_the_key(edit, key, fragment):
    with pytest.raises(ParamsError) as info:
        load_params(PARAMS, edit)
    msg = str(info.value)
    assert info.value.key == key, msg
    assert msg.startswith(f"{key}: ") and "\n" not in msg, msg
    assert fragment in msg, msg


def test_bad_edits_table_is_large_enough():
    assert len(BAD_EDITS) >= 20


def test_use_gpu_without_gpu_rejected():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(ParamsError, match=r"^ray\.use_gpu: true but no CUDA GPU is visible"):
        load_params(PARAMS, {"ray.use_gpu": True})


def test_env_checks_pass_when_satisfied(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    p = load_params(PARAMS, {"ray.storage_path": "s3://bucket/ray"})
    assert resolve_path(p.ray.storage_path, p.repo_root) == "s3://bucket/ray"
    with socket.socket() as srv:  # a listening port counts as reachable
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert load_params(PARAMS, {"ray.address": f"127.0.0.1:{port}"}).ray.address == f"127.0.0.1:{port}"
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_CLOSED_PORT}")  # the env address is probed too
    with pytest.raises(ParamsError, match=r"^RAY_ADDRESS \(env\): cannot reach"):
        load_params(PARAMS)
    assert load_params(PARAMS, check_env=False).ray.address is None


def test_with_changes_validates_tune_values():
    """A Tune trial is the distill section with the trial's values, validated like params.yaml."""
    d = DistillParams()
    assert with_changes(d, {"lr": 5e-4, "K": 4}) == d.model_copy(update={"lr": 5e-4, "K": 4})
    assert with_changes(d, {"gan.weight": 0.5}).gan.weight == 0.5
    assert d.K == DistillParams().K and d.lr == DistillParams().lr  # frozen: the original is untouched
    with pytest.raises(ParamsError, match=r"^distill\.K: must be < distill\.N"):
        with_changes(d, {"K": 40})
    with pytest.raises(ParamsError, match=r"^distill\.K: expected an integer"):
        with_changes(d, {"K": "6"})
    with pytest.raises(ParamsError, match=r"^distill\.gan\.bogus: unknown key"):
        with_changes(d, {"gan.bogus": 1})
    with pytest.raises(ParamsError, match=r"^distill\.batch: must be divisible"):
        check_batch_split(with_changes(d, {"batch": 64, "microbatch": 64}), 2)
    # A section built directly is checked the same way (the trainer never sees an invalid one).
    with pytest.raises(ValueError, match=r"distill\.K: must be < distill\.N"):
        DistillParams(N=10, K=12)
    with pytest.raises(ValueError, match=r"teacher\.train\.microbatch: must divide"):
        TeacherTrainParams(batch=64, microbatch=24)


def test_params_hash_stable():
    a = {"lr": 4e-4, "K": 17, "gan": {"enabled": False, "weight": 1.0}, "eval_emas": [0.999, 0.9999]}
    b = {"eval_emas": [0.999, 0.9999], "gan": {"weight": 1.0, "enabled": False}, "K": 17, "lr": 4e-4}
    assert params_hash(a) == params_hash(b)
    canonical = '{"K":17,"eval_emas":[0.999,0.9999],"gan":{"enabled":false,"weight":1.0},"lr":0.0004}'
    assert params_hash(a) == hashlib.sha256(canonical.encode()).hexdigest()
    assert params_hash({**a, "K": 16}) != params_hash(a)
    assert params_hash({**a, "eval_emas": [0.9999, 0.999]}) != params_hash(a)  # list order matters
    p = load_params(PARAMS)
    assert params_hash(p.distill) == params_hash(p.section("distill")) == params_hash(load_params(PARAMS).distill)


def test_cli_exit_codes(tmp_path):
    cfg = yaml.safe_load(PARAMS.read_text())
    cfg["distill"]["K"] = 18
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "pipelines.config", *a], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    ok = run("--check", "--params", str(PARAMS))
    assert ok.returncode == 0 and ok.stdout.strip() == "OK", ok.stderr
    err = run("--check", "--params", str(bad))
    assert err.returncode == 2
    lines = [ln for ln in err.stderr.splitlines() if ln.strip()]
    assert lines == [
        "params error: distill.K: must be < distill.N (12), got 18 (fix: set distill.K <= 11 or raise distill.N)"
    ], err.stderr


def test_cli_set_and_show(capsys):
    from pipelines.config import _main

    assert _main(["--params", str(PARAMS), "--show", "distill", "--set", "distill.K=8", "--no-env"]) == 0
    out = capsys.readouterr().out
    assert '"K": 8' in out and '"params_hash"' in out
    assert _main(["--params", str(PARAMS), "--check", "--set", "distill.lr=-1"]) == 2
    assert capsys.readouterr().err.startswith("params error: distill.lr: must be > 0.0")


@pytest.mark.ray
def test_local_ray_starts_runs_and_cleans_up(tmp_path):
    import psutil

    from pipelines.support import ray_env

    port = _free_port()
    temp_dir = f"/tmp/rt_{os.getpid()}"
    p = load_params(
        PARAMS,
        {
            "ray.num_cpus": 2,
            "ray.num_workers": 1,
            "ray.dashboard_port": port,
            "ray.temp_dir": temp_dir,
            "distill.microbatch": 32,
        },
    )
    auth_before = os.environ.get("RAY_AUTH_MODE")
    # Children from earlier tests in this session (e.g. multiprocessing's resource tracker, which lives as long as
    # this process once any test used the spawn start method) are not Ray's: only new ones must go.
    before = {q.pid for q in psutil.Process().children(recursive=True)}
    t0 = time.monotonic()
    try:
        info = ray_env.connect_or_start(p)
        import ray

        assert ray.cluster_resources()["CPU"] == 2.0
        assert ray.get(ray.remote(lambda x: x * 2).remote(21)) == 42
        assert info["dashboard_url"] == f"127.0.0.1:{port}"
        url = f"http://127.0.0.1:{port}/api/version"
        if info["auth_mode"] == "token":  # our default: the dashboard refuses requests without the cluster token
            with pytest.raises(urllib.error.HTTPError, match="401"):
                urllib.request.urlopen(url, timeout=10)
            token = open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        else:
            req = urllib.request.Request(url)
        assert urllib.request.urlopen(req, timeout=10).status == 200
        children = [q for q in psutil.Process().children(recursive=True) if q.pid not in before]
        assert children, "ray.init started no processes?"
    finally:
        ray_env.shutdown()
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"left running: {[(q.pid, q.name()) for q in alive]}"
    assert os.environ.get("RAY_AUTH_MODE") == auth_before  # env restored
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert time.monotonic() - t0 < 60


def test_dvc_yaml_schema_and_params_keys():
    """dvc.yaml passes DVC's own schema; every `params:` key exists in params.yaml; the stage order and contracts."""
    schema = pytest.importorskip("dvc.schema")
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    schema.COMPILED_MULTI_STAGE_SCHEMA(dvc)
    stages = dvc["stages"]
    assert list(stages) == ["prepare", "teacher", "tune", "distill", "evaluate", "likelihood", "register"]
    raw = yaml.safe_load(PARAMS.read_text())
    for name, st in stages.items():
        assert st["cmd"].startswith(f"python -m pipelines.{name} --params params.yaml"), name
        assert f"pipelines/{name}.py" in st["deps"], name
        assert st["params"], name
        for key in st["params"]:
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params key {key!r} not in params.yaml"
                node = node[part]
        for out in st["outs"]:  # every out a later stage reads is declared as its dep
            path = out if isinstance(out, str) else next(iter(out))
            assert any(path in s["deps"] for s in stages.values()) or name in ("evaluate", "likelihood", "register"), (
                path
            )
    reg_out = stages["register"]["outs"][0]["artifacts/registry.json"]
    assert reg_out["persist"] is True and reg_out["cache"] is False  # no run-cache for the registry side effect
    assert dvc["metrics"] == ["artifacts/eval/metrics.json", "artifacts/likelihood/metrics.json"]
    assert "artifacts/likelihood" not in stages["register"]["deps"]  # bits/dim never gates a promotion
    assert "likelihood" in stages["likelihood"]["params"] and "likelihood" not in stages["evaluate"]["params"]
    # plots are images (rendered offline by `dvc plots show`) that follow any evaluate.gammas: no per-gamma files
    assert dvc["plots"] == ["artifacts/eval/fd_vs_nfe.png", "artifacts/eval/grids"]


def _sections(model) -> list[tuple[str, type]]:
    """(dotted path, section class) of `model` and every section below it."""
    out = [("", model)]
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
            out += [(f"{name}.{p}".rstrip("."), m) for p, m in _sections(ann)]
    return out


def test_params_yaml_keys_are_the_schema_fields():
    """Every params.yaml key is a field and every field is in params.yaml, section by section (one to one)."""
    raw = yaml.safe_load(PARAMS.read_text())
    dumped = load_params(PARAMS, check_env=False).model_dump()

    def walk(a, b, path):
        assert isinstance(a, dict) and isinstance(b, dict), path
        assert set(a) == set(b), f"{path or 'top level'}: only in params.yaml {set(a) - set(b)}, only in the schema "
        f"{set(b) - set(a)}"
        for k in a:
            if isinstance(a[k], dict) and k != "space":  # tune.space: a mapping of search dimensions
                walk(a[k], b[k], f"{path}.{k}".lstrip("."))

    walk(raw, dumped, "")
    assert set(raw["tune"]["space"]) == set(dumped["tune"]["space"])


def test_every_field_has_a_docstring():
    """The schema documents each key once, next to its only default (pydantic attribute docstrings)."""
    missing = [
        f"{path}.{name}".lstrip(".")
        for path, model in _sections(Params)
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert not missing, missing
    for model in (DistillParams, TeacherTrainParams):  # the trainers' sections, named explicitly
        assert all(f.description for f in model.model_fields.values())


def test_trainer_knobs_default_to_what_the_pipeline_ran():
    """Knobs the trainer had beyond params.yaml keep the values the stages used: distill RAdam, no warm-up, no
    clipping, fp32; the teacher Adam with params' warm-up, the whole batch per microbatch."""
    d, t = DistillParams(), TeacherTrainParams()
    assert (d.optimizer, d.lr_warmup_steps, d.grad_clip_norm, d.precision, d.channels_last, d.compile) == (
        "radam",
        0,
        0.0,
        "fp32",
        False,
        False,
    )
    assert (d.ctm_weight, d.P_mean, d.P_std, d.diffusion_mult) == (1.0, -1.2, 1.2, 0.7)
    assert (t.optimizer, t.lr_warmup_steps, t.microbatch, t.precision, t.checkpoint_every) == (
        "adam",
        100,
        None,
        "fp32",
        0,
    )


def test_evaluate_num_samples_follows_the_protocol():
    """`evaluate.num_samples: null` (the default params.yaml) = 1,000 for the digits classifier's FD and 50,000 for
    the Inception FID (EDM fid.py); an explicit value always wins."""
    assert yaml.safe_load(PARAMS.read_text())["evaluate"]["num_samples"] is None
    assert load_params(PARAMS, check_env=False).evaluate.num_samples == PROTOCOL_NUM_SAMPLES["classifier"] == 1000
    inception = load_params(PARAMS, {"evaluate": {"features": "inception"}}, check_env=False)
    assert inception.evaluate.num_samples == PROTOCOL_NUM_SAMPLES["inception"] == 50_000
    assert inception.section("evaluate")["num_samples"] == 50_000  # the stage's params hash sees the real value
    explicit = load_params(PARAMS, {"evaluate": {"features": "inception", "num_samples": 10_000}}, check_env=False)
    assert explicit.evaluate.num_samples == 10_000
