"""LPIPS (piq 0.7.0, replace_pooling=True) with random weights: invariants, a hand computation, file loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ctm_core.gan.lpips import (
    EPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LPIPS,
    LPIPS_CHANNELS,
    VGG16_CONV_INDICES,
    ctm_lpips_distance,
)

SEED = 1234


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    return LPIPS(random_init=True, generator=torch.Generator().manual_seed(SEED))


def _images(B: int = 2, H: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, H, generator=g), torch.rand(B, 3, H, H, generator=g)


def test_layout_matches_torchvision_vgg16_with_avg_pool(lpips):
    keys = set(lpips.state_dict())
    expected = {f"features.{i}.{p}" for i in VGG16_CONV_INDICES for p in ("weight", "bias")}
    expected |= {f"weights.{l}" for l in range(5)}
    assert keys == expected
    pools = [i for i, m in enumerate(lpips.features) if isinstance(m, (torch.nn.AvgPool2d, torch.nn.MaxPool2d))]
    assert pools == [4, 9, 16, 23, 30]
    for i in pools:
        m = lpips.features[i]
        assert type(m) is torch.nn.AvgPool2d and m.kernel_size == 2 and m.stride == 2 and m.padding == 0
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in lpips.modules())
    assert [tuple(w.shape) for w in lpips.weights] == [(1, c, 1, 1) for c in LPIPS_CHANNELS]
    assert all(not p.requires_grad for p in lpips.parameters())


def test_identity_symmetry_positivity_shape(lpips):
    x, y = _images(B=2)
    d_xy, d_yx, d_xx = lpips(x, y), lpips(y, x), lpips(x, x)
    assert d_xy.shape == (2,)
    assert torch.all(d_xx == 0)
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-6, atol=0)
    assert torch.all(d_xy > 0)


def _hand_features(lpips: LPIPS, x: torch.Tensor, pool) -> list[torch.Tensor]:
    """relu1_2 and relu2_2 by explicit F.conv2d calls, with the given pooling between them."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    f = lpips.features
    h = (x - mean) / std
    h = F.relu(F.conv2d(h, f[0].weight, f[0].bias, padding=1))
    r12 = F.relu(F.conv2d(h, f[2].weight, f[2].bias, padding=1))
    h = pool(r12, 2, 2)
    h = F.relu(F.conv2d(h, f[5].weight, f[5].bias, padding=1))
    r22 = F.relu(F.conv2d(h, f[7].weight, f[7].bias, padding=1))
    return [r12, r22]


def _hand_term(fx: torch.Tensor, fy: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    B, C, H, W = fx.shape
    out = torch.zeros(B, dtype=torch.float64)
    nx = fx.double() / (fx.double().pow(2).sum(1, keepdim=True).sqrt() + EPS)
    ny = fy.double() / (fy.double().pow(2).sum(1, keepdim=True).sqrt() + EPS)
    for b in range(B):  # sum_c w_c * mean_{h,w} (nx - ny)^2, written out
        for c in range(C):
            out[b] += w.view(-1)[c].double() * ((nx[b, c] - ny[b, c]) ** 2).sum() / (H * W)
    return out


def test_first_two_layers_match_hand_computation_with_avg_pool(lpips):
    x, y = _images(B=2, H=16, seed=3)
    terms = lpips.layer_distances(x, y)
    fx, fy = _hand_features(lpips, x, F.avg_pool2d), _hand_features(lpips, y, F.avg_pool2d)
    for l in range(2):
        torch.testing.assert_close(terms[l].double(), _hand_term(fx[l], fy[l], lpips.weights[l]), rtol=1e-4, atol=1e-7)
    # The same computation with max-pooling gives a different relu2_2 term: the pooling really is average.
    mx, my = _hand_features(lpips, x, F.max_pool2d), _hand_features(lpips, y, F.max_pool2d)
    assert not torch.allclose(terms[1].double(), _hand_term(mx[1], my[1], lpips.weights[1]), rtol=1e-3)
    # And the five terms add up to the forward value.
    torch.testing.assert_close(lpips(x, y), torch.stack(terms).sum(0))


def test_gradients_flow_to_inputs_only(lpips):
    x, y = _images(B=2)
    x.requires_grad_(True)
    lpips(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_weights_round_trip_by_name(lpips, tmp_path):
    # torchvision vgg16 state dict: 'features.N.*' plus classifier keys that must be ignored.
    vgg = {k: v.clone() for k, v in lpips.state_dict().items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)
    save_file(vgg, str(tmp_path / "vgg16.safetensors"))
    torch.save([w.detach().clone() for w in lpips.weights], tmp_path / "lpips_weights.pt")  # piq's list format
    loaded = LPIPS.from_files(tmp_path / "vgg16.safetensors", tmp_path / "lpips_weights.pt")
    for k, v in lpips.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, y = _images(B=1)
    assert torch.equal(loaded(x, y), lpips(x, y))

    # features-only keys ('N.weight') and richzhang's 'lin{l}.model.1.weight' names load the same values.
    torch.save({k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")}, tmp_path / "f.pt")
    save_file(
        {f"lin{l}.model.1.weight": w.detach().clone() for l, w in enumerate(lpips.weights)},
        str(tmp_path / "l.safetensors"),
    )
    loaded2 = LPIPS.from_files(tmp_path / "f.pt", tmp_path / "l.safetensors")
    assert all(torch.equal(loaded2.state_dict()[k], v) for k, v in lpips.state_dict().items())


def test_loading_errors_name_the_problem(lpips, tmp_path):
    bad = {k: v for k, v in lpips.state_dict().items() if k.startswith("features.") and k != "features.28.bias"}
    save_file(bad, str(tmp_path / "vgg.safetensors"))
    torch.save([w.detach() for w in lpips.weights], tmp_path / "l.pt")
    with pytest.raises(ValueError, match="features.28.bias"):
        LPIPS.from_files(tmp_path / "vgg.safetensors", tmp_path / "l.pt")
    with pytest.raises(ValueError, match="random_init"):
        LPIPS()
    with pytest.raises(FileNotFoundError):
        LPIPS.from_files(tmp_path / "nope.safetensors", tmp_path / "l.pt")


def test_ctm_distance_resizes_to_224_and_maps_without_clamping():
    seen = {}

    def fake_lpips(a, b):
        seen["a"], seen["b"] = a, b
        return (a - b).flatten(1).abs().mean(1)

    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 32, 32, generator=g) * 3 - 1.5  # outside [-1, 1] on purpose
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    d = ctm_lpips_distance(fake_lpips, x, y)
    assert d.shape == (2,)
    assert seen["a"].shape == (2, 3, 224, 224)
    expected = (F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False) + 1) / 2
    torch.testing.assert_close(seen["a"], expected)
    assert seen["a"].min() < 0 and seen["a"].max() > 1  # not clamped
    # No resize at H >= 256.
    big = torch.zeros(1, 3, 256, 256)
    ctm_lpips_distance(fake_lpips, big, big)
    assert seen["a"].shape == (1, 3, 256, 256) and torch.all(seen["a"] == 0.5)
