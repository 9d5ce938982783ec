"""Shared test fixtures: paths to ../shared and deterministic torch settings."""

from __future__ import annotations

import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES_EDM = SHARED / "fixtures" / "edm"
EDM_KEYS = SHARED / "docs" / "edm_keys"

torch.set_num_threads(1)  # tiny nets: threads cost more than they give on a 2-core box


def require_shared(path: pathlib.Path) -> pathlib.Path:
    """Skip the calling test with a clear message when a ../shared file is absent."""
    if not path.exists():
        pytest.skip(f"shared material not found at {path} (clone the project next to ../shared to run this test)")
    return path


@pytest.fixture
def fixtures_edm() -> pathlib.Path:
    return require_shared(FIXTURES_EDM)


@pytest.fixture
def edm_keys_dir() -> pathlib.Path:
    return require_shared(EDM_KEYS)


@pytest.fixture(autouse=True)
def _isolate_mlflow_globals():
    """MLflow keeps the tracking URI and the active run in process globals: reset them around every test so one
    test's store never leaks into the next (env MLFLOW_TRACKING_URI set by a test then takes effect)."""
    import sys

    def reset():
        if "mlflow" in sys.modules:
            mlflow = sys.modules["mlflow"]
            while mlflow.active_run() is not None:
                mlflow.end_run()
            mlflow.set_tracking_uri(None)

    reset()
    yield
    reset()


def write_tiny_nets(root: pathlib.Path, *, student: bool = True):
    """A tiny 8×8 grey EDM teacher (seed 0, weights perturbed because EDM zero-initialises the output conv, so
    D = c_skip·x would do nothing) saved to `root/teacher`, and its CTM student to `root/student`. Returns the teacher."""
    from ctm_core.io.student_format import save_student
    from ctm_core.io.teacher_format import save_teacher
    from ctm_core.nets.precond import EDMPrecond
    from ctm_core.nets.student import CTMStudent

    torch.manual_seed(0)
    teacher = EDMPrecond(
        img_resolution=8,
        img_channels=1,
        model_type="SongUNet",
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    ).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_teacher("EDMPrecond", teacher.init_kwargs, teacher.state_dict(), root / "teacher")
    if student:
        s = CTMStudent.from_teacher(teacher)
        save_student(root / "student", s.init_kwargs, {"online": s.state_dict()})
    return teacher
