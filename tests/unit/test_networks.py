"""EDM-compatible networks and preconditioning: key grammar against EDM's listings, parameter counts, the CTM
s-branch, closed-form checks of embeddings / attention / GroupNorm / preconditioning, and argument errors.

Released presets are built on the ``meta`` device (no memory, no time); forward passes use tiny configs.
"""

from __future__ import annotations

import ast
import functools
import math

import numpy as np
import pytest
import torch

from ctm_core.nets.layers import GroupNorm, Linear, PositionalEmbedding, UNetBlock
from ctm_core.nets.networks import DhariwalUNet, SongUNet
from ctm_core.nets.precond import EDMPrecond, VEPrecond, VPPrecond, build_precond
from ctm_core.nets.presets import PRESETS, build_preset

SEED = 0


@pytest.fixture(autouse=True)
def _one_thread():
    """Run these small forwards single-threaded: on the shared 2-core machine, 2 OpenMP threads competing with other
    processes made them ~10-100x slower. Restores the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# docs/edm.md#a15-parameter-counts (EDM's own classes, exact preset kwargs).
PARAM_COUNTS = {
    "edm-cifar10-32x32-cond-vp": 55_735_299,
    "edm-cifar10-32x32-uncond-vp": 55_733_891,
    "edm-cifar10-32x32-cond-ve": 56_400_643,
    "edm-cifar10-32x32-uncond-ve": 56_397_827,
    "edm-ffhq-64x64-uncond-vp": 61_805_571,
    "edm-ffhq-64x64-uncond-ve": 62_761_091,
    "edm-afhqv2-64x64-uncond-vp": 61_805_571,
    "edm-afhqv2-64x64-uncond-ve": 62_761_091,
    "edm-imagenet-64x64-cond-adm": 295_899_267,
}

# Tiny inner-net configs (img 16x16, C=16 -> GroupNorm with 4/8 groups).
TINY_SONG = dict(
    img_resolution=16,
    in_channels=3,
    out_channels=3,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    dropout=0.0,
)
TINY_ADM = dict(
    img_resolution=16,
    in_channels=3,
    out_channels=3,
    model_channels=32,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    dropout=0.0,
)  # 64 channels at 8x8 -> 1 attention head
SONG_VARIANTS = {
    "ddpmpp": dict(embedding_type="positional", encoder_type="standard", resample_filter=[1, 1]),
    "ncsnpp": dict(
        embedding_type="fourier", encoder_type="residual", resample_filter=[1, 3, 3, 1], channel_mult_noise=2
    ),
    "skip": dict(embedding_type="positional", encoder_type="skip", decoder_type="skip", resample_filter=[1, 3, 3, 1]),
}


def _read_tsv(path) -> list[tuple[str, list[int], str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape, dtype = line.split("\t")
            rows.append((key, ast.literal_eval(shape), dtype))
    return rows


@functools.cache
def _meta_preset(name: str, ctm_s_branch: bool = False) -> torch.nn.Module:
    """A weight-less skeleton of a released preset (shared by the tests below; never modified)."""
    with torch.device("meta"):
        return build_preset(name, ctm_s_branch=True) if ctm_s_branch else build_preset(name)


def _song(label_dim: int = 0, variant: str = "ddpmpp", **kw) -> SongUNet:
    torch.manual_seed(SEED)
    return SongUNet(**TINY_SONG, label_dim=label_dim, **SONG_VARIANTS[variant], **kw).eval()


def _adm(label_dim: int = 0, **kw) -> DhariwalUNet:
    torch.manual_seed(SEED)
    return DhariwalUNet(**TINY_ADM, label_dim=label_dim, **kw).eval()


def _randomize(net: torch.nn.Module, seed: int = SEED) -> None:
    """Overwrite every parameter with O(1) noise so that zero-initialised paths (conv1, proj, out) matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ------------------------------------------------------------------------------------------------------------------
