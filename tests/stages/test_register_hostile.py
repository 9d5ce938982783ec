"""The registered model and the student folder against crafted inputs: nothing in the model's artifact folder runs
unchecked, weights paths stay inside the student folder, and the tracking URI's secrets are never recorded.

Each case builds the hostile input (an edited `python_model.pkl`, an edited code file, a weights path out of the
folder, weights swapped together with their config), shows with a canary file what a plain implementation does with
it where that is safe to show, and checks that ours refuses in one line and runs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from ctm_core.errors import InputError  # noqa: E402
from ctm_core.io.student_format import load_student, read_student_config, save_student  # noqa: E402
from ctm_core.nets.student import CTMStudent  # noqa: E402
from ctm_core.redact import redact_uri  # noqa: E402
from pipelines.register import main, run  # noqa: E402
from pipelines.support.params import load_params  # noqa: E402
from pipelines.support.pyfunc_model import CTMSampler, folder_digests  # noqa: E402
from pipelines.support.registry import (  # noqa: E402
    ENTRY_FILE,
    MANIFEST_FILE,
    MANIFEST_TAG,
    RegisterError,
    verify_registered_model,
)

ROOT = Path(__file__).resolve().parents[2]
NAME = "ctm-hostile"
SECRET = "s3cret-token"
WEIGHTS = "weights/ema_0.999.safetensors"


def _student(folder: Path, seed: int) -> Path:
    """A tiny 8x8x1 CTM student (online + ema_0.999) written with save_student."""
    torch.manual_seed(seed)
    s = CTMStudent(
        img_resolution=8,
        img_channels=1,
        model_type="SongUNet",
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    )
    sd = {k: v.clone() for k, v in s.state_dict().items()}
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}
    save_student(folder, s.init_kwargs, {"online": sd, "ema_0.999": ema}, meta={"rho": 7.0})
    return folder


class _Canary:
    """Unpickling this writes `path` (and nothing else): proof that a loader ran code from the bytes it read."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.path), "ran"))


class _PlainModel(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and len(msg.splitlines()) == 1, msg
    return msg


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """One version registered by the register stage into a SQLite store whose URI carries a secret in its query;
    the model's store folder, and the warnings MLflow logged while registering."""
    root = tmp_path_factory.mktemp("repo")
    db = root / "mlflow.db"
    uri = f"sqlite:///{db}?timeout=30&token={SECRET}"
    student = _student(root / "student", 1)
    ev = root / "eval"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"fd_nfe1": 10.0, "fd_nfe1_std": 0.1, "complete": True}))
    (ev / "protocol.json").write_text(json.dumps({"features": "classifier"}))
    params = load_params(
        ROOT / "params.yaml", {"register": {"model_name": NAME}, "evaluate": {"ema": 0.999}}, check_env=False
    )
    records = _Records()
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.addHandler(records)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k in ("DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
                mp.delenv(k, raising=False)
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            mp.chdir(root)
            rec = run(params, student, ev, root / "registry.json", repo_root=root)
    finally:
        mlflow_logger.removeHandler(records)
        mlflow.set_tracking_uri(None)
    client = MlflowClient(tracking_uri=uri)
    mv = client.get_model_version(NAME, rec["version"])
    model_id = mv.source.removeprefix("models:/")  # the logged model behind the version
    store = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    return SimpleNamespace(
        root=root, uri=uri, rec=rec, mv=mv, store=store, student=student, warnings=records.messages, client=client
    )


@pytest.fixture
def tamper(registered):
    """`tamper(rel, data)` rewrites (data=bytes), adds, or removes (data=None) a file of the registered model in the
    artifact store; everything is restored after the test."""
    saved: dict[Path, bytes | None] = {}

    def apply(rel: str, data: bytes | None) -> None:
        path = registered.store / rel
        saved.setdefault(path, path.read_bytes() if path.exists() else None)
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)

    yield apply
    for path, data in saved.items():
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(data)


