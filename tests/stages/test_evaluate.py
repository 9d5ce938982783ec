"""Tests of the evaluate stage (pipelines/evaluate.py, pipelines/support/{evaluation,plots}.py) on a tiny digits setup.

One module-scoped fixture prepares the digits (8x8, 17 levels), saves a tiny random EDM teacher and a student
copied from it, and runs the stage once with tiny `evaluate` overrides; the tests check its outputs, that a
second run gives identical metrics, batch-size independence of samples, the missing-input error path and that
real data scored against itself gives FD ≈ 0 (bits/dim: tests/stages/test_likelihood_stage.py).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]

TINY_EVAL = {
    "evaluate": {
        "nfe": [1, 2],
        "gammas": [0.0, 1.0],
        "teacher_nfe": 3,
        "teacher_euler_nfe": 1,
        "num_samples": 160,  # 4 seed sets of set_size 40 (the held-out split's 180 would exceed num_samples)
        "set_size": 40,
        "batch": 80,
        "grid_size": 2,
        "ema": None,
        "classifier": {"steps": 13, "batch": 128, "lr": 2.0e-3, "seed": 0},
    }
}


def _params(overrides=TINY_EVAL):
    from pipelines.support.params import load_params

    return load_params(ROOT / "params.yaml", overrides=overrides, check_env=False)


@pytest.fixture(scope="module")
def setup(scored_inputs):
    return scored_inputs


@pytest.fixture(scope="module")
def first_run(setup):
    from pipelines.evaluate import evaluate

    out = setup["root"] / "eval"
    metrics = evaluate(
        _params(), setup["data"], setup["teacher"], setup["student"], out, progress=False, log_mlflow=False
    )
    return out, metrics


def test_outputs_keys_and_columns(setup, first_run):
    out, metrics = first_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    # metrics.json holds the headline only (what `dvc metrics show` prints)
    assert sorted(on_disk) == sorted(
        [
            "fd_nfe1",
            "fd_nfe1_std",
            "fd_nfe2",
            "fd_nfe2_std",
            "fd_teacher_heun3",
            "fd_teacher_heun3_std",
            "fd_teacher_euler1",
            "fd_heldout_vs_train",
            "complete",
        ]
    )
    assert on_disk["complete"] is True
    for k, v in on_disk.items():
        if k != "complete":
            assert isinstance(v, (int, float)) and math.isfinite(v), (k, v)
    details = json.loads((out / "fd_details.json").read_text())
    every = details["metrics"]  # every number lives in the details file
    assert {k: every[k] for k in on_disk} == on_disk
    assert every["set_size"] == 40 and every["num_sets"] == 4 and every["num_heldout"] > 40
    for key in (
        "fd_nfe2_gamma0",
        "fd_nfe2_gamma1",
        "fd_nfe1_gamma1",
        "fd_student_heun7",
        "fd_student_heun3",
        "fd_nfe1_over_teacher_heun3",
        "fd_nfe1_over_teacher_euler1",
        "fd_nfe1_over_floor",
        "fd_teacher_heun3_over_floor",
        "classifier_accuracy",
        "kid_nfe1",
    ):
        assert key in every, key
    assert every["fd_nfe1"] == every["fd_nfe1_gamma0"] == every["fd_nfe1_gamma1"]
    assert every["fd_nfe1_over_teacher_heun3"] == pytest.approx(every["fd_nfe1"] / every["fd_teacher_heun3"])
    assert every["fd_nfe1_over_floor"] == pytest.approx(every["fd_nfe1"] / every["fd_heldout_vs_train"])
    assert every["fd_nfe2_gamma0"] != every["fd_nfe2_gamma1"]  # gamma = 1 re-noises: other samples
    # the headline is the mean of the seed-set FDs and its std their spread: computed on the same sets
    sets = details["methods"]["fd_nfe1_gamma0"]["seed_sets"]
    assert len(sets["fds"]) == 4 and sets["set_size"] == 40
    assert on_disk["fd_nfe1"] == pytest.approx(float(np.mean(sets["fds"])), rel=1e-12)
    assert on_disk["fd_nfe1_std"] == pytest.approx(float(np.std(sets["fds"], ddof=1)), rel=1e-12)
    assert min(sets["fds"]) <= on_disk["fd_nfe1"] and sets["min"] == min(sets["fds"])
    assert details["seed_sets"] == [[0, 40], [40, 80], [80, 120], [120, 160]]
    assert not any(k.startswith("bpd_") for k in every)  # bits/dim is the likelihood stage
    with open(out / "fd_vs_nfe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["gamma", "nfe", "fd", "fd_std"]
    assert [(r["gamma"], int(r["nfe"])) for r in rows] == [("0", 1), ("0", 2), ("1", 1), ("1", 2)]
    for r in rows:
        assert float(r["fd"]) == pytest.approx(every[f"fd_nfe{r['nfe']}_gamma{r['gamma']}"], rel=1e-5)
    grids = {p.name for p in (out / "grids").glob("*.png")}
    assert {
        "data.png",
        "nfe1_gamma0.png",
        "nfe2_gamma1.png",
        "teacher_heun3.png",
        "teacher_euler1.png",
        "student_heun7.png",
    } <= grids
    assert (out / "fd_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert details["errors"] == [] and details["reference"]["splits"] == ["train"]
    assert not list(out.parent.glob(".eval.tmp-*"))  # staged folder renamed away
    # the feature space and the protocol identity (what a promotion gate compares)
    assert every["inception_features"] is False and every["feature_dim"] == 64
    assert details["features"] == "classifier" and details["inception"] is None
    proto = json.loads((out / "protocol.json").read_text())
    assert proto == details["protocol"]
    assert {
        k: proto[k] for k in ("features", "num_samples", "set_size", "seed_start", "reference_source", "feature_dim")
    } == {
        "features": "classifier",
        "num_samples": 160,
        "set_size": 40,
        "seed_start": 0,
        "reference_source": "data",
        "feature_dim": 64,
    }
    body = {k: v for k, v in proto.items() if k != "protocol_sha256"}
    import hashlib

    assert (
        proto["protocol_sha256"]
        == hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    )
    assert proto["reference_sha256"] == details["reference"]["sha256"] and len(proto["feature_net_sha256"]) == 64


def test_data_floor_is_heldout_against_the_train_reference(setup, first_run):
    """The floor is the held-out split's FD against the same train-split statistics the models are scored against,
    at the models' set size: subsets of set_size, or with set_size null the whole split (like with like)."""
    from ctm_core.config import with_changes
    from ctm_core.data.prepared import load_prepared
    from ctm_core.eval.classifier import classifier_features, load_classifier
    from ctm_core.eval.metrics import feature_statistics, frechet_distance

    out, metrics = first_run
    clf = load_classifier(out / "classifier")
    f_train = classifier_features(clf, load_prepared(setup["data"], "train")[0])
    f_held = classifier_features(clf, load_prepared(setup["data"], "heldout")[0])
    ref = feature_statistics(f_train)
    # set_size 40 < the held-out split: the floor is the mean over its disjoint 40-image subsets (like with like)
    subsets = [f_held[i : i + 40] for i in range(0, len(f_held) - 39, 40)]
    floor = np.mean([frechet_distance(*feature_statistics(f), *ref) for f in subsets])
    assert len(subsets) == len(f_held) // 40 >= 4
    assert metrics["fd_heldout_vs_train"] == pytest.approx(floor, rel=1e-9)
    whole = frechet_distance(*feature_statistics(f_held), *ref)
    assert metrics["fd_heldout_vs_train"] > whole  # FD's small-sample bias: the reason for the same size
    from pipelines.support.evaluation import _classifier_space

    params = _params()
    params = params.model_copy(
        update={"evaluate": with_changes(params.evaluate, {"set_size": None, "num_samples": 400})}
    )
    from ctm_core.data.prepared import load_card

    space = _classifier_space(params, load_card(setup["data"]), setup["data"], out.parent / "clf2", progress=False)
    assert space.set_size == len(f_held)