# Released presets: key names, shapes, order, dtypes and parameter counts equal EDM's.


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_keys_shapes_order_match_edm(shared_file, name):
    rows = _read_tsv(shared_file("docs", "edm_keys", f"{name.removeprefix('edm-')}.tsv"))
    net = _meta_preset(name)
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in net.state_dict().items()]
    assert [r[0] for r in ours] == [r[0] for r in rows]  # names and order
    assert ours == rows  # shapes and dtypes
    assert sum(p.numel() for p in net.parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_kwargs_and_attributes(name):
    class_name, kwargs = PRESETS[name]
    assert class_name == "EDMPrecond"  # "vp"/"ve" is the architecture, not the preconditioning
    net = _meta_preset(name)
    assert net.init_kwargs == kwargs
    assert (net.sigma_min, net.sigma_max, net.sigma_data) == (0, math.inf, 0.5)
    assert net.img_resolution == kwargs["img_resolution"] and net.img_channels == 3
    assert net.label_dim == kwargs["label_dim"]
    if "imagenet" in name:
        assert kwargs["use_fp16"] is True and "augment_dim" not in kwargs and kwargs["dropout"] == 0.1
    else:
        assert kwargs["augment_dim"] == 9 and kwargs["use_fp16"] is False
        expected_dropout = {"cifar10": 0.13, "ffhq": 0.05, "afhqv2": 0.25}[name.split("-")[1]]
        assert kwargs["dropout"] == expected_dropout


@pytest.mark.parametrize(
    "name", ["edm-cifar10-32x32-cond-vp", "edm-cifar10-32x32-uncond-ve", "edm-imagenet-64x64-cond-adm"]
)
def test_preset_s_branch_adds_only_s_keys(name):
    teacher, student = _meta_preset(name), _meta_preset(name, ctm_s_branch=True)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    extra = [k for k in s_sd if k not in t_sd]
    assert all(k in s_sd and s_sd[k].shape == v.shape for k, v in t_sd.items())
    assert [k for k in s_sd if k in t_sd] == list(t_sd)  # teacher keys keep their order
    affine = [k for k in t_sd if ".affine." in k]
    expected = {f"model.map_layer{i}_s.{p}" for i in (0, 1) for p in ("weight", "bias")}
    expected |= {k.replace(".affine.", ".affine_s.") for k in affine}
    assert set(extra) == expected
    for k in affine:
        assert s_sd[k.replace(".affine.", ".affine_s.")].shape == t_sd[k].shape


def test_unknown_preset_name():
    with pytest.raises(ValueError, match="edm-cifar10-32x32-cond-vp.*got 'edm-cifar10'"):
        build_preset("edm-cifar10")


# ------------------------------------------------------------------------------------------------------------------
# CTM s-branch on tiny nets.


@pytest.mark.parametrize("kind", ["song-uncond", "song-cond", "adm-cond"])
def test_s_branch_keys_init_and_teacher_load(kind):
    make = _adm if kind.startswith("adm") else _song
    label_dim = 10 if kind.endswith("-cond") else 0
    teacher, student = make(label_dim), make(label_dim, ctm_s_branch=True)
    assert not any("_s." in k for k in teacher.state_dict())
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(k.startswith(("map_layer0_s.", "map_layer1_s.")) or ".affine_s." in k for k in missing)
    blocks = [m for m in student.modules() if isinstance(m, UNetBlock)]
    assert blocks and all(b.affine_s is not None for b in blocks)
    assert len(missing) == 4 + 2 * len(blocks)
    for name, p in student.named_parameters():
        if "_s." not in name:
            continue
        if name.endswith("weight"):
            assert p.abs().max() > 0, name  # fresh, not zero-initialised
        elif kind.startswith("song"):
            assert torch.count_nonzero(p) == 0, name  # SongUNet linears: zero bias
        else:
            assert p.abs().max() > 0, name  # ADM linears: torch-default-like uniform bias


@pytest.mark.parametrize("kind", ["song-cond", "ncsnpp-uncond", "adm-cond"])
def test_s_branch_zero_affine_s_reproduces_teacher(kind):
    """With every affine_s zeroed, the student's F equals the teacher's F for any s (s enters only via affine_s);
    with them non-zero, F depends on s."""
    label_dim = 10 if kind.endswith("-cond") else 0
    if kind.startswith("adm"):
        teacher, student = _adm(label_dim), _adm(label_dim, ctm_s_branch=True)
    else:
        variant = "ncsnpp" if kind.startswith("ncsnpp") else "ddpmpp"
        teacher, student = _song(label_dim, variant), _song(label_dim, variant, ctm_s_branch=True)
    _randomize(teacher)
    _randomize(student, seed=SEED + 1)
    student.load_state_dict(teacher.state_dict(), strict=False)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, 3, 16, 16, generator=g)
    c_t = torch.tensor([-1.0, 0.5])
    c_s = torch.tensor([-1.5, -2.0])
    y = torch.eye(10)[[3, 7]] if label_dim else None
    with torch.no_grad():
        F_student = student(x, c_t, y, noise_labels_s=c_s)
        F_student_other_s = student(x, c_t, y, noise_labels_s=c_s + 1)
        assert (F_student - F_student_other_s).abs().max() > 1e-3
        for name, p in student.named_parameters():
            if ".affine_s." in name:
                p.zero_()
        F_teacher = teacher(x, c_t, y)
        F_student = student(x, c_t, y, noise_labels_s=c_s)
    torch.testing.assert_close(F_student, F_teacher, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label_dim", [0, 10])
def test_song_s_embedding_closed_form(label_dim):
    """map_layer0_s receives [sin(c_s f), cos(c_s f)] (+ map_label(y sqrt(L))), f_i = 1e-4^(i / (C/2 - 1))
    (endpoint=True, half swap; docs/ctm.md#12-cifar-10-student, docs/edm.md#a13-porting-traps); map_layer0 receives the
    same for c_t."""
    net = _song(label_dim, ctm_s_branch=True)
    _randomize(net)
    seen = {}
    hooks = [
        getattr(net, n).register_forward_hook(lambda m, inp, out, n=n: seen.__setitem__(n, inp[0]))
        for n in ("map_layer0", "map_layer0_s")
    ]
    c_t, c_s = torch.tensor([0.7, -0.3]), torch.tensor([-2.0, 1.1])
    y = torch.eye(10)[[1, 4]] if label_dim else None
    with torch.no_grad():
        net(torch.zeros(2, 3, 16, 16), c_t, y, noise_labels_s=c_s)
    for h in hooks:
        h.remove()
    half = 8  # noise channels 16
    f = (1e-4) ** (torch.arange(half, dtype=torch.float64) / (half - 1))
    for name, c in (("map_layer0", c_t), ("map_layer0_s", c_s)):
        arg = c.double()[:, None] * f
        expected = torch.cat([arg.sin(), arg.cos()], dim=1)
        if label_dim:
            expected = expected + (y.double() * math.sqrt(10)) @ net.map_label.weight.double().T
            expected = expected + net.map_label.bias.double()
        torch.testing.assert_close(seen[name].double(), expected, rtol=1e-5, atol=1e-5)


def test_adm_s_embedding_has_no_label():
    net = _adm(10, ctm_s_branch=True)
    _randomize(net)
    seen = {}
    net.map_layer0_s.register_forward_hook(lambda m, inp, out: seen.__setitem__("in", inp[0]))
    c_s = torch.tensor([-2.0, 1.1])
    with torch.no_grad():
        out_a = net(torch.ones(2, 3, 16, 16), torch.zeros(2), torch.eye(10)[[0, 1]], noise_labels_s=c_s)
    arg = c_s.double()[:, None] * (1e-4) ** (torch.arange(16, dtype=torch.float64) / 16)  # endpoint=False, no swap
    torch.testing.assert_close(seen["in"].double(), torch.cat([arg.cos(), arg.sin()], dim=1), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        out_b = net(torch.ones(2, 3, 16, 16), torch.zeros(2), torch.eye(10)[[5, 6]], noise_labels_s=c_s)
    assert (out_a - out_b).abs().max() > 1e-3  # labels still act through the t path


def test_noise_labels_s_required_iff_s_branch():
    with pytest.raises(ValueError, match="noise_labels_s must be given iff ctm_s_branch"):
        _song(ctm_s_branch=True)(torch.zeros(1, 3, 16, 16), torch.zeros(1), None)
    with pytest.raises(ValueError, match="noise_labels_s must be given iff ctm_s_branch"):
        _adm()(torch.zeros(1, 3, 16, 16), torch.zeros(1), None, noise_labels_s=torch.zeros(1))


def test_last_layer_weight():
    song = _song(ctm_s_branch=True)
    assert song.last_layer_weight() is song.dec["16x16_aux_conv"].weight
    adm = _adm(ctm_s_branch=True)
    assert adm.last_layer_weight() is adm.dec["16x16_block1"].conv1.weight
    assert adm.last_layer_weight().shape == (32, 32, 3, 3)


# ------------------------------------------------------------------------------------------------------------------
# Forward shapes, GroupNorm groups, attention layout.


@pytest.mark.parametrize("variant", sorted(SONG_VARIANTS))
def test_song_forward_shapes_and_augment(variant):
    net = _song(10, variant, augment_dim=9, ctm_s_branch=True)
    _randomize(net)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(SEED))
    y = torch.eye(10)[[0, 1, 2]]
    with torch.no_grad():
        out = net(x, torch.zeros(3), y, noise_labels_s=torch.zeros(3))
        out_aug = net(x, torch.zeros(3), y, augment_labels=torch.ones(3, 9), noise_labels_s=torch.zeros(3))
        out_bcast = net(x, torch.zeros(1), y, noise_labels_s=torch.zeros(1))  # scalar sigma -> (1,) labels
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - out_aug).abs().max() > 1e-3
    torch.testing.assert_close(out_bcast, out, rtol=1e-5, atol=1e-5)
    if variant == "skip":
        assert {"8x8_aux_down", "8x8_aux_skip"} <= set(net.enc) and "8x8_aux_up" not in net.dec
    if variant == "ncsnpp":
        assert net.enc["8x8_aux_residual"].resample_filter.shape == (1, 1, 4, 4)


