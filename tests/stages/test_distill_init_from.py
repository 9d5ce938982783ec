"""`distill.init_from`: the distill stage continues training from a released CTM student
(docs/official.md#5-continuing-training-from-a-released-checkpoint).

Default tier, in-process (what the driver does before Ray, then what every Ray worker does): the shared ctm-cifar10
fixture (saved by the official training loop, outputs from the official code) continues as the project's SongUNet
student and starts from exactly the official function; a tiny sony/ctm ImageNet-64-layout file continues as
`ADMStudent`, and the student folder the stage writes loads back as that class. Bad files and mismatches fail in one
line before any training, through the stage's CLI. Slow tier: the whole stage on Ray from the released file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOL = dict(rtol=1e-5, atol=1e-5)
CIFAR_FLAGS = {"model_channels": 8, "num_blocks": 1, "label_dim": 10}  # the shared fixture's constructor flags
ADM_FLAGS = dict(  # not the evaluate test's file: heads of 8, attention at 16 and 8, 2 blocks
    image_size=16,
    num_channels=32,
    num_res_blocks=2,
    channel_mult="1,2",
    attention_resolutions="16,8",
    num_head_channels=8,
    num_classes=3,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _teacher(root: Path, size: int, classes: int, **arch):
    from ctm_core.io.teacher_format import save_teacher
    from ctm_core.nets.precond import EDMPrecond

    torch.manual_seed(0)
    teacher = EDMPrecond(size, 3, label_dim=classes, model_type="SongUNet", **arch).eval()
    with torch.no_grad():
        for p in teacher.parameters():  # EDM zero-initialises the output conv: make the teacher non-trivial
            p.add_(0.05 * torch.randn_like(p))
    save_teacher("EDMPrecond", teacher.init_kwargs, teacher.state_dict(), root / "teacher")
    return teacher


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_file, save_like_official, rgb_class_folders):
    """Two runs' inputs: 32x32 RGB 10-class data + a DDPM++ teacher for the ctm-cifar10 fixture, and 16x16 RGB 3-class
    data + a teacher for a tiny ADM file in the sony/ctm layout."""
    from ctm_core.nets.official.loader import build_official_ctm
    from pipelines.support.datasets import prepare_dataset

    root = tmp_path_factory.mktemp("init_from")
    out = {}
    cifar = root / "cifar"
    images = rgb_class_folders(cifar / "images", 10, 2, 32)
    prepare_dataset("imagefolder", images, cifar / "data", heldout_fraction=0.25, seed=0, progress=False)
    arch = dict(model_channels=8, channel_mult=[2, 2, 2], num_blocks=1, attn_resolutions=[16], dropout=0.13)
    teacher = _teacher(cifar, 32, 10, **arch)
    ckpt = shared_file("fixtures", "ctm_official", "ctm_cifar10_cond_tiny.pt")
    ref = {k: torch.from_numpy(v) for k, v in np.load(ckpt.with_suffix(".ref.npz")).items()}
    out["cifar"] = dict(root=cifar, teacher=teacher, ckpt=ckpt, sha=_sha(ckpt), preset="ctm-cifar10", ref=ref)
    out["cifar"]["flags"] = CIFAR_FLAGS

    adm = root / "adm"
    images = rgb_class_folders(adm / "images", 3, 4, 16)
    prepare_dataset("imagefolder", images, adm / "data", heldout_fraction=0.25, seed=0, progress=False)
    teacher = _teacher(adm, 16, 3, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    torch.manual_seed(1)
    student = build_official_ctm("sony-ctm-imagenet64", **ADM_FLAGS)
    with torch.no_grad():
        for p in student.parameters():  # ADM zero-initialises its output convs
            p.add_(0.05 * torch.randn_like(p))
    ckpt = adm / "ema_0.999_000100.pt"
    save_like_official(student.model.state_dict(), ckpt)
    out["adm"] = dict(root=adm, teacher=teacher, ckpt=ckpt, sha=_sha(ckpt), preset="sony-ctm-imagenet64")
    out["adm"]["flags"], out["adm"]["student"] = ADM_FLAGS, student.eval()
    return out


def _params(run: dict, sections: dict | None = None, **init):
    """params.yaml with a tiny distill section continuing `run`'s file (`init` overrides distill.init_from)."""
    from pipelines.support.params import load_params

    src = {"uri": run["ckpt"].as_uri(), "sha256": run["sha"], "preset": run["preset"], "flags": run["flags"]}
    src.update({"cache_dir": str(run["root"] / "cache"), **init})
    distill = {"N": 6, "K": 2, "batch": 4, "microbatch": 2, "steps": 2, "checkpoint_every": 2, "init_from": src}
    return load_params(ROOT / "params.yaml", overrides={"distill": distill, **(sections or {})}, check_env=False)


