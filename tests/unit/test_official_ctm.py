"""The official CTM students (ctm_core.nets.official): the shared fixtures' reference outputs, other widths, bad input.

Reference arrays: ../shared/fixtures/ctm_official/*.ref.npz, computed by the official sony/ctm and ctm-cifar10 code
on tiny random students saved the way the official training loop saves them (README there). Rows of callK use
(t_i, s_i) pairs from t = 80 down to 0.002; samples are the official `exact` sampler with 1 and 2 steps.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from ctm_core import gamma_sampler, load_official_ctm
from ctm_core.errors import InputError
from ctm_core.io.edm_pickle import UnsafeCheckpointError
from ctm_core.nets.official.loader import build_official_ctm

IMAGENET_FLAGS = dict(num_channels=32, num_res_blocks=1, channel_mult="1,1", num_head_channels=16, num_classes=10)
TOL = dict(rtol=1e-5, atol=1e-5)  # g, G (fp32 reimplementation; README: ~1e-5 relative)
SAMPLE_TOL = dict(rtol=0.0, atol=1e-4)


@pytest.fixture(scope="module")
def official(shared_file):
    def get(name):
        ref = dict(np.load(shared_file("fixtures", "ctm_official", f"{name}.ref.npz")))
        return shared_file("fixtures", "ctm_official", f"{name}.pt"), {k: torch.from_numpy(v) for k, v in ref.items()}

    return get


def _onehot(y, n):
    return torch.nn.functional.one_hot(y, n).to(torch.float32)


def _check_calls(student, ref, prefix, num_classes):
    for k in range(3):
        p = f"{prefix}call{k}_"
        if f"{p}t" not in ref:
            continue
        x, t, s = ref[f"{p}x_t"], ref[f"{p}t"], ref[f"{p}s"]
        y = _onehot(ref[f"{p}y"], num_classes) if num_classes else None
        torch.testing.assert_close(student.g(x, t, s, y), ref[f"{p}denoised"], **TOL)
        torch.testing.assert_close(student.G(x, t, s, y), ref[f"{p}G"], **TOL)
        # The raw network output F, fed c_in·x_t and the CTMStudent time inputs ln(t)/4, ln(s)/4.
        c_in = (1 / (t**2 + 0.25).sqrt()).reshape(-1, 1, 1, 1)
        F_x = student.model(c_in * x, t.log() / 4, class_labels=y, noise_labels_s=s.log() / 4)
        torch.testing.assert_close(F_x, ref[f"{p}F"], rtol=1e-5, atol=3e-5)  # g carries c_out(t) <= 0.5 of it


def _check_samples(student, ref, prefix, num_classes):
    z = ref[f"{prefix}sample_z"]
    y = _onehot(ref["sample_y"], num_classes) if num_classes else None
    for n in (1, 2):
        x = gamma_sampler(student, z, y, nfe=n, gamma=0.0)
        torch.testing.assert_close(x.float(), ref[f"{prefix}sample_{n}step_raw"], **SAMPLE_TOL)


def test_fixture_has_the_official_shared_storage_layout(official):
    """What the loader must cope with: every tensor a view into a few flat storages, at non-zero offsets."""
    for name, n_storages in (("ctm_imagenet64_tiny", 2), ("ctm_cifar10_cond_tiny", 10)):
        path, _ = official(name)
        sd = torch.load(path, weights_only=True, map_location="cpu")
        ptrs = {t.untyped_storage().data_ptr() for t in sd.values()}
        assert len(ptrs) == n_storages and any(t.storage_offset() > 0 for t in sd.values())


@torch.no_grad()
def test_imagenet64_matches_official_outputs_and_exact_sampler(official):
    path, ref = official("ctm_imagenet64_tiny")
    student = load_official_ctm(path, "sony-ctm-imagenet64", **IMAGENET_FLAGS)
    # sony/ctm's network input is 250·ln(t + 1e-44); ours is 1000·(ln(t)/4): the same float32 number.
    for k in range(3):
        t = ref[f"call{k}_t"]
        assert torch.equal(1000 * (t.log() / 4), ref[f"call{k}_net_t_in"])
    _check_calls(student, ref, "", 10)
    _check_samples(student, ref, "", 10)
    assert student.official["sha256"] == "5b4d3e5cd69f40ff41710e13c35d965e9d5ca9ee1797819e66743624dbe1422c"
    assert list(student.model.state_dict()) == list(torch.load(path, weights_only=True))  # key order as saved


@torch.no_grad()
def test_cifar10_cond_and_uncond_match_official_outputs(official, tmp_path):
    path, ref = official("ctm_cifar10_cond_tiny")
    small = dict(model_channels=8, num_blocks=1)
    student = load_official_ctm(path, "ctm-cifar10", label_dim=10, **small)
    for k in range(3):  # SongUNet receives EDM's ln(t)/4 (EDMPrecond_CTM undoes the 250·ln wrapper)
        torch.testing.assert_close(ref[f"call{k}_t"].log() / 4, ref[f"call{k}_noise_label_t"], rtol=0, atol=4e-8)
    _check_calls(student, ref, "", 10)
    _check_samples(student, ref, "", 10)

    # Unconditional: the same weights without map_label (label_dim=0, the official default).
    sd = torch.load(path, weights_only=True)
    uncond = tmp_path / "uncond.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith("model.map_label.")}, uncond)
    student = load_official_ctm(uncond, "ctm-cifar10", **small)
    assert student.label_dim == 0
    _check_calls(student, ref, "uncond_", 0)
    _check_samples(student, ref, "uncond_", 0)


@pytest.mark.parametrize(
    "preset, flags, num_classes",
    [
        (
            "sony-ctm-imagenet64",
            dict(
                image_size=32,
                num_channels=64,
                num_res_blocks=2,
                channel_mult="1,2",
                attention_resolutions="16",
                num_head_channels=32,
                num_classes=5,
            ),
            5,
        ),
        ("sony-ctm-imagenet64", dict(num_channels=32, channel_mult=[1, 2], num_res_blocks=1, num_classes=0), 0),
        ("ctm-cifar10", dict(model_channels=16, num_blocks=2, label_dim=10), 10),
    ],
)
@torch.no_grad()
def test_other_widths_and_seeds_roundtrip_through_shared_storage_files(
    preset, flags, num_classes, tmp_path, save_like_official
):
    torch.manual_seed(3)
    built = build_official_ctm(preset, **flags).eval()
    for p in built.parameters():  # zero-initialised output convs would make every student equal to c_skip·x
        p.add_(0.05 * torch.randn_like(p))
    net = built.model if preset == "sony-ctm-imagenet64" else built
    path = tmp_path / "ema_0.999_000001.pt"
    save_like_official(net.state_dict(), path)
    loaded = load_official_ctm(path, preset, **flags)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2
    y = _onehot(torch.tensor([0, num_classes - 1]), num_classes) if num_classes else None
    t, s = torch.tensor([2.0, 0.5]), torch.tensor([0.3, 0.002])
    assert torch.equal(loaded.G(x, t, s, y), built.G(x, t, s, y))
    assert torch.equal(loaded.G(x, t, t, y), x)  # G(x, t, t) = x exactly
    assert not torch.equal(loaded.g(x, t, s, y), loaded.g(x, t, t, y))  # s reaches the network


def test_mismatched_flags_fail_in_one_line_naming_key_and_shapes(official):
    path, _ = official("ctm_imagenet64_tiny")
    with pytest.raises(InputError) as e:
        load_official_ctm(path, "sony-ctm-imagenet64", **{**IMAGENET_FLAGS, "num_channels": 64})
    msg = str(e.value)
    assert "\n" not in msg and "first mismatching key time_embed.0.weight" in msg
    assert "checkpoint [128, 32]" in msg and "model [256, 64]" in msg
    with pytest.raises(InputError, match=r"first mismatching key label_emb.weight: checkpoint \[10, 128\], model"):
        load_official_ctm(path, "sony-ctm-imagenet64", **{**IMAGENET_FLAGS, "num_classes": 1000})
    # The release flags (192 channels) on the tiny file: refused before any weights are copied.
    with pytest.raises(InputError, match="does not fit preset 'sony-ctm-imagenet64'"):
        load_official_ctm(path, "sony-ctm-imagenet64")
    cifar, _ = official("ctm_cifar10_cond_tiny")
    with pytest.raises(InputError, match=r"checkpoint key model.map_label.weight \[8, 10\] is not in the model"):
        load_official_ctm(cifar, "ctm-cifar10", model_channels=8, num_blocks=1)  # label_dim 0 vs a cond file
    with pytest.raises(ValueError, match=r"unknown flags for preset 'ctm-cifar10': \['num_channels'\]"):
        load_official_ctm(cifar, "ctm-cifar10", num_channels=8)
    with pytest.raises(ValueError, match="preset must be one of"):
        load_official_ctm(cifar, "ctm-imagenet")


class _Payload:
    """Unpickling this would create a file: the loader must refuse it without running anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_and_non_state_dicts_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"time_embed.0.weight": torch.zeros(2), "x": _Payload(str(marker))}, evil)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load") as e:
        load_official_ctm(evil, "sony-ctm-imagenet64")
    assert "\n" not in str(e.value) and str(evil.name) in str(e.value) and not marker.exists()

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"ema": {"w": torch.zeros(1)}}, wrapped)
    with pytest.raises(InputError, match="expected a bare state dict"):
        load_official_ctm(wrapped, "ctm-cifar10")
    with pytest.raises(InputError, match="not a readable torch checkpoint"):
        load_official_ctm(io.BytesIO(b"not a checkpoint"), "ctm-cifar10")
    ints = tmp_path / "ints.pt"
    torch.save({"w": torch.zeros(1, dtype=torch.int64)}, ints)
    with pytest.raises(InputError, match="expected floating-point tensors"):
        load_official_ctm(ints, "ctm-cifar10")


