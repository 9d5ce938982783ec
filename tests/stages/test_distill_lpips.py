"""`distance: lpips` through the real distill stage: pinned weight files fetched before Ray, the LPIPS built by each Ray
worker from them, grey digits repeated to RGB; missing pins and bad files stop the stage in one line before Ray."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ctm_core.config import ParamsError
from ctm_core.gan.lpips import LPIPS
from tests.stages.test_distill import _params, inputs  # noqa: F401 - the module's prepared digits + tiny teacher

TINY_WIDTHS = (2, 2, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4)  # VGG16's layout at a fraction of its width: cheap at 224²


def tiny_lpips_files(folder: Path, seed: int = 0) -> dict[str, str]:
    """Random-weight VGG16-layout + LPIPS linear files (torchvision / piq formats); returns distill.lpips overrides
    with their sha256 pins."""
    folder.mkdir(parents=True, exist_ok=True)
    net = LPIPS(random_init=True, generator=torch.Generator().manual_seed(seed), widths=TINY_WIDTHS)
    sd = net.state_dict()
    vgg, linear = folder / "vgg16.safetensors", folder / "lpips_weights.pt"
    save_file({k: v.contiguous() for k, v in sd.items() if k.startswith("features.")}, str(vgg))
    torch.save([sd[f"weights.{l}"] for l in range(5)], linear)  # piq's format: a list of 5 tensors
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (vgg, linear)}
    return {
        "distill.distance": "lpips",
        "distill.lpips.vgg16_source": str(vgg),
        "distill.lpips.vgg16_sha256": sha[vgg],
        "distill.lpips.linear_source": str(linear),
        "distill.lpips.linear_sha256": sha[linear],
        "distill.lpips.cache_dir": str(folder / "cache"),
    }


def test_pinned_files_build_the_workers_lpips_and_train_grey_digits(inputs, tmp_path):  # noqa: F811
    """What each Ray worker does (pin on the driver, build_lpips in the worker, CTMTrainer(lpips=...)), in-process:
    one step on the 1-channel digits, whose CTM term is the LPIPS of the channel repeated to RGB."""
    from ctm_core.io.teacher_format import load_edm_checkpoint
    from ctm_core.nets.student import CTMStudent
    from ctm_core.training.losses import ctm_distance
    from ctm_core.training.trainer import CTMTrainer, TensorDataSource
    from pipelines.support.lpips_weights import build_lpips, pin_lpips_weights

    files = tiny_lpips_files(tmp_path / "lpips")
    files["distill.lpips.linear_sha256"] = "record"
    pinned = pin_lpips_weights(_params(inputs, "unused", **files))
    assert (
        pinned.distill.lpips.linear_sha256
        == hashlib.sha256(Path(files["distill.lpips.linear_source"]).read_bytes()).hexdigest()
    )
    lpips = build_lpips(pinned.distill)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    trainer_kw = dict(progress=False)
    teacher = load_edm_checkpoint(inputs / "teacher")
    torch.manual_seed(0)
    student = CTMStudent.from_teacher(teacher)
    trainer = CTMTrainer(
        pinned.distill,
        student,
        teacher,
        TensorDataSource(x.repeat(4, 1, 1, 1), batch_size=8, seed=0),
        lpips=lpips,
        **trainer_kw,
    )
    # the trainer's distance = LPIPS of the RGB-repeated, 224²-resized, (x+1)/2 images
    d = ctm_distance(x, y, "lpips", lpips=trainer.lpips)
    up = lambda t: torch.nn.functional.interpolate(t, size=224, mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(d, lpips((up(x).repeat(1, 3, 1, 1) + 1) / 2, (up(y).repeat(1, 3, 1, 1) + 1) / 2))
    metrics = trainer.train_step()
    assert all(torch.isfinite(v).all() for v in metrics.values()), metrics


@pytest.mark.slow
@pytest.mark.ray
def test_lpips_distance_trains_through_the_stage(inputs, tmp_path, monkeypatch):  # noqa: F811
    from ctm_core.io.student_format import load_student
    from pipelines.distill import run_distill

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    files = tiny_lpips_files(tmp_path / "lpips")
    files["distill.lpips.linear_sha256"] = "record"  # resolved to the digest by the driver, before Ray starts
    params = _params(inputs, "ray_lpips", **files, **{"distill.steps": 2, "distill.checkpoint_every": 2})
    rec = run_distill(
        params,
        data_dir=str(inputs / "data"),
        teacher_dir=str(inputs / "teacher"),
        out_dir=str(tmp_path / "s"),
        num_workers=1,
    )
    assert rec["steps"] == 2
    loss = rec["metrics"].get("train/loss_ctm", rec["metrics"].get("train/loss"))
    assert loss is not None and loss > 0, rec["metrics"]
    assert all(torch.isfinite(v).all() for v in load_student(tmp_path / "s", "online").state_dict().values())


def test_lpips_without_pins_fails_in_one_line(inputs):  # noqa: F811
    with pytest.raises(ParamsError) as info:
        _params(inputs, "unused", **{"distill.distance": "lpips"})
    assert info.value.key == "distill.lpips.vgg16_sha256" and "\n" not in str(info.value)


def test_altered_or_wrong_lpips_files_stop_before_ray(inputs, tmp_path, capsys):  # noqa: F811
    import yaml

    from pipelines.distill import main

    files = tiny_lpips_files(tmp_path / "lpips")
    root = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raytmp = f"/tmp/rt_lpips{os.getpid()}"
    raw["ray"]["temp_dir"] = raytmp
    for key, value in files.items():
        node = raw
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    args = ["--data", str(inputs / "data"), "--teacher", str(inputs / "teacher"), "--out", str(tmp_path / "out")]

    raw["distill"]["lpips"]["vgg16_sha256"] = "0" * 64  # altered file: its bytes no longer match the pin
    (tmp_path / "p1.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--params", str(tmp_path / "p1.yaml"), *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "distill.lpips.vgg16_source" in err[0] and "sha256 mismatch" in err[0], err

    raw["distill"]["lpips"]["vgg16_source"] = files["distill.lpips.linear_source"]  # not a VGG16 state dict
    raw["distill"]["lpips"]["vgg16_sha256"] = files["distill.lpips.linear_sha256"]
    (tmp_path / "p2.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--params", str(tmp_path / "p2.yaml"), *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("ERROR pipelines.distill: distill.lpips:"), err
    assert not Path(raytmp).exists() and not (tmp_path / "out").exists()  # Ray never started


def test_tune_checks_lpips_files_before_ray(inputs, tmp_path):  # noqa: F811
    """The tune stage's input check fetches and verifies the LPIPS files too (its trials' workers build LPIPS)."""
    from ctm_core.errors import InputError
    from pipelines.support.tune_search import check_tune_inputs

    files = tiny_lpips_files(tmp_path / "lpips")
    data, teacher = inputs / "data", inputs / "teacher"
    check_tune_inputs(_params(inputs, "unused", **files), data, teacher)  # pinned files: fine
    files["distill.lpips.linear_sha256"] = "f" * 64
    with pytest.raises(InputError) as info:
        check_tune_inputs(_params(inputs, "unused", **files), data, teacher)
    assert str(info.value).startswith("distill.lpips.linear_source:") and "sha256 mismatch" in str(info.value)
    assert "\n" not in str(info.value)


def test_run_name_follows_the_pins_not_the_file_locations(inputs, tmp_path):  # noqa: F811
    from ctm_core.config import with_changes
    from ctm_core.data.prepared import load_card
    from pipelines.support.distill_run import run_identity, run_name, section_identity

    card = load_card(inputs / "data")
    d = _params(inputs, "unused", **tiny_lpips_files(tmp_path / "lpips")).distill
    name = run_name(run_identity(d, card, "t", 1))
    moved = with_changes(d, {"lpips.cache_dir": "/elsewhere", "lpips.vgg16_source": "file:///x/vgg16.pth"})
    assert run_name(run_identity(moved, card, "t", 1)) == name
    assert section_identity(moved) == section_identity(d)  # the GAN phase's run name uses it too
    assert run_name(run_identity(with_changes(d, {"lpips.vgg16_sha256": "0" * 64}), card, "t", 1)) != name
