"""Discriminators for CTM's GAN phase (docs/ctm.md#26-gan-phase, docs/ctm.md#88-gan-specifics).

``ProjectedDiscriminator``: the StyleGAN-XL / Projected-GAN discriminator CTM uses (Sauer et al. 2021,
"Projected GANs Converge Faster"; Kim-Dongjun/ctm-cifar10 cm/enc_dec_lib.py:30-63). Per backbone:
DiffAugment -> (x+1)/2 -> backbone normalisation -> bilinear resize to 224 when H < 256 -> frozen
pretrained feature network (4 feature maps at strides 4, 8, 16, 32) -> frozen *random* projections
(CCM 1x1 convs, CSM feature fusion; cout=64, expand=True) -> trainable multi-scale heads (one per map:
spectral-norm conv 4x4/2 + BatchNorm + LeakyReLU(0.2) down to 8x8, then a spectral-norm conv 4x4 to a
logit map). Unconditional (cond=0). The two official backbones are re-implemented here with timm's
parameter names, so timm's weight files load by name (timm itself needs torchvision, which this
environment lacks):

- ``DeiTDistilled``: timm ``deit_base_distilled_patch16_224`` (ViT-B/16 + cls + dist tokens), taps after
  blocks (2, 5, 8, 11), readout 'ignore' with start_index 2, then random 1x1 conv (+ transposed conv x4 / x2,
  identity, conv 3x3/2) to 96, 192, 384, 768 channels (stylegan-xl feature_networks/vit.py
  ``_make_vit_b16_backbone``, pretrained_builder.py ``_make_vit``);
- ``EfficientNetLite``: timm ``tf_efficientnet_lite0`` (TF 'SAME' padding, BN eps 1e-3, ReLU6, no SE),
  split into stem + blocks[0:2], blocks[2:3], blocks[3:5], blocks[5:7] (pretrained_builder.py
  ``_make_efficientnet``).

``ScratchDiscriminator``: a small spectral-norm conv discriminator trained from scratch (no pretrained
weights), so the GAN phase also runs offline. Not in the official code.

Every discriminator maps images x: (B, C, H, W) in [-1, 1] to a list of logit tensors, one (B, n_k) per
backbone; randomness (DiffAugment) comes from an injected ``torch.Generator``. Modules are built on the
meta device and then initialised from ``generator``: the global RNG is never used.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from ctm_core.gan.diffaug import diff_augment
from ctm_core.gan.lpips import load_state_file

__all__ = [
    "Discriminator",
    "ProjectedDiscriminator",
    "ScratchDiscriminator",
    "DeiTDistilled",
    "EfficientNetLite",
    "RandomProjector",
    "MultiScaleD",
    "init_parameters_",
    "OFFICIAL_BACKBONES",
]

OFFICIAL_BACKBONES = ("deit_base_distilled_patch16_224", "tf_efficientnet_lite0")  # C cm/enc_dec_lib.py
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # stylegan-xl feature_networks/constants.py NORMALIZED_IMAGENET (DeiT)
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # constants.py NORMALIZED_INCEPTION (tf_efficientnet_lite*)


# ------------------------------------------------------------------------------------------------
# Initialisation from an injected generator (modules are built on 'meta', then materialised).


def _uniform(shape, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, device=generator.device) * 2.0 - 1.0) * bound


@torch.no_grad()
def init_parameters_(module: nn.Module, generator: torch.Generator) -> None:
    """Initialise every parameter and buffer of ``module`` from ``generator``.

    Conv/Linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default distribution);
    norm layers: weight 1, bias 0, running stats reset; spectral-norm u, v: normalised Gaussians;
    anything else (ViT tokens, position embedding): N(0, 0.02^2).
    """
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"init_parameters_: generator must be a torch.Generator, got {type(generator).__name__}")
    norm_types = (nn.BatchNorm2d, nn.LayerNorm)
    lin_types = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    for m in module.modules():
        tensors = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        for name, t in tensors:
            if t.is_meta:
                continue
            if isinstance(m, norm_types):
                value = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}
                t.fill_(value[name])
            elif isinstance(m, lin_types) and name in ("weight", "weight_orig", "bias"):
                w = m.weight_orig if hasattr(m, "weight_orig") else m.weight  # spectral norm keeps weight_orig
                fan_in = w.shape[1] * math.prod(w.shape[2:])
                t.copy_(_uniform(t.shape, 1.0 / math.sqrt(fan_in), generator))
            elif name in ("weight_u", "weight_v"):
                g = torch.randn(t.shape, generator=generator, device=generator.device)
                t.copy_(F.normalize(g, dim=0, eps=1e-12))
            else:
                t.copy_(torch.randn(t.shape, generator=generator, device=generator.device) * 0.02)


def _timm_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor] | list[torch.Tensor]:
    """``load_state_file``, plus the ``{'model': state_dict}`` wrapper of the DeiT release file (dl.fbaipublicfiles
    ``deit_base_distilled_patch16_224-df68dfff.pth``); weights-only loads, no code is unpickled."""
    if not os.fspath(path).endswith(".safetensors") and os.path.isfile(path):
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
            bad = [k for k, v in obj["model"].items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise ValueError(
                    f"{path}: expected a mapping of tensors under 'model', got non-tensor entries {bad[:5]}"
                )
            return dict(obj["model"])
    return load_state_file(path)


def _load_pretrained_(
    net: nn.Module, path: str | os.PathLike, ignore_prefixes: Sequence[str], random_prefixes: Sequence[str]
) -> None:
    """Copy a timm state dict into ``net`` by name; keys under ``random_prefixes`` stay random (not in timm)."""
    state = _timm_state_file(path)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a timm state dict (name -> tensor), got a list")
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(tuple(random_prefixes))}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(tuple(ignore_prefixes))]
    if missing or unexpected:
        raise ValueError(
            f"{path}: keys do not match {type(net).__name__}: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    with torch.no_grad():
        for k, v in own.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"{path}: {k} expected shape {tuple(v.shape)}, got {tuple(state[k].shape)}")
            v.copy_(state[k].to(v.dtype))


# ------------------------------------------------------------------------------------------------
# EfficientNet-lite0 with timm parameter names (timm efficientnet.py ``_gen_efficientnet_lite``).

# (block type, repeats, kernel, stride, expansion, out channels): timm arch_def of efficientnet_lite
# 'ds_r1_k3_s1_e1_c16', 'ir_r2_k3_s2_e6_c24', 'ir_r2_k5_s2_e6_c40', 'ir_r3_k3_s2_e6_c80',
# 'ir_r3_k5_s1_e6_c112', 'ir_r4_k5_s2_e6_c192', 'ir_r1_k3_s1_e6_c320'; stem 32 (fixed), act ReLU6.
LITE0_ARCH = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
TF_BN_EPS = 1e-3  # timm BN_EPS_TF_DEFAULT, used by tf_* models


def _round_channels(c: float, divisor: int = 8) -> int:
    """timm make_divisible: round to a multiple of 8, never below 90% of c."""
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * c else new


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric when needed), as timm's tf_* models use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv_same(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:  # static symmetric padding, as timm's get_padding_value for stride 1
        return nn.Conv2d(cin, cout, k, 1, (k - 1) // 2, groups=groups, bias=False)
    return Conv2dSame(cin, cout, k, stride, 0, groups=groups, bias=False)


class _DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = _conv_same(cin, cin, k, stride, groups=cin)
        self.bn1 = nn.BatchNorm2d(cin, eps=TF_BN_EPS)
        self.conv_pw = _conv_same(cin, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout, eps=TF_BN_EPS)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))
        return x + h if self.has_skip else h


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expansion: float) -> None:
        super().__init__()
        mid = _round_channels(cin * expansion)
        self.conv_pw = _conv_same(cin, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid, eps=TF_BN_EPS)
        self.conv_dw = _conv_same(mid, mid, k, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid, eps=TF_BN_EPS)
        self.conv_pwl = _conv_same(mid, cout, 1)
        self.bn3 = nn.BatchNorm2d(cout, eps=TF_BN_EPS)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn1(self.conv_pw(x)))
        h = F.relu6(self.bn2(self.conv_dw(h)))
        h = self.bn3(self.conv_pwl(h))
        return x + h if self.has_skip else h


class EfficientNetLite(nn.Module):
    """timm ``tf_efficientnet_lite0`` feature trunk (keys ``conv_stem.*``, ``bn1.*``, ``blocks.S.R.*``).

    ``width_multiplier`` != 1 scales every width (stem included) for small test models.
    forward: x (B, 3, H, W), normalised with mean/std 0.5 -> 4 maps at strides (4, 8, 16, 32) with
    ``channels`` = (24, 40, 112, 320) for lite0 (pretrained_builder.py ``_make_efficientnet`` splits).
    """

    mean, std = INCEPTION_MEAN, INCEPTION_MEAN
    reductions = (4, 8, 16, 32)
    stage_splits = (2, 3, 5, 7)  # taps after blocks[0:2], [2:3], [3:5], [5:7]
    ignore_prefixes = ("conv_head.", "bn2.", "classifier.")  # timm head, unused
    random_prefixes: tuple[str, ...] = ()

    def __init__(self, width_multiplier: float = 1.0) -> None:
        super().__init__()
        stem = _round_channels(32 * width_multiplier)
        self.conv_stem = _conv_same(3, stem, 3, 2)
        self.bn1 = nn.BatchNorm2d(stem, eps=TF_BN_EPS)
        stages, cin = [], stem
        for kind, repeats, k, stride, e, c in LITE0_ARCH:
            cout, blocks = _round_channels(c * width_multiplier), []
            for r in range(repeats):
                s = stride if r == 0 else 1
                blocks.append(
                    _DepthwiseSeparable(cin, cout, k, s) if kind == "ds" else _InvertedResidual(cin, cout, k, s, e)
                )
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        outs = [_round_channels(a[-1] * width_multiplier) for a in LITE0_ARCH]
        self.channels = tuple(outs[i - 1] for i in self.stage_splits)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = F.relu6(self.bn1(self.conv_stem(x)))
        taps, start = [], 0
        for stop in self.stage_splits:
            h = self.blocks[start:stop](h)
            taps.append(h)
            start = stop
        return taps


# ------------------------------------------------------------------------------------------------
# DeiT-B distilled with timm parameter names (timm vision_transformer.py VisionTransformerDistilled).


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = (
            self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        )  # (3, B, nh, N, hs)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # softmax(q k^T / sqrt(hs)) v
        return self.proj(h.transpose(1, 2).reshape(B, N, D))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)


class DeiTDistilled(nn.Module):
    """timm ``deit_base_distilled_patch16_224`` trunk + the random readout convs of stylegan-xl's ViT wrapper.

    timm keys: ``cls_token`` (1,1,D), ``dist_token`` (1,1,D), ``pos_embed`` (1, (224/p)^2 + 2, D),
    ``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``. Random (not in
    timm): ``layer1..layer4`` (vit.py ``_make_vit_b16_backbone``). Defaults are DeiT-B; small values of
    ``embed_dim``/``num_heads``/``readout_features`` give test models with the same structure.
    forward: x (B, 3, H, W), ImageNet-normalised, H and W multiples of the patch size -> 4 maps at strides
    (4, 8, 16, 32) with ``channels`` = readout_features.
    """

    mean, std = IMAGENET_MEAN, (0.229, 0.224, 0.225)
    reductions = (4, 8, 16, 32)
    ignore_prefixes = ("norm.", "head.", "head_dist.")  # final norm and classifier heads, unused
    random_prefixes = ("layer1.", "layer2.", "layer3.", "layer4.")
    start_index = 2  # cls + dist tokens dropped (readout 'ignore', pretrained_builder.py ``_make_vit``)

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        img_size: int = 224,
        hooks: Sequence[int] = (2, 5, 8, 11),
        readout_features: Sequence[int] = (96, 192, 384, 768),
    ) -> None:
        super().__init__()
        if patch_size != 16:
            raise ValueError(f"DeiTDistilled: readout strides assume patch_size 16, got {patch_size}")
        if len(hooks) != 4 or max(hooks) >= depth:
            raise ValueError(f"DeiTDistilled: expected 4 hooks < depth={depth}, got {tuple(hooks)}")
        D, f = embed_dim, tuple(readout_features)
        self.patch_size, self.grid, self.hooks = patch_size, img_size // patch_size, tuple(hooks)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 2, D))
        self.patch_embed = _PatchEmbed(patch_size, D)
        self.blocks = nn.ModuleList(_Block(D, num_heads, mlp_ratio) for _ in range(depth))
        # Readout projections, vit.py _make_vit_b16_backbone: /16 tokens -> strides 4, 8, 16, 32.
        self.layer1 = nn.Sequential(nn.Conv2d(D, f[0], 1), nn.ConvTranspose2d(f[0], f[0], 4, 4))
        self.layer2 = nn.Sequential(nn.Conv2d(D, f[1], 1), nn.ConvTranspose2d(f[1], f[1], 2, 2))
        self.layer3 = nn.Sequential(nn.Conv2d(D, f[2], 1))
        self.layer4 = nn.Sequential(nn.Conv2d(D, f[3], 1), nn.Conv2d(f[3], f[3], 3, 2, 1))
        self.channels = f

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Bilinearly resize the grid part of the position embedding (vit.py ``_resize_pos_embed``)."""
        tok, grid = self.pos_embed[:, : self.start_index], self.pos_embed[:, self.start_index :]
        if (gh, gw) != (self.grid, self.grid):
            grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([tok, grid], dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        B, _, H, W = x.shape
        gh, gw = H // self.patch_size, W // self.patch_size
        h = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        h = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), h], dim=1)
        h = h + self._pos_embed(gh, gw)
        taps = []
        for i, blk in enumerate(self.blocks[: max(self.hooks) + 1]):
            h = blk(h)
            if i in self.hooks:  # block outputs, before the final norm (vit.py forward hooks)
                taps.append(h[:, self.start_index :].transpose(1, 2).reshape(B, -1, gh, gw))  # (B, D, gh, gw)
        return [layer(t) for layer, t in zip((self.layer1, self.layer2, self.layer3, self.layer4), taps)]