def test_params_schema_offers_exactly_the_loader_presets():
    import typing

    from ctm_core.config import StudentSourceParams
    from ctm_core.nets.official.loader import OFFICIAL_PRESETS

    assert set(typing.get_args(StudentSourceParams.model_fields["preset"].annotation)) == set(OFFICIAL_PRESETS)


def test_release_presets_build_with_the_release_shapes():
    """The release flags give the release widths (shapes from docs/ctm.md#14-imagenet-64-student; no released file
    can be fetched here to compare)."""
    with torch.device("meta"):
        imagenet = build_official_ctm("sony-ctm-imagenet64")
        cifar = build_official_ctm("ctm-cifar10")
    sd = imagenet.model.state_dict()
    assert tuple(sd["time_embed.0.weight"].shape) == (768, 192) and tuple(sd["label_emb.weight"].shape) == (1000, 768)
    assert tuple(sd["input_blocks.5.1.qkv.weight"].shape) == (1152, 384, 1, 1)  # 32x32 attention, 6 heads of 64
    assert tuple(sd["out.2.weight"].shape) == (3, 192, 3, 3)
    assert tuple(cifar.state_dict()["model.map_layer0_s.weight"].shape) == (512, 128)


@torch.no_grad()
def test_cifar10_release_layout_is_the_distill_students_layout(official):
    """A ctm-cifar10 checkpoint loads strictly into the student the distill stage builds from an EDM DDPM++ teacher
    of the same width (CTMStudent.from_teacher), so continuing training needs no key mapping
    (docs/official.md#5-continuing-training-from-a-released-checkpoint)."""
    from ctm_core.nets.precond import EDMPrecond
    from ctm_core.nets.student import CTMStudent

    path, ref = official("ctm_cifar10_cond_tiny")
    arch = dict(model_channels=8, channel_mult=[2, 2, 2], num_blocks=1, attn_resolutions=[16], dropout=0.13)
    teacher = EDMPrecond(32, 3, label_dim=10, model_type="SongUNet", **arch)
    student = CTMStudent.from_teacher(teacher).eval()
    student.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x, t, s = ref["call1_x_t"], ref["call1_t"], ref["call1_s"]
    torch.testing.assert_close(student.G(x, t, s, _onehot(ref["call1_y"], 10)), ref["call1_G"], **TOL)
