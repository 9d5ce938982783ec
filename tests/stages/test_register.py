"""pipelines.register + pipelines.support.{registry,pyfunc_model} against a real MLflow SQLite store (pre-migrated
once per session).

The champion/challenger logic is checked end to end through the registry (aliases, version tags, registry.json),
the sampler against `gamma_sampler` with per-image seeds, and the registered model in a separate process through
`mlflow.pyfunc.load_model("models:/<name>@champion")`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from ctm_core.diffusion.samplers import StackedRandomGenerator, gamma_sampler  # noqa: E402
from ctm_core.io.student_format import load_student, save_student  # noqa: E402
from ctm_core.nets.student import CTMStudent  # noqa: E402
from pipelines.register import main, run  # noqa: E402
from pipelines.support.gate import Evidence, decide, metric_noise, read_eval, read_protocol  # noqa: E402
from pipelines.support.params import load_params  # noqa: E402
from pipelines.support.pyfunc_model import CTMSampler, to_uint8  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"
NAME = "ctm-test"


def _make_student(folder: Path, seed: int, run_id: str | None = None, resolution: int = 8, channels: int = 1) -> Path:
    """A tiny CTM student (8x8x1 by default; online + ema_0.999 weights that differ) written with save_student."""
    torch.manual_seed(seed)
    s = CTMStudent(
        img_resolution=resolution,
        img_channels=channels,
        model_type="SongUNet",
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    )
    online = {k: v.clone() for k, v in s.state_dict().items()}
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in online.items()}
    save_student(
        folder,
        s.init_kwargs,
        {"online": online, "ema_0.999": ema},
        meta={"rho": 7.0, "teacher_weights_sha256": f"teacher{seed}", "data_hash": "data-md5"},
    )
    if run_id is not None:
        (folder / "run.json").write_text(json.dumps({"mlflow_run_id": run_id}))
    return folder


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An empty mlflow.db with all alembic migrations applied (~4 s, paid once)."""
    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(scope="session")