# ------------------------------------------------------------------------------------------------
# Random projections (CCM + CSM) and the multi-scale heads.


class _FeatureFusion(nn.Module):
    """CSM block (pg_modules/blocks.py FeatureFusionBlock): sum, bilinear x2 (align_corners=True), 1x1 conv."""

    def __init__(self, channels: int, expand: bool) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(channels, channels // 2 if expand else channels, 1)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        h = xs[0] if len(xs) == 1 else xs[0] + xs[1]
        return self.out_conv(F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True))


class RandomProjector(nn.Module):
    """F_RandomProj with proj_type=2 (stylegan-xl pg_modules/projector.py ``_make_scratch_ccm/_csm``).

    CCM channels (c, 2c, 4c, 8c) with expand (else c each); CSM fuses from the coarsest map up, each
    output at twice its input resolution; output ``channels`` = (c, c, 2c, 4c) with expand.
    """

    def __init__(self, in_channels: Sequence[int], cout: int = 64, expand: bool = True) -> None:
        super().__init__()
        ccm = [cout, cout * 2, cout * 4, cout * 8] if expand else [cout] * 4
        for i in range(4):
            setattr(self, f"layer{i}_ccm", nn.Conv2d(in_channels[i], ccm[i], 1))
        self.layer3_csm = _FeatureFusion(ccm[3], expand)
        self.layer2_csm = _FeatureFusion(ccm[2], expand)
        self.layer1_csm = _FeatureFusion(ccm[1], expand)
        self.layer0_csm = _FeatureFusion(ccm[0], False)  # the last fusion does not expand
        self.channels = (cout, cout, cout * 2, cout * 4) if expand else (cout,) * 4

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        c = [getattr(self, f"layer{i}_ccm")(f) for i, f in enumerate(feats)]
        o3 = self.layer3_csm(c[3])
        o2 = self.layer2_csm(o3, c[2])
        o1 = self.layer1_csm(o2, c[1])
        o0 = self.layer0_csm(o1, c[0])
        return [o0, o1, o2, o3]


