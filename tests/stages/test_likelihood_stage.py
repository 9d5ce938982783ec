"""Tests of the likelihood stage (pipelines/likelihood.py): bits/dim of held-out images on a tiny digits setup.

A module-scoped fixture prepares the digits (8x8, 17 levels), saves a tiny random EDM teacher and a student copied
from it; the tests check the stage's outputs, the 17-level discretisation against a Gaussian closed form, that the
stage runs on unlabelled data (256 levels: the power-of-two path), the one-line exit-2 paths, `enabled: false` and
the MLflow logging.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

TINY_LIK = {
    "likelihood": {
        "enabled": True,
        "num_samples": 2,
        "divergence": "hutchinson",
        "num_probes": 2,
        "rtol": 1.0e-2,
        "atol": 1.0e-2,
        "dequantize": "uniform",
        "seed": 0,
    },
}


def _params(overrides=TINY_LIK):
    from pipelines.support.params import load_params

    return load_params(ROOT / "params.yaml", overrides=overrides, check_env=False)


@pytest.fixture(scope="module")
def setup(scored_inputs):
    return scored_inputs


def _args(s, out, params=None):
    a = [
        "--data",
        str(s["data"]),
        "--teacher",
        str(s["teacher"]),
        "--student",
        str(s["student"]),
        "--out",
        str(out),
        "--no-mlflow",
        "--no-progress",
        "--device",
        "cpu",
    ]
    return (["--params", str(params)] if params else []) + a


def test_outputs_keys_and_details(setup):
    from pipelines.likelihood import likelihood

    out = setup["root"] / "lik"
    metrics = likelihood(
        _params(),
        setup["data"],
        setup["teacher"],
        setup["student"],
        out,
        progress=False,
        device="cpu",
        log_mlflow=False,
    )
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["complete"] is True and on_disk["num_images"] == 2
    for key in (
        "bpd_student",
        "bpd_teacher",
        "bpd_student_stderr",
        "bpd_teacher_stderr",
        "bpd_teacher_hutchinson_stderr",
        "bpd_student_hutchinson_stderr",
    ):
        assert key in on_disk, key
    for k, v in on_disk.items():
        if k != "complete":
            assert isinstance(v, (int, float)) and math.isfinite(v), (k, v)
    assert 0 < on_disk["bpd_teacher"] < 20 and 0 < on_disk["bpd_student"] < 20
    assert not any(k.startswith("fd_") for k in on_disk)
    details = json.loads((out / "details.json").read_text())
    assert details["errors"] == [] and details["missing"] == [] and details["enabled"] is True
    assert (
        "Δ = 2/(L − 1)" in details["protocol"]
        and "17 levels" in details["protocol"]
        and details["params"] == _params().section("likelihood")
    )
    assert set(details["networks"]) == {"teacher", "student"}
    assert all(n["seconds"] > 0 for n in details["networks"].values())
    assert details["networks"]["teacher"]["sigma_min"] == pytest.approx(0.002)
    assert sorted(p.name for p in out.iterdir()) == ["details.json", "metrics.json"]
    assert not list(out.parent.glob(".lik.tmp-*"))  # staged folder renamed away


def test_bits_per_dim_levels_matches_gaussian_closed_form():
    """17 levels (not a power of 2): bpd = (−log p(x) − D log Δ)/(D ln 2), Δ = 2/16, for a Gaussian model whose
    density at sigma_min is known in closed form (bin centres, exact divergence)."""
    from ctm_core.diffusion.likelihood import log_likelihood
    from ctm_core.eval.bits_per_dim import bits_per_dim_levels

    s2 = 0.3**2

    def D_gauss(x, sigma, class_labels=None):  # exact denoiser of N(0, s2 I): D = s2 / (s2 + σ²) · x
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        return x * (s2 / (s2 + sigma**2))

    levels = torch.tensor([[[[0, 8], [16, 3]]]])  # (1, 1, 2, 2), 17 levels
    bpd, _ = bits_per_dim_levels(
        D_gauss, levels, 17, dequantize="none", generator=torch.Generator(), divergence="exact", rtol=1e-7, atol=1e-7
    )
    x = levels.to(torch.float64) / 16 * 2 - 1
    v = s2 + 0.002**2  # the model density at sigma_min is N(0, (s2 + sigma_min²) I)
    log_p = -0.5 * (x**2).sum() / v - 2 * math.log(2 * math.pi * v)
    want = -(log_p + 4 * math.log(2 / 16)) / (4 * math.log(2))
    assert float(bpd[0]) == pytest.approx(float(want), rel=1e-4)
    ll = log_likelihood(D_gauss, x, divergence="exact", rtol=1e-7, atol=1e-7)
    assert float(ll[0]) == pytest.approx(float(log_p), rel=1e-4)
    with pytest.raises(ValueError, match="levels"):
        bits_per_dim_levels(D_gauss, levels + 1, 17, dequantize="none", generator=torch.Generator())


def test_runs_on_unlabelled_data(tiny_nets, tmp_path, monkeypatch, capsys):
    """No class labels (imagefolder root images, 256 levels): the FD classifier would refuse the data, this stage
    does not; the CLI writes both numbers."""
    from PIL import Image

    from pipelines.evaluate import InputError, check_inputs
    from pipelines.likelihood import main
    from pipelines.prepare import prepare_dataset

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        ramp = np.add.outer(np.arange(8), np.arange(8)) * (8 + i)
        Image.fromarray(((ramp + rng.integers(0, 40, (8, 8))) % 256).astype(np.uint8), mode="L").save(
            folder / f"img{i:02d}.png"
        )
    card = prepare_dataset(
        "imagefolder", folder, tmp_path / "prepared", heldout_fraction=0.25, seed=0, shard_size=64, progress=False
    )
    assert card.labels.label_dim == 0 and card.image.num_levels == 256
    tiny_nets(tmp_path)
    s = {"data": tmp_path / "prepared", "teacher": tmp_path / "teacher", "student": tmp_path / "student"}
    with pytest.raises(InputError, match="no class labels"):  # the evaluate stage's classifier features
        check_inputs(_params({"evaluate": {"features": "classifier"}}), s["data"], s["teacher"], s["student"])
    params = tmp_path / "params.yaml"
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["likelihood"].update(TINY_LIK["likelihood"])
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(_args(s, tmp_path / "lik", params)) == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "lik" / "metrics.json").read_text())
    assert m["complete"] is True and m["num_images"] == 2
    assert math.isfinite(m["bpd_teacher"]) and math.isfinite(m["bpd_student"])


def test_bad_params_and_missing_inputs_exit_2_one_line(setup, tmp_path, capsys):
    from pipelines.likelihood import main

    bad = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    assert "  num_probes: 1\n" in text
    bad.write_text(text.replace("  num_probes: 1\n", "  num_probes: 0\n"))
    rc = main(_args(setup, tmp_path / "o", bad))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "likelihood.num_probes" in err[0], err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(text.replace("likelihood:", "likelihood:\n  bogus: 1", 1))
    rc = main(_args(setup, tmp_path / "o", unknown))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "likelihood.bogus" in err[0], err
    rc = main(_args({**setup, "student": tmp_path / "nope"}, tmp_path / "o", ROOT / "params.yaml"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--student" in err[0], err
    assert not (tmp_path / "o").exists()


def test_disabled_writes_complete_metrics_and_logs_to_mlflow(setup, tmp_path):
    """`enabled: false`: complete metrics without bpd keys (dvc metrics still works); logged to a likelihood run."""
    import mlflow

    from pipelines.likelihood import likelihood

    out = tmp_path / "lik"
    m = likelihood(
        _params({"likelihood": {"enabled": False}}),
        setup["data"],
        setup["teacher"],
        setup["student"],
        out,
        progress=False,
        device="cpu",
        log_mlflow=True,
    )
    assert json.loads((out / "metrics.json").read_text()) == m == {"enabled": False, "complete": True}
    assert json.loads((out / "details.json").read_text())["enabled"] is False
    runs = mlflow.search_runs(experiment_names=["ctm-digits"], output_format="list")
    assert len(runs) == 1 and runs[0].info.run_name.startswith("likelihood-")
    assert runs[0].data.metrics["likelihood_complete"] == 1.0
    assert runs[0].data.tags["ctm.likelihood.complete"] == "true"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "likelihood")}
    assert {"likelihood/metrics.json", "likelihood/details.json", "likelihood/likelihood_params.json"} <= arts
