"""Tests for ctm_core.eval.classifier: trains on sklearn digits, feature shapes, determinism, save/load."""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import pytest
import torch

from ctm_core.data.prepared import levels_to_unit
from ctm_core.eval.classifier import (
    SmallClassifier,
    classifier_features,
    load_classifier,
    save_classifier,
    train_classifier,
)
from ctm_core.eval.metrics import feature_statistics, frechet_distance, images_to_levels

NUM_LEVELS = 17  # sklearn digits: levels 0..16


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), levels 0..16
    labels = d.target.astype(np.int64)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).numpy()
    train, held = perm[:1400], perm[1400:]
    return images[train], labels[train], images[held], labels[held]


@pytest.fixture(scope="module")
def trained(digits):
    x_tr, y_tr, x_te, y_te = digits
    t0 = time.perf_counter()
    model, acc = train_classifier(
        x_tr,
        y_tr,
        NUM_LEVELS,
        epochs=4,
        batch_size=128,
        lr=2e-3,
        width=16,
        generator=torch.Generator().manual_seed(1),
        heldout_images=x_te,
        heldout_labels=y_te,
    )
    return model, acc, time.perf_counter() - t0


def test_trains_on_digits_above_90_percent(trained):
    model, acc, seconds = trained
    assert acc is not None and acc > 0.90, f"held-out accuracy {acc:.3f} after {seconds:.1f}s"
    assert seconds < 60  # ~1.5 s on an idle 2-core box
    assert not model.training


def test_features_shape_and_frechet_sanity(trained, digits):
    model, _, _ = trained
    x_tr, y_tr, x_te, y_te = digits
    f_te = classifier_features(model, x_te)
    assert f_te.shape == (len(x_te), 64) and f_te.dtype == np.float64 and np.isfinite(f_te).all()
    # features of the held-out split are closer to the training split than those of pure noise images
    f_tr = classifier_features(model, x_tr)
    noise = torch.randint(0, NUM_LEVELS, x_te.shape, generator=torch.Generator().manual_seed(2)).to(torch.uint8)
    f_noise = classifier_features(model, noise)
    ref = feature_statistics(f_tr)
    fd_held = frechet_distance(*feature_statistics(f_te), *ref)
    fd_noise = frechet_distance(*feature_statistics(f_noise), *ref)
    assert 0 <= fd_held < 0.2 * fd_noise
    # generated samples in [-1, 1] go through the same quantisation as the data
    x_unit = torch.from_numpy(levels_to_unit(x_te, NUM_LEVELS))
    requantised = images_to_levels(x_unit, NUM_LEVELS)
    assert torch.equal(requantised, torch.from_numpy(x_te))
    np.testing.assert_allclose(classifier_features(model, requantised), f_te, rtol=1e-5, atol=1e-5)


def test_training_is_deterministic(digits):
    x_tr, y_tr, _, _ = digits
    kw = dict(epochs=1, batch_size=128, width=8, feature_dim=16)
    m1, acc1 = train_classifier(x_tr[:300], y_tr[:300], NUM_LEVELS, generator=torch.Generator().manual_seed(3), **kw)
    m2, _ = train_classifier(x_tr[:300], y_tr[:300], NUM_LEVELS, generator=torch.Generator().manual_seed(3), **kw)
    assert acc1 is None
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k


def test_save_load_round_trip(trained, digits, tmp_path: pathlib.Path):
    model, acc, _ = trained
    _, _, x_te, _ = digits
    digest = save_classifier(model, tmp_path / "clf", meta={"heldout_accuracy": acc, "dataset": "sklearn-digits"})
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["init_kwargs"] == model.init_kwargs and config["init_kwargs"]["num_levels"] == NUM_LEVELS
    loaded = load_classifier(tmp_path / "clf", expected_sha256=digest)
    assert loaded.meta["dataset"] == "sklearn-digits" and loaded.file_sha256 == digest
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    np.testing.assert_allclose(
        classifier_features(loaded, x_te[:50]), classifier_features(model, x_te[:50]), rtol=1e-6, atol=1e-6
    )
    loaded_file = load_classifier(tmp_path / "clf" / "classifier.safetensors")
    assert loaded_file.init_kwargs == model.init_kwargs
    with pytest.raises(ValueError, match="sha256"):
        load_classifier(tmp_path / "clf", expected_sha256="f" * 64)


def test_levels_to_unit_and_argument_checks():
    x = levels_to_unit(np.array([0, 8, 16], dtype=np.uint8).reshape(1, 1, 1, 3), NUM_LEVELS)
    assert x.flatten().tolist() == [-1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        levels_to_unit(np.array([17]), NUM_LEVELS)
    with pytest.raises(TypeError):
        levels_to_unit(np.array([0.5]), NUM_LEVELS)
    with pytest.raises(ValueError, match="generator"):
        train_classifier(np.zeros((4, 1, 8, 8), np.uint8), np.arange(4) % 2, NUM_LEVELS, generator=None)
    with pytest.raises(ValueError, match="labels"):
        train_classifier(np.zeros((4, 1, 8, 8), np.uint8), np.arange(3), NUM_LEVELS, generator=torch.Generator())
    skeleton = SmallClassifier(1, 8, 10)
    assert all(p.is_meta for p in skeleton.parameters())
    assert SmallClassifier(3, 32, 10, generator=torch.Generator().manual_seed(0)).features(
        torch.zeros(2, 3, 32, 32)
    ).shape == (2, 64)