def test_deterministic(setup, first_run, tmp_path):
    """A second run through the CLI (params file, --no-mlflow) gives exactly the same metrics."""
    import yaml

    from pipelines.evaluate import main

    _, metrics = first_run
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["evaluate"].update(TINY_EVAL["evaluate"])
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    out2 = tmp_path / "eval2"
    rc = main(
        [
            "--params",
            str(params_file),
            "--data",
            str(setup["data"]),
            "--teacher",
            str(setup["teacher"]),
            "--student",
            str(setup["student"]),
            "--out",
            str(out2),
            "--no-progress",
            "--no-mlflow",
        ]
    )
    assert rc == 0
    again = json.loads((out2 / "metrics.json").read_text())
    assert set(again) == set(metrics)
    for k in metrics:
        if not k.endswith("_seconds"):
            assert again[k] == metrics[k], k
    # same classifier tensors and reference statistics -> the same protocol identity (file metadata such as the
    # classifier's training time does not enter it)
    first = json.loads((setup["root"] / "eval" / "protocol.json").read_text())
    assert json.loads((out2 / "protocol.json").read_text()) == first


def test_mlflow_logging_new_run_then_distill_run(setup, first_run):
    """No run.json -> an evaluate-<hash> run; run.json naming a distill run -> a nested run under it, one per
    evaluation (never two values of a metric at one step); unknown id -> back to the evaluate run (resumed)."""
    import mlflow

    from pipelines.support.evaluation import log_to_mlflow

    out, metrics = first_run
    params = _params()
    run_json = setup["student"] / "run.json"
    log_to_mlflow(params, setup["student"], out, metrics)
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["ctm-digits"], output_format="list")
    assert len(runs) == 1 and runs[0].info.run_name.startswith("evaluate-")
    assert runs[0].data.metrics["fd_nfe1"] == pytest.approx(metrics["fd_nfe1"])
    assert runs[0].data.metrics["complete"] == 1.0
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "eval")}
    assert {
        "eval/metrics.json",
        "eval/fd_details.json",
        "eval/fd_vs_nfe.png",
        "eval/fd_vs_nfe.csv",
        "eval/grids",
    } <= arts

    with mlflow.start_run(run_name="distill-fake") as distill:
        pass
    try:
        run_json.write_text(json.dumps({"mlflow_run_id": distill.info.run_id}))
        child = client.get_run(log_to_mlflow(params, setup["student"], out, metrics))
        assert child.data.tags["mlflow.parentRunId"] == distill.info.run_id
        logged = child.data
        assert logged.metrics["fd_teacher_heun3"] == pytest.approx(metrics["fd_teacher_heun3"])
        assert logged.tags["ctm.evaluate.complete"] == "true"
        assert logged.tags["ctm.evaluate.features"] == "classifier"
        assert (
            logged.tags["ctm.evaluate.protocol_sha256"]
            == json.loads((out / "protocol.json").read_text())["protocol_sha256"]
        )
        again = log_to_mlflow(params, setup["student"], out, metrics)  # a re-evaluation: its own child run
        assert again != child.info.run_id and len(client.get_metric_history(again, "fd_nfe1")) == 1
        assert "fd_nfe1" not in client.get_run(distill.info.run_id).data.metrics
        run_json.write_text(json.dumps({"mlflow_run_id": "0" * 32}))
        assert log_to_mlflow(params, setup["student"], out, metrics) == runs[0].info.run_id
    finally:
        run_json.unlink()
    assert len(mlflow.search_runs(experiment_names=["ctm-digits"], output_format="list")) == 4


