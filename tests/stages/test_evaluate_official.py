"""The evaluate stage scoring a released-layout CTM checkpoint (`evaluate.student_source`, docs/official.md).

A tiny random student in the sony/ctm ImageNet-64 layout (ADM, 3 classes, built for 16x16) is saved the way the
official training loop saves it (views into flat storages), pinned by sha256 and named by
`evaluate.student_source`; the real stage code (check_inputs -> fetch through file:// with the pin -> weights-only
load -> samplers -> classifier-feature FD) scores it on 16x16 RGB images in 3 class folders against a tiny 3-class
EDM teacher. No `--student` folder exists: the released file is the student.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FLAGS = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="8",
    num_head_channels=16,
    num_classes=3,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, save_like_official, rgb_class_folders):
    from ctm_core.io.teacher_format import save_teacher
    from ctm_core.nets.official.loader import build_official_ctm
    from ctm_core.nets.precond import EDMPrecond
    from pipelines.support.datasets import prepare_dataset

    root = tmp_path_factory.mktemp("official_eval")
    data = root / "prepared"
    images = rgb_class_folders(root / "images", 3, 8, 16)  # 3 classes of 8 RGB images
    card = prepare_dataset("imagefolder", images, data, heldout_fraction=0.25, seed=0, progress=False)
    assert card.labels.label_dim == 3 and card.image.shape == (3, 16, 16)

    torch.manual_seed(0)
    teacher = EDMPrecond(16, 3, label_dim=3, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    save_teacher("EDMPrecond", teacher.init_kwargs, teacher.eval().state_dict(), root / "teacher")

    student = build_official_ctm("sony-ctm-imagenet64", **FLAGS)
    with torch.no_grad():
        for p in student.parameters():  # ADM zero-initialises its output convs: make the student non-trivial
            p.add_(0.05 * torch.randn_like(p))
    ckpt = root / "ema_0.999_000100.pt"
    save_like_official(student.model.state_dict(), ckpt)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("DVC_ROOT", str(root))
    yield {
        "root": root,
        "data": data,
        "teacher": root / "teacher",
        "ckpt": ckpt,
        "sha": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
        "student": student.eval(),
    }
    mp.undo()


def _params(s, **source):
    from pipelines.support.params import load_params

    src = {"uri": s["ckpt"].as_uri(), "sha256": s["sha"], "preset": "sony-ctm-imagenet64", "flags": FLAGS, **source}
    ev = {
        "nfe": [1],
        "gammas": [0.0],
        "teacher_nfe": 3,
        "teacher_euler_nfe": 1,
        "num_samples": 12,
        "set_size": 12,  # one seed set (the default set size is the held-out split's, which may exceed 12)
        "batch": 12,
        "grid_size": 2,
        "num_bootstrap": 5,
        "cache_dir": str(s["root"] / "cache"),
        "classifier": {"steps": 4, "batch": 16, "lr": 2.0e-3, "seed": 0},
        "student_source": src,
    }
    return load_params(ROOT / "params.yaml", overrides={"evaluate": ev}, check_env=False)


def _evaluate(s, out, params):
    from pipelines.evaluate import evaluate

    no_student = s["root"] / "no-student-folder"  # the released file replaces --student
    return evaluate(params, s["data"], s["teacher"], no_student, out, progress=False, log_mlflow=False)


def test_evaluate_scores_the_released_checkpoint(setup, tmp_path):
    s = setup
    out = tmp_path / "eval"
    metrics = _evaluate(s, out, _params(s))
    assert metrics["complete"] is True
    for key in ("fd_nfe1", "fd_teacher_heun3", "fd_teacher_euler1"):
        assert math.isfinite(metrics[key]) and metrics[key] >= 0, key
    details = json.loads((out / "fd_details.json").read_text())
    assert details["student"]["variant"] == f"official:sony-ctm-imagenet64@sha256:{s['sha']}"
    # The fetched copy is the pinned file, in the cache.
    cached = list((s["root"] / "cache" / "official").rglob("ema_0.999_000100.pt"))
    assert len(cached) == 1 and hashlib.sha256(cached[0].read_bytes()).hexdigest() == s["sha"]
    # The register stage's check reads this very output and refuses it (tests/stages/test_register_official.py).
    from pipelines.evaluate import InputError
    from pipelines.support.student_source import check_registrable

    with pytest.raises(
        InputError, match=f"scored the released checkpoint official:sony-ctm-imagenet64@sha256:{s['sha']}"
    ):
        check_registrable(out)


def test_the_stage_samples_the_released_student(setup):
    """The student the stage loads from the source is the saved network: its 1-step samples on the stage's seeds
    equal gamma_sampler on the network that was saved."""
    from ctm_core.diffusion.samplers import StackedRandomGenerator, gamma_sampler
    from ctm_core.eval.methods import plan_methods, sample_method
    from pipelines.support.stage_common import check_inputs, load_scored_networks

    s = setup
    params = _params(s)
    checked = check_inputs(params, s["data"], s["teacher"], s["root"] / "absent")
    _, student = load_scored_networks(s["teacher"], s["root"] / "absent", checked["variant"], torch.device("cpu"))
    method = next(m for m in plan_methods(params) if m.key == "fd_nfe1_gamma0")
    seeds = [0, 1, 2]
    x = sample_method(method, student, None, seeds=seeds, batch=3, img_shape=(3, 16, 16), label_dim=3)
    rnd = StackedRandomGenerator("cpu", seeds)
    latents = rnd.randn([3, 3, 16, 16])
    labels = torch.eye(3)[rnd.randint(3, [3])]
    with torch.no_grad():
        ref = gamma_sampler(s["student"], latents, labels, nfe=1)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)


def test_bad_sources_fail_in_one_line_before_any_output(setup, tmp_path):
    from pipelines.evaluate import InputError

    s = setup
    cases = [
        ({"sha256": "0" * 64}, "evaluate.student_source.uri"),  # pin mismatch
        ({"flags": {**FLAGS, "num_channels": 64}}, "first mismatching key time_embed.0.weight: checkpoint [128, 32]"),
        ({"flags": {**FLAGS, "num_classes": 5}}, "first mismatching key label_emb.weight"),
        ({"preset": "ctm-cifar10", "flags": {"label_dim": 3}}, "does not fit preset 'ctm-cifar10'"),
    ]
    for i, (source, expected) in enumerate(cases):
        out = tmp_path / f"eval{i}"
        with pytest.raises(InputError) as e:
            _evaluate(s, out, _params(s, **source))
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not out.exists()


CLASSIFIER_FLAGS = dict(
    image_size=16,
    classifier_width=32,
    classifier_depth=1,
    classifier_attention_resolutions="8",
    num_classes=3,
    channel_mult="1,2",
)


def _adm_classifier(folder: Path, **flags):
    """A tiny random ADM noisy classifier saved as a plain state dict: (network, path, sha256)."""
    from ctm_core.eval.rejection import build_adm_classifier

    torch.manual_seed(0)
    net = build_adm_classifier(**{**CLASSIFIER_FLAGS, **flags}).eval()
    path = folder / "64x64_classifier.pt"
    torch.save(net.state_dict(), path)
    return net, path, hashlib.sha256(path.read_bytes()).hexdigest()


def _rejection_params(s, path, sha, **flags):
    from pipelines.support.params import load_params

    rj = {"enabled": True, "classifier_uri": path.as_uri(), "classifier_sha256": sha}
    rj["classifier_flags"] = {**CLASSIFIER_FLAGS, **flags}
    ev = {**_params(s).section("evaluate"), "rejection": rj}
    return load_params(ROOT / "params.yaml", overrides={"evaluate": ev}, check_env=False)


def test_evaluate_scores_classifier_rejection(setup, tmp_path):
    """evaluate.rejection.enabled: the real stage scores `fd_nfe1_rejection` (metrics.json and fd_details.json),
    and it equals the FD computed here from rejection_sample on the saved student and classifier networks (seeds
    0..17, 12 kept), featurised by the stage's own feature classifier against the train split's statistics."""
    from ctm_core.data.prepared import load_prepared
    from ctm_core.eval.classifier import classifier_features, load_classifier
    from ctm_core.eval.metrics import feature_statistics, frechet_distance, images_to_levels
    from ctm_core.eval.rejection import rejection_sample

    s = setup
    net, path, sha = _adm_classifier(tmp_path)
    out = tmp_path / "eval"
    headline = _evaluate(s, out, _rejection_params(s, path, sha))
    details = json.loads((out / "fd_details.json").read_text())
    assert headline["complete"] is True and len(headline) <= 20
    assert headline["fd_nfe1_rejection"] == details["metrics"]["fd_nfe1_rejection"]
    assert "fd_nfe1_rejection_std" in headline
    rej = details["methods"]["fd_nfe1_rejection"]["rejection"]
    assert rej["pool"] == 18 and rej["pool_seeds"] == [0, 17] and rej["classifier_sha256"] == sha

    x, _, keep = rejection_sample(s["student"], net, list(range(18)), num_out=12, img_shape=(3, 16, 16), batch=12)
    assert rej["kept_distinct"] == len(set(keep.tolist()))
    clf = load_classifier(out / "classifier")
    mu, sigma = feature_statistics(classifier_features(clf, load_prepared(s["data"], "train")[0]))
    f = classifier_features(clf, images_to_levels(x.clamp(-1, 1), clf.num_levels))
    expected = frechet_distance(*feature_statistics(f), mu, sigma)
    assert headline["fd_nfe1_rejection"] == pytest.approx(expected, rel=1e-6, abs=1e-9)

    # Without rejection the key is in neither file.
    plain = _evaluate(s, tmp_path / "plain", _params(s))
    assert "fd_nfe1_rejection" not in plain


def test_rejection_classifier_must_fit_the_data(setup, tmp_path):
    """A classifier of another class count fails in one line before any output."""
    from pipelines.evaluate import InputError

    s = setup
    _, path, sha = _adm_classifier(tmp_path, num_classes=5)
    out = tmp_path / "eval"
    with pytest.raises(InputError) as e:
        _evaluate(s, out, _rejection_params(s, path, sha, num_classes=5))
    assert "evaluate.rejection: the classifier scores 5 classes at 16x16" in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and not out.exists()


def test_rejection_classifier_is_fetched_with_its_pin(setup, tmp_path):
    """evaluate.rejection's classifier: fetched through file:// with the sha256 pin, loaded in the ADM layout."""
    from pipelines.evaluate import InputError
    from pipelines.support.params import load_params
    from pipelines.support.student_source import load_rejection_classifier

    net, path, sha = _adm_classifier(tmp_path)

    def params(sha256):
        rj = {"classifier_uri": path.as_uri(), "classifier_sha256": sha256, "classifier_flags": CLASSIFIER_FLAGS}
        ev = {"cache_dir": str(tmp_path / "cache"), "rejection": rj}
        return load_params(ROOT / "params.yaml", overrides={"evaluate": ev}, check_env=False)

    loaded = load_rejection_classifier(params(sha), "cpu")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.01, 0.5])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), net(x, t))
    with pytest.raises(InputError, match="evaluate.rejection: .*sha256"):
        load_rejection_classifier(params("1" * 64), "cpu")

    # The stage-side call: N = evaluate.num_samples kept out of N·1.5 one-step samples of the released student.
    from pipelines.support.student_source import rejection_samples

    ev = {**_params(setup).section("evaluate"), "rejection": params(sha).section("evaluate")["rejection"]}
    p = load_params(ROOT / "params.yaml", overrides={"evaluate": ev}, check_env=False)
    x, details = rejection_samples(p, setup["student"], img_shape=(3, 16, 16), device="cpu")
    assert x.shape == (12, 3, 16, 16) and details["pool"] == 18 and details["classifier_sha256"] == sha
    assert details["pool_seeds"] == [0, 17] and 1 <= details["kept_distinct"] <= 12


@pytest.mark.slow  # an adaptive ODE solve per network: ~15 s on 2 cores
def test_likelihood_stage_scores_the_released_checkpoint(setup, tmp_path):
    """`likelihood` reads the same evaluate.student_source: bits/dim of the released student, no --student folder."""
    from pipelines.likelihood import likelihood
    from pipelines.support.params import load_params

    s = setup
    ev = _params(s).section("evaluate")
    lk = {"num_samples": 1, "rtol": 1e-2, "atol": 1e-2}
    params = load_params(ROOT / "params.yaml", overrides={"evaluate": ev, "likelihood": lk}, check_env=False)
    out = tmp_path / "likelihood"
    metrics = likelihood(params, s["data"], s["teacher"], s["root"] / "absent", out, progress=False, log_mlflow=False)
    assert metrics["complete"] is True and math.isfinite(metrics["bpd_student"]), metrics
    details = json.loads((out / "details.json").read_text())
    assert details["student"]["variant"] == f"official:sony-ctm-imagenet64@sha256:{s['sha']}"
