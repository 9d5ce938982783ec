"""GAN phase: DiffAugment, projected / scratch discriminators, hinge losses, adaptive weight, a few G/D steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctm_core.gan.diffaug import DiffAugmentParams, apply_diffaugment, diff_augment, sample_diffaugment_params
from ctm_core.gan.discriminator import Conv2dSame, EfficientNetLite, init_parameters_
from ctm_core.gan.objective import (
    D_BETAS,
    D_LR,
    OFFICIAL_BACKBONES,
    Discriminator,
    ProjectedDiscriminator,
    ScratchDiscriminator,
    adaptive_gan_weight,
    build_discriminator,
    d_hinge_loss,
    g_loss,
    g_loss_from_logits,
    hinge_d_loss_from_logits,
    make_d_optimizer,
)

SEED = 2024
DEIT, EFFNET = OFFICIAL_BACKBONES
TINY_BACKBONES = {
    DEIT: dict(embed_dim=16, depth=4, num_heads=2, mlp_ratio=2.0, hooks=(0, 1, 2, 3), readout_features=(8, 8, 16, 16)),
    EFFNET: dict(width_multiplier=0.25),
}


def _gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tiny_projected(seed: int = SEED) -> ProjectedDiscriminator:
    return ProjectedDiscriminator(
        random_init=True, generator=_gen(seed), backbone_kwargs=TINY_BACKBONES, cout=4, ndf=8, resize_to=64
    )


# ------------------------------------------------------------------------------------------------ DiffAugment


def _params(B, **kw) -> DiffAugmentParams:
    base = dict(
        brightness=torch.zeros(B),
        saturation=torch.ones(B),
        contrast=torch.ones(B),
        translation_x=torch.zeros(B, dtype=torch.long),
        translation_y=torch.zeros(B, dtype=torch.long),
        offset_x=torch.full((B,), -100, dtype=torch.long),
        offset_y=torch.full((B,), -100, dtype=torch.long),
    )  # offsets far outside: no cutout
    base.update(kw)
    return DiffAugmentParams(**base)


def test_diffaugment_shapes_determinism_and_ranges():
    x = torch.rand(4, 3, 32, 32, generator=_gen(1)) * 2 - 1
    a, b = diff_augment(x, generator=_gen(7)), diff_augment(x, generator=_gen(7))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, diff_augment(x, generator=_gen(8)))
    p = sample_diffaugment_params(4000, 32, 32, generator=_gen(3))
    assert p.brightness.min() >= -0.5 and p.brightness.max() < 0.5
    assert p.saturation.min() >= 0 and p.saturation.max() < 2
    assert p.contrast.min() >= 0.5 and p.contrast.max() < 1.5
    # shift int(0.125 * 32 + 0.5) = 4; cutout K = int(0.2 * 32 + 0.5) = 6 (even) -> offsets in 0..32.
    assert set(p.translation_x.tolist()) == set(range(-4, 5)) == set(p.translation_y.tolist())
    assert p.offset_x.min() == 0 and p.offset_x.max() == 32
    q = sample_diffaugment_params(4000, 64, 64, generator=_gen(3))  # K = 13 (odd) -> offsets 0..63, shift 8
    assert q.offset_y.max() == 63 and q.translation_x.abs().max() == 8


def test_diffaugment_color_ops_closed_form():
    x = torch.rand(2, 3, 8, 8, generator=_gen(2)) * 2 - 1
    bri, sat, con = torch.tensor([0.3, -0.2]), torch.tensor([0.0, 1.7]), torch.tensor([0.5, 1.4])
    out = apply_diffaugment(x, _params(2, brightness=bri, saturation=sat, contrast=con))
    h = x + bri.view(2, 1, 1, 1)
    m = h.mean(1, keepdim=True)
    h = (h - m) * sat.view(2, 1, 1, 1) + m
    m = h.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, (h - m) * con.view(2, 1, 1, 1) + m)
    assert torch.allclose(out[0], out[0].mean(0, keepdim=True).expand(3, -1, -1))  # saturation 0 -> grey


def _official_style_translation(x, tx, ty):
    """Independent formulation: pad by one zero pixel, shift the index grid, clamp into the padding."""
    B, C, H, W = x.shape
    xp = F.pad(x, [1, 1, 1, 1])
    out = torch.empty_like(x)
    for b in range(B):
        i = torch.clamp(torch.arange(H) + tx[b] + 1, 0, H + 1)
        j = torch.clamp(torch.arange(W) + ty[b] + 1, 0, W + 1)
        out[b] = xp[b][:, i][:, :, j]
    return out


def test_diffaugment_translation_and_cutout():
    x = torch.rand(3, 3, 16, 16, generator=_gen(4)) + 0.5  # strictly positive, so zeros mark fills
    tx, ty = torch.tensor([2, -1, 0]), torch.tensor([0, 3, -2])
    out = apply_diffaugment(x, _params(3, translation_x=tx, translation_y=ty))
    torch.testing.assert_close(out, _official_style_translation(x, tx, ty))
    assert torch.equal(out[0, :, :14], x[0, :, 2:]) and torch.all(out[0, :, 14:] == 0)
    # Cutout K = int(0.2 * 16 + 0.5) = 3 centred at (5, 9): rows 4..6, cols 8..10; clipped at the border.
    out = apply_diffaugment(x, _params(3, offset_x=torch.tensor([5, 0, 15]), offset_y=torch.tensor([9, 0, 15])))
    zero = out == 0
    assert zero[0].all(0)[4:7, 8:11].all() and zero[0].sum() == 3 * 9
    assert zero[1].all(0)[0:2, 0:2].all() and zero[1].sum() == 3 * 4
    assert zero[2].all(0)[14:16, 14:16].all() and zero[2].sum() == 3 * 4


# ------------------------------------------------------------------------------------------------ networks


def test_full_size_projected_discriminator_on_meta():
    d = ProjectedDiscriminator(random_init=True, device="meta")
    sd = d.state_dict()
    f = "feature_networks."
    expected = {
        f + DEIT + ".cls_token": (1, 1, 768),
        f + DEIT + ".dist_token": (1, 1, 768),
        f + DEIT + ".pos_embed": (1, 198, 768),
        f + DEIT + ".patch_embed.proj.weight": (768, 3, 16, 16),
        f + DEIT + ".blocks.11.attn.qkv.weight": (2304, 768),
        f + DEIT + ".blocks.11.mlp.fc1.weight": (3072, 768),
        f + DEIT + ".layer1.1.weight": (96, 96, 4, 4),
        f + DEIT + ".layer4.1.weight": (768, 768, 3, 3),
        f + EFFNET + ".conv_stem.weight": (32, 3, 3, 3),
        f + EFFNET + ".blocks.0.0.conv_dw.weight": (32, 1, 3, 3),
        f + EFFNET + ".blocks.0.0.conv_pw.weight": (16, 32, 1, 1),
        f + EFFNET + ".blocks.1.0.conv_pw.weight": (96, 16, 1, 1),
        f + EFFNET + ".blocks.5.3.conv_dw.weight": (1152, 1, 5, 5),
        f + EFFNET + ".blocks.6.0.conv_pwl.weight": (320, 1152, 1, 1),
        f + EFFNET + ".blocks.6.0.bn3.running_var": (320,),
        "projectors." + EFFNET + ".layer0_ccm.weight": (64, 24, 1, 1),
        "projectors." + EFFNET + ".layer3_ccm.weight": (512, 320, 1, 1),
        "projectors." + DEIT + ".layer3_csm.out_conv.weight": (256, 512, 1, 1),
        "projectors." + DEIT + ".layer0_csm.out_conv.weight": (64, 64, 1, 1),
        "heads." + DEIT + ".mini_discs.0.main.0.main.0.weight_orig": (64, 64, 4, 4),
        "heads." + DEIT + ".mini_discs.0.main.3.main.0.weight_orig": (512, 256, 4, 4),
        "heads." + DEIT + ".mini_discs.0.main.4.weight_orig": (1, 512, 4, 4),
        "heads." + EFFNET + ".mini_discs.3.main.0.main.0.weight_orig": (512, 256, 4, 4),
        "heads." + EFFNET + ".mini_discs.3.main.1.weight_orig": (1, 512, 4, 4),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert len([k for k in sd if k.startswith(f + DEIT + ".blocks.") and k.endswith("attn.qkv.weight")]) == 12
    assert len([k for k in sd if k.startswith(f + EFFNET + ".blocks.") and k.endswith("conv_pwl.weight")]) == 15
    assert d.feature_networks[EFFNET].channels == (24, 40, 112, 320)
    # Heads downsample from nominal 128, 64, 32, 16 to 8 (4, 3, 2, 1 DownBlocks), as the official RESOLUTIONS.
    assert [sum(isinstance(m, nn.BatchNorm2d) for m in h.modules()) for h in d.heads[DEIT].mini_discs.values()] == [
        4,
        3,
        2,
        1,
    ]
    assert not any(p.requires_grad for p in d.feature_networks.parameters())
    assert not any(p.requires_grad for p in d.projectors.parameters())
    logits = d(torch.zeros(2, 3, 32, 32, device="meta"), _gen())
    assert [tuple(l.shape) for l in logits] == [(2, 64), (2, 64)]  # 4 heads x 4 x 4 logits per backbone


def test_tiny_discriminators_output_shapes_and_modes():
    d = _tiny_projected()
    x = torch.rand(2, 3, 32, 32, generator=_gen(1)) * 2 - 1
    logits = d(x, _gen(2))
    assert len(logits) == 2 and all(l.shape[0] == 2 and l.ndim == 2 and torch.isfinite(l).all() for l in logits)
    d.train()
    assert d.heads.training and not d.feature_networks.training and not d.projectors.training
    with pytest.raises(ValueError, match="generator"):
        d(x)
    s = ScratchDiscriminator(32, generator=_gen(3), channels=8, max_channels=32)
    assert [tuple(l.shape) for l in s(x, _gen(4))] == [(2, 1)]
    convs = [m for m in s.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(hasattr(m, "weight_orig") and hasattr(m, "weight_u") for m in convs)
    with pytest.raises(ValueError, match="power of two"):
        ScratchDiscriminator(48, generator=_gen())


def test_construction_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = _tiny_projected(5), _tiny_projected(5)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c = _tiny_projected(6)
    assert not torch.equal(a.projectors[EFFNET].layer0_ccm.weight, c.projectors[EFFNET].layer0_ccm.weight)


def test_checkpoint_state_round_trip_without_backbones():
    a, b = _tiny_projected(31), _tiny_projected(32)
    state = a.checkpoint_state()
    assert state and not any(k.startswith("feature_networks.") for k in state)
    assert any(k.startswith("projectors.") for k in state) and any(k.endswith("weight_u") for k in state)
    b.load_checkpoint_state(state)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="missing keys"):
        b.load_checkpoint_state({k: v for k, v in state.items() if not k.startswith("heads.")})


def test_projected_requires_weights_or_random_init(tmp_path):
    with pytest.raises(ValueError, match="random_init"):
        ProjectedDiscriminator(generator=_gen())
    with pytest.raises(ValueError, match="kind must be one of"):
        build_discriminator("stylegan", img_resolution=32)
    # Loading a timm-named file: the EfficientNet trunk is copied by name, head keys are ignored.
    from safetensors.torch import save_file

    src = EfficientNetLite(width_multiplier=0.25)
    init_parameters_(src, _gen(11))
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["classifier.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "effnet.safetensors"))
    d = ProjectedDiscriminator(
        (EFFNET,),
        weights={EFFNET: tmp_path / "effnet.safetensors"},
        generator=_gen(),
        backbone_kwargs=TINY_BACKBONES,
        cout=4,
        ndf=8,
        resize_to=64,
    )
    for k, v in src.state_dict().items():
        assert torch.equal(d.feature_networks[EFFNET].state_dict()[k], v), k
    del state["blocks.0.0.conv_dw.weight"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="blocks.0.0.conv_dw.weight"):
        ProjectedDiscriminator(
            (EFFNET,),
            weights={EFFNET: tmp_path / "bad.safetensors"},
            generator=_gen(),
            backbone_kwargs=TINY_BACKBONES,
            cout=4,
            ndf=8,
            resize_to=64,
        )


def test_tf_same_padding_is_asymmetric():
    conv = Conv2dSame(1, 1, 3, 2, 0, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.ones(1, 1, 4, 4)
    # TF SAME, k=3, s=2 on 4 px: total pad 1 -> 0 before, 1 after; output 2x2 with sums 9, 6 / 6, 4.
    assert conv(x).flatten().tolist() == [9.0, 6.0, 6.0, 4.0]


# ------------------------------------------------------------------------------------------------ losses


def test_hinge_and_g_losses_on_constructed_logits():
    real = [torch.tensor([[2.0, 0.5], [-1.0, 0.0]]), torch.tensor([[3.0], [0.0]])]
    fake = [torch.tensor([[-2.0, 0.0], [1.0, -0.5]]), torch.tensor([[0.5], [-3.0]])]
    # real: relu(1 - l) means 3.5/4 and 1/2; fake: relu(1 + l) means 3.5/4 and 1.5/2.
    expected = (3.5 / 4 + 1 / 2) / 2 + (3.5 / 4 + 1.5 / 2) / 2
    assert hinge_d_loss_from_logits(real, fake).item() == pytest.approx(expected)
    assert g_loss_from_logits(fake).item() == pytest.approx((1.5 / 4 + 2.5 / 2) / 2)


class _SignD(Discriminator):
    """Stub D: one logit per sample = 3 * mean pixel; ignores the generator."""

    def forward(self, x, generator=None):
        return [3.0 * x.mean(dim=(1, 2, 3)).unsqueeze(1)]


def test_d_hinge_and_g_loss_through_a_discriminator():
    real, fake = torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 4, 4), -0.2, requires_grad=True)
    # D(real) = 1.5 -> relu(1 - 1.5) = 0; D(fake) = -0.6 -> relu(0.4) = 0.4.
    assert d_hinge_loss(_SignD(), real, fake, _gen()).item() == pytest.approx(0.4)
    loss = g_loss(_SignD(), fake, _gen())
    assert loss.item() == pytest.approx(0.6)
    loss.backward()
    assert fake.grad is not None and torch.allclose(fake.grad, torch.full_like(fake, -1.0 / 32))
    with pytest.raises(ValueError, match="differ in shape"):
        d_hinge_loss(_SignD(), real, torch.zeros(2, 3, 8, 8), _gen())


def test_adaptive_gan_weight_closed_form_and_clip():
    W = torch.ones(3, 2, requires_grad=True)
    a, b = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]]), torch.full((3, 2), 0.5)  # ||a|| = 5, ||b|| = sqrt(1.5)
    L_ctm, L_g = (a * W).sum(), (b * W).sum()
    lam = adaptive_gan_weight(L_ctm, L_g, W)
    assert lam.ndim == 0 and not lam.requires_grad
    assert lam.item() == pytest.approx(5.0 / (1.5**0.5 + 1e-4))
    assert adaptive_gan_weight((a * W).sum(), (100 * a * W).sum(), W).item() == pytest.approx(0.01)  # clip low
    assert adaptive_gan_weight((a * W).sum(), (0 * W).sum(), W).item() == pytest.approx(10.0)  # 5/1e-4 -> 10
    with pytest.raises(ValueError, match="L_g does not depend"):
        adaptive_gan_weight((a * W).sum(), torch.ones((), requires_grad=True) * 2, W)


# ------------------------------------------------------------------------------------------------ training


class _TinyG(nn.Module):
    """Noise (B, 8) -> images (B, 3, 32, 32) in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8 * 8 * 8)
        self.conv = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z):
        h = self.fc(z).view(-1, 8, 8, 8)
        return torch.tanh(self.conv(F.interpolate(h, scale_factor=4, mode="nearest")))


