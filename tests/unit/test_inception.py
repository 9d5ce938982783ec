"""Tests for ctm_core.eval.inception: key names/shapes of the FID Inception-v3 (derived here from the torchvision /
pytorch-fid layer list), strict loading from files, and the random-weight path end to end."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from ctm_core.eval.inception import FIDInception, _preprocess, _tf_avg_pool3x3, count_parameters, extract_features

SEED = 0

# ---------------------------------------------------------------------------------------------------------------------
# Expected layout, written out independently from the facts in pytorch/vision torchvision/models/inception.py
# (Inception3.__init__, InceptionA-E.__init__, BasicConv2d) and mseitzer/pytorch-fid src/pytorch_fid/inception.py
# (fid_inception_v3: num_classes=1008, aux_logits=False; Mixed_5b..7c replaced by FID blocks of the same shapes).
# Each entry: conv name -> (in_channels, out_channels, kh, kw).


def _block_a(cin, pool):
    return {
        "branch1x1": (cin, 64, 1, 1),
        "branch5x5_1": (cin, 48, 1, 1),
        "branch5x5_2": (48, 64, 5, 5),
        "branch3x3dbl_1": (cin, 64, 1, 1),
        "branch3x3dbl_2": (64, 96, 3, 3),
        "branch3x3dbl_3": (96, 96, 3, 3),
        "branch_pool": (cin, pool, 1, 1),
    }


def _block_b(cin):
    return {
        "branch3x3": (cin, 384, 3, 3),
        "branch3x3dbl_1": (cin, 64, 1, 1),
        "branch3x3dbl_2": (64, 96, 3, 3),
        "branch3x3dbl_3": (96, 96, 3, 3),
    }


def _block_c(cin, c7):
    return {
        "branch1x1": (cin, 192, 1, 1),
        "branch7x7_1": (cin, c7, 1, 1),
        "branch7x7_2": (c7, c7, 1, 7),
        "branch7x7_3": (c7, 192, 7, 1),
        "branch7x7dbl_1": (cin, c7, 1, 1),
        "branch7x7dbl_2": (c7, c7, 7, 1),
        "branch7x7dbl_3": (c7, c7, 1, 7),
        "branch7x7dbl_4": (c7, c7, 7, 1),
        "branch7x7dbl_5": (c7, 192, 1, 7),
        "branch_pool": (cin, 192, 1, 1),
    }


def _block_d(cin):
    return {
        "branch3x3_1": (cin, 192, 1, 1),
        "branch3x3_2": (192, 320, 3, 3),
        "branch7x7x3_1": (cin, 192, 1, 1),
        "branch7x7x3_2": (192, 192, 1, 7),
        "branch7x7x3_3": (192, 192, 7, 1),
        "branch7x7x3_4": (192, 192, 3, 3),
    }


def _block_e(cin):
    return {
        "branch1x1": (cin, 320, 1, 1),
        "branch3x3_1": (cin, 384, 1, 1),
        "branch3x3_2a": (384, 384, 1, 3),
        "branch3x3_2b": (384, 384, 3, 1),
        "branch3x3dbl_1": (cin, 448, 1, 1),
        "branch3x3dbl_2": (448, 384, 3, 3),
        "branch3x3dbl_3a": (384, 384, 1, 3),
        "branch3x3dbl_3b": (384, 384, 3, 1),
        "branch_pool": (cin, 192, 1, 1),
    }


def expected_state_shapes() -> dict[str, tuple[int, ...]]:
    convs = {
        "Conv2d_1a_3x3": (3, 32, 3, 3),
        "Conv2d_2a_3x3": (32, 32, 3, 3),
        "Conv2d_2b_3x3": (32, 64, 3, 3),
        "Conv2d_3b_1x1": (64, 80, 1, 1),
        "Conv2d_4a_3x3": (80, 192, 3, 3),
    }
    blocks = {
        "Mixed_5b": _block_a(192, 32),
        "Mixed_5c": _block_a(256, 64),
        "Mixed_5d": _block_a(288, 64),
        "Mixed_6a": _block_b(288),
        "Mixed_6b": _block_c(768, 128),
        "Mixed_6c": _block_c(768, 160),
        "Mixed_6d": _block_c(768, 160),
        "Mixed_6e": _block_c(768, 192),
        "Mixed_7a": _block_d(768),
        "Mixed_7b": _block_e(1280),
        "Mixed_7c": _block_e(2048),
    }
    for block, branches in blocks.items():
        for branch, spec in branches.items():
            convs[f"{block}.{branch}"] = spec
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (cin, cout, kh, kw) in convs.items():
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{p}"] = (cout,)
        shapes[f"{name}.bn.num_batches_tracked"] = ()
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


def test_key_names_and_shapes_on_meta_device():
    model = FIDInception()  # meta skeleton: no memory, no RNG
    sd = model.state_dict()
    assert all(t.is_meta for t in sd.values())
    got = {k: tuple(v.shape) for k, v in sd.items()}
    expected = expected_state_shapes()
    assert set(got) - set(expected) == set(), "unexpected keys"
    assert set(expected) - set(got) == set(), "missing keys"
    assert got == expected
    assert not any(k.startswith("AuxLogits") for k in got)
    assert len(got) == 566  # 94 BasicConv2d x (1 conv + 5 bn entries) + fc.weight + fc.bias


def test_parameter_count():
    model = FIDInception()
    n = count_parameters(model)
    # Independent count from the expected layout (BN running stats are buffers, not parameters).
    from_table = sum(
        int(np.prod(s))
        for k, s in expected_state_shapes().items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert n == from_table
    # torchvision inception_v3 (aux logits, 1000 classes) has 27,161,264 parameters (torchvision weights table);
    # minus AuxLogits (98,560 + 2,459,136 + 769,000) plus 8 extra fc classes (8 * 2049).
    assert n == 27_161_264 - (98_560 + 2_459_136 + 769_000) + 8 * 2049 == 23_850_960


def test_tf_average_pool_excludes_padding_and_pool_types():
    x = torch.ones(1, 2, 5, 5)
    assert torch.equal(_tf_avg_pool3x3(x), x)  # count_include_pad=True would give 4/9 in the corners
    model = FIDInception()
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"


# ---------------------------------------------------------------------------------------------------------------------
# Loading


@pytest.fixture(scope="module")
def random_model() -> FIDInception:
    return FIDInception(random_init=True, generator=torch.Generator().manual_seed(SEED))


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_random_init_is_seeded(random_model):
    other = FIDInception(random_init=True, generator=torch.Generator().manual_seed(SEED))
    _assert_same_state(random_model, other)
    assert not random_model.training
    assert all(not p.requires_grad for p in random_model.parameters())
    with pytest.raises(ValueError, match="generator"):
        FIDInception(random_init=True)


def test_from_file_loads_strictly(random_model, tmp_path: pathlib.Path):
    import hashlib

    import safetensors.torch

    pth = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(random_model.state_dict(), pth)
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()
    loaded = FIDInception.from_file(pth, expected_sha256=digest)
    _assert_same_state(random_model, loaded)
    assert loaded.file_sha256 == digest and not loaded.training

    # safetensors copy without num_batches_tracked (as a converted TF port may be): still loads
    sd = {k: v.contiguous() for k, v in random_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    st = tmp_path / "w.safetensors"
    safetensors.torch.save_file(sd, str(st))
    _assert_same_state(random_model, FIDInception.from_file(st))

    with pytest.raises(ValueError, match="sha256"):
        FIDInception.from_file(pth, expected_sha256="0" * 64)

    extra = dict(random_model.state_dict())
    extra["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        FIDInception.from_file(tmp_path / "extra.pth")

    bad = dict(random_model.state_dict())
    bad["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="size mismatch"):
        FIDInception.from_file(tmp_path / "bad.pth")

    missing = dict(random_model.state_dict())
    del missing["Mixed_7c.branch_pool.conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        FIDInception.from_file(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------------------------------
# Forward path


def test_random_model_end_to_end_features(random_model):
    g = torch.Generator().manual_seed(1)
    rgb = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8, generator=g)
    gray = torch.randint(0, 256, (1, 1, 16, 16), dtype=torch.uint8, generator=g)
    batch3 = torch.cat([rgb, gray.repeat(1, 3, 1, 1)])  # (2, 3, 16, 16)
    feats = extract_features(random_model, batch3, batch_size=2, device="cpu")
    assert feats.shape == (2, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all()
    assert (feats >= 0).all() and feats.std() > 0  # post-ReLU average pool, not degenerate
    assert not np.allclose(feats[0], feats[1])
    # grayscale (N, 1, H, W) is repeated to 3 channels; batching and float [0, 255] input give the same features
    f_gray = random_model(gray.to(torch.float32)).double().numpy()
    np.testing.assert_allclose(f_gray[0], feats[1], rtol=1e-4, atol=1e-5)


def test_input_validation(random_model):
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        random_model(torch.full((1, 3, 8, 8), -1.0))
    with pytest.raises(ValueError, match="C in"):
        random_model(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError):
        random_model(torch.zeros(1, 3, 8, 8, dtype=torch.int32))


def test_preprocess_matches_tensorflow_convention():
    from ctm_core.eval.inception import resize_bilinear_tf1

    g = torch.Generator().manual_seed(4)
    x299 = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=g)
    # at 299×299 no resize; then the TF graph's (x − 128)/128 (torch-fidelity feature_extractor_inceptionv3.py)
    torch.testing.assert_close(_preprocess(x299), (x299.float() - 128) / 128, rtol=0, atol=0)
    # TF1 legacy resize: output i samples the input at i·in/out. 2 → 4: positions 0, 0.5, 1, 1.5 (the last clamps).
    row = torch.tensor([[[[10.0, 20.0]]]])
    torch.testing.assert_close(resize_bilinear_tf1(row, (1, 4)), torch.tensor([[[[10.0, 15.0, 20.0, 20.0]]]]))
    small = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=g)
    out = _preprocess(small)
    assert out.shape == (2, 3, 299, 299) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    torch.testing.assert_close(_preprocess(small.float()), out)
    with pytest.warns(UserWarning, match=r"\[0, 1\]"):
        _preprocess(torch.full((1, 3, 4, 4), 0.5))


class _MeanPerChannel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


def test_extract_features_batches_in_order():
    imgs = torch.arange(5 * 2 * 2 * 2, dtype=torch.int64).reshape(5, 2, 2, 2).to(torch.uint8)
    full = _MeanPerChannel()(imgs).double().numpy()
    for bs in (1, 2, 5, 7):
        np.testing.assert_array_equal(extract_features(_MeanPerChannel(), imgs.numpy(), batch_size=bs), full)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(_MeanPerChannel(), imgs, batch_size=0)
    with pytest.raises(ValueError, match="N = 0"):
        extract_features(_MeanPerChannel(), imgs[:0], batch_size=2)


# ---------------------------------------------------------------------------------------------------------------------
# The whole FID path with random weights: [-1, 1] samples → uint8 → features → stats → reference file → FID


def _fid_path(model, tmp_path, dims):
    from ctm_core.eval.metrics import (
        feature_statistics,
        frechet_distance,
        images_to_uint8,
        load_reference_stats,
        save_reference_stats,
    )

    g = torch.Generator().manual_seed(3)
    x_data = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1  # "training images" in [-1, 1]
    x_gen = (x_data + 0.3 * torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)).clip(-1.2, 1.2)
    f_data = extract_features(model, images_to_uint8(x_data), batch_size=4)[:, :dims]
    f_gen = extract_features(model, images_to_uint8(x_gen), batch_size=4)[:, :dims]
    digest = save_reference_stats(tmp_path / "ref.npz", *feature_statistics(f_data), meta={"n": 4})
    ref = load_reference_stats(tmp_path / "ref.npz", expected_sha256=digest)
    mu, sigma = feature_statistics(f_gen)
    fid = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    self_fid = frechet_distance(ref.mu, ref.sigma, ref.mu, ref.sigma)
    scale = np.trace(ref.sigma) + np.trace(sigma)
    assert np.isfinite(fid) and fid > 1e-3 * scale
    # N = 4 < D: singular covariances, where sqrtm's error is ~sqrt(machine eps) per null direction
    assert abs(self_fid) < 1e-5 * scale
    return fid


def test_fid_path_random_weights(random_model, tmp_path):
    # 64 of the 2048 features: the same path at D = 2048 took ~95 s on the shared 2-core box (scipy's sqrtm of a
    # singular 2048² product); it gave a finite FID and |self-FID| ≈ 1e-6 × scale.
    _fid_path(random_model, tmp_path, dims=64)
