"""Fixtures every layer shares: material under ../shared (skipped with a clear message when absent), the tiny
teacher/student folders, MLflow isolation and deterministic torch settings. The servers and processes of the system
tests (moto S3, Ray head, distill runs) come from the plugin tests/plugins/remote.py.

Tests reach all of this through fixtures, never by importing a module of tests/.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest
import torch

pytest_plugins = ["tests.plugins.remote"]

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

torch.set_num_threads(1)  # tiny nets: threads cost more than they give on a 2-core box


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"shared material not found at {path} (clone the project next to ../shared to run this test)")
    return path


@pytest.fixture(scope="session")
def shared_file() -> Callable[..., pathlib.Path]:
    """`shared_file("fixtures", "edm", "x.pkl")` -> ../shared/fixtures/edm/x.pkl; skips the calling test when it
    is absent (a checkout without ../shared runs everything else)."""
    return lambda *parts: _require(SHARED.joinpath(*parts))


@pytest.fixture(scope="session")
def fixtures_edm() -> pathlib.Path:
    """../shared/fixtures/edm: tiny EDM pickles and NVlabs/edm reference outputs (skips when absent)."""
    return _require(SHARED / "fixtures" / "edm")


@pytest.fixture(scope="session")
def edm_keys_dir() -> pathlib.Path:
    """../shared/docs/edm_keys: state-dict key/shape listings of the released EDM presets (skips when absent)."""
    return _require(SHARED / "docs" / "edm_keys")


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


def _write_tiny_nets(root: pathlib.Path, *, student: bool = True):
    """A tiny 8×8 grey EDM teacher (seed 0, weights perturbed because EDM zero-initialises the output conv, so
    D = c_skip·x would do nothing) saved to `root/teacher`, and its CTM student to `root/student`. Returns the
    teacher."""
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


@pytest.fixture(scope="session")
def tiny_nets() -> Callable[..., torch.nn.Module]:
    """`tiny_nets(root, student=True)`: writes the tiny teacher to root/teacher (and its CTM student to
    root/student) and returns the teacher; session-scoped so module-scoped setups can use it."""
    return _write_tiny_nets


@pytest.fixture(scope="module")
def scored_inputs(tiny_nets, tmp_path_factory, request):
    """Inputs of a stage that scores a student (evaluate, likelihood), once per test module: the prepared digits
    (10 % held out), the tiny teacher + student, and an MLflow SQLite store with its artifacts in the same folder."""
    from pipelines.support.datasets import prepare_dataset

    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    data = root / "prepared"
    prepare_dataset("sklearn-digits", None, data, heldout_fraction=0.1, seed=0, shard_size=4096, progress=False)
    tiny_nets(root)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("DVC_ROOT", str(root))  # MLflow artifacts (mlruns/) next to the test DB, not in the repo
    yield {"root": root, "data": data, "teacher": root / "teacher", "student": root / "student"}
    mp.undo()


def _save_like_official(state_dict: dict[str, torch.Tensor], path: pathlib.Path) -> None:
    """torch.save of views into two flat fp32 storages (ndim <= 1 and ndim > 1), as sony/ctm's
    MixedPrecisionTrainer.master_params_to_state_dict writes its checkpoints (tensors sharing storage)."""
    out = {}
    for big in (False, True):
        keys = [k for k, v in state_dict.items() if (v.ndim > 1) == big]
        flat = torch.cat([state_dict[k].reshape(-1) for k in keys]) if keys else torch.zeros(0)
        offset = 0
        for k in keys:
            n = state_dict[k].numel()
            out[k] = flat[offset : offset + n].view(state_dict[k].shape)
            offset += n
    torch.save({k: out[k] for k in state_dict}, path)


@pytest.fixture(scope="session")
def save_like_official() -> Callable[[dict[str, torch.Tensor], pathlib.Path], None]:
    """`save_like_official(state_dict, path)`: a checkpoint laid out as the official CTM training loops save them."""
    return _save_like_official


def _rgb_class_folders(root: pathlib.Path, classes: int, per_class: int, size: int) -> pathlib.Path:
    """`classes` folders of `per_class` RGB PNGs (size x size), each class its own noisy colour ramp; returns root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            ramp = np.add.outer(np.arange(size), np.arange(size))[..., None] * np.array([3 + c, 8 - 2 * c, 5]) + 10 * i
            img = (ramp + rng.integers(0, 30, (size, size, 3))) % 256
            Image.fromarray(img.astype(np.uint8), mode="RGB").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def rgb_class_folders() -> Callable[..., pathlib.Path]:
    """`rgb_class_folders(root, classes, per_class, size)`: an image-folder data set for the prepare stage."""
    return _rgb_class_folders
