"""The distill stage on a real local Ray: data parallelism is exact, a re-run resumes, bad input stops early."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ctm_core.io.student_format import load_student, read_student_config
from ctm_core.io.teacher_format import save_teacher
from ctm_core.nets.precond import EDMPrecond
from pipelines.prepare import prepare_dataset
from pipelines.support.params import load_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    prepare_dataset("sklearn-digits", None, root / "data", heldout_fraction=0.1, seed=0, shard_size=512, progress=False)
    torch.manual_seed(0)
    teacher = EDMPrecond(
        img_resolution=8,
        img_channels=1,
        label_dim=0,
        model_type="SongUNet",
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # EDM zero-inits the output conv: give the teacher a non-trivial function
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_teacher("EDMPrecond", teacher.init_kwargs, teacher.state_dict(), root / "teacher")
    return root


def _params(root: Path, storage: str, **extra):
    overrides = {
        "distill.steps": 4,
        "distill.batch": 8,
        "distill.microbatch": 2,
        "distill.checkpoint_every": 2,
        "distill.log_every": 2,
        "distill.K": 4,
        "distill.N": 6,
        "ray.storage_path": str(root / storage),
        "ray.temp_dir": f"/tmp/ray_td{os.getpid()}",
        "ray.dashboard_port": 8291,
        "mlflow.tracking_uri": f"sqlite:///{root}/mlflow.db",
    }
    overrides.update(extra)
    return load_params(ROOT / "params.yaml", overrides=overrides)


def _weights(folder: Path, variant: str = "online") -> dict[str, torch.Tensor]:
    return load_student(folder, variant).state_dict()


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_equal_one_worker_and_rerun_resumes(inputs, monkeypatch):
    from pipelines.distill import run_distill

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    one = run_distill(
        _params(inputs, "ray1"),
        data_dir=str(inputs / "data"),
        teacher_dir=str(inputs / "teacher"),
        out_dir=str(inputs / "s1"),
        num_workers=1,
    )
    two = run_distill(
        _params(inputs, "ray2"),
        data_dir=str(inputs / "data"),
        teacher_dir=str(inputs / "teacher"),
        out_dir=str(inputs / "s2"),
        num_workers=2,
    )
    assert one["steps"] == two["steps"] == 4
    w1, w2 = _weights(inputs / "s1"), _weights(inputs / "s2")
    changed = 0
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6, msg=name)
    # The students trained: weights moved away from the teacher-initialised ones.
    from ctm_core.io.teacher_format import load_edm_checkpoint
    from ctm_core.nets.student import CTMStudent

    torch.manual_seed(0)
    init = CTMStudent.from_teacher(load_edm_checkpoint(inputs / "teacher")).state_dict()
    changed = sum(not torch.equal(init[k], w1[k]) for k in w1 if not k.endswith("resample_filter"))
    assert changed > len(w1) // 2
    params = _params(inputs, "ray1")
    assert set(read_student_config(inputs / "s1")["variants"]) == {"online"} | {
        f"ema_{r:g}" for r in params.distill.eval_emas
    }

    # Same params again: same Ray run name and storage, nothing retrained, identical weights.
    again = run_distill(
        _params(inputs, "ray2"),
        data_dir=str(inputs / "data"),
        teacher_dir=str(inputs / "teacher"),
        out_dir=str(inputs / "s2b"),
        num_workers=2,
    )
    assert again["ray_run_name"] == two["ray_run_name"]
    assert again["mlflow_run_id"] == two["mlflow_run_id"]
    for name, v in _weights(inputs / "s2b").items():
        assert torch.equal(v, w2[name]), name
    run = json.loads((inputs / "s2" / "run.json").read_text())
    assert Path(run["checkpoint_path"]).is_dir()


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "pipelines.distill", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_teacher_stops_before_ray(inputs, tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    raytmp = Path(f"/tmp/rt_missing{os.getpid()}")
    params["ray"]["temp_dir"] = str(raytmp)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = _cli(
        [
            "--params",
            str(tmp_path / "params.yaml"),
            "--data",
            str(inputs / "data"),
            "--teacher",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "student"),
        ],
        tmp_path,
    )
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "teacher" in lines[0] and "run the teacher stage" in lines[0], out.stderr
    assert not (tmp_path / "student").exists()
    assert not raytmp.exists()  # Ray never started


def test_best_params_applied_and_validated(inputs, tmp_path, capsys):
    """--best-params holds distill overrides (the tune stage's output), merged into params.yaml and validated with it
    in one go: the plan shows them; a bad or missing file stops the stage with one line naming the key."""
    from pipelines.distill import main

    args = ["--params", str(ROOT / "params.yaml"), "--data", str(inputs / "data"), "--teacher", str(inputs / "teacher")]
    best = tmp_path / "best.yaml"

    def plan(best_text: str) -> dict:
        best.write_text(best_text)
        assert main([*args, "--best-params", str(best), "--dry-run"]) == 0
        return json.loads(capsys.readouterr().out)["distill"]

    default = load_params(ROOT / "params.yaml", check_env=False).distill.model_dump()
    assert plan("{}\n") == default  # tune disabled: no overrides
    assert plan(yaml.safe_dump({"distill": {"lr": 1.0e-4, "K": 6}})) == {**default, "lr": 1.0e-4, "K": 6}
    for text, key in [
        (yaml.safe_dump({"distill": {"K": 99}}), "distill.K: must be < distill.N"),
        (yaml.safe_dump({"distill": {"lr": "fast"}}), "distill.lr: expected a number"),
        (yaml.safe_dump({"tuned": True}), "tuned: unknown key"),
    ]:
        best.write_text(text)
        assert main([*args, "--best-params", str(best), "--dry-run"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith(f"ERROR pipelines.distill: {key}"), err
    assert main([*args, "--best-params", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    assert "--best-params: file" in capsys.readouterr().err


def test_dry_run_plans_without_training(inputs, tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = _cli(
        [
            "--params",
            str(tmp_path / "params.yaml"),
            "--data",
            str(inputs / "data"),
            "--teacher",
            str(inputs / "teacher"),
            "--out",
            str(tmp_path / "student"),
            "--dry-run",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["distill"]["N"] == params["distill"]["N"] and plan["workers"] == params["ray"]["num_workers"]
    assert not (tmp_path / "student").exists()


@pytest.mark.parametrize(
    "edit,key",
    [
        ({"distill.gan.enabled": True, "distill.mode": "cm"}, "distill.gan.enabled"),
        ({"distill.distance": "lpips"}, "distill.lpips.vgg16_sha256"),
    ],
)
def test_unwired_features_refused_before_work(inputs, edit, key):
    from ctm_core.config import ParamsError
    from pipelines.distill import check_stage_features

    with pytest.raises(ParamsError) as info:
        check_stage_features(_params(inputs, "unused", **edit))
    assert info.value.key == key


def test_checkpoint_markers_on_local_storage(tmp_path):
    """Local ``ray.storage_path``: the verified upload writes ``complete.json`` last; resume picks the newest
    checkpoint whose files match it, skips half-written or altered ones, and uses a marker-less checkpoint only for
    runs from before markers (Ray's registered checkpoint, with a warning)."""
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    from pipelines.distill import (
        MARKER_FILE,
        complete_checkpoints,
        newest_complete_checkpoint,
        persist_checkpoint_verified,
        read_marker,
    )

    ctx = StorageContext(storage_path=str(tmp_path / "ray_results"), experiment_dir_name="distill-local")
    fs, run = ctx.storage_filesystem, ctx.experiment_fs_path
    for step in (2, 4):
        src = tmp_path / f"src{step}"
        src.mkdir()
        (src / "trainer_state.pt").write_bytes(bytes([step]) * 1000)
        persist_checkpoint_verified(ctx, Checkpoint.from_directory(str(src)), f"checkpoint_{step:06d}", step=step)
    marker = read_marker(fs, f"{run}/checkpoint_000004")
    assert marker["step"] == 4 and marker["files"]["trainer_state.pt"]["size"] == 1000

    def pick(legacy=None):
        dest = tmp_path / f"dl{len(list(tmp_path.glob('dl*')))}"
        dest.mkdir()
        logs: list[str] = []
        got = newest_complete_checkpoint(fs, run, dest, legacy=legacy, log=logs.append)
        return got, dest, logs

    got, dest, _ = pick()
    assert got == (f"{run}/checkpoint_000004", 4) and (dest / "trainer_state.pt").read_bytes() == b"\x04" * 1000
    # a half-written step 6 (files, no marker) is never loaded
    half = Path(run) / "checkpoint_000006"
    half.mkdir()
    (half / "trainer_state.pt").write_bytes(b"\x06" * 10)
    got, _, logs = pick()
    assert got[1] == 4 and any("checkpoint_000006" in m and "not loading" in m for m in logs)
    # step 4's file altered after its marker was written: skipped, step 2 is used
    (Path(run) / "checkpoint_000004" / "trainer_state.pt").write_bytes(b"\x00" * 1000)
    got, dest, logs = pick()
    assert got[1] == 2 and (dest / "trainer_state.pt").read_bytes() == b"\x02" * 1000
    assert any("does not match its complete.json" in m for m in logs)
    assert [p for p, _ in complete_checkpoints(fs, run)[0]] == [f"{run}/checkpoint_000004", f"{run}/checkpoint_000002"]
    # a run from before markers: only Ray's registered checkpoint is trusted, with a warning
    for p in Path(run).glob(f"checkpoint_*/{MARKER_FILE}"):
        p.unlink()
    legacy = Checkpoint(path=f"{run}/checkpoint_000002", filesystem=fs)
    got, dest, logs = pick(legacy=legacy)
    assert got == (f"{run}/checkpoint_000002", -1) and any("WARNING" in m for m in logs)
    assert pick()[0] is None  # no marker and nothing registered: a fresh start