def _driver_and_worker(run: dict, params):
    """What the stage does before Ray (resolve) and what each Ray worker builds from it (initial_student)."""
    from ctm_core.data.prepared import load_card
    from pipelines.support.init_from import initial_student, resolve_init_from

    card = load_card(run["root"] / "data")
    pinned, init = resolve_init_from(params, card, run["teacher"])
    return pinned, init, initial_student(run["teacher"], pinned.distill, init), card


def _train(run: dict, params, student, card):
    from ctm_core.data.prepared import levels_to_unit, load_prepared
    from ctm_core.training.trainer import CTMTrainer, TensorDataSource

    images, y = load_prepared(run["root"] / "data", "train")
    x = torch.from_numpy(levels_to_unit(images, card.image.num_levels))
    labels = torch.nn.functional.one_hot(torch.from_numpy(y).long(), card.labels.label_dim).float()
    d = params.distill
    trainer = CTMTrainer(
        d, student, run["teacher"], TensorDataSource(x, labels, batch_size=d.batch, seed=d.seed), progress=False
    )
    assert trainer.train() == d.steps
    return trainer


@torch.no_grad()
def _assert_official_function(student, ref, classes):
    y = torch.nn.functional.one_hot(ref["call1_y"], classes).float()
    x, t, s = ref["call1_x_t"], ref["call1_t"], ref["call1_s"]
    torch.testing.assert_close(student.G(x, t, s, y), ref["call1_G"], **TOL)
    torch.testing.assert_close(student.g(x, t, s, y), ref["call1_denoised"], **TOL)


def test_cifar10_release_continues_as_the_official_function_and_trains(runs, tmp_path):
    from ctm_core.io.student_format import load_student, read_student_config, save_student
    from ctm_core.nets.student import CTMStudent

    run = runs["cifar"]
    params = _params(run, sha256="record")  # `record` fetches once and pins the digest for the run
    pinned, init, student, card = _driver_and_worker(run, params)
    assert pinned.distill.init_from.sha256 == run["sha"] == init.sha256
    assert type(student) is CTMStudent and student.training
    _assert_official_function(student.eval(), run["ref"], 10)  # the start is the released student, within 1e-5
    student.train()  # dropout 0.13 on, as the trainer runs it

    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = _train(run, pinned, student, card)
    # θ⁻ started as the released weights (no update yet reaches it exactly), and training moved the online weights.
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())

    save_student(tmp_path / "s", student.init_kwargs, {"online": trainer.model.state_dict()})
    assert read_student_config(tmp_path / "s")["class_name"] == "CTMStudent"
    loaded = load_student(tmp_path / "s")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.eye(10)[:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded.G(x, 80.0, 1.0, y), trainer.model.eval().G(x, 80.0, 1.0, y))


def test_imagenet_release_continues_as_adm_student_through_the_student_folder(runs, tmp_path):
    from ctm_core.io.student_format import load_student, read_student_config, save_student
    from ctm_core.nets.official.loader import ADMStudent

    run = runs["adm"]
    pinned, init, student, card = _driver_and_worker(run, _params(run))
    assert type(student) is ADMStudent
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 5
    y = torch.eye(3)
    with torch.no_grad():  # 250·ln t conditioning of the released network, unchanged
        torch.testing.assert_close(student.eval().G(x, 5.0, 0.5, y), run["student"].G(x, 5.0, 0.5, y), **TOL)
    trainer = _train(run, pinned, student.train(), card)

    save_student(tmp_path / "s", student.init_kwargs, {"online": trainer.model.state_dict()})
    config = read_student_config(tmp_path / "s")
    assert config["class_name"] == "ADMStudent" and config["init_kwargs"]["model_type"] == "ADMUNet"
    loaded = load_student(tmp_path / "s")
    assert type(loaded) is ADMStudent
    with torch.no_grad():
        torch.testing.assert_close(loaded.G(x, 5.0, 0.5, y), trainer.model.eval().G(x, 5.0, 0.5, y))


def test_run_identity_names_the_file_by_its_pin_only(runs):
    from pipelines.support.distill_run import section_identity

    run = runs["cifar"]
    off = _params(run, uri=None, sha256=None).distill
    assert "init_from" not in section_identity(off)  # runs named before the option keep their names
    a = section_identity(_params(run).distill)
    b = section_identity(_params(run, cache_dir="/elsewhere", uri=run["ckpt"].as_posix()).distill)
    assert a == b and a["init_from"]["sha256"] == run["sha"]
    c = section_identity(_params(run, sha256="0" * 64).distill)
    assert c != a


