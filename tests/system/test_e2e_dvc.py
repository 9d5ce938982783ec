"""End to end: `dvc repro` in a temporary copy of the repository with tiny params, then the registered champion
loads through `mlflow.pyfunc.load_model("models:/<name>@champion")` in a separate process and returns images;
a second `dvc repro` with nothing changed re-runs no compute stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "teacher": {"train": {"steps": 40, "batch": 32, "log_every": 10, "lr_warmup_steps": 5}},
    "distill": {"steps": 6, "batch": 16, "microbatch": 8, "checkpoint_every": 3, "log_every": 3, "K": 4, "N": 6},
    "evaluate": {
        "nfe": [1, 2],
        "num_samples": 96,
        "set_size": 48,  # 2 seed sets (the default, the held-out split's 179, needs num_samples >= 179)
        "batch": 48,
        "grid_size": 4,
        "classifier": {"steps": 30, "batch": 64},
    },
    "likelihood": {"enabled": True, "num_samples": 4, "rtol": 1.0e-3, "atol": 1.0e-3},
    "ray": {"num_workers": 1, "num_cpus": 2, "dashboard_port": 8297},
}


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def _env(repo: Path) -> dict[str, str]:
    # PYTHONDONTWRITEBYTECODE dropped too: a user's Python writes __pycache__/ into ctm_core/, a directory dependency
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "DVC_")) and k != "PYTHONDONTWRITEBYTECODE"
    }
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(repo)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.ray
def test_dvc_repro_end_to_end(remote, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    remote.copy_repo(repo)  # tracked + untracked-not-ignored files as a one-commit repo: what a clone holds
    params = yaml.safe_load((repo / "params.yaml").read_text())
    _merge(params, TINY)
    params["ray"]["temp_dir"] = f"/tmp/ray_e2e{os.getpid()}"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(repo)

    t0 = time.time()
    first = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    wall = time.time() - t0
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    print(f"first dvc repro: {wall:.1f} s")

    metrics = json.loads((repo / "artifacts/eval/metrics.json").read_text())
    assert metrics["complete"] is True
    for key in ("fd_nfe1", "fd_nfe2", "fd_teacher_heun35", "fd_teacher_euler1"):
        assert key in metrics and metrics[key] >= 0, key
    lik = json.loads((repo / "artifacts/likelihood/metrics.json").read_text())
    assert lik["complete"] is True and "bpd_student" in lik and "bpd_teacher" in lik, lik
    registry = json.loads((repo / "artifacts/registry.json").read_text())
    assert "champion" in registry["aliases"], registry
    assert (repo / "mlflow.db").is_file()

    # The champion loads in a separate process, from the repo's default tracking store.
    code = (
        "import mlflow, numpy as np\n"
        "m = mlflow.pyfunc.load_model('models:/ctm-digits@champion')\n"
        "x = m.predict({'num_samples': 3, 'nfe': 2, 'gamma': 0.0, 'seed': 7})\n"
        "print(x.shape, x.dtype)\n"
    )
    load_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=load_env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(3, 8, 8, 1) uint8" in out.stdout

    # Nothing changed: nothing runs (register's persist out keeps the run-cache away, not a forced re-run).
    t0 = time.time()
    second = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    print(f"second dvc repro: {time.time() - t0:.1f} s")
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("prepare", "teacher", "tune", "distill", "evaluate", "likelihood", "register"):
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout, second.stdout
    assert "Running stage" not in second.stdout