def test_adm_forward_shape_and_heads():
    net = _adm(10, augment_dim=9)
    _randomize(net)
    with torch.no_grad():
        out = net(torch.randn(2, 3, 16, 16), torch.zeros(2), torch.eye(10)[[0, 1]])
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    heads = {name: b.num_heads for name, b in [*net.enc.items(), *net.dec.items()] if isinstance(b, UNetBlock)}
    assert heads == {
        "8x8_down": 0,
        "16x16_block0": 0,
        "8x8_block0": 1,
        "8x8_in0": 1,
        "8x8_in1": 0,
        "8x8_block1": 1,
        "16x16_up": 0,
        "16x16_block1": 0,
    }
    assert not hasattr(net.dec["16x16_up"].skip, "weight") or net.dec["16x16_up"].skip.weight is None
    big = UNetBlock(128, 128, emb_channels=8, attention=True)  # ADM default: channels_per_head=64
    assert big.num_heads == 2


def test_groupnorm_groups_min_32_c_over_4():
    for C, groups in [(16, 4), (32, 8), (48, 12), (64, 16), (128, 32), (256, 32), (1536, 32)]:
        assert GroupNorm(C).num_groups == groups
    net = _song()
    norms = [(m.weight.numel(), m.num_groups) for m in net.modules() if isinstance(m, GroupNorm)]
    assert {g for _, g in norms} == {4, 8, 12, 16}  # 16, 32, 48 and 64 (concatenated skips) channels
    assert all(g == min(32, c // 4) for c, g in norms)
    # Closed form: per-(sample, group) standardisation with eps, then the affine.
    x = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    gn = GroupNorm(16, eps=1e-6).double()
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-1, 1)
    xg = x.reshape(2, 4, -1)
    ref = ((xg - xg.mean(-1, keepdim=True)) / (xg.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()).reshape(x.shape)
    ref = ref * gn.weight[:, None, None] + gn.bias[:, None, None]
    torch.testing.assert_close(gn(x), ref.detach())


def test_attention_qkv_interleaved_per_channel():
    """qkv output channel (head*C/heads + c)*3 + {0,1,2} is q/k/v of head-channel c (docs/edm.md#a13-porting-traps)."""
    torch.manual_seed(SEED)
    C, heads, HW = 8, 2, 4
    blk = UNetBlock(C, C, emb_channels=4, attention=True, num_heads=heads, adaptive_scale=False, skip_scale=1.0)
    _randomize(blk)
    blk.double()
    x = torch.randn(1, C, 2, 2, dtype=torch.float64)
    # Reproduce the residual part, then the attention by explicit indexing.
    with torch.no_grad():
        h = blk.conv0(torch.nn.functional.silu(blk.norm0(x)))
        h = torch.nn.functional.silu(blk.norm1(h + blk.affine(torch.ones(1, 4, dtype=torch.float64))[:, :, None, None]))
        r = blk.conv1(h) + x
        qkv = blk.qkv(blk.norm2(r)).reshape(3 * C, HW)
        Ch = C // heads
        out = torch.zeros(C, HW, dtype=torch.float64)
        for hd in range(heads):
            idx = [(hd * Ch + c) * 3 for c in range(Ch)]
            q, k, v = qkv[idx], qkv[[i + 1 for i in idx]], qkv[[i + 2 for i in idx]]  # (Ch, HW)
            w = torch.softmax(q.T @ k / math.sqrt(Ch), dim=1)  # (HW_q, HW_k)
            out[hd * Ch : (hd + 1) * Ch] = v @ w.T
        ref = blk.proj(out.reshape(1, C, 2, 2)) + r
        got = blk(x, torch.ones(1, 4, dtype=torch.float64))
    torch.testing.assert_close(got, ref)


def test_positional_embedding_endpoint():
    pe = PositionalEmbedding(8, endpoint=False)
    x = torch.tensor([2.0], dtype=torch.float64)
    f = (1e-4) ** (np.arange(4) / 4)
    expected = np.concatenate([np.cos(2 * f), np.sin(2 * f)])
    np.testing.assert_allclose(pe(x).numpy()[0], expected, rtol=1e-6)  # freqs are float32 as in EDM


def test_linear_casts_weights_to_input_dtype():
    lin = Linear(3, 2)
    assert lin(torch.ones(1, 3, dtype=torch.float64)).dtype == torch.float64


# ------------------------------------------------------------------------------------------------------------------
# Preconditioning: closed forms, dtypes, init_kwargs round trip.


class _RecordingNet(torch.nn.Module):
    """Stands in for the inner net: records its inputs and returns a fixed F."""

    def forward(self, x, noise_labels, class_labels, **kw):
        self.seen = dict(x=x, noise_labels=noise_labels, class_labels=class_labels, **kw)
        return torch.full_like(x, 0.25)


TINY_PRECOND = dict(
    img_resolution=16,
    img_channels=3,
    model_type="SongUNet",
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
)


@pytest.mark.parametrize("cls", [EDMPrecond, VPPrecond, VEPrecond])
def test_precond_closed_forms(cls):
    net = cls(**TINY_PRECOND, label_dim=4)
    net.model = _RecordingNet()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(SEED))
    sigma = torch.tensor([0.3, 7.0], dtype=torch.float64)
    D = net(x, sigma, torch.eye(4)[[0, 2]].double(), augment_labels=torch.zeros(2, 9))
    s = sigma.reshape(-1, 1, 1, 1)
    if cls is EDMPrecond:
        c_skip, c_out = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt()
        c_in, c_noise = 1 / (s**2 + 0.25).sqrt(), s.log() / 4
    elif cls is VPPrecond:
        c_skip, c_out, c_in = 1.0, -s, 1 / (s**2 + 1).sqrt()
        c_noise = 999 * ((0.01 + 2 * 19.9 * (1 + s**2).log()).sqrt() - 0.1) / 19.9
    else:
        c_skip, c_out, c_in, c_noise = 1.0, s, 1.0, (s / 2).log()
    assert D.dtype == torch.float32
    torch.testing.assert_close(D.double(), c_skip * x + c_out * 0.25, rtol=1e-6, atol=1e-6)
    seen = net.model.seen
    torch.testing.assert_close(seen["x"].double(), c_in * x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["noise_labels"].double(), c_noise.flatten(), rtol=1e-6, atol=1e-6)
    assert seen["noise_labels"].shape == (2,) and seen["x"].dtype == torch.float32
    assert seen["class_labels"].dtype == torch.float32 and seen["class_labels"].shape == (2, 4)
    assert seen["augment_labels"].shape == (2, 9)  # model kwargs pass through
    # Scalar sigma and missing labels: c_noise (1,), zero labels (1, L).
    net(x, 0.5)
    assert net.model.seen["noise_labels"].shape == (1,)
    torch.testing.assert_close(net.model.seen["class_labels"], torch.zeros(1, 4))
    assert net.round_sigma(0.123).item() == pytest.approx(0.123)


def test_vp_ve_sigma_range():
    vp = VPPrecond(**TINY_PRECOND)
    assert vp.sigma_min == pytest.approx(0.0009765625, rel=1e-6) and vp.sigma_max == pytest.approx(152.167, rel=1e-5)
    ve = VEPrecond(**TINY_PRECOND)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)


