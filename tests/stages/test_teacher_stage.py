"""pipelines.teacher: train on a tiny prepared digits set, fetch + convert a file:// pickle, all-or-nothing output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ctm_core.config import ParamsError
from ctm_core.io.edm_pickle import read_edm_snapshot
from ctm_core.io.teacher_format import load_edm_checkpoint
from pipelines.prepare import prepare_dataset
from pipelines.support.io_utils import sha256_file
from pipelines.support.params import load_params
from pipelines.teacher import TeacherError, main, run

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"
# A few steps of a small UNet: the point is the wiring, not the quality.
TINY_TRAIN = {
    "steps": 3,
    "batch": 8,
    "log_every": 1,
    "lr_warmup_steps": 0,
    "model": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1},
}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """sklearn digits (1,797 8x8 images, 17 levels) prepared as Parquet shards."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_dataset("sklearn-digits", None, out, heldout_fraction=0.1, seed=0, shard_size=1024, progress=False)
    return out


def _params_file(tmp_path: Path, teacher: dict) -> Path:
    """params.yaml of the repo with the `teacher` section updated (written next to the test's repo root)."""
    doc = yaml.safe_load(PARAMS.read_text())
    doc["teacher"].update(teacher)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_train_writes_loadable_teacher_and_mlflow_run(tmp_path, prepared, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    params = load_params(PARAMS, {"teacher": {"train": TINY_TRAIN}}, check_env=False)
    out = tmp_path / "artifacts" / "teacher"
    summary = run(params, prepared, out, progress=False)

    net = load_edm_checkpoint(out)
    assert type(net).__name__ == "EDMPrecond"
    assert (net.img_resolution, net.img_channels, net.label_dim, net.sigma_data) == (8, 1, 0, 0.5)
    assert net.init_kwargs["model_channels"] == 8 and net.init_kwargs["channel_mult"] == [1, 2]
    meta = json.loads((out / "train_meta.json").read_text())
    assert meta["steps"] == 3 and [s for s, _ in meta["loss_curve"]] == [1, 2, 3]
    assert meta["data_card_sha256"] == sha256_file(prepared / "card.json")
    assert meta["weights_sha256"] == summary["weights_sha256"]
    assert json.loads((out / "config.json").read_text())["weights_sha256"] == summary["weights_sha256"]
    x = torch.zeros(2, 1, 8, 8)
    assert torch.isfinite(net(x, torch.tensor([0.5, 5.0]))).all()
    # No temp folders left next to the output.
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher"]

    run_ = mlflow.tracking.MlflowClient().get_run(summary["mlflow_run_id"])
    assert run_.info.status == "FINISHED"
    assert run_.data.tags["ctm.stage"] == "teacher"
    assert run_.data.params["teacher.train.steps"] == "3"
    hist = mlflow.tracking.MlflowClient().get_metric_history(run_.info.run_id, "teacher/loss_edm")
    assert [m.step for m in hist] == [1, 2, 3]
    mlflow.set_tracking_uri(None)


def test_train_failure_leaves_no_output(tmp_path, prepared, monkeypatch):
    import ctm_core.io.teacher_format as tf

    params = load_params(PARAMS, {"teacher": {"train": {**TINY_TRAIN, "steps": 1}}}, check_env=False)
    out = tmp_path / "teacher"

    def broken(_source):
        raise ValueError("simulated unreadable teacher")

    monkeypatch.setattr(tf, "load_edm_checkpoint", broken)  # fails after the files are written, before the rename
    with pytest.raises(TeacherError, match="simulated unreadable teacher"):
        run(params, prepared, out, progress=False, track=False)
    assert list(tmp_path.iterdir()) == []  # neither the out folder nor a temp folder

    # An existing output survives a failed run untouched.
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    with pytest.raises(TeacherError):
        run(params, prepared, out, progress=False, track=False)
    assert [p.name for p in tmp_path.iterdir()] == ["teacher"] and (out / "keep.txt").read_text() == "previous"


def test_file_uri_with_wrong_sha256_fails_with_one_line(tmp_path, prepared, capsys):
    src = tmp_path / "teacher.pkl"
    src.write_bytes(b"\x80\x04not really a snapshot")
    params_file = _params_file(tmp_path, {"source": src.as_uri(), "sha256": "0" * 64})
    out = tmp_path / "artifacts" / "teacher"
    rc = main(
        ["--params", str(params_file), "--data", str(prepared), "--out", str(out), "--no-progress", "--no-mlflow"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and "sha256 mismatch" in err[0] and "0" * 64 in err[0], err
    assert not out.exists()
    cached = tmp_path / ".cache" / "teacher"  # teacher.cache_dir, relative to the params file
    assert not any(p.is_file() for p in cached.rglob("*")) if cached.exists() else True


def test_file_uri_fixture_converts_to_identical_weights(tmp_path, prepared, capsys, shared_file):
    pkl = shared_file("fixtures", "edm", "tiny-uncond-vp.pkl")
    digest = sha256_file(pkl)
    params = load_params(_params_file(tmp_path, {"source": pkl.as_uri(), "sha256": digest}), check_env=False)
    out = tmp_path / "teacher"
    summary = run(params, None, out, progress=False, track=False)
    assert summary["file_sha256"] == digest

    snap = read_edm_snapshot(pkl)
    net = load_edm_checkpoint(out)
    got = net.state_dict()
    assert sorted(got) == sorted(snap.state_dict)
    for k, v in snap.state_dict.items():
        assert torch.equal(got[k], v), k
    source = json.loads((out / "source.json").read_text())
    assert source["file_sha256"] == digest and source["kind"] == "file" and source["sha256_pinned"]

    # The same teacher against the 8x8x1 digits: a geometry mismatch is refused before the output changes.
    out2 = tmp_path / "teacher2"
    with pytest.raises(TeacherError, match="does not match|32x32x3"):
        run(params, prepared, out2, progress=False, track=False)
    assert not out2.exists()


def test_bad_params_exit_2_before_any_work(tmp_path, prepared, capsys):
    params_file = _params_file(tmp_path, {"source": "no-such-release"})
    out = tmp_path / "teacher"
    assert main(["--params", str(params_file), "--data", str(prepared), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("ERROR pipelines.teacher: params error: teacher.source")
        and "no-such-release" in err[0]
    )
    # source: train without a prepared dataset: one line, exit 2.
    params_file = _params_file(tmp_path, {"source": "train"})
    assert main(["--params", str(params_file), "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "card.json" in err[0], err
    # A non-EDM precond cannot become a CTM teacher.
    with pytest.raises(ParamsError, match="teacher.train.precond"):
        run(load_params(PARAMS, {"teacher": {"train": {"precond": "VPPrecond"}}}, check_env=False), prepared, out)
    assert not out.exists()


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, prepared, capsys):
    out = tmp_path / "teacher"
    assert main(["--params", str(PARAMS), "--data", str(prepared), "--out", str(out), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["kind"] == "train" and plan["image"] == {"channels": 1, "resolution": 8, "num_levels": 17}
    assert plan["init_kwargs"]["img_resolution"] == 8 and plan["train_images"] > 1000
    assert not out.exists()
    shutil.rmtree(tmp_path / ".cache", ignore_errors=True)
