"""Cross-implementation check (STYLE 17d): our EDMPrecond + SongUNet/DhariwalUNet, loaded with the weights of EDM
snapshot fixtures through the safe reader, reproduce what NVlabs/edm's own code computed from the same pickles
(``../shared/fixtures/edm/<name>.ref.npz``, README there).

Tolerance: relative L2 error 1e-5 (the fixtures README: fp32 vs fp64 of the same weights differ by < 1e-6; a scalar
vs vector sigma moves the last bits).
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np
import pytest
import torch

from ctm_core.io.edm_pickle import read_edm_snapshot
from ctm_core.nets.precond import build_precond

FIXTURES = ["tiny-uncond-vp", "tiny-cond-ve", "tiny-cond-adm"]
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """Run these small forwards single-threaded: on the shared 2-core machine, 2 OpenMP threads competing with other
    processes made them ~10-100x slower. Restores the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def _load(pkl: pathlib.Path, npz_path: pathlib.Path):
    """(net in eval mode, reference arrays, labels or None) for one fixture; cached across the tests below."""
    with np.load(npz_path) as npz:
        ref = {key: np.array(npz[key]) for key in npz.files}  # writable copies
    snap = read_edm_snapshot(pkl)
    meta = json.loads(str(ref["meta_json"]))
    assert snap.class_name == meta["net_class"] == "EDMPrecond"
    assert snap.init_kwargs == meta["init_kwargs"]
    net = build_precond(snap.class_name, snap.init_kwargs)
    net.load_state_dict(snap.state_dict, strict=True)
    net.eval().requires_grad_(False)
    labels = torch.from_numpy(ref["labels"]) if ref["labels"].shape[1] else None
    return net, ref, labels


def _rel_l2(ours: torch.Tensor, expected: np.ndarray) -> float:
    """||ours - expected|| / ||expected|| in float64 (0 when both are exactly zero, e.g. c_noise at sigma = 1)."""
    expected = torch.from_numpy(np.array(expected, dtype=np.float64))
    err = (ours.to(torch.float64) - expected).norm().item()
    return 0.0 if err == 0 else err / expected.norm().item()


@pytest.fixture
def edm_net(shared_file):
    """name -> (net, reference arrays, labels or None) of ../shared/fixtures/edm/<name>; skips when absent."""
    return lambda name: _load(
        shared_file("fixtures", "edm", f"{name}.pkl"), shared_file("fixtures", "edm", f"{name}.ref.npz")
    )


@pytest.mark.parametrize("name", FIXTURES)
def test_snapshot_attributes(edm_net, name):
    net, ref, _ = edm_net(name)
    meta = json.loads(str(ref["meta_json"]))
    assert net.label_dim == meta["label_dim"]
    assert net.img_resolution == meta["img_resolution"] and net.img_channels == meta["img_channels"]
    assert (net.sigma_min, net.sigma_max) == (meta["sigma_min"], meta["sigma_max"])
    assert type(net.model).__name__ == meta["model_class"]


@pytest.mark.parametrize("name", FIXTURES)
def test_denoiser_matches_edm_vector_and_scalar_sigma(edm_net, name):
    net, ref, labels = edm_net(name)
    sigmas = ref["den_sigmas"]
    batch = ref["den_x"].shape[1]
    with torch.no_grad():
        for k, sigma in enumerate(sigmas):
            x = torch.from_numpy(ref["den_x"][k])
            sigma_vec = torch.full([batch], float(sigma), dtype=torch.float32)
            D = net(x, sigma_vec, labels)
            assert D.dtype == torch.float32 and D.shape == x.shape
            assert _rel_l2(D, ref["den_D"][k]) < RTOL, f"den_D at sigma={sigma}"
            D_scalar = net(x, torch.tensor(float(sigma), dtype=torch.float64), labels)  # as edm_sampler calls it
            assert _rel_l2(D_scalar, ref["den_D_scalar"][k]) < RTOL, f"den_D_scalar at sigma={sigma}"


@pytest.mark.parametrize("name", FIXTURES)
def test_inner_network_inputs_and_output_match_edm(edm_net, name):
    """c_in x, c_noise and F_x as the inner UNet saw / returned them, captured with a forward hook."""
    net, ref, labels = edm_net(name)
    seen = {}

    def hook(module, args, kwargs, output):
        seen["model_in"], seen["c_noise"] = args[0], args[1]
        seen["F"] = output

    handle = net.model.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for k in (0, len(ref["den_sigmas"]) // 2, len(ref["den_sigmas"]) - 1):
                x = torch.from_numpy(ref["den_x"][k])
                net(x, torch.full([x.shape[0]], float(ref["den_sigmas"][k]), dtype=torch.float32), labels)
                assert _rel_l2(seen["model_in"], ref["den_model_in"][k]) < RTOL
                c_noise = np.broadcast_to(ref["den_c_noise"][k], seen["c_noise"].shape)
                assert _rel_l2(seen["c_noise"], c_noise) < RTOL
                assert _rel_l2(seen["F"], ref["den_F"][k]) < RTOL
    finally:
        handle.remove()


@pytest.mark.parametrize("name", FIXTURES)
def test_mixed_sigma_batch_and_missing_labels(edm_net, name):
    net, ref, labels = edm_net(name)
    with torch.no_grad():
        D = net(torch.from_numpy(ref["mix_x"]), torch.from_numpy(ref["mix_sigma"]), labels)
        assert _rel_l2(D, ref["mix_D"]) < RTOL
        if "nolabel_D" in ref:
            assert labels is not None
            # nolabel_D is D at sigma = 1 with class_labels=None, on the denoiser input of that noise level.
            (k,) = np.flatnonzero(ref["den_sigmas"] == 1.0)
            x = torch.from_numpy(ref["den_x"][k])
            assert _rel_l2(net(x, torch.tensor(1.0), None), ref["nolabel_D"]) < RTOL
            assert _rel_l2(net(x, torch.ones(x.shape[0]), None), ref["nolabel_D"]) < RTOL
            # The labelled output differs: class_labels=None really means zero labels, not the stored ones.
            assert _rel_l2(net(x, torch.tensor(1.0), labels), ref["nolabel_D"]) > 1e-3
        else:
            assert labels is None