def test_precond_uncond_ignores_labels_and_real_forward():
    torch.manual_seed(SEED)
    net = EDMPrecond(**TINY_PRECOND, augment_dim=9).eval()
    _randomize(net)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        D = net(x, torch.tensor([1.0, 2.0]), torch.ones(2, 10))  # label_dim 0: labels dropped
        D_none = net(x, torch.tensor([1.0, 2.0]))
    assert D.shape == x.shape and D.dtype == torch.float32
    torch.testing.assert_close(D, D_none)


def test_init_kwargs_round_trip_and_json():
    net = EDMPrecond(16, 3, model_type="SongUNet", model_channels=16, channel_mult=(1, 2), num_blocks=1)
    assert net.init_kwargs == dict(
        img_resolution=16, img_channels=3, model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1
    )
    again = build_precond("EDMPrecond", net.init_kwargs)
    assert again.init_kwargs == net.init_kwargs
    assert [(k, v.shape) for k, v in again.state_dict().items()] == [(k, v.shape) for k, v in net.state_dict().items()]
    assert type(build_precond("training.networks.VEPrecond", TINY_PRECOND)) is VEPrecond


@pytest.mark.parametrize(
    "class_name, kwargs, match",
    [
        ("iDDPMPrecond", TINY_PRECOND, "class_name must be one of .*got 'iDDPMPrecond'"),
        ("EDMPrecond", {**TINY_PRECOND, "num_heads": 2}, r"unknown init kwargs .*got \['num_heads'\], expected"),
        (
            "EDMPrecond",
            {**TINY_PRECOND, "embedding_type": "fourier", "model_type": "DhariwalUNet"},
            r"got \['embedding_type'\]",
        ),
        ("EDMPrecond", {**TINY_PRECOND, "model_type": "UNet"}, "model_type must be one of .*got 'UNet'"),
        ("EDMPrecond", {"img_channels": 3}, r"missing required init kwargs .*\['img_resolution'\]"),
        ("EDMPrecond", {**TINY_PRECOND, "embedding_type": "sinusoidal"}, "embedding_type must be one of.*'sinusoidal'"),
        ("EDMPrecond", {**TINY_PRECOND, "encoder_type": "unet"}, "encoder_type must be one of.*'unet'"),
        ("EDMPrecond", {**TINY_PRECOND, "img_resolution": 15}, "img_resolution must be divisible by 2.*got 15"),
    ],
)
def test_build_precond_errors(class_name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_precond(class_name, kwargs)


@pytest.mark.gpu
def test_fp16_inner_net_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(SEED)
    net = EDMPrecond(**TINY_PRECOND, use_fp16=True).cuda().eval()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.no_grad():
        D16 = net(x, torch.tensor([0.5, 5.0], device="cuda"))
        D32 = net(x, torch.tensor([0.5, 5.0], device="cuda"), force_fp32=True)
    assert D16.dtype == torch.float32
    assert ((D16 - D32).norm() / D32.norm()).item() < 1e-2
