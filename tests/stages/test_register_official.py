"""The register stage refuses an evaluation of a released checkpoint (`evaluate.student_source`): its numbers are
the released file's, not `--student`'s (docs/official.md#4-evaluating-a-released-checkpoint).

The evaluation folders are written as the evaluate stage writes them (metrics.json, protocol.json and
fd_details.json with `student.variant`); the refusal must come in one line before any MLflow work (no store is
created), from the CLI (`--dry-run` included) and from `run`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from pipelines.register import main, run  # noqa: E402
from pipelines.support.registry import RegisterError  # noqa: E402
from tests.stages.test_register import NAME, PARAMS, _eval, _make_student  # noqa: E402

OFFICIAL = "official:sony-ctm-imagenet64@sha256:" + "ab" * 32


def _evaluation(folder: Path, variant: str) -> Path:
    _eval(folder, fd_nfe1=1.5, fd_nfe1_std=0.1, complete=True)
    details = {"metrics": {"fd_nfe1": 1.5}, "student": {"dir": "artifacts/student", "variant": variant}}
    (folder / "fd_details.json").write_text(json.dumps(details))
    return folder


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """Where an MLflow store would be created: it must not exist after a refusal."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return db


@pytest.mark.parametrize("dry_run", [False, True])
def test_cli_refuses_an_evaluation_of_a_released_checkpoint(tmp_path, store, capsys, dry_run):
    student = _make_student(tmp_path / "student", seed=1)
    ev = _evaluation(tmp_path / "eval", OFFICIAL)
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text().replace("model_name: ctm-digits", f"model_name: {NAME}"))
    out = tmp_path / "registry.json"
    argv = ["--params", str(params), "--student", str(student), "--eval", str(ev), "--out", str(out)]
    rc = main(argv + (["--dry-run"] if dry_run else []))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("ERROR pipelines.register: "), err
    assert OFFICIAL in err[0] and "evaluate.student_source" in err[0] and "(fix: " in err[0], err[0]
    assert not out.exists() and not store.exists()


def test_run_refuses_before_any_mlflow_work(tmp_path, store):
    from pipelines.support.params import load_params

    params = load_params(PARAMS, {"register": {"model_name": NAME}}, check_env=False)
    student = _make_student(tmp_path / "student", seed=1)
    with pytest.raises(RegisterError, match=r"scored the released checkpoint official:sony-ctm-imagenet64@"):
        run(params, student, _evaluation(tmp_path / "eval", OFFICIAL), tmp_path / "r.json", repo_root=tmp_path)
    assert not store.exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "details", [{"student": {"variant": "ema_0.999"}}, {"student": {"variant": None}}, {}, "not json"]
)
def test_own_student_evaluations_pass_the_check(tmp_path, details):
    """The distill stage's own variants, an older fd_details.json without a student and an unreadable file are not
    refused here (the metrics/protocol checks judge those)."""
    from pipelines.support.gate import read_evaluation

    ev = _eval(tmp_path / "eval", fd_nfe1=1.5, fd_nfe1_std=0.1, complete=True)
    (ev / "fd_details.json").write_text(details if isinstance(details, str) else json.dumps(details))
    _, value, status, _ = read_evaluation(ev, "fd_nfe1")
    assert value == 1.5 and status == "ok"
