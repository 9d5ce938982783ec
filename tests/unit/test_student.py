"""The CTM student: initialisation from an EDM teacher, G(x, t, t) = x, and the s-branch wiring."""

from __future__ import annotations

import pytest
import torch

from ctm_core.nets.precond import EDMPrecond, VEPrecond
from ctm_core.nets.student import CTMStudent, is_s_branch_key, s_branch_parameters

TINY = {
    "SongUNet-ddpmpp": dict(
        model_type="SongUNet",
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        augment_dim=9,
        dropout=0.1,
    ),
    "SongUNet-ncsnpp": dict(
        model_type="SongUNet",
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        embedding_type="fourier",
        encoder_type="residual",
        channel_mult_noise=2,
        resample_filter=[1, 3, 3, 1],
    ),
    "DhariwalUNet": dict(
        model_type="DhariwalUNet",
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
    ),
}


def _randomized_teacher(arch: str, label_dim: int, seed: int = 0) -> EDMPrecond:
    """A tiny EDM teacher whose weights are all random (EDM zero-inits output layers, which hides wiring bugs)."""
    torch.manual_seed(seed)
    teacher = EDMPrecond(img_resolution=16, img_channels=3, label_dim=label_dim, **TINY[arch])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return teacher.eval()


@pytest.fixture(params=[("SongUNet-ddpmpp", 10), ("SongUNet-ncsnpp", 0), ("DhariwalUNet", 10)], ids=str)
def pair(request):
    arch, label_dim = request.param
    teacher = _randomized_teacher(arch, label_dim)
    torch.manual_seed(1)
    student = CTMStudent.from_teacher(teacher).eval()
    return teacher, student, label_dim


def _inputs(label_dim: int, B: int = 3):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 3, 16, 16, generator=g)
    labels = None
    if label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(B) % label_dim, label_dim).float()
    return x, labels


def test_teacher_weights_copied_by_name_and_s_branch_fresh(pair):
    teacher, student, _ = pair
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    s_branch = s_branch_parameters(student)
    assert any(k.startswith("model.map_layer0_s.") for k in s_branch)
    assert any(k.endswith("affine_s.weight") for k in s_branch)
    for name, tensor in s_sd.items():
        if is_s_branch_key(name):
            assert name not in t_sd
        else:
            assert torch.equal(tensor, t_sd[name]), name
    # Fresh, not zero: every s-branch weight matrix carries signal at step 0 (docs/ctm.md#13-student-initialisation).
    for name, p in s_branch.items():
        if name.endswith("weight"):
            assert p.abs().sum() > 0, name
    # The teacher's augmentation mapping is not part of the student.
    assert not any("map_augment" in k for k in s_sd)


def test_G_identity_at_s_equals_t(pair):
    _, student, label_dim = pair
    x, labels = _inputs(label_dim)
    for t in (0.002, 0.7, 80.0):
        torch.testing.assert_close(student.G(x, t, t, labels), x, rtol=0, atol=0)
    x64 = x.double()
    t = torch.tensor([0.01, 1.0, 40.0])
    assert torch.equal(student.G(x64, t, t, labels), x64)


def test_zeroed_s_branch_reproduces_teacher(pair):
    teacher, student, label_dim = pair
    with torch.no_grad():
        for p in s_branch_parameters(student).values():
            p.zero_()
    x, labels = _inputs(label_dim)
    for t in (0.05, 2.0, 60.0):
        D = teacher(x * t, torch.full((x.shape[0],), t), labels)
        for s in (0.002, t / 3):
            g = student.g(x * t, torch.full((x.shape[0],), t), s, labels)
            torch.testing.assert_close(g, D, rtol=1e-5, atol=1e-5)


def test_s_branch_changes_output(pair):
    _, student, label_dim = pair
    x, labels = _inputs(label_dim)
    g1 = student.g(x, 1.0, 0.002, labels)
    g2 = student.g(x, 1.0, 0.5, labels)
    assert (g1 - g2).abs().max() > 1e-6


def test_G_matches_definition(pair):
    _, student, label_dim = pair
    x, labels = _inputs(label_dim)
    t, s = torch.tensor([3.0, 1.0, 0.5]), torch.tensor([0.002, 0.3, 0.5])
    g = student.g(x, t, s, labels)
    ratio = (s / t).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(student.G(x, t, s, labels), ratio * x + (1 - ratio) * g)


def test_bad_inputs_named():
    teacher = _randomized_teacher("SongUNet-ddpmpp", 0)
    student = CTMStudent.from_teacher(teacher)
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="s must be > 0"):
        student.G(x, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(2,\)"):
        student.G(x, torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="x_t must have shape"):
        student.G(x[0], 1.0, 0.5)
    ve = VEPrecond(img_resolution=16, img_channels=3, **TINY["SongUNet-ddpmpp"])
    with pytest.raises(ValueError, match="EDMPrecond"):
        CTMStudent.from_teacher(ve)
    with pytest.raises(ValueError, match="model_type"):
        CTMStudent(16, 3, model_type="UNet3000")