# --- item: the model is logged from code and pinned by the registry --------------------------------------------------
def test_logged_from_code_pinned_by_manifest_and_no_cloudpickle_warning(registered, tmp_path):
    mlmodel = (registered.store / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and "model_code_path" in mlmodel
    assert not (registered.store / "python_model.pkl").exists()
    assert not any("CloudPickle" in m for m in registered.warnings), registered.warnings
    manifest = (registered.store / MANIFEST_FILE).read_bytes()
    assert registered.mv.tags[MANIFEST_TAG] == hashlib.sha256(manifest).hexdigest() == registered.rec["manifest_sha256"]
    files = json.loads(manifest)["files"]
    for rel in (
        "MLmodel",
        ENTRY_FILE,
        "code/ctm_core/__init__.py",
        "artifacts/student/config.json",
        "requirements.txt",
    ):
        assert rel in files, rel
    assert f"artifacts/student/{WEIGHTS}" in files
    local = verify_registered_model(f"models:/{NAME}@champion", tmp_path / "m", tracking_uri=registered.uri)
    model = mlflow.pyfunc.load_model(local)
    x = model.predict({"num_samples": 2, "nfe": 1, "gamma": 0.0, "seed": 3})
    assert x.shape == (2, 8, 8, 1)


def test_loading_the_model_leaves_the_repository_packages_importable(registered, tmp_path):
    """Loading the model puts its code/ first on sys.path; the repository's `pipelines` stays importable after it
    (the sampler once shipped as a minimal `pipelines` package, which hid the real one)."""
    local = verify_registered_model(f"models:/{NAME}@champion", tmp_path / "m", tracking_uri=registered.uri)
    script = (
        "import sys, mlflow.pyfunc\n"
        f"m = mlflow.pyfunc.load_model({str(local)!r})\n"
        "import pipelines.support.plots, pipelines.support.gate\n"
        "print(type(m.unwrap_python_model()).__module__, pipelines.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    module, pipelines_file = out.stdout.split()
    assert module == "ctm_pyfunc.pyfunc_model" and Path(pipelines_file) == ROOT / "pipelines" / "__init__.py", (
        out.stdout
    )


def test_plain_mlflow_runs_an_edited_pickle_ours_never_reads_one(registered, tamper, tmp_path):
    canary = tmp_path / "canary"
    payload = pickle.dumps(_Canary(canary), protocol=4)
    # Plain MLflow (a python_model object, cloudpickled): an edited python_model.pkl runs on load.
    plain = tmp_path / "plain"
    records = _Records()
    logging.getLogger("mlflow").addHandler(records)
    try:
        mlflow.pyfunc.save_model(plain, python_model=_PlainModel(), pip_requirements=["mlflow"])
    finally:
        logging.getLogger("mlflow").removeHandler(records)
    assert any("CloudPickle" in m for m in records.messages)  # the warning registering no longer prints
    (plain / "python_model.pkl").write_bytes(payload)
    try:
        mlflow.pyfunc.load_model(str(plain)).predict({"a": [1]})
    except Exception:  # the unpickled "model" is whatever the payload returned; the payload has run by then
        pass
    assert canary.read_text() == "ran"
    canary.unlink()
    # Ours has no pickle; one planted next to the model is never read by its loader ...
    local = tmp_path / "ours"
    shutil.copytree(registered.store, local)
    (local / "python_model.pkl").write_bytes(payload)
    mlflow.pyfunc.load_model(str(local))
    assert not canary.exists()
    # ... and one planted in the store (with MLmodel pointed at it) is refused before anything loads.
    tamper("python_model.pkl", payload)
    mlmodel = (registered.store / "MLmodel").read_text()
    tamper(
        "MLmodel",
        mlmodel.replace("loader_module: mlflow.pyfunc.loaders.code_model", "python_model: python_model.pkl").encode(),
    )
    with pytest.raises(RegisterError) as e:
        verify_registered_model(f"models:/{NAME}/{registered.mv.version}", tmp_path / "v", tracking_uri=registered.uri)
    msg = _one_line(e.value)
    assert "MLmodel" in msg and "python_model.pkl" in msg and "fix:" in msg
    assert not canary.exists()


_LOAD = r"""
import sys, mlflow
for path in sys.argv[1:]:
    try:
        mlflow.pyfunc.load_model(path)
        print("LOADED", path)
    except Exception as e:
        lines = str(e).splitlines()
        print("REFUSED", path, len(lines), lines[0])
"""


def test_edited_code_file_runs_only_when_the_check_is_edited_too_and_the_registry_refuses_both(
    registered, tamper, tmp_path
):
    canary = tmp_path / "canary"
    init_rel = "code/ctm_core/__init__.py"
    evil = f"\nimport pathlib\npathlib.Path({str(canary)!r}).write_text('ran')\n".encode()
    edited_init = (registered.store / init_rel).read_bytes() + evil
    entry = (registered.store / ENTRY_FILE).read_text()
    assert entry.count("\n_check_code(") == 1
    unchecked_entry = entry.replace("\n_check_code(", "\n(").encode()
    only_code, code_and_entry = tmp_path / "only_code", tmp_path / "code_and_entry"
    for folder in (only_code, code_and_entry):
        shutil.copytree(registered.store, folder)
        (folder / init_rel).write_bytes(edited_init)
    (code_and_entry / ENTRY_FILE).write_bytes(unchecked_entry)
    # A fresh process (ctm_core not yet imported), the plain `mlflow.pyfunc.load_model` of each copy, in this order.
    res = subprocess.run(
        [sys.executable, "-c", _LOAD, str(only_code), str(code_and_entry)],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = res.stdout.splitlines()
    assert len(out) == 2, res.stdout + res.stderr[-2000:]
    # Only the code file edited: the entry's check refuses it in one line before code/ctm_core is imported.
    assert out[0].startswith(f"REFUSED {only_code} 1 ") and "code files differ" in out[0] and init_rel[5:] in out[0]
    # The check edited away too: plain MLflow imports the edited file (the canary is written). A check inside the
    # model cannot catch an edit of itself ...
    assert out[1] == f"LOADED {code_and_entry}" and canary.read_text() == "ran"
    canary.unlink()
    # ... the registry side can: the same two edits in the store are refused before anything of the model runs.
    tamper(init_rel, edited_init)
    tamper(ENTRY_FILE, unchecked_entry)
    with pytest.raises(RegisterError) as e:
        verify_registered_model(NAME, tmp_path / "v", tracking_uri=registered.uri)
    msg = _one_line(e.value)
    assert ENTRY_FILE in msg and "ctm_core/__init__.py" in msg and not canary.exists()


def _edited_weights(registered) -> bytes:
    data = bytearray((registered.store / f"artifacts/student/{WEIGHTS}").read_bytes())
    data[-1] ^= 1
    return bytes(data)


@pytest.mark.parametrize(
    "rel, data, named",
    [
        ("MLmodel", lambda r: (r.store / "MLmodel").read_bytes() + b"\n", "changed: MLmodel"),
        ("requirements.txt", lambda r: b"evil-package==1.0\n", "changed: requirements.txt"),
        (f"artifacts/student/{WEIGHTS}", _edited_weights, WEIGHTS),
        ("code/sitecustomize.py", lambda r: b"print('x')\n", "added: code/sitecustomize.py"),
        ("input_example.json", lambda r: None, "missing: input_example.json"),
        (MANIFEST_FILE, lambda r: b'{"files": {}}\n', "does not match"),
    ],
    ids=["mlmodel", "requirements", "weights", "added-code", "removed-file", "manifest"],
)
def test_registry_side_check_names_the_file(registered, tamper, tmp_path, rel, data, named):
    tamper(rel, data(registered))
    with pytest.raises(RegisterError) as e:
        verify_registered_model(f"models:/{NAME}@champion", tmp_path / "v", tracking_uri=registered.uri)
    assert named in _one_line(e.value)


def test_version_without_manifest_tag_is_refused(registered, tmp_path):
    registered.client.delete_model_version_tag(NAME, registered.mv.version, MANIFEST_TAG)
    try:
        with pytest.raises(RegisterError) as e:
            verify_registered_model(NAME, tmp_path / "v", tracking_uri=registered.uri)
    finally:
        registered.client.set_model_version_tag(
            NAME, registered.mv.version, MANIFEST_TAG, registered.rec["manifest_sha256"]
        )
    assert MANIFEST_TAG in _one_line(e.value)
    with pytest.raises(RegisterError, match="expected models:/"):
        verify_registered_model("models:/a/b/c", tracking_uri=registered.uri)


# --- item: weights paths confined to the student folder, digests from outside its config ----------------------------
@pytest.mark.parametrize("how", ["absolute", "dotdot", "legacy-absolute", "symlink"])
def test_weights_path_outside_the_student_folder_is_refused(tmp_path, how):
    folder = _student(tmp_path / "s", 1)
    outside = tmp_path / "outside.safetensors"  # a valid weights file that is not the student's
    _student(tmp_path / "other", 2)
    shutil.copy(tmp_path / "other" / WEIGHTS, outside)
    config = json.loads((folder / "config.json").read_text())
    rel = WEIGHTS if how == "symlink" else "weights/../../outside.safetensors" if how == "dotdot" else str(outside)
    if how == "symlink":
        (folder / WEIGHTS).unlink()
        (folder / WEIGHTS).symlink_to(outside)
    else:
        config["variants"]["ema_0.999"]["file"] = rel
        if how == "legacy-absolute":  # a config from before the artifact format: no `kind`, no `files` record
            del config["kind"], config["files"]
        (folder / "config.json").write_text(json.dumps(config))
    # A plain `folder / file` join opens the file outside the folder.
    assert (folder / rel).resolve() == outside.resolve()
    for load in (lambda: load_student(folder, "ema_0.999"), lambda: read_student_config(folder)):
        with pytest.raises(InputError) as e:
            load()
        msg = _one_line(e.value)
        assert "expected a relative" in msg and "inside" in msg


def test_weights_swapped_with_a_matching_config_are_refused(tmp_path):
    folder = _student(tmp_path / "s", 1)
    pinned = folder_digests(folder)  # what the registered model records (model_config + registry manifest)
    other = _student(tmp_path / "other", 2)
    for rel in ("config.json", WEIGHTS):  # weights and the config that vouches for them, replaced together
        shutil.copy(other / rel, folder / rel)
    # The config's own digest accepts the swap: it is the same editable file that names the weights.
    load_student(folder, "ema_0.999")
    with pytest.raises(InputError) as e:
        load_student(folder, "ema_0.999", sha256=pinned[WEIGHTS])
    assert "differs from the expected" in _one_line(e.value)
    model = CTMSampler()
    context = SimpleNamespace(artifacts={"student": str(folder)}, model_config={"student_files": pinned})
    with pytest.raises(InputError) as e:
        model.load_context(context)
    msg = _one_line(e.value)
    assert "config.json" in msg and WEIGHTS in msg and model.student is None


# --- item: secrets in the tracking URI ------------------------------------------------------------------------------
def test_tracking_uri_secret_is_not_recorded(registered, tmp_path):
    assert registered.rec["tracking_uri"] == redact_uri(registered.uri) and SECRET not in registered.rec["tracking_uri"]
    on_disk = (registered.root / "registry.json").read_text()
    assert SECRET not in on_disk and "tracking_uri" in on_disk
    logged = mlflow.artifacts.download_artifacts(
        run_id=registered.rec["run_id"], artifact_path="register", dst_path=str(tmp_path), tracking_uri=registered.uri
    )
    texts = [p.read_text() for p in Path(logged).rglob("*.json")]
    assert texts and all(SECRET not in t for t in texts)
    assert SECRET.encode() not in (registered.root / "mlflow.db").read_bytes()  # no tag, param or source holds it
    for path in (registered.root / "mlruns").rglob("*"):  # nor any file the model or the run stored
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_tracking_uri_secret_is_not_printed_on_error(registered, tmp_path, monkeypatch, capsys):
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"fd_nfe1": 1.0}))
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://alice:{SECRET}@127.0.0.1:9/mlflow?sig={SECRET}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    rc = main(
        [
            "--params",
            str(params),
            "--student",
            str(registered.student),
            "--eval",
            str(ev),
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "register:" in err and SECRET not in err
