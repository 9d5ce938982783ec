"""Tests of the tune stage (pipelines/tune.py) and the distill loop's quality hook.

Disabled search: no overrides are written and Ray is never started. Enabled search on the digits
default with a tiny random teacher: 2 trials × 3 reports on a local Ray with the dashboard on (Tune + Train V2 need
the State API to release placement groups, docs/stack.md#1112-state-api). The space is one `lr` choice and the searcher
is told to try lr = 1e-4 first and lr = 1e3 second: the second student diverges (its 1-step FD at the first report is
measurably worse: 135.6 vs 126.2 here, deterministic on CPU), so ASHA (grace 1, reduction factor 2, max_t 3,
concurrency 1) must stop it at its first rung while the first trial runs all 3 iterations. The same test checks
best_params.yaml (only the chosen distill overrides) as the distill stage reads it, the MLflow parent + 2 nested runs,
that a re-run
restores the finished experiment (no new trials, no duplicate runs) and that no placement group or Ray process is
left. The quality hook itself is compared with the evaluate stage's fd_nfe1 protocol without Ray.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
LR_GOOD, LR_BAD = 1.0e-4, 1.0e3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_params(path: Path, **changes) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in changes.items():
        raw[section] = {**raw[section], **values}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


TINY = {
    "distill": {
        "N": 6,
        "K": 2,
        "batch": 16,
        "microbatch": 16,
        "steps": 3,
        "checkpoint_every": 1,
        "log_every": 1,
        "eval_emas": [0.9],
    },
    "tune": {
        "enabled": True,
        "num_samples": 2,
        "max_concurrent_trials": 1,
        "steps": 3,
        "report_every": 1,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 3},
        "search_alg": "optuna",
        "metric": "fd_nfe1",
        "mode": "min",
        "space": {"lr": {"type": "choice", "values": [LR_GOOD, LR_BAD]}},
        "seed": 0,
    },
    "evaluate": {
        "num_samples": 128,
        "batch": 128,
        "ema": None,
        "classifier": {"steps": 13, "batch": 128, "lr": 2.0e-3, "seed": 0},
    },
}


def _ray_processes(marker: str) -> list[int]:
    """PIDs whose command line mentions `marker` (the private temp dir of the test's Ray)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and int(d.name) != os.getpid():
                pids.append(int(d.name))
    return pids


def test_disabled_writes_no_overrides_without_ray(tmp_path):
    import ray

    from pipelines.support.params import load_params, read_overrides
    from pipelines.tune import main

    out = tmp_path / "artifacts" / "best_params.yaml"
    assert (
        main(
            [
                "--params",
                str(ROOT / "params.yaml"),
                "--data",
                str(tmp_path / "missing"),
                "--teacher",
                str(tmp_path / "missing"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert not ray.is_initialized()
    assert yaml.safe_load(out.read_text()) == {} and read_overrides(out) == {}
    params = load_params(ROOT / "params.yaml", check_env=False)
    assert load_params(ROOT / "params.yaml", read_overrides(out), check_env=False) == params
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # atomic write left no temp file


def test_bad_params_exit_2_one_line(tmp_path, capsys):
    from pipelines.tune import main

    bad = {**TINY["tune"], "space": {"K": {"type": "choice", "values": [2, 40]}}}  # K = 40 >= N = 18
    params = _write_params(tmp_path / "params.yaml", tune=bad)
    out = tmp_path / "best_params.yaml"
    assert main(["--params", str(params), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tune.space.K" in err and "40" in err
    assert not out.exists()


def test_enabled_missing_inputs_exit_2(tmp_path, capsys):
    from pipelines.tune import main

    params = _write_params(tmp_path / "params.yaml", **TINY, ray={"num_workers": 1})
    out = tmp_path / "best_params.yaml"
    assert (
        main(
            [
                "--params",
                str(params),
                "--data",
                str(tmp_path / "nope"),
                "--teacher",
                str(tmp_path / "nope"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nope" in err
    assert not out.exists()


def test_max_concurrent_from_resources():
    from pipelines.support.params import load_params
    from pipelines.support.tune_search import max_concurrent

    p = load_params(ROOT / "params.yaml", overrides={"tune": {"max_concurrent_trials": 8}}, check_env=False)
    # 2 workers × 1 CPU + 1 CPU trial driver = 3 per trial, one CPU kept for Ray Data.
    assert max_concurrent(p, {"CPU": 4.0}, 2) == 1
    assert max_concurrent(p, {"CPU": 10.0}, 2) == 3
    assert max_concurrent(p, {"CPU": 100.0}, 2) == 8  # capped by tune.max_concurrent_trials
    assert max_concurrent(p, {"CPU": 2.0}, 2) == 1  # never 0


def test_trials_tune_the_ctm_dsm_phase():
    """With the GAN recipe on, a trial trains phase 1 (no GAN, no feature networks), with the sampled values and the
    tune budget; the chosen overrides then reach both phases through the distill section."""
    from ctm_core.config import gan_phases, with_changes
    from pipelines.support.params import load_params
    from pipelines.support.tune_search import trial_section

    p = load_params(
        ROOT / "params.yaml",
        overrides={"distill": {"gan": {"enabled": True, "steps": 10, "changes": {"K": 4}}}},
        check_env=False,
    )
    d = trial_section(p, {"lr": 2.0e-4, "K": 6})
    assert not d.gan.enabled and d.gan == type(d.gan)()
    assert (d.lr, d.K, d.steps, d.checkpoint_every) == (2.0e-4, 6, p.tune.steps, p.tune.report_every)
    _, phase2 = gan_phases(with_changes(p.distill, {"lr": 2.0e-4}))
    assert phase2 is not None and phase2.gan.enabled and (phase2.lr, phase2.K) == (2.0e-4, 4)


@pytest.fixture(scope="module")
def tiny_setup(tiny_nets, tmp_path_factory):
    from pipelines.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("tune")
    prepare_dataset(
        "sklearn-digits", None, root / "prepared", heldout_fraction=0.1, seed=0, shard_size=4096, progress=False
    )
    tiny_nets(root, student=False)
    return root


@pytest.mark.ray
def test_enabled_asha_optuna_mlflow_and_cleanup(tiny_setup, monkeypatch):
    import mlflow
    import ray
    from ray.util.state import list_placement_groups

    from pipelines.support import ray_env
    from pipelines.support.params import load_params, read_overrides
    from pipelines.support.tune_search import TRIAL_ID_TAG
    from pipelines.tune import run_tune

    root = tiny_setup
    temp_dir = f"/tmp/ray_tt{os.getpid()}"
    params_file = _write_params(
        root / "params.yaml",
        **TINY,
        ray={
            "num_workers": 1,
            "cpus_per_worker": 1.0,
            "num_cpus": 4,
            "max_failures": 0,
            "storage_path": str(root / "ray_results"),
            "temp_dir": temp_dir,
            "dashboard_port": _free_port(),
        },
    )
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(root))  # MLflow artifacts next to the test DB, not in the repo
    params = load_params(params_file)
    out = root / "artifacts" / "best_params.yaml"

    ray_env.init_local_ray(4, temp_dir, params.ray.dashboard_port, 200)
    try:
        gcs = ray.get_runtime_context().gcs_address
        t0 = time.time()
        payload = run_tune(
            params,
            data_dir=root / "prepared",
            teacher_dir=root / "teacher",
            out=out,
            points_to_evaluate=[{"lr": LR_GOOD}, {"lr": LR_BAD}],
        )
        first_s = time.time() - t0
        print(f"tune with 2 trials: {first_s:.1f} s", file=sys.stderr)

        # ASHA: the diverging second trial is stopped at the first rung, the first runs all max_t iterations.
        trials = {t["config"]["lr"]: t for t in payload["trials"]}
        assert set(trials) == {LR_GOOD, LR_BAD}
        assert trials[LR_GOOD]["iterations"] == trials[LR_GOOD]["steps"] == 3
        assert trials[LR_BAD]["iterations"] < trials[LR_GOOD]["iterations"]
        assert trials[LR_BAD]["value"] > trials[LR_GOOD]["value"]

        # best_params.yaml: only the best trial's distill values, merged into params.yaml by the distill stage.
        raw = yaml.safe_load(out.read_text())
        assert raw == payload["overrides"] == {"distill": {"lr": LR_GOOD}}  # the trial budget does not leak into it
        assert payload["tuned"] is True and payload["metric"] == "fd_nfe1"
        assert math.isfinite(payload["value"]) and payload["value"] == trials[LR_GOOD]["value"]
        assert payload["trial_id"] == trials[LR_GOOD]["trial_id"] and payload["trial_id"] in out.read_text()
        d = load_params(params_file, read_overrides(out)).distill
        assert d == params.distill.model_copy(update={"lr": LR_GOOD})

        # MLflow: one parent run, one nested run per trial with the per-report metric history.
        client = mlflow.MlflowClient(tracking_uri=uri)
        parent = client.get_run(payload["mlflow_parent_run_id"])
        assert parent.info.status == "FINISHED" and parent.data.tags["ctm.run_key"] == payload["experiment"]
        assert parent.data.metrics["best_fd_nfe1"] == pytest.approx(payload["value"])
        assert parent.data.metrics["num_stopped_early"] == 1
        children = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert len(children) == 2
        by_trial = {c.data.tags[TRIAL_ID_TAG]: c for c in children}
        assert set(by_trial) == {t["trial_id"] for t in payload["trials"]}
        for t in payload["trials"]:
            run = by_trial[t["trial_id"]]
            assert float(run.data.params["lr"]) == t["config"]["lr"]
            hist = client.get_metric_history(run.info.run_id, "fd_nfe1")
            assert [h.step for h in hist] == list(range(1, t["steps"] + 1))  # MLflow step = distill step
            assert hist[-1].value == pytest.approx(t["value"])

        # Re-running the stage restores the (finished) Tune experiment instead of starting over.
        out.unlink()
        t0 = time.time()
        again = run_tune(params, data_dir=root / "prepared", teacher_dir=root / "teacher", out=out)
        print(f"tune re-run (restore): {time.time() - t0:.1f} s", file=sys.stderr)
        assert again["experiment"] == payload["experiment"] and again["trial_id"] == payload["trial_id"]
        assert again["mlflow_parent_run_id"] == payload["mlflow_parent_run_id"]
        assert (
            len(
                client.search_runs(
                    [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
                )
            )
            == 2
        )

        # No placement group left behind (the PG cleaner needs the dashboard's State API).
        deadline = time.time() + 60
        while True:
            # Other Ray clusters may run on a shared machine: ask ours (its GCS address) explicitly.
            pgs = list_placement_groups(address=gcs, detail=True)
            states = [pg.state for pg in pgs]
            if all(s == "REMOVED" for s in states) or time.time() > deadline:
                break
            time.sleep(2)
        assert states and all(s == "REMOVED" for s in states), [(pg.name, pg.state, pg.creator_job_id) for pg in pgs]
    finally:
        ray_env.shutdown()
    assert not ray.is_initialized()
    deadline = time.time() + 30
    while _ray_processes(temp_dir) and time.time() < deadline:
        time.sleep(1)
    assert _ray_processes(temp_dir) == []
    shutil.rmtree(temp_dir, ignore_errors=True)  # Ray leaves its session logs in the temp dir


def test_quality_probe_matches_evaluate_protocol(tiny_setup, tmp_path):
    """The distill loop's quality hook = the evaluate stage's fd_nfe1 protocol on the same weights and seeds; the
    reference statistics are those of all real images; a diverged (NaN) student gets a finite FD, flagged."""
    import types

    import numpy as np

    from ctm_core.data.prepared import load_card
    from ctm_core.eval.classifier import classifier_features
    from ctm_core.eval.methods import Method, sample_method
    from ctm_core.eval.methods import train_feature_classifier as _train_feature_classifier
    from ctm_core.eval.metrics import feature_statistics, frechet_distance, images_to_levels
    from ctm_core.io.teacher_format import load_edm_checkpoint
    from ctm_core.nets.student import CTMStudent
    from pipelines.support.params import load_params
    from pipelines.support.ray_train import QualityProbe
    from pipelines.support.tune_search import prepare_quality

    root = tiny_setup
    params = load_params(
        ROOT / "params.yaml",
        overrides={"evaluate": {**TINY["evaluate"], "num_samples": 96, "batch": 40, "seed_start": 7}},
        check_env=False,
    )
    card = load_card(root / "prepared")
    quality = prepare_quality(params, card, root / "prepared", tmp_path / "q")
    assert quality["num_samples"] == 96 and quality["seed"] == 7 and quality["ema"] is None
    quality.pop("classifier_accuracy")
    probe = QualityProbe(quality, card, torch.device("cpu"))

    # Independent recomputation: classifier retrained (seeded: same weights), statistics of train + held-out.
    clf, info, (x_train, x_held) = _train_feature_classifier(params, card, root / "prepared", tmp_path / "c", False)
    for k, v in clf.state_dict().items():  # same weights (the file hash differs: its metadata has timings)
        assert torch.equal(probe.classifier.state_dict()[k], v), k
    mu_ref, sigma_ref = feature_statistics(
        np.concatenate([classifier_features(clf, x_train), classifier_features(clf, x_held)])
    )
    np.testing.assert_allclose(probe.reference.mu, mu_ref, rtol=0, atol=1e-12)
    student = CTMStudent.from_teacher(load_edm_checkpoint(root / "teacher")).train()
    x = sample_method(
        Method("fd_nfe1_gamma0", "gamma", 1, 0.0),
        student.eval(),
        None,
        seeds=range(7, 103),
        batch=96,
        img_shape=(1, 8, 8),
    )
    expected = frechet_distance(
        *feature_statistics(classifier_features(clf, images_to_levels(x.clamp(-1, 1), 17))), mu_ref, sigma_ref
    )
    student.train()
    got = probe(types.SimpleNamespace(model=student, emas={}))
    assert got["fd_nfe1"] == pytest.approx(expected, rel=1e-9) and got["fd_nfe1_nonfinite"] == 0.0
    assert student.training  # the probe restores the training mode

    class Diverged(torch.nn.Module):
        sigma_min, sigma_max, label_dim = 0.002, 80.0, 0

        def G(self, x_t, t, s, class_labels=None):
            return torch.full_like(x_t, float("nan"))

    bad = probe(types.SimpleNamespace(model=Diverged(), emas={}))
    assert bad["fd_nfe1_nonfinite"] == 1.0 and math.isfinite(bad["fd_nfe1"]) and bad["fd_nfe1"] > got["fd_nfe1"]


@pytest.mark.ray
@pytest.mark.slow
def test_killed_tune_stage_resumes_its_experiment(tiny_setup, tmp_path):
    """SIGKILL `python -m pipelines.tune` (its whole process group, as killing `dvc repro` does) once the first trial
    has a complete checkpoint; the re-run prints that it resumes the same Tune experiment, finishes both trials and
    leaves exactly one parent MLflow run with two nested runs (no duplicates)."""
    import signal
    import subprocess

    import mlflow

    root = tiny_setup
    temp_dir = f"/tmp/ray_tk{os.getpid()}"
    storage = tmp_path / "ray_results"
    tune_cfg = {**TINY["tune"], "steps": 6, "scheduler": {**TINY["tune"]["scheduler"], "max_t": 6}}
    params_file = _write_params(
        tmp_path / "params.yaml",
        **{**TINY, "tune": tune_cfg},
        ray={
            "num_workers": 1,
            "cpus_per_worker": 1.0,
            "num_cpus": 4,
            "max_failures": 0,
            "storage_path": str(storage),
            "temp_dir": temp_dir,
            "dashboard_port": _free_port(),
        },
    )
    out = tmp_path / "best_params.yaml"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "DVC_"))}
    env.update(MLFLOW_TRACKING_URI=uri, DVC_ROOT=str(tmp_path), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "pipelines.tune",
        "--params",
        str(params_file),
        "--data",
        str(root / "prepared"),
        "--teacher",
        str(root / "teacher"),
        "--out",
        str(out),
    ]

    def complete_checkpoints() -> list[Path]:
        return sorted(storage.rglob("checkpoint_*/complete.json")) if storage.exists() else []

    try:
        first = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.time() + 300
        while not complete_checkpoints() and first.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert first.poll() is None, "the search ended before it could be killed (make the trials longer)"
        assert complete_checkpoints(), "no trial checkpoint within 300 s"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        t_kill = time.time()
        killed_with = len(complete_checkpoints())
        for pid in _ray_processes(temp_dir):  # the local Ray the killed driver started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not out.exists()

        second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        recovery_s = time.time() - t_kill
        assert second.returncode == 0, second.stderr[-4000:]
        assert "tune: resuming the Tune experiment" in second.stderr, second.stderr[-4000:]
        raw = yaml.safe_load(out.read_text())
        assert set(raw) == {"distill"} and set(raw["distill"]) == {"lr"}  # only the chosen overrides
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(yaml.safe_load(params_file.read_text())["mlflow"]["experiment_name"])
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.`ctm.stage` = 'tune'")
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the stage's run; trials nest in it
        assert parent.info.status == "FINISHED"
        assert math.isfinite(parent.data.metrics["best_fd_nfe1"])
        children = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert len(children) == 2, [c.data.tags for c in children]
        parents = client.search_runs([parent.info.experiment_id], filter_string="tags.`ctm.stage` = 'tune'")
        assert len({r.data.tags.get("mlflow.parentRunId", r.info.run_id) for r in parents}) == 1
        print(
            f"FAULT kill -9 tune stage after {killed_with} complete trial checkpoint(s); re-run resumed the "
            f"experiment and finished in {recovery_s:.1f} s",
            file=sys.stderr,
        )
    finally:
        for pid in _ray_processes(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
