"""The public API (docs/api.md) is importable from the package root with its documented signature,
and importing ctm_core pulls in no pipeline service."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

import ctm_core


def test_public_names_and_keywords():
    sig = inspect.signature(ctm_core.edm_sampler)
    assert list(sig.parameters)[:3] == ["denoiser", "latents", "class_labels"]
    for name, default in dict(
        num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0
    ).items():
        assert sig.parameters[name].default == default, name
    assert sig.parameters["randn_like"].default is torch.randn_like
    sig = inspect.signature(ctm_core.gamma_sampler)
    for name in ("nfe", "gamma", "sigmas", "sigma_min", "sigma_max", "rho", "randn_like"):
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    sig = inspect.signature(ctm_core.log_likelihood)
    for name, default in dict(sigma_min=0.002, sigma_max=80.0, divergence="exact", rtol=1e-5, atol=1e-5).items():
        assert sig.parameters[name].default == default, name
    assert inspect.signature(ctm_core.bits_per_dim).parameters["bits"].default == 8
    assert issubclass(ctm_core.UnsafeCheckpointError, ValueError)


def test_import_touches_no_services():
    code = (
        "import sys, ctm_core\n"
        "bad = [m for m in ('ray', 'mlflow', 'dvc', 'boto3') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_load_edm_checkpoint_contract(shared_file):
    path = shared_file("fixtures", "edm", "tiny-cond-ve.pkl")
    net = ctm_core.load_edm_checkpoint(path)
    assert not net.training
    assert all(not p.requires_grad for p in net.parameters())
    for attr in ("sigma_min", "sigma_max", "label_dim", "img_resolution", "img_channels"):
        assert hasattr(net, attr), attr
    assert (net.label_dim, net.img_resolution, net.img_channels) == (10, 32, 3)
    sigma = torch.tensor(0.5, dtype=torch.float64)
    assert net.round_sigma(sigma) == sigma
    x = torch.zeros(1, 3, 32, 32, dtype=torch.float64)
    assert net(x, sigma).dtype == torch.float32
    with open(path, "rb") as f:  # binary file objects work too
        net2 = ctm_core.load_edm_checkpoint(f)
    for (k1, v1), (k2, v2) in zip(net.state_dict().items(), net2.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_unsafe_error_on_garbage(tmp_path):
    p = tmp_path / "not_a_checkpoint.pkl"
    p.write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    with pytest.raises(ValueError):
        ctm_core.load_edm_checkpoint(p)
