"""edm_sampler on the EDM snapshot fixtures against the outputs of NVlabs/edm's own generate.py (../shared)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ctm_core.diffusion.samplers import StackedRandomGenerator, edm_sampler

FIXTURES = ["tiny-uncond-vp", "tiny-cond-ve", "tiny-cond-adm"]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).norm() / b.to(torch.float64).norm())


class SigmaRecorder:
    """Wraps the net, forwarding round_sigma/sigma_min/sigma_max, and records the sigma of every call."""

    def __init__(self, net):
        self.net, self.sigmas = net, []
        self.sigma_min, self.sigma_max, self.round_sigma = net.sigma_min, net.sigma_max, net.round_sigma

    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(float(sigma))
        return self.net(x, sigma, class_labels)


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request, shared_file):
    teacher_format = pytest.importorskip("ctm_core.io.teacher_format")
    pkl = shared_file("fixtures", "edm", f"{request.param}.pkl")
    ref = dict(np.load(shared_file("fixtures", "edm", f"{request.param}.ref.npz")))
    net = teacher_format.load_edm_checkpoint(pkl)
    labels = torch.from_numpy(ref["labels"])
    labels = labels if labels.shape[1] > 0 else None
    return net, ref, labels


@pytest.mark.parametrize("steps", [2, 5, pytest.param(18, marks=pytest.mark.slow)])
def test_deterministic_sampler_matches_edm(fixture, steps):
    net, ref, labels = fixture
    rec = SigmaRecorder(net)
    latents = torch.from_numpy(ref["samp_latents"])
    with torch.no_grad():
        x = edm_sampler(rec, latents, labels, num_steps=steps)
    np.testing.assert_allclose(np.array(rec.sigmas), ref[f"samp{steps}_sigmas"], rtol=1e-12, atol=0)
    assert x.dtype == torch.float64
    assert rel_l2(x, torch.from_numpy(ref[f"samp{steps}_x"])) < 1e-4


def test_stochastic_sampler_matches_edm(fixture):
    net, ref, labels = fixture
    params = json.loads(str(ref["stoch_params_json"]))
    noise = iter(torch.from_numpy(ref["stoch_noise"]))
    calls = []

    def randn_like(x):
        calls.append(1)
        z = next(noise)
        assert z.shape == x.shape
        return z.to(x.dtype)

    rec = SigmaRecorder(net)
    with torch.no_grad():
        x = edm_sampler(rec, torch.from_numpy(ref["samp_latents"]), labels, randn_like=randn_like, **params)
    assert len(calls) == params["num_steps"]  # one draw per step, also where no churn applies
    np.testing.assert_allclose(np.array(rec.sigmas), ref["stoch_sigmas"], rtol=1e-12, atol=0)
    assert rel_l2(x, torch.from_numpy(ref["stoch_x"])) < 1e-4


@pytest.mark.slow
def test_generate_path_matches_edm(fixture):
    """generate.py: per-image generators give latents, then labels, then churn noise; 18 steps; uint8 output."""
    net, ref, _ = fixture
    seeds = ref["gen_seeds"].tolist()
    rnd = StackedRandomGenerator("cpu", seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    torch.testing.assert_close(latents, torch.from_numpy(ref["gen_latents"]), rtol=0, atol=0)
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim)[rnd.randint(net.label_dim, size=[len(seeds)])]
        torch.testing.assert_close(labels, torch.from_numpy(ref["gen_labels"]), rtol=0, atol=0)
    with torch.no_grad():
        x = edm_sampler(net, latents, labels, randn_like=rnd.randn_like, num_steps=18)
    assert rel_l2(x, torch.from_numpy(ref["gen_x"])) < 1e-4
    images = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, C), as generate.py
    diff = (images.to(torch.int16) - torch.from_numpy(ref["gen_uint8"]).to(torch.int16)).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