NFC = {4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}  # discriminator.py SingleDisc


def _sn_conv(*args, **kwargs) -> nn.Module:
    return spectral_norm(nn.Conv2d(*args, **kwargs))  # pg_modules/blocks.py conv2d


class _DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:  # pg_modules/blocks.py DownBlock
        super().__init__()
        self.main = nn.Sequential(_sn_conv(cin, cout, 4, 2, 1, bias=True), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class SingleDisc(nn.Module):
    """One head (pg_modules/discriminator.py SingleDisc): DownBlocks from ``start_sz`` to 8, conv 4x4 -> 1 map."""

    def __init__(self, nc: int, start_sz: int, end_sz: int = 8, ndf: int | None = None) -> None:
        super().__init__()
        nfc = dict(NFC) if ndf is None else {k: ndf for k in NFC}
        nfc[start_sz] = nc
        layers, sz = [], start_sz
        while sz > end_sz:
            layers.append(_DownBlock(nfc[sz], nfc[sz // 2]))
            sz //= 2
        # nfc[sz] == nfc[end_sz] whenever start_sz >= end_sz (always, officially); a smaller start keeps nc.
        layers.append(_sn_conv(nfc[sz], 1, 4, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class MultiScaleD(nn.Module):
    """One SingleDisc per feature map; logits flattened and concatenated -> (B, n) (discriminator.py MultiScaleD)."""

    def __init__(self, channels: Sequence[int], resolutions: Sequence[int], num_discs: int = 4, ndf: int | None = None):
        super().__init__()
        if not 1 <= num_discs <= 4:
            raise ValueError(f"MultiScaleD: num_discs must be in 1..4, got {num_discs}")
        self.mini_discs = nn.ModuleDict(
            {str(i): SingleDisc(c, r, ndf=ndf) for i, (c, r) in enumerate(zip(channels[:num_discs], resolutions))}
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([d(feats[int(k)]).flatten(1) for k, d in self.mini_discs.items()], dim=1)


def _nominal_size(actual: float) -> int:
    """Nearest key of NFC (SingleDisc's rounding of non-power-of-two start sizes); 112 -> 128 at 224 input."""
    keys = list(NFC)
    return keys[min(range(len(keys)), key=lambda i: abs(keys[i] - actual))]


# ------------------------------------------------------------------------------------------------
# Public discriminators.


class Discriminator(nn.Module):
    """Base class: ``forward(x, generator) -> list of (B, n_k) logits``; x: (B, C, H, W) in [-1, 1].

    Spectral norm's power iteration runs once per training step (``power_iteration_``, called by the trainer before
    the step's first D forward), not inside every forward as torch's hook does in train mode: the spectral-norm
    layers stay in eval mode. Then u, v, and so the normalised weights, depend on the step alone, not on how many
    microbatches a rank ran, so W ranks make the same update as one process
    (docs/gan.md#spectral-norm-and-data-parallelism).
    """

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _spectral_norms(self) -> list[tuple[nn.Module, object]]:
        from torch.nn.utils.spectral_norm import SpectralNorm

        return [(m, h) for m in self.modules() for h in m._forward_pre_hooks.values() if isinstance(h, SpectralNorm)]

    def train(self, mode: bool = True) -> Discriminator:
        super().train(mode)
        for m, _ in self._spectral_norms():
            m.training = False  # u, v are updated by power_iteration_ only (class docstring)
        return self

    @torch.no_grad()
    def power_iteration_(self) -> None:
        """One power iteration of every spectral-norm layer (torch's update of u and v, Miyato et al. 2018)."""
        for m, h in self._spectral_norms():
            h.compute_weight(m, do_power_iteration=True)


def _build_on_meta_then_materialise(module: nn.Module, device, generator: torch.Generator | None) -> None:
    device = torch.device("cpu" if device is None else device)
    if device.type == "meta":
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"{type(module).__name__}: generator=torch.Generator(...) is required to initialise, got {generator!r}"
        )
    module.to_empty(device=device)
    init_parameters_(module, generator)


class ProjectedDiscriminator(Discriminator):
    """CTM's projected discriminator (module docstring; docs/ctm.md#26-gan-phase).

    Args:
        backbones: names from ``OFFICIAL_BACKBONES`` (the official pair by default).
        weights: backbone name -> timm weight file (safetensors or weights-only torch). Required for every
            backbone unless ``random_init=True`` (tests, or a deliberately random feature network).
        random_init: build with random feature networks (no files).
        generator: initialises everything random (backbones when random, projections, heads). Required
            unless ``device`` is 'meta' (shape-only construction).
        backbone_kwargs: per-backbone constructor kwargs (e.g. a tiny DeiT for tests).
        cout, expand, num_discs, ndf: projector width, CCM expansion, heads per backbone, fixed head width.
        resize_to: side of the bilinear resize applied when H < 256 (224 officially).
        diffaug: apply DiffAugment (on in CTM, prob_aug=1).

    Parameters are under ``feature_networks.<bb>.*`` and ``projectors.<bb>.*`` (frozen, always in eval
    mode) and ``heads.<bb>.mini_discs.<i>.*`` (trainable).
    """

    def __init__(
        self,
        backbones: Sequence[str] = OFFICIAL_BACKBONES,
        *,
        weights: Mapping[str, str | os.PathLike] | None = None,
        random_init: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        backbone_kwargs: Mapping[str, Mapping] | None = None,
        cout: int = 64,
        expand: bool = True,
        num_discs: int = 4,
        ndf: int | None = None,
        resize_to: int = 224,
        diffaug: bool = True,
    ) -> None:
        super().__init__()
        constructors = {"deit_base_distilled_patch16_224": DeiTDistilled, "tf_efficientnet_lite0": EfficientNetLite}
        for bb in backbones:
            if bb not in constructors:
                raise ValueError(
                    f"ProjectedDiscriminator: unknown backbone {bb!r}, expected one of {sorted(constructors)}"
                )
        weights, backbone_kwargs = dict(weights or {}), dict(backbone_kwargs or {})
        if random_init == bool(weights):
            raise ValueError(
                "ProjectedDiscriminator: pass weights={backbone: path} for the pretrained feature networks or "
                f"random_init=True, not both or neither; got weights for {sorted(weights)}, random_init={random_init}"
            )
        if weights and set(weights) != set(backbones):
            raise ValueError(
                f"ProjectedDiscriminator: weights must name exactly {list(backbones)}, got {sorted(weights)}"
            )
        self.backbones, self.resize_to, self.diffaug = tuple(backbones), int(resize_to), bool(diffaug)
        with torch.device("meta"):
            nets = {bb: constructors[bb](**backbone_kwargs.get(bb, {})) for bb in backbones}
            projs = {bb: RandomProjector(nets[bb].channels, cout, expand) for bb in backbones}
            heads = {}
            for bb in backbones:
                # CSM doubles each map: actual sizes 2*resize_to/reduction (112, 56, 28, 14 at 224), rounded
                # like SingleDisc to (128, 64, 32, 16) = the official fixed RESOLUTIONS (projector.py).
                res = [_nominal_size(2 * self.resize_to / r) for r in nets[bb].reductions]
                heads[bb] = MultiScaleD(projs[bb].channels, res, num_discs=num_discs, ndf=ndf)
        self.feature_networks = nn.ModuleDict(nets)
        self.projectors = nn.ModuleDict(projs)
        self.heads = nn.ModuleDict(heads)
        if weights and device is not None and torch.device(device).type == "meta":
            raise ValueError(
                f"ProjectedDiscriminator: weight files cannot be loaded on device 'meta', got {sorted(weights)}"
            )
        _build_on_meta_then_materialise(self, device, generator)
        for bb, path in weights.items():
            net = self.feature_networks[bb]
            _load_pretrained_(net, path, net.ignore_prefixes, net.random_prefixes)
        self.feature_networks.requires_grad_(False)
        self.projectors.requires_grad_(False)
        self.train()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """State to checkpoint: random projections + heads (BN stats, spectral-norm u/v included), without the
        pretrained feature networks, which are rebuilt from their weight files. (The official run re-draws the
        projections at every restart and saves the heads only; keeping them makes a resume exact.)"""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("feature_networks.")}

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of ``checkpoint_state``; raises ValueError naming missing or unexpected keys."""
        own = self.checkpoint_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"load_checkpoint_state: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
        self.load_state_dict({**self.state_dict(), **state})

    def train(self, mode: bool = True) -> ProjectedDiscriminator:
        """Heads follow ``mode``; feature networks and projections stay in eval mode (C enc_dec_lib.py:51-53)."""
        super().train(mode)
        self.feature_networks.eval()
        self.projectors.eval()
        return self

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """x: (B, 3, H, W) in [-1, 1] -> one (B, n_bb) logit tensor per backbone (fresh DiffAugment draws each)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ProjectedDiscriminator: expected x of shape (B, 3, H, W), got {tuple(x.shape)}")
        if self.diffaug and generator is None:
            raise ValueError("ProjectedDiscriminator: DiffAugment needs generator=torch.Generator(...), got None")
        logits = []
        for bb in self.backbones:
            net = self.feature_networks[bb]
            h = diff_augment(x, generator=generator) if self.diffaug else x
            h = (h + 1) / 2
            mean = torch.tensor(net.mean, device=h.device, dtype=h.dtype).view(1, 3, 1, 1)
            std = torch.tensor(net.std, device=h.device, dtype=h.dtype).view(1, 3, 1, 1)
            h = (h - mean) / std
            if h.shape[-2] < 256:  # C enc_dec_lib.py get_feature
                h = F.interpolate(h, size=self.resize_to, mode="bilinear", align_corners=False)
            logits.append(self.heads[bb](self.projectors[bb](net(h))))
        return logits


class ScratchDiscriminator(Discriminator):
    """Small spectral-norm conv discriminator trained from scratch (offline option; not in the official code).

    DiffAugment -> sn conv 3x3 (``channels``) -> [sn conv 4x4/2 + LeakyReLU(0.2)] down to 4x4 (width doubling,
    capped at ``max_channels``) -> sn conv 4x4 -> one logit per sample. Returns ``[(B, 1)]``.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int = 3,
        *,
        channels: int = 64,
        max_channels: int = 512,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        diffaug: bool = True,
    ) -> None:
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"ScratchDiscriminator: img_resolution must be a power of two >= 4, got {img_resolution}")
        self.img_resolution, self.img_channels, self.diffaug = img_resolution, img_channels, bool(diffaug)
        with torch.device("meta"):
            layers: list[nn.Module] = [_sn_conv(img_channels, channels, 3, 1, 1), nn.LeakyReLU(0.2)]
            res, c = img_resolution, channels
            while res > 4:
                c_next = min(2 * c, max_channels)
                layers += [_sn_conv(c, c_next, 4, 2, 1), nn.LeakyReLU(0.2)]
                res, c = res // 2, c_next
            layers.append(_sn_conv(c, 1, 4, 1, 0))
            self.main = nn.Sequential(*layers)
        _build_on_meta_then_materialise(self, device, generator)
        self.train()

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """x: (B, C, R, R) in [-1, 1] -> [(B, 1)]."""
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ScratchDiscriminator: expected x of shape (B, {expected}), got {tuple(x.shape)}")
        if self.diffaug and generator is None:
            raise ValueError("ScratchDiscriminator: DiffAugment needs generator=torch.Generator(...), got None")
        h = diff_augment(x, generator=generator) if self.diffaug else x
        return [self.main(h).flatten(1)]