@pytest.mark.parametrize("kind", ["projected", "scratch"])
def test_alternating_steps_update_heads_only(kind):
    torch_gen = _gen(21)
    G = _TinyG()
    init_parameters_(G, _gen(22))
    if kind == "projected":
        d = _tiny_projected(23)
        frozen = {k: v.clone() for k, v in d.state_dict().items() if not k.startswith("heads.")}
        assert frozen
    else:
        d = build_discriminator("scratch", img_resolution=32, generator=_gen(23), channels=8, max_channels=32)
        frozen = {}
    trainable_before = [p.detach().clone() for p in d.trainable_parameters()]
    assert trainable_before and any(isinstance(m, nn.Conv2d) and hasattr(m, "weight_orig") for m in d.modules())
    opt_d = make_d_optimizer(d)
    assert opt_d.defaults["lr"] == D_LR == 2e-3 and opt_d.defaults["betas"] == D_BETAS == (0.5, 0.9)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    g_before = [p.detach().clone() for p in G.parameters()]
    B, steps = (2, 2) if kind == "projected" else (4, 4)  # keep the CPU cost of the projected case small
    real = torch.rand(B, 3, 32, 32, generator=_gen(24)) * 2 - 1
    for step in range(steps):
        fake = G(torch.randn(B, 8, generator=torch_gen))
        if step % 2 == 0:  # G step (docs/ctm.md#26-gan-phase: even steps)
            loss = g_loss(d, fake, torch_gen)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
        else:  # D step
            loss = d_hinge_loss(d, real, fake, torch_gen)
            opt_d.zero_grad(set_to_none=True)
            loss.backward()
            opt_d.step()
        assert torch.isfinite(loss), (step, loss)
    assert any(not torch.equal(a, p) for a, p in zip(trainable_before, d.trainable_parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(g_before, G.parameters()))
    for k, v in frozen.items():
        assert torch.equal(d.state_dict()[k], v), k  # feature networks (incl. BN stats) and projections frozen