def students(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("students")
    return {k: _make_student(root / k, seed) for k, seed in (("a", 1), ("b", 2), ("c", 3))}


@pytest.fixture
def repo(tmp_path, migrated_db, monkeypatch) -> Path:
    """A repo root with a copy of the migrated DB; MLFLOW_TRACKING_URI points at it, cwd elsewhere."""
    for k in ("DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(k, raising=False)
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(migrated_db, root / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(root))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    yield root
    mlflow.set_tracking_uri(None)


@pytest.fixture
def params():
    # evaluate.ema pinned: these tests are about picking the evaluated EMA variant (ema_0.999) for the model.
    return load_params(PARAMS, {"register": {"model_name": NAME}, "evaluate": {"ema": 0.999}}, check_env=False)


def _eval(folder: Path, protocol: str = "digits-fd-1000", **metrics) -> Path:
    """An evaluation folder as the evaluate stage writes it: metrics.json + protocol.json (its fingerprint)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "protocol.json").write_text(json.dumps({"features": "classifier", "name": protocol}))
    return folder


def _register(params, student, eval_dir, root):
    out = root / "registry.json"
    rec = run(params, student, eval_dir, out, repo_root=root)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rec))  # the record on disk is the returned one
    return rec


# --- pure decision rule (pipelines.support.gate) ----------------------------------------------------------------------
P = "proto-a"  # one protocol fingerprint


@pytest.mark.parametrize(
    "value, noise, champ, champ_noise, mode, expected",
    [
        (9.0, 0.3, 10.0, 0.3, "min", "champion"),  # 1.0 better > 2·sqrt(0.09+0.09) = 0.85
        (9.3, 0.3, 10.0, 0.3, "min", "challenger"),  # 0.7 better: inside 2σ of the difference
        (9.0, 0.6, 10.0, 0.6, "min", "challenger"),  # the same 1.0 with twice the noise: not significant
        (10.5, 0.1, 10.0, 0.1, "min", "challenger"),  # worse
        (11.0, 0.3, 10.0, 0.3, "max", "champion"),
        (-1.5, 0.1, -1.0, 0.1, "max", "challenger"),  # max mode with a negative metric: -1.5 is worse
        (-0.5, 0.1, -1.0, 0.1, "max", "champion"),
        (9.0, 0.3, 10.0, None, "min", "champion"),  # champion without a σ: assumed equal to the challenger's
        (9.0, None, 10.0, None, "min", "challenger"),  # no measured noise at all: never promote
        (0.0, 0.0, 0.0, 0.0, "min", "challenger"),  # equal: no promotion even with zero noise
    ],
)
def test_gate_needs_improvement_beyond_measured_noise(value, noise, champ, champ_noise, mode, expected):
    d = decide(Evidence(value, noise, P), "ok", Evidence(champ, champ_noise, P), mode=mode, noise_z=2.0)
    assert d.decision == expected, d.reason
    if d.noise is not None:
        sig = noise if noise is not None else champ_noise
        sig_c = champ_noise if champ_noise is not None else noise
        assert math.isclose(d.noise, math.sqrt(sig**2 + sig_c**2))
        assert math.isclose(d.threshold, 2.0 * d.noise)


def test_gate_min_improvement_and_z():
    better = Evidence(9.0, 0.1, P)
    champ = Evidence(10.0, 0.1, P)
    assert decide(better, "ok", champ, noise_z=2.0).decision == "champion"
    assert decide(better, "ok", champ, noise_z=10.0).decision == "challenger"  # 1.0 < 10·0.14
    assert decide(better, "ok", champ, noise_z=0.0, min_improvement=0.2).decision == "challenger"  # 10 % < 20 %
    with pytest.raises(ValueError, match="mode"):
        decide(better, "ok", champ, mode="lower")


def test_gate_never_compares_protocols_or_promotes_failed_eval():
    champ = Evidence(10.0, 0.1, P)
    d = decide(Evidence(1.0, 0.1, "proto-b"), "ok", champ)  # 10x better, but another protocol
    assert d.decision == "challenger" and "not comparable" in d.reason
    assert decide(Evidence(1.0, 0.1, None), "ok", champ).decision == "challenger"
    assert decide(Evidence(1.0, 0.1, P), "failed: x", champ).decision == "rejected"
    assert decide(Evidence(None, 0.1, P), "ok", None).decision == "rejected"
    assert decide(Evidence(float("nan"), 0.1, P), "ok", None).decision == "rejected"
    assert decide(Evidence(5.0, None, P), "ok", None).decision == "champion"  # the first valid version


@pytest.mark.parametrize(
    "metrics, expected",
    [
        ({"fd_nfe1": 5.0, "fd_nfe1_std": 0.4, "fd_nfe1_ci_low": 4.0, "fd_nfe1_ci_high": 6.0}, 0.4),  # std first
        ({"fd_nfe1": 5.0, "fd_nfe1_ci_low": 4.0, "fd_nfe1_ci_high": 6.0}, 1.0 / 1.959963984540054),
        ({"fd_nfe1": 5.0}, None),
        ({"fd_nfe1": 5.0, "fd_nfe1_std": float("nan")}, None),
    ],
)
def test_metric_noise_from_the_evaluations_error_bars(metrics, expected):
    got = metric_noise(metrics, "fd_nfe1")
    assert (got is None) if expected is None else math.isclose(got, expected)


def test_read_protocol_fingerprint(tmp_path):
    assert read_protocol(tmp_path) == (None, None)
    (tmp_path / "protocol.json").write_text(json.dumps({"features": "inception", "num_samples": 50000}))
    _, sha1 = read_protocol(tmp_path)
    (tmp_path / "protocol.json").write_text(json.dumps({"num_samples": 50000, "features": "inception"}))
    assert read_protocol(tmp_path)[1] == sha1  # canonical JSON: key order does not matter
    (tmp_path / "protocol.json").write_text(json.dumps({"features": "inception", "num_samples": 10000}))
    assert read_protocol(tmp_path)[1] != sha1
    (tmp_path / "protocol.json").write_text(json.dumps({"protocol_sha256": "abc"}))
    assert read_protocol(tmp_path)[1] == "abc"
    (tmp_path / "protocol.json").write_text("[1]")
    with pytest.raises(ValueError, match="expected an object"):
        read_protocol(tmp_path)


@pytest.mark.parametrize(
    "content, status_part",
    [
        (None, "not found"),
        ({"fd_nfe1": float("nan"), "complete": True}, "not a finite number"),
        ({"fd_nfe1": 1.0, "complete": False}, "complete: false"),
        ({"fd_nfe2": 1.0}, "no key 'fd_nfe1'"),
        ({"fd_nfe1": "1.0"}, "not a finite number"),
    ],
)
def test_read_eval_flags_failed_evaluations(tmp_path, content, status_part):
    if content is not None:
        (tmp_path / "metrics.json").write_text(json.dumps(content))
    _, value, status = read_eval(tmp_path, "fd_nfe1")
    assert status.startswith("failed") and status_part in status and value is None


# --- the sampler without MLflow ------------------------------------------------------------------------------------
def test_sampler_matches_gamma_sampler_with_per_image_seeds(students):
    model = CTMSampler(variant="ema_0.999")
    model.load_context(SimpleNamespace(artifacts={"student": str(students["a"])}))
    imgs = model.predict(None, {"num_samples": 3, "nfe": 2, "gamma": 0.5, "seed": 10})
    assert imgs.shape == (3, 8, 8, 1) and imgs.dtype == np.uint8
    # Reference: the same student, latents and noise from per-image generators seeded 10, 11, 12.
    st = load_student(students["a"], "ema_0.999")
    rnd = StackedRandomGenerator("cpu", [10, 11, 12])
    x = gamma_sampler(
        st,
        rnd.randn([3, 1, 8, 8]),
        nfe=2,
        gamma=0.5,
        sigma_min=st.sigma_min,
        sigma_max=st.sigma_max,
        randn_like=rnd.randn_like,
    )
    np.testing.assert_array_equal(imgs, to_uint8(x))
    # Image i depends only on seed + i: a request for seed 12 alone gives the third image.
    alone = model.predict(None, {"num_samples": 1, "nfe": 2, "gamma": 0.5, "seed": 12})
    np.testing.assert_array_equal(alone[0], imgs[2])
    # The variant matters (ema weights differ from online ones).
    online = CTMSampler(variant="online")
    online.load_context(SimpleNamespace(artifacts={"student": str(students["a"])}))
    assert not np.array_equal(online.predict(None, {"num_samples": 3, "nfe": 2, "gamma": 0.5, "seed": 10}), imgs)


def test_to_uint8_is_edm_mapping():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0]).reshape(1, 1, 1, 5)
    np.testing.assert_array_equal(to_uint8(x)[0, 0, :, 0], [0, 0, 128, 255, 255])


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"num_samples": 0, "nfe": 1, "gamma": 0.0, "seed": 0}, "num_samples"),
        ({"num_samples": 1, "nfe": 0, "gamma": 0.0, "seed": 0}, "nfe"),
        ({"num_samples": 1, "nfe": 1, "gamma": 1.5, "seed": 0}, "gamma"),
        ({"num_samples": 1, "nfe": 1, "gamma": 0.0, "seed": 0, "class_labels": [3]}, "unconditional"),
    ],
)
def test_sampler_rejects_bad_requests(students, request_, message):
    model = CTMSampler()
    model.load_context(SimpleNamespace(artifacts={"student": str(students["a"])}))
    with pytest.raises(ValueError, match=message):
        model.predict(None, request_)


# --- registry: promotion rules --------------------------------------------------------------------------------------
def test_champion_moves_only_beyond_measured_noise(repo, params, students, tmp_path):
    client = MlflowClient()
    r1 = _register(
        params, students["a"], _eval(tmp_path / "e1", fd_nfe1=10.0, fd_nfe1_std=0.1, fd_nfe2=8.0, complete=True), repo
    )
    assert r1["decision"] == "champion" and r1["aliases"] == ["champion"] and r1["version"] == "1"
    mv1 = client.get_model_version(NAME, "1")
    # a few headline tags: the gate's metric and its error bar, not every number of the evaluation
    assert mv1.tags["metric.fd_nfe1"] == "10.0" and mv1.tags["metric.fd_nfe1_std"] == "0.1"
    assert "metric.fd_nfe2" not in mv1.tags and mv1.tags["image.shape"] == "8x8x1"
    assert mv1.tags["teacher.hash"] == "teacher1" and mv1.tags["data.hash"] == "data-md5"
    assert mv1.tags["params.hash"] == r1["params_hash"] and "git.commit" in mv1.tags
    assert mv1.tags["student.variant"] == "ema_0.999"  # evaluate.ema of the params

    assert mv1.tags["eval.protocol_sha256"] == r1["protocol_sha256"] and len(r1["protocol_sha256"]) == 64

    # 0.5 better with σ 0.1 on both sides: 0.5 > 2·0.141 -> @champion moves to version 2.
    r2 = _register(params, students["b"], _eval(tmp_path / "e2", fd_nfe1=9.5, fd_nfe1_std=0.1), repo)
    assert r2["decision"] == "champion" and r2["version"] == "2", r2["reason"]
    assert r2["champion_before"]["version"] == "1" and r2["champion_before"]["value"] == 10.0
    assert math.isclose(r2["relative_improvement"], 0.05)
    assert math.isclose(r2["gate"]["noise"], math.sqrt(2) * 0.1) and math.isclose(r2["gate"]["improvement"], 0.5)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"

    # 0.2 better, but within 2σ of the measured noise -> @challenger + tag, champion unchanged.
    r3 = _register(params, students["c"], _eval(tmp_path / "e3", fd_nfe1=9.3, fd_nfe1_std=0.1), repo)
    assert r3["decision"] == "challenger" and r3["aliases"] == ["challenger"], r3["reason"]
    assert "within the noise" in r3["reason"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "3"
    assert client.get_model_version(NAME, "3").tags["challenger"] == "true"

    # Same student again (a repeated `dvc repro`): the version is reused, nothing new is logged.
    r3b = _register(params, students["c"], tmp_path / "e3", repo)
    assert r3b["version"] == "3" and r3b["reused_version"] and r3b["decision"] == "challenger"
    steps = [m.step for m in client.get_metric_history(r3b["run_id"], "register/value")]
    assert r3b["run_id"] == r1["run_id"]  # same params: one register run, resumed by every registration
    assert sorted(steps) == [0, 1, 2, 3]  # its n-th decision at step n: never two values of a metric at one step
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 3


def test_one_name_holds_one_image_shape(repo, params, students, tmp_path):
    """A student of other data (another H×W×C) under the same register.model_name is refused in one line, before
    anything is logged; under its own name it registers."""
    from pipelines.support.registry import RegisterError

    _register(params, students["a"], _eval(tmp_path / "e1", fd_nfe1=10.0, fd_nfe1_std=0.1), repo)
    rgb = _make_student(tmp_path / "rgb", seed=4, resolution=4, channels=3)
    with pytest.raises(RegisterError) as e:
        run(params, rgb, _eval(tmp_path / "e2", fd_nfe1=9.0, fd_nfe1_std=0.1), repo / "r.json", repo_root=repo)
    assert str(e.value).startswith(f"register.model_name: '{NAME}' holds 8x8x1 models (version 1), got a 4x4x3 student")
    assert "\n" not in str(e.value) and len(MlflowClient().search_model_versions(f"name = '{NAME}'")) == 1
    own = load_params(PARAMS, {"register": {"model_name": "ctm-rgb"}}, check_env=False)
    assert _register(own, rgb, tmp_path / "e2", repo)["decision"] == "champion"


def test_failed_evaluation_never_promotes(repo, params, students, tmp_path, capsys):
    client = MlflowClient()
    _register(params, students["a"], _eval(tmp_path / "ok", fd_nfe1=10.0), repo)
    params_file = tmp_path / "params.yaml"
    text = PARAMS.read_text().replace("model_name: ctm-digits", f"model_name: {NAME}")
    assert f"model_name: {NAME}" in text
    params_file.write_text(text)
    failures = {
        "missing": None,
        "nan": {"fd_nfe1": float("nan")},
        "partial": {"fd_nfe1": 0.5, "complete": False},  # looks far better, but the evaluation is partial
        "no_key": {"fd_nfe4": 0.5},
        "no_protocol": {"fd_nfe1": 0.5, "fd_nfe1_std": 0.01, "complete": True},  # no protocol.json: not comparable
    }
    for name, content in failures.items():
        ev = tmp_path / f"eval_{name}"
        if content is not None and name != "no_protocol":
            _eval(ev, **content)
        else:
            ev.mkdir()
        if content is not None:
            ev.joinpath("metrics.json").write_text(json.dumps(content))
        out = tmp_path / f"registry_{name}.json"
        rc = main(["--params", str(params_file), "--student", str(students["b"]), "--eval", str(ev), "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1, name
        assert "rejected" in err[-1], err
        rec = json.loads(out.read_text())
        assert rec["decision"] == "rejected" and rec["aliases"] == [] and rec["eval_status"].startswith("failed")
        assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1", name
        mv = client.get_model_version(NAME, rec["version"])
        assert mv.tags["ctm.eval_status"] == "failed" and mv.tags["ctm.decision"] == "rejected"
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(NAME, "challenger")


def test_other_protocol_never_replaces_champion(repo, params, students, tmp_path):
    client = MlflowClient()
    _register(params, students["a"], _eval(tmp_path / "e1", fd_nfe1=10.0, fd_nfe1_std=0.1), repo)
    # Far better, but measured with another protocol (e.g. 10k instead of 50k samples): not comparable.
    rec = _register(params, students["b"], _eval(tmp_path / "e2", protocol="other", fd_nfe1=2.0, fd_nfe1_std=0.1), repo)
    assert rec["decision"] == "challenger" and "not comparable" in rec["reason"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"


def test_logs_into_distill_run_named_by_run_json(repo, params, students, tmp_path):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    exp = mlflow.set_experiment("distill-exp")
    with mlflow.start_run(experiment_id=exp.experiment_id) as r:
        distill_run_id = r.info.run_id
    student = tmp_path / "student"
    shutil.copytree(students["a"], student)
    (student / "run.json").write_text(json.dumps({"mlflow_run_id": distill_run_id}))
    rec = _register(params, student, _eval(tmp_path / "e", fd_nfe1=3.0), repo)
    assert rec["run_id"] == distill_run_id
    mv = MlflowClient().get_model_version(NAME, rec["version"])
    assert mv.run_id == distill_run_id
    assert MlflowClient().get_run(distill_run_id).data.tags["ctm.register.decision"] == "champion"


# --- the registered model in a fresh process ------------------------------------------------------------------------
_LOADER = r"""
import json, sys
import mlflow, numpy as np, pandas as pd
m = mlflow.pyfunc.load_model(sys.argv[1])
out = {}
for nfe in (1, 2):
    x = m.predict(pd.DataFrame({"num_samples": [3], "nfe": [nfe], "gamma": [0.0], "seed": [7]}))
    np.save(f"{sys.argv[2]}/nfe{nfe}.npy", x)
    out[nfe] = [list(x.shape), str(x.dtype)]
print(json.dumps(out))
"""


def test_champion_loads_in_a_separate_process(repo, params, students, tmp_path):
    rec = _register(params, students["a"], _eval(tmp_path / "e", fd_nfe1=10.0), repo)
    assert rec["decision"] == "champion"
    env = dict(os.environ, PYTHONPATH="")  # the model must bring its own code (code_paths), not the repo's
    res = subprocess.run(
        [sys.executable, "-c", _LOADER, f"models:/{NAME}@champion", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    shapes = json.loads(res.stdout.strip().splitlines()[-1])
    assert shapes == {"1": [[3, 8, 8, 1], "uint8"], "2": [[3, 8, 8, 1], "uint8"]}
    st = load_student(students["a"], "ema_0.999")
    for nfe in (1, 2):
        rnd = StackedRandomGenerator("cpu", [7, 8, 9])
        x = gamma_sampler(
            st, rnd.randn([3, 1, 8, 8]), nfe=nfe, gamma=0.0, sigma_min=st.sigma_min, sigma_max=st.sigma_max
        )
        np.testing.assert_array_equal(np.load(tmp_path / f"nfe{nfe}.npy"), to_uint8(x))