def _cli(params_file: Path, run: dict, cwd: Path) -> subprocess.CompletedProcess:
    args = [
        "--params",
        str(params_file),
        "--data",
        str(run["root"] / "data"),
        "--teacher",
        str(run["root"] / "teacher"),
    ]
    return subprocess.run(
        [sys.executable, "-m", "pipelines.distill", *args, "--out", str(cwd / "student"), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _write_params(tmp_path: Path, params) -> Path:
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["distill"] = params.distill.model_dump()
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class _Payload:
    def __reduce__(self):  # unpickling this would run code
        return (print, ("pwned",))


def _bad_files(run: dict, tmp_path: Path) -> dict[str, tuple[dict, str]]:
    pickled = tmp_path / "pickled.pt"
    torch.save({"model.map_noise.freqs": _Payload()}, pickled)
    return {
        "wrong width": (
            {"flags": {**CIFAR_FLAGS, "model_channels": 16}},
            r"does not fit preset 'ctm-cifar10'.*first mismatching key model\.map_label\.weight: "
            r"checkpoint \[8, 10\], model \[16, 10\]",
        ),
        "wrong classes": ({"flags": {**CIFAR_FLAGS, "label_dim": 0}}, r"does not fit preset 'ctm-cifar10'"),
        "wrong pin": ({"sha256": "0" * 64}, r"distill\.init_from\.uri: .*sha256"),
        "pickled code": ({"uri": pickled.as_uri(), "sha256": _sha(pickled)}, r"distill\.init_from: .*(pickle|code)"),
        "sigma range": ({}, r"distill\.init_from: the released students use sigma_max 80\.0"),
    }


@pytest.mark.parametrize("case", ["wrong width", "wrong classes", "wrong pin", "pickled code", "sigma range"])
def test_bad_release_files_fail_in_one_line_before_training(runs, tmp_path, case):
    run = runs["cifar"]
    init, pattern = _bad_files(run, tmp_path)[case]
    params = _params(run, **init)
    if case == "sigma range":
        params = params.model_copy(update={"distill": params.distill.model_copy(update={"sigma_max": 40.0})})
    proc = _cli(_write_params(tmp_path, params), run, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
    assert len(errors) == 1 and errors[0].startswith("ERROR pipelines.distill: "), proc.stderr[-2000:]
    assert re.search(pattern, errors[0]), errors[0]
    assert "pwned" not in proc.stdout and not (tmp_path / "student").exists()


def test_teacher_with_other_classes_is_refused(runs):
    from ctm_core.data.prepared import load_card
    from ctm_core.errors import InputError
    from pipelines.support.init_from import resolve_init_from

    run = runs["cifar"]
    unconditional = type("T", (), {"label_dim": 0})()  # what resolve_init_from reads of the teacher
    with pytest.raises(InputError, match=r"10 classes.*need 3 channels at 32x32 with 0 classes"):
        resolve_init_from(_params(run), load_card(run["root"] / "data"), unconditional)


def test_tune_refuses_init_from(runs):
    from ctm_core.errors import InputError
    from pipelines.support.tune_search import check_tune_inputs

    run = runs["cifar"]
    with pytest.raises(InputError, match="distill.init_from: the tune stage trains its trials from the teacher"):
        check_tune_inputs(_params(run), run["root"] / "data", run["root"] / "teacher")


@pytest.mark.slow
@pytest.mark.ray
def test_distill_stage_on_ray_continues_the_release(runs, tmp_path, monkeypatch):
    from ctm_core.io.student_format import load_student
    from pipelines.distill import run_distill

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run = runs["cifar"]
    sections = {
        "ray": {"num_workers": 1, "storage_path": str(tmp_path / "ray"), "temp_dir": f"/tmp/ray_init{os.getpid()}"},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }
    params = _params(run, sections)
    rec = run_distill(
        params,
        data_dir=str(run["root"] / "data"),
        teacher_dir=str(run["root"] / "teacher"),
        out_dir=str(tmp_path / "s"),
    )
    assert rec["steps"] == 2
    run_json = json.loads((tmp_path / "s" / "run.json").read_text())
    assert run_json["ray_run_name"] == rec["ray_run_name"]
    student = load_student(tmp_path / "s")
    assert student.label_dim == 10 and all(torch.isfinite(v).all() for v in student.state_dict().values())


def test_pickle_payload_is_really_code():
    """The refusal test's file would run code under plain pickle (so its refusal means something)."""
    assert pickle.loads(pickle.dumps(_Payload())) is None
