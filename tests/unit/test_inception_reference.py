"""Our FID Inception (ctm_core/inception.py) against torch-fidelity's, the library the field uses for TF-exact FID.

torch-fidelity cannot be imported normally here: its package __init__ imports torchvision (for CLIP/DINOv2/datasets),
and PyPI's torchvision does not import beside the CPU torch wheel. Its Inception module itself needs only torch, so
the test loads `torch_fidelity.feature_extractor_inceptionv3` and `interpolate_compat_tensorflow` from the installed
package WITHOUT running the package __init__ (installed with `pip install --no-deps torch-fidelity==0.4.0` by
`make setup`; skipped with a message where it is missing). Both networks get the same random weights (BatchNorm
statistics included, so eps and the TF pooling patches matter) and the same uint8 images.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from ctm_core.eval.inception import FIDInception


@pytest.fixture(scope="module")
def tfid():
    """torch_fidelity's Inception module and TF1 resize, imported without the package __init__."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity not installed (make setup installs it with --no-deps)")
    saved = sys.modules.get("torch_fidelity")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = pkg
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    finally:
        if saved is None:
            sys.modules.pop("torch_fidelity", None)
        else:
            sys.modules["torch_fidelity"] = saved
    return types.SimpleNamespace(
        Extractor=FeatureExtractorInceptionV3, resize=interpolate_bilinear_2d_like_tensorflow1x
    )


def _random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the FID Inception at random, BN running statistics included (var in [0.5, 1.5])."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in FIDInception().state_dict().items():  # meta skeleton: names and shapes only
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.zeros((), dtype=torch.long)
        elif name.endswith("running_var"):
            sd[name] = 0.5 + torch.rand(t.shape, generator=g)
        elif name.endswith(("running_mean", "bn.bias")):
            sd[name] = 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith("bn.weight"):
            sd[name] = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        elif t.ndim == 4:  # conv: He-normal keeps activations O(1) through 90+ layers
            sd[name] = torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5
        else:
            sd[name] = 0.01 * torch.randn(t.shape, generator=g)
    return sd


def test_resize_matches_tensorflow1x_bilinear(tfid):
    from ctm_core.eval.inception import resize_bilinear_tf1

    g = torch.Generator().manual_seed(0)
    for shape, size in (
        ((2, 3, 32, 32), (299, 299)),
        ((1, 3, 8, 8), (299, 299)),
        ((1, 1, 64, 40), (299, 299)),
        ((1, 3, 500, 400), (299, 299)),
    ):
        x = torch.randint(0, 256, shape, generator=g).to(torch.float64)
        ref = tfid.resize(x, size=size, align_corners=False)
        got = resize_bilinear_tf1(x, size)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_pool3_features_match_torch_fidelity(tfid, tmp_path):
    sd = _random_state_dict(1)
    path = tmp_path / "inception-random.pth"
    torch.save(sd, path)  # our own trusted file: torch-fidelity reads it with torch.load(weights_only=False)
    ref_net = tfid.Extractor("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    ours = FIDInception.from_file(path)

    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    ref = ref_net(images)[0]  # (N, 2048)
    got = ours(images)
    assert got.shape == ref.shape == (3, 2048)
    assert ref.abs().mean() > 1e-3  # the random net is not degenerate
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

    # Grey images (EDM repeats the channel): ours takes (N, 1, H, W), torch-fidelity needs the repeat done for it.
    grey = images[:, :1]
    torch.testing.assert_close(ours(grey), ref_net(grey.repeat(1, 3, 1, 1))[0], rtol=1e-4, atol=1e-5)
