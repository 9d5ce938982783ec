"""The projected discriminator's feature networks against timm's own modules (docs/gan.md).

timm cannot be imported normally here: `timm/__init__` imports every model and `timm.data`, which import
torchvision (datasets, transforms), and PyPI's torchvision does not import beside the CPU torch wheel; the layers
package imports one name, `torchvision.ops.misc.FrozenBatchNorm2d`, at module level. So the test loads
`timm.models.deit` and `timm.models.efficientnet` WITHOUT running the `timm`, `timm.models` and `timm.data` package
__init__ files (bare package modules; `timm.data` gets only the constants of `timm/data/constants.py`) and with a
placeholder `torchvision.ops.misc` module whose `FrozenBatchNorm2d` is never built (neither model uses it);
huggingface_hub is optional in timm. timm is installed with `pip install --no-deps timm==1.0.31` (make setup,
requirements-nodeps.txt); skipped with a message where it is missing. Every module put in `sys.modules` for the
import is removed afterwards.

Both sides get the same random weights (timm's init, norm layers and BatchNorm statistics perturbed so eps and the
affine terms matter), written to a weights-only file and loaded through the pipeline's own path
(`_load_pretrained_`, by name, as `ProjectedDiscriminator(weights=...)` does); the outputs must agree within 1e-5
of their scale. DeiT-B itself runs in the slow tier; the default tier checks timm's DeiT-Ti distilled (the same
class at width 192) and the full EfficientNet-lite0.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from ctm_core.gan.discriminator import DeiTDistilled, EfficientNetLite, _load_pretrained_, init_parameters_

DEIT, EFFNET = "deit_base_distilled_patch16_224", "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def timm_models():
    """timm's DeiT-B distilled and EfficientNet-lite0 classes' builders, imported without the package __init__s."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm not installed (make setup installs it with --no-deps)")
    root = spec.submodule_search_locations[0]
    names = ["torchvision", "torchvision.ops", "torchvision.ops.misc", "timm", "timm.models", "timm.data"]
    before = set(sys.modules)
    saved = {n: sys.modules.get(n) for n in names}

    def bare(name, path=None, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        if path is not None:
            m.__path__ = [path]
        sys.modules[name] = m
        return m

    class FrozenBatchNorm2d(torch.nn.Module):
        """Placeholder for the one torchvision name timm.layers imports; never built here."""

    try:
        bare("torchvision", "/nonexistent")
        bare("torchvision.ops", "/nonexistent")
        bare("torchvision.ops.misc", FrozenBatchNorm2d=FrozenBatchNorm2d)
        version = importlib.metadata.version("timm")
        bare("timm", root, __version__=version)
        bare("timm.models", f"{root}/models")
        data = bare("timm.data", f"{root}/data")
        from timm.data import constants

        data.__dict__.update({k: v for k, v in vars(constants).items() if k.isupper()})
        from timm.models import deit, efficientnet

        return {
            DEIT: deit.deit_base_distilled_patch16_224,
            "deit_tiny_distilled_patch16_224": deit.deit_tiny_distilled_patch16_224,
            EFFNET: efficientnet.tf_efficientnet_lite0,
        }
    finally:
        for n in set(sys.modules) - before:
            if n.startswith(("timm", "torchvision")):
                sys.modules.pop(n, None)
        for n, m in saved.items():
            if m is not None:
                sys.modules[n] = m


def _perturbed_state(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """timm's random init with norm affines and BatchNorm statistics moved off 1/0 (so eps and affines matter)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in net.state_dict().items():
        v = v.clone()
        if k.endswith("running_var"):
            v = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("running_mean") or (k.endswith(".bias") and v.ndim == 1 and ("norm" in k or "bn" in k)):
            v = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith(".weight") and v.ndim == 1 and ("norm" in k or "bn" in k):
            v = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif k in ("cls_token", "dist_token"):
            v = 0.02 * torch.randn(v.shape, generator=g)
        sd[k] = v
    return sd


def _assert_close(ours: list[torch.Tensor], ref: list[torch.Tensor], name: str) -> None:
    assert len(ours) == len(ref) == 4, name
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, f"{name}[{i}]: {tuple(a.shape)} vs {tuple(b.shape)}"
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        assert scale > 1e-3 and err <= 1e-5 * scale, f"{name}[{i}]: max |diff| {err:.3g}, scale {scale:.3g}"


def _ours(cls, ref_net, tmp_path, name, seed, wrap=None, **kwargs):
    """Our module with ``ref_net``'s perturbed weights, loaded by name from a weights-only file (the pipeline's
    path, ``_load_pretrained_``); what timm lacks (DeiT's readout convs) is random from a seeded generator."""
    sd = _perturbed_state(ref_net, seed)
    ref_net.load_state_dict(sd)
    path = tmp_path / f"{name}.pth"
    torch.save({wrap: sd} if wrap else sd, path)
    with torch.device("meta"):
        net = cls(**kwargs)
    net.to_empty(device="cpu")
    init_parameters_(net, torch.Generator().manual_seed(seed))
    _load_pretrained_(net, path, net.ignore_prefixes, net.random_prefixes)
    return net.eval()


@torch.no_grad()
def test_efficientnet_lite0_equals_timm(timm_models, tmp_path):
    torch.manual_seed(0)  # timm's own init draws from the global RNG
    e = timm_models[EFFNET](pretrained=False).eval()
    ours = _ours(EfficientNetLite, e, tmp_path, EFFNET, seed=10)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    h = e.bn1(e.conv_stem(x))  # timm's BatchNormAct2d: BN + ReLU6
    taps = []
    for start, stop in ((0, 2), (2, 3), (3, 5), (5, 7)):  # stylegan-xl _make_efficientnet splits
        h = e.blocks[start:stop](h)
        taps.append(h)
    _assert_close(ours(x), taps, EFFNET)


@pytest.mark.parametrize(
    "timm_name,kwargs",
    [
        # DeiT-Ti distilled: timm's same VisionTransformerDistilled class at width 192 (seconds on CPU)
        ("deit_tiny_distilled_patch16_224", dict(embed_dim=192, num_heads=3, readout_features=(24, 48, 96, 192))),
        pytest.param(DEIT, {}, marks=pytest.mark.slow),  # the official DeiT-B (about a minute on 2 cores)
    ],
)
@torch.no_grad()
def test_deit_distilled_equals_timm(timm_models, tmp_path, timm_name, kwargs):
    torch.manual_seed(0)
    v = timm_models[timm_name](pretrained=False).eval()
    ours = _ours(DeiTDistilled, v, tmp_path, timm_name, seed=11, wrap="model", **kwargs)  # the release's wrapper
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    inter = v.forward_intermediates(x, indices=[2, 5, 8, 11], norm=False, output_fmt="NCHW", intermediates_only=True)
    layers = (ours.layer1, ours.layer2, ours.layer3, ours.layer4)  # the random readout, not in timm
    _assert_close(ours(x), [layer(t) for layer, t in zip(layers, inter)], timm_name)
