"""Our LPIPS (ctm_core/gan/lpips.py) against piq 0.7.0's, the package official CTM trains with
(docs/ctm.md#811-lpips-is-piq-070).

piq cannot be imported normally here: its package __init__ imports every metric, some of which need torchvision, and
PyPI's torchvision does not import beside the CPU torch wheel. `piq.perceptual` itself needs torchvision only for
the two names `vgg16, vgg19` it imports at the top, and it downloads its weights in `LPIPS.__init__`. The test loads
`piq.perceptual` from the installed package (`pip install --no-deps piq==0.7.0`, requirements-nodeps.txt) WITHOUT
running the package __init__, with a placeholder `torchvision.models` present only during that import; piq's
`vgg16` is then given torchvision's VGG16 layout (max-pools included, which piq's `replace_pooling` swaps itself)
holding the shared random weights, and its weight download returns the shared random linear weights. Everything
LPIPS computes (normalisation, taps, unit-normalisation, weighting, reductions) is piq's own code.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import sys
import tarfile
import types

import numpy as np
import pytest
import torch
from torch import nn

from ctm_core.gan.lpips import LPIPS, VGG16_CONV_INDICES, ctm_lpips_distance

SEED = 2024
RTOL = 1e-5


@pytest.fixture(scope="module")
def piq_perceptual():
    """piq 0.7.0's `perceptual` module, imported without the piq package __init__ and without torchvision."""
    spec = importlib.util.find_spec("piq")
    if spec is None:
        pytest.skip("piq not installed (make setup installs piq==0.7.0 with --no-deps)")
    names = ("piq", "torchvision", "torchvision.models")
    saved = {n: sys.modules.get(n) for n in names}
    pkg = types.ModuleType("piq")
    pkg.__path__ = list(spec.submodule_search_locations)
    tv, tv_models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    tv_models.vgg16 = tv_models.vgg19 = None  # placeholders for the import line; the test sets piq's vgg16 below
    tv.models = tv_models
    sys.modules.update({"piq": pkg, "torchvision": tv, "torchvision.models": tv_models})
    try:
        import piq.perceptual as perceptual
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    if importlib.metadata.version("piq") != "0.7.0":
        pytest.skip("piq is not 0.7.0 (the version official CTM pins)")
    return perceptual


def _torchvision_vgg16_features() -> nn.Sequential:
    """torchvision vgg16().features layout ("D" config): 3×3 convs + ReLU, MaxPool2d(2, 2) after each block."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def pair(piq_perceptual, monkeypatch_module):
    """(ours, piq's) LPIPS holding the same random weights, piq's built by piq.perceptual.LPIPS itself."""
    ours = LPIPS(random_init=True, generator=torch.Generator().manual_seed(SEED))
    sd = ours.state_dict()
    vgg = types.SimpleNamespace(features=_torchvision_vgg16_features())
    vgg.features.load_state_dict({k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")})
    assert [i for i, m in enumerate(vgg.features) if isinstance(m, nn.Conv2d)] == list(VGG16_CONV_INDICES)
    linear = [sd[f"weights.{l}"].clone() for l in range(5)]
    monkeypatch_module.setattr(piq_perceptual, "vgg16", lambda pretrained, progress: vgg)
    monkeypatch_module.setattr(torch.hub, "load_state_dict_from_url", lambda url, progress: linear)
    ref = piq_perceptual.LPIPS(replace_pooling=True, reduction="none")
    return ours, ref


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _assert_rel(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    rel = ((got.double() - ref.double()).abs() / ref.double().abs()).max().item()
    assert rel <= RTOL, f"max relative difference {rel:.3g} > {RTOL}"


def test_random_images_match_piq(pair):
    ours, ref = pair
    assert isinstance(ref.model[4], nn.AvgPool2d)  # piq swapped the pools itself
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
    d_ours, d_ref = ours(x, y), ref(x, y)
    assert torch.all(d_ref > 0)
    _assert_rel(d_ours, d_ref)
    # Inputs outside [0, 1] (CTM does not clamp): piq's check allows them with data_range=-1.
    _assert_rel(ours(x * 1.6 - 0.3, y), ref(x * 1.6 - 0.3, y))


def _cifar_images(path, n: int) -> torch.Tensor:
    """The first n JPEGs (sorted names) of the CIFAR-10 test tar as (n, 3, 32, 32) in [-1, 1]."""
    from PIL import Image

    out = []
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
                if len(out) == n:
                    break
    x = torch.stack(out).float()  # (n, 3, 32, 32) uint8 levels
    return x / 127.5 - 1


def test_cifar10_images_match_piq_through_the_ctm_path(pair, shared_file):
    """CTM's distance on real 32×32 images: bilinear 224² resize, (x + 1)/2 unclamped, then LPIPS
    (ctm-cifar10 cm/karras_diffusion.py:357-362): ours vs piq's LPIPS on the same resized inputs."""
    import torch.nn.functional as F

    ours, ref = pair
    x = _cifar_images(shared_file("data", "cifar10-jpg", "test.tar.gz"), 4)
    a, b = x[:2], x[2:]
    got = ctm_lpips_distance(ours, a, b)
    up = lambda t: (F.interpolate(t, size=224, mode="bilinear", align_corners=False) + 1) / 2  # noqa: E731
    _assert_rel(got, ref(up(a), up(b)))
