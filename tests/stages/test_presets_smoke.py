"""A smoke run of every preset through the real stage code on CPU, with tiny overrides: digits data, the tiny test
teacher, random-weight LPIPS files (VGG16 layout, narrow), the from-scratch discriminator, a few steps.

Default tier: the preset is applied to a params file by `pipelines.config --preset`, the distill stage's `main`
validates params and inputs (`--dry-run`, nothing trained), then the work each Ray worker does runs in-process: the
driver pins the LPIPS files, phase 1 (CTM+DSM, LPIPS, flips) trains, and phase 2 (the GAN phase) continues its state
with a fresh discriminator and the preset's `gan.changes` (scaled down). Slow tier: the whole stage on Ray.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.support.presets import list_presets
from tests.stages.test_distill import inputs  # noqa: F401 - the prepared digits + tiny teacher
from tests.stages.test_distill_lpips import tiny_lpips_files

ROOT = Path(__file__).resolve().parents[2]


def tiny(root: Path, name: str, lpips_dir: Path) -> dict:
    """Overrides that shrink a preset to seconds on CPU; everything else stays the preset's."""
    changes = {"batch": 4, "microbatch": 2}
    if name.startswith("imagenet"):
        changes.update(K=2, lr=8.0e-6)  # the ImageNet GAN phase changes K and lr too
    return {
        "data.source": "sklearn-digits",
        "data.path": None,
        "distill.N": 6,
        "distill.K": 3,
        "distill.batch": 4,
        "distill.microbatch": 2,
        "distill.steps": 2,
        "distill.checkpoint_every": 2,
        "distill.log_every": 1,
        "distill.gan.steps": 2,
        "distill.gan.discriminator": "scratch",
        "distill.gan.scratch_channels": 4,
        "distill.gan.changes": changes,
        **tiny_lpips_files(lpips_dir),
        "ray.num_workers": 1,
        "ray.num_cpus": 2,
        "ray.use_gpu": False,
        "ray.storage_path": str(root / "ray"),
        "ray.temp_dir": f"/tmp/ray_ps{os.getpid()}",
        "evaluate.features": "classifier",
        "mlflow.tracking_uri": f"sqlite:///{root}/mlflow.db",
    }


def _preset_params_file(name: str, tmp_path: Path) -> Path:
    from pipelines.config import _main

    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    sets = []
    for k, v in tiny(tmp_path, name, tmp_path / "lpips").items():
        sets += ["--set", f"{k}={json.dumps(v)}"]
    assert _main(["--params", str(p), "--preset", name, *sets, "--no-env"]) == 0
    return p


@pytest.mark.parametrize("name", list_presets())
def test_preset_smoke_through_stage_code(name, inputs, tmp_path, capsys):  # noqa: F811
    from ctm_core.config import gan_phases
    from ctm_core.data.prepared import load_card
    from ctm_core.io.teacher_format import load_edm_checkpoint
    from ctm_core.nets.student import CTMStudent
    from ctm_core.training.trainer import CTMTrainer
    from pipelines.distill import main
    from pipelines.support.gan_phase import build_phase_discriminator
    from pipelines.support.lpips_weights import build_lpips, pin_lpips_weights
    from pipelines.support.params import load_params
    from pipelines.support.ray_train import _train_stream

    p = _preset_params_file(name, tmp_path)
    capsys.readouterr()
    args = ["--params", str(p), "--data", str(inputs / "data"), "--teacher", str(inputs / "teacher"), "--dry-run"]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)["distill"]
    assert plan["distance"] == "lpips" and plan["random_flip"] and plan["gan"]["enabled"]

    params = pin_lpips_weights(load_params(p, check_env=False))  # the driver, before Ray
    phase1, phase2 = gan_phases(params.distill)
    card = load_card(inputs / "data")
    data = {"card": card, "data_dir": str(inputs / "data")}  # what each worker streams
    teacher = load_edm_checkpoint(inputs / "teacher")
    lpips = build_lpips(phase1)  # what each worker does

    def student():
        torch.manual_seed(0)
        return CTMStudent.from_teacher(teacher, sigma_min=phase1.sigma_min, sigma_max=phase1.sigma_max)

    one = CTMTrainer(
        phase1, student(), teacher, _train_stream(data, phase1),
        lpips=lpips, progress=False,
    )  # fmt: skip
    assert one.train() == phase1.steps
    d, d_opt = build_phase_discriminator(phase2, card, torch.device("cpu"), None)
    two = CTMTrainer(
        phase2, student(), teacher, _train_stream(data, phase2),
        lpips=lpips, discriminator=d, d_optimizer=d_opt, progress=False,
    )  # fmt: skip
    two.continue_from(one.state_dict())
    assert two.train() == phase2.steps == phase1.steps + params.distill.gan.steps
    assert all(torch.isfinite(v).all() for v in two.model.state_dict().values())


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("name", list_presets())
def test_preset_smoke_on_ray(name, inputs, tmp_path, monkeypatch):  # noqa: F811
    from pipelines.distill import run_distill
    from pipelines.support.params import load_params

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    params = load_params(_preset_params_file(name, tmp_path), check_env=False)
    rec = run_distill(
        params, data_dir=str(inputs / "data"), teacher_dir=str(inputs / "teacher"), out_dir=str(tmp_path / "s")
    )
    assert rec["steps"] == params.distill.steps + params.distill.gan.steps