@pytest.mark.parametrize("kind,nfe,gamma", [("gamma", 2, 1.0), ("teacher_heun", 3, None)])
def test_sample_does_not_depend_on_batch_size(setup, kind, nfe, gamma):
    from ctm_core.eval.methods import Method, sample_method
    from ctm_core.io.student_format import load_student
    from ctm_core.io.teacher_format import load_edm_checkpoint

    student = load_student(setup["student"], "online")
    teacher = load_edm_checkpoint(setup["teacher"])
    m = Method("x", kind, nfe, gamma)
    kw = dict(img_shape=(1, 8, 8), label_dim=0)
    big = sample_method(m, student, teacher, seeds=[5, 6, 7, 8], batch=4, **kw)
    small = sample_method(m, student, teacher, seeds=[5, 6, 7, 8], batch=1, **kw)
    alone = sample_method(m, student, teacher, seeds=[7], batch=1, **kw)
    # float32 convolutions may pick other kernels per batch size: equal up to rounding (1e-4 of the scale),
    # while a seed mix-up would differ by O(1)
    torch.testing.assert_close(big, small, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(big[2:3], alone, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(big[0], big[1])  # different seeds, different images


def test_missing_student_fails_before_work(setup, tmp_path, capsys):
    from pipelines.evaluate import main

    out = tmp_path / "eval"
    rc = main(
        [
            "--params",
            str(ROOT / "params.yaml"),
            "--data",
            str(setup["data"]),
            "--teacher",
            str(setup["teacher"]),
            "--student",
            str(tmp_path / "nope"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "--student" in err[0] and "nope" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".eval*"))


def test_missing_ema_variant_fails_before_work(setup, tmp_path, capsys):
    from pipelines.evaluate import main

    out = tmp_path / "eval"  # evaluate.ema 0.999, the tiny student only has 'online'
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"]["ema"] = 0.999
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc = main(
        [
            "--params",
            str(tmp_path / "params.yaml"),
            "--data",
            str(setup["data"]),
            "--teacher",
            str(setup["teacher"]),
            "--student",
            str(setup["student"]),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "evaluate.ema" in err[0] and "ema_0.999" in err[0]
    assert not out.exists()


def test_diverged_student_is_incomplete(setup, tmp_path):
    """Non-finite student samples: the stage still writes the teacher numbers but complete=false, no fd_nfe1."""
    from ctm_core.io.student_format import load_student, save_student
    from pipelines.evaluate import evaluate

    student = load_student(setup["student"], "online")
    sd = {
        k: torch.full_like(v, float("nan")) if k.endswith("aux_conv.weight") else v
        for k, v in student.state_dict().items()
    }
    save_student(tmp_path / "student", student.init_kwargs, {"online": sd})
    ov = {
        "evaluate": {
            **TINY_EVAL["evaluate"],
            "nfe": [1],
            "num_samples": 40,
            "set_size": 40,
            "classifier": {"steps": 1, "batch": 128, "lr": 1.0e-3, "seed": 0},
        }
    }
    m = evaluate(
        _params(ov),
        setup["data"],
        setup["teacher"],
        tmp_path / "student",
        tmp_path / "eval",
        progress=False,
        log_mlflow=False,
    )
    assert m["complete"] is False and "fd_nfe1" not in m and "fd_teacher_heun3" in m
    details = json.loads((tmp_path / "eval" / "fd_details.json").read_text())
    # one seed set of 40 (set_size = num_samples): the std comes from the bootstrap replicates of that set
    heun = details["methods"]["fd_teacher_heun3"]
    assert len(heun["seed_sets"]["fds"]) == 1 and heun["bootstrap"]["num_bootstrap"] == 200
    assert m["fd_teacher_heun3"] == heun["seed_sets"]["fds"][0] and m["fd_teacher_heun3_std"] > 0
    assert any(e.startswith("fd_nfe1_gamma0:") for e in details["errors"])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["complete"] is False


def test_bad_params_one_line_exit_2(tmp_path, capsys):
    from pipelines.evaluate import main

    bad = tmp_path / "params.yaml"
    bad.write_text((ROOT / "params.yaml").read_text().replace("teacher_nfe: 35", "teacher_nfe: 34"))
    rc = main(["--params", str(bad), "--data", "d", "--teacher", "t", "--student", "s", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "evaluate.teacher_nfe" in err[0]


def test_fd_path_data_against_itself_is_zero(setup):
    """Real images through the samples' path (unit range -> clamp -> levels -> features) give FD ≈ 0 vs themselves,
    and the quantisation inverts prepare's level mapping exactly."""
    from ctm_core.data.prepared import levels_to_unit, load_prepared
    from ctm_core.eval.classifier import classifier_features, train_classifier
    from ctm_core.eval.metrics import feature_statistics, frechet_distance, images_to_levels
    from ctm_core.eval.scoring import fd_summary

    x, y = load_prepared(setup["data"], "train")
    x_unit = torch.from_numpy(levels_to_unit(x, 17)).to(torch.float64)
    q = images_to_levels(x_unit.clamp(-1, 1), 17)
    assert torch.equal(q, torch.from_numpy(x))
    clf, _ = train_classifier(
        x[:256], y[:256], 17, epochs=1, batch_size=128, generator=torch.Generator().manual_seed(0)
    )
    f = classifier_features(clf, q)
    mu, sigma = feature_statistics(classifier_features(clf, x))
    flat, det = fd_summary("fd_x", f, mu, sigma, [slice(0, len(f))], seed=0)
    assert abs(flat["fd_x"]) < 1e-6 * np.trace(sigma)
    assert len(det["seed_sets"]["fds"]) == 1 and flat["fd_x_std"] >= 0
    shifted = f + 0.1
    assert frechet_distance(*feature_statistics(shifted), mu, sigma) == pytest.approx(0.01 * f.shape[1], rel=1e-6)


def test_grid_image_places_cells_row_major():
    from pipelines.support.plots import grid_image

    levels = np.zeros((3, 1, 2, 2), dtype=np.uint8)
    levels[1, 0, 0, 1] = 16  # image 1: top-right pixel white
    g = grid_image(levels, 17, 2, scale=1)  # 2x2 cells of 2x2 pixels, 2-pixel separators
    assert g.shape == (2 * (2 + 2) + 2, 2 * (2 + 2) + 2)
    assert g[2, 2 + 4 + 1] == 255 and g[2:4, 2:4].max() == 0  # cell (0, 1) holds image 1; cell (0, 0) image 0
    assert g[6:8, 6:8].max() == 0 and g[0, 0] == 96  # missing 4th cell black, separators grey
