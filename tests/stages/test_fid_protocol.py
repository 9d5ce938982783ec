"""The Inception FID path of the evaluate stage (pipelines/fid_reference.py, `evaluate.features: inception`).

No Inception weights can be downloaded here: the module fixture writes RANDOM weights of the right shape
(`FIDInception(random_init=True)`) to a .pth file and pins its sha256, so the whole path runs: fetch through
`file://` with the pin -> weights_only load -> EDM uint8 images -> 2048-d pool3 features -> float64 statistics ->
reference statistics computed from an unlabelled prepared dataset and cached (or a fetched npz) -> FID + error
bars + protocol.json. Inception at 299x299 costs ~0.1-0.3 s per image per CPU core, so the data set has 12 images
and each run samples 4 images per method (N < 2048: the exact low-rank eigh form of the Fréchet distance is used).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NUM_IMAGES = 12


def _tiny_eval(cache_dir: Path, weights: Path, weights_sha: str, **extra) -> dict:
    ev = {
        "features": "inception",
        "nfe": [1],
        "gammas": [0.0],
        "teacher_nfe": 3,
        "teacher_euler_nfe": 1,
        "num_samples": 4,
        "batch": 4,
        "grid_size": 2,
        "ema": None,
        "num_bootstrap": 5,
        "cache_dir": str(cache_dir),
        "inception": {"source": weights.as_uri(), "sha256": weights_sha, "batch": 16},
    }
    ev.update(extra)
    return {"evaluate": ev}


def _params(overrides):
    from pipelines.support.params import load_params

    return load_params(ROOT / "params.yaml", overrides=overrides, check_env=False)


@pytest.fixture(scope="module")
def fid_setup(tiny_nets, tmp_path_factory):
    from PIL import Image

    from ctm_core.eval.inception import FIDInception
    from pipelines.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("fid")
    # 12 unlabelled 8x8 grey images directly in the folder root (no class folders -> label_dim 0)
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        ramp = np.add.outer(np.arange(8), np.arange(8)) * (8 + i)  # structured, different per image
        Image.fromarray(((ramp + rng.integers(0, 40, (8, 8))) % 256).astype(np.uint8), mode="L").save(
            folder / f"img{i:02d}.png"
        )
    data = root / "prepared"
    card = prepare_dataset("imagefolder", folder, data, heldout_fraction=0.25, seed=0, shard_size=64, progress=False)
    assert card.labels.label_dim == 0 and card.image.num_levels == 256

    tiny_nets(root)

    weights = root / "pt_inception-random.pth"
    torch.save(FIDInception(random_init=True, generator=torch.Generator().manual_seed(0)).state_dict(), weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("DVC_ROOT", str(root))
    yield {
        "root": root,
        "data": data,
        "teacher": root / "teacher",
        "student": root / "student",
        "weights": weights,
        "sha": sha,
        "cache": root / "cache",
    }
    mp.undo()


def _run(s, out, overrides):
    from pipelines.evaluate import evaluate

    return evaluate(_params(overrides), s["data"], s["teacher"], s["student"], out, progress=False, log_mlflow=False)


def test_inception_fid_end_to_end_unlabelled_data_and_reference_cache(fid_setup, tmp_path, monkeypatch):
    """Random-weight Inception fetched via file:// + sha256, reference stats computed from the (unlabelled) data and
    cached; a second run reuses the cache (no reference feature extraction, same file, same mtime) and gives the
    same numbers."""
    import ctm_core.eval.inception as inc

    s = fid_setup
    ov = _tiny_eval(s["cache"], s["weights"], s["sha"], num_samples=4, batch=4)
    calls: list[int] = []
    real = inc.extract_features

    def counting(model, images, *a, **k):
        calls.append(len(images))
        return real(model, images, *a, **k)

    monkeypatch.setattr(inc, "extract_features", counting)
    m1 = _run(s, tmp_path / "eval1", ov)
    out = tmp_path / "eval1"
    details = json.loads((out / "fd_details.json").read_text())
    every = details["metrics"]  # metrics.json (m1) holds the headline; every number is in the details
    assert m1["complete"] is True and every["inception_features"] is True and every["feature_dim"] == 2048
    assert every["num_reference"] == NUM_IMAGES and every["set_size"] == 4 and every["num_sets"] == 1
    for key in ("fd_nfe1", "fd_nfe1_std", "fd_teacher_heun3", "fd_teacher_heun3_std", "fd_teacher_euler1"):
        assert key in m1 and math.isfinite(m1[key]), key
    for key in ("fd_student_heun3", "fd_student_heun7", "kid_nfe1"):
        assert key in every and math.isfinite(every[key]), key
    assert m1["fd_nfe1"] > 0 and "classifier_accuracy" not in every and "fd_heldout_vs_train" not in m1
    # one set (set_size null = num_samples, the paper protocol): std from the bootstrap of that set
    b = details["methods"]["fd_nfe1_gamma0"]["bootstrap"]
    assert b["num_bootstrap"] > 1 and b["bootstrap_low"] <= b["bootstrap_high"]
    assert NUM_IMAGES in calls  # the reference: all 12 prepared images (train + heldout) in one chunk
    assert sum(calls) == NUM_IMAGES + 5 * 4  # + 5 methods x 4 samples

    ref = details["reference"]
    assert details["features"] == "inception" and details["classifier"] is None
    assert details["inception"]["sha256"] == s["sha"]
    assert ref["source"] == "data" and ref["splits"] == ["train", "heldout"] and ref["count"] == NUM_IMAGES
    assert ref["cached"] is False and ref["kid_features"] == NUM_IMAGES
    cache_file = Path(ref["file"])
    assert cache_file.parent == s["cache"] / "reference" and cache_file.name == f"{ref['cache_key']}.npz"
    assert hashlib.sha256(cache_file.read_bytes()).hexdigest() == ref["sha256"]
    with np.load(cache_file, allow_pickle=False) as npz:
        assert npz["mu"].shape == (2048,) and npz["sigma"].shape == (2048, 2048) and int(npz["num_images"]) == 12
    assert details["seed_sets_note"] and "one seed set" in details["seed_sets_note"]
    assert details["methods"]["fd_nfe1_gamma0"]["fd_method"] == "eigh"  # N = 4 < D = 2048
    proto = json.loads((out / "protocol.json").read_text())
    sha = proto.pop("protocol_sha256")
    assert sha == hashlib.sha256(json.dumps(proto, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert {**proto, "protocol_sha256": sha} == details["protocol"]
    assert proto["features"] == "inception" and proto["feature_net_sha256"] == s["sha"]
    assert proto["reference_source"] == "data" and proto["reference_sha256"] == ref["sha256"]
    assert (proto["num_samples"], proto["seed_start"], proto["feature_dim"]) == (4, 0, 2048)
    assert (out / "grids" / "nfe1_gamma0.png").is_file() and (out / "grids" / "data.png").is_file()

    mtime = cache_file.stat().st_mtime_ns
    calls.clear()
    m2 = _run(s, tmp_path / "eval2", ov)
    d2 = json.loads((tmp_path / "eval2" / "fd_details.json").read_text())
    assert d2["reference"]["cached"] is True and d2["reference"]["sha256"] == ref["sha256"]
    assert cache_file.stat().st_mtime_ns == mtime
    assert calls == [4] * 5  # samples only: no reference features extracted
    for k in m1:
        if not k.endswith("_seconds"):
            assert m2[k] == m1[k], k
    assert json.loads((tmp_path / "eval2" / "protocol.json").read_text())["protocol_sha256"] == sha


@pytest.fixture
def fewer_methods(monkeypatch):
    """Only CTM 1-step + the two teacher baselines (3 methods): keeps the Inception forwards to a handful."""
    import ctm_core.eval.methods as methods

    monkeypatch.setattr(methods, "STUDENT_HEUN_NFES", ())


def test_inception_fid_against_fetched_npz_reference(fid_setup, tmp_path, fewer_methods):
    """An EDM-layout npz (plain np.savez, mu/sigma only) fetched with its sha256: used as is; no KID (no features)."""
    from ctm_core.eval.metrics import feature_statistics

    s = fid_setup
    rng = np.random.default_rng(3)
    mu, sigma = feature_statistics(rng.standard_normal((64, 2048)) * 0.1 + 0.2)
    npz = tmp_path / "cifar10-32x32.npz"
    np.savez(npz, mu=mu, sigma=sigma)
    ref_sha = hashlib.sha256(npz.read_bytes()).hexdigest()
    ov = _tiny_eval(
        tmp_path / "cache",
        s["weights"],
        s["sha"],
        num_samples=4,
        batch=4,
        reference={"source": npz.as_uri(), "sha256": ref_sha},
    )
    m = _run(s, tmp_path / "eval", ov)
    details = json.loads((tmp_path / "eval" / "fd_details.json").read_text())
    assert m["complete"] is True and math.isfinite(m["fd_nfe1"]) and "num_reference" not in details["metrics"]
    assert "kid_nfe1" not in details["metrics"]
    assert details["methods"]["fd_nfe1_gamma0"]["kid"] is None
    assert details["reference"]["source"] == npz.as_uri() and details["reference"]["sha256"] == ref_sha
    assert details["reference"]["count"] is None and details["reference"]["splits"] is None
    proto = json.loads((tmp_path / "eval" / "protocol.json").read_text())
    assert proto["reference_sha256"] == ref_sha and proto["reference_source"] == npz.as_uri()
    assert not (tmp_path / "cache" / "reference").exists()  # nothing computed from the data


def _no_sampling(monkeypatch):
    import pipelines.support.evaluation as ev

    def boom(*a, **k):
        raise AssertionError("sampling started before the FID setup was checked")

    monkeypatch.setattr(ev, "sample_method", boom)


def test_wrong_inception_sha256_refused_before_sampling(fid_setup, tmp_path, monkeypatch, capsys):
    import yaml

    from pipelines.evaluate import InputError, main

    s = fid_setup
    _no_sampling(monkeypatch)
    ov = _tiny_eval(tmp_path / "cache", s["weights"], "ab" * 32)
    with pytest.raises(InputError, match=r"^evaluate\.inception\.source: sha256 mismatch"):
        _run(s, tmp_path / "eval", ov)
    assert not (tmp_path / "eval").exists() and not list((tmp_path / "cache").rglob("*.pth"))
    # the CLI: exit 2, one line on stderr, nothing written
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["evaluate"].update(ov["evaluate"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    rc = main(
        [
            "--params",
            str(tmp_path / "params.yaml"),
            "--data",
            str(s["data"]),
            "--teacher",
            str(s["teacher"]),
            "--student",
            str(s["student"]),
            "--out",
            str(tmp_path / "eval"),
            "--no-progress",
            "--no-mlflow",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "evaluate.inception.source" in err[0] and "sha256 mismatch" in err[0]
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("case", ["wrong_sha", "wrong_dim", "non_finite", "asymmetric"])
def test_bad_reference_file_refused_before_sampling(fid_setup, tmp_path, monkeypatch, case):
    from pipelines.evaluate import InputError

    s = fid_setup
    _no_sampling(monkeypatch)
    D = 64 if case == "wrong_dim" else 2048
    mu, sigma = np.zeros(D), np.eye(D)
    if case == "non_finite":
        mu[3] = np.nan
    if case == "asymmetric":
        sigma[0, 1] = 0.5
    npz = tmp_path / "ref.npz"
    np.savez(npz, mu=mu, sigma=sigma)
    sha = "cd" * 32 if case == "wrong_sha" else hashlib.sha256(npz.read_bytes()).hexdigest()
    ov = _tiny_eval(tmp_path / "cache", s["weights"], s["sha"], reference={"source": str(npz), "sha256": sha})
    fragment = {
        "wrong_sha": "sha256 mismatch",
        "wrong_dim": "expected mu (2048,)",
        "non_finite": "non-finite",
        "asymmetric": "not symmetric",
    }[case]
    with pytest.raises(InputError) as info:
        _run(s, tmp_path / "eval", ov)
    msg = str(info.value)
    assert msg.startswith("evaluate.reference.source: ") and fragment in msg and "\n" not in msg, msg
    assert not (tmp_path / "eval").exists()


def test_unlabelled_data_refused_by_the_classifier_features(fid_setup, tmp_path):
    from pipelines.evaluate import InputError, check_inputs

    s = fid_setup
    with pytest.raises(InputError, match="no class labels.*evaluate.features: inception"):
        check_inputs(_params({"evaluate": {"features": "classifier"}}), s["data"], s["teacher"], s["student"])
    check_inputs(_params({"evaluate": {"features": "inception"}}), s["data"], s["teacher"], s["student"])


def test_damaged_cache_entry_is_recomputed(fid_setup, tmp_path, caplog):
    from ctm_core.data.prepared import load_card
    from pipelines.support.fid_reference import _cache_key, load_inception, reference_from_data

    s = fid_setup
    params = _params(_tiny_eval(tmp_path / "cache", s["weights"], s["sha"]))
    model, sha, _ = load_inception(params)
    card = load_card(s["data"])
    a = reference_from_data(model, sha, s["data"], card, ["train"], tmp_path / "cache", batch=16)
    assert not a.cached and a.num_images == card.splits["train"].count
    a.path.write_bytes(a.path.read_bytes()[:100])  # truncated
    b = reference_from_data(model, sha, s["data"], card, ["train"], tmp_path / "cache", batch=16)
    assert not b.cached and b.sha256 == a.sha256  # deterministic bytes: the same statistics, the same file
    assert "unusable" in caplog.text
    c = reference_from_data(model, sha, s["data"], card, ["train"], tmp_path / "cache", batch=16)
    assert c.cached and np.array_equal(c.sigma, a.sigma)
    # another weights sha256 (or data, or preprocessing) is another key: never the old file
    assert _cache_key(a.data_hash, "0" * 64) != a.key


def test_levels_to_uint8_is_identity_for_8bit_and_matches_the_sampler_path():
    from ctm_core.eval.metrics import images_to_uint8
    from pipelines.support.fid_reference import levels_to_uint8

    k = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(levels_to_uint8(k, 256), torch.from_numpy(k))
    k17 = np.arange(17, dtype=np.uint8).reshape(1, 1, 1, 17)
    x = torch.from_numpy(k17).to(torch.float64) / 16 * 2 - 1  # prepare's mapping for the 17-level digits
    assert torch.equal(levels_to_uint8(k17, 17), images_to_uint8(x))
    assert levels_to_uint8(k17, 17)[0, 0, 0, [0, 8, 16]].tolist() == [0, 128, 255]


# --- params validation (evaluate.features / inception / reference) ----------------------------------------------------
BAD = [
    (
        {"evaluate.features": "inception", "evaluate.inception.sha256": None},
        "evaluate.inception.sha256",
        "required when evaluate.features is 'inception'",
    ),
    (
        {"evaluate.features": "inception", "evaluate.inception.sha256": "abc"},
        "evaluate.inception.sha256",
        "64 hex digits or 'record'",
    ),
    (
        {"evaluate.features": "inception", "evaluate.reference.source": "https://example.com/cifar10-32x32.npz"},
        "evaluate.reference.sha256",
        "required when evaluate.reference.source",
    ),
    (
        {
            "evaluate.features": "inception",
            "evaluate.reference.source": "ftp://x/ref.npz",
            "evaluate.reference.sha256": "record",
        },
        "evaluate.reference.source",
        "expected an https://, s3:// or file://",
    ),
    (
        {"evaluate.features": "inception", "evaluate.inception.source": "gs://b/w.pth"},
        "evaluate.inception.source",
        "expected an https://",
    ),
    ({"evaluate.features": "incept"}, "evaluate.features", "expected one of 'classifier' or 'inception'"),
    (
        {"evaluate.reference.source": "/ref.npz", "evaluate.reference.sha256": "record"},
        "evaluate.reference.source",
        "needs evaluate.features: inception",
    ),
    ({"evaluate.reference.sha256": "ab" * 32}, "evaluate.reference.sha256", "must be null when"),
    ({"evaluate.reference.splits": ["train", "train"]}, "evaluate.reference.splits", "distinct"),
    ({"evaluate.reference.splits": ["test"]}, "evaluate.reference.splits[0]", "expected one of"),
    ({"evaluate.num_bootstrap": -1}, "evaluate.num_bootstrap", "must be >= 0"),
]


@pytest.mark.parametrize("edit,key,fragment", BAD, ids=[b[1] + f"-{i}" for i, b in enumerate(BAD)])
def test_fid_params_validation(edit, key, fragment):
    from ctm_core.config import ParamsError

    with pytest.raises(ParamsError) as info:
        _params(edit)
    msg = str(info.value)
    assert info.value.key == key and msg.startswith(f"{key}: ") and "\n" not in msg, msg
    assert fragment in msg, msg


def test_fid_params_defaults_and_record():
    from ctm_core.config import FID_WEIGHTS_SHA256, FID_WEIGHTS_URL

    p = _params({})
    ev = p.evaluate
    assert ev.features == "classifier" and ev.nfe == [1, 2, 4, 8] and ev.num_samples == 1000
    assert ev.inception.source == FID_WEIGHTS_URL and ev.inception.sha256 == FID_WEIGHTS_SHA256
    assert FID_WEIGHTS_URL.endswith("pt_inception-2015-12-05-6726825d.pth") and FID_WEIGHTS_SHA256[:8] == "6726825d"
    assert ev.reference.source == "data" and ev.reference.sha256 is None
    q = _params(
        {
            "evaluate.features": "inception",
            "evaluate.inception.sha256": "record",
            "evaluate.reference.source": "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz",
            "evaluate.reference.sha256": "record",
            "evaluate.num_samples": 50000,
        }
    )
    assert q.evaluate.reference.sha256 == "record"
