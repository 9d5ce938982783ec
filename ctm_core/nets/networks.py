"""EDM's U-Nets: ``SongUNet`` (DDPM++ / NCSN++) and ``DhariwalUNet`` (ADM), with the optional CTM s-branch.

Clean-room reimplementation from ``docs/edm.md#a1-networks`` (Karras et al., NeurIPS 2022; the architectures of
Song et al., ICLR 2021 and Dhariwal & Nichol, NeurIPS 2021). Keys, shapes and registration order equal
``NVlabs/edm training/networks.py`` (SongUNet 228-363, DhariwalUNet 371-461), so an EDM ``ema`` state_dict
(without the ``model.`` prefix) loads with ``strict=True``.

CTM s-branch (Kim et al., ICLR 2024; ``docs/ctm.md#12-cifar-10-student``, ``docs/ctm.md#14-imagenet-64-student``),
enabled by ``ctm_s_branch=True``: the target time s is embedded like t (same ``map_noise``), goes through its own
``map_layer0_s``/``map_layer1_s`` and enters every ``UNetBlock`` through ``affine_s``. Those are the only extra keys;
they start from a fresh (non-zero) initialisation.

Shape legend: ``B`` batch, ``C`` channels, ``H``/``W`` = ``img_resolution``, ``L`` label_dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ctm_core.nets.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from ctm_core.nets.utils import check_in, check_positive

__all__ = ["SongUNet", "DhariwalUNet"]


def _check_resolution(img_resolution: int, num_levels: int) -> None:
    if img_resolution % (2 ** (num_levels - 1)) != 0:
        raise ValueError(
            f"img_resolution must be divisible by 2^(len(channel_mult)-1) = {2 ** (num_levels - 1)}, "
            f"got {img_resolution}"
        )


def _label_dropout_mask(class_labels: torch.Tensor, label_dropout: float, training: bool) -> torch.Tensor:
    """Zero whole label vectors with probability ``label_dropout`` during training (networks.py:326-327, 443-444)."""
    if training and label_dropout:
        keep = torch.rand([class_labels.shape[0], 1], device=class_labels.device) >= label_dropout
        class_labels = class_labels * keep.to(class_labels.dtype)
    return class_labels


def _check_s_branch_input(ctm_s_branch: bool, noise_labels_s: torch.Tensor | None) -> None:
    """noise_labels_s (c_noise(s)) is required exactly when the network has the CTM s-branch."""
    if (noise_labels_s is None) == ctm_s_branch:
        raise ValueError(
            f"noise_labels_s must be given iff ctm_s_branch (ctm_s_branch={ctm_s_branch}), "
            f"got {'None' if noise_labels_s is None else tuple(noise_labels_s.shape)}"
        )


class SongUNet(nn.Module):
    """DDPM++ (``embedding_type='positional'``, ``encoder_type='standard'``, filter [1,1]) and NCSN++
    (``'fourier'``, ``'residual'``, [1,3,3,1]) U-Net (NVlabs/edm training/networks.py:228-363).

    forward(x: (B, C_in, H, W), noise_labels: (B,) or (1,) = c_noise(t), class_labels: (B, L) or None,
    augment_labels: (B, augment_dim) or None, noise_labels_s: (B,) or (1,) = c_noise(s), required iff
    ``ctm_s_branch``) -> F_x: (B, C_out, H, W).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
        ctm_s_branch: bool = False,
    ) -> None:
        check_in("embedding_type", embedding_type, {"fourier", "positional"})
        check_in("encoder_type", encoder_type, {"standard", "skip", "residual"})
        check_in("decoder_type", decoder_type, {"standard", "skip"})
        check_positive("img_resolution", img_resolution)
        check_positive("model_channels", model_channels)
        if len(channel_mult) < 1:
            raise ValueError(f"channel_mult must be non-empty, got {list(channel_mult)!r}")
        _check_resolution(img_resolution, len(channel_mult))
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.ctm_s_branch = ctm_s_branch
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        # networks.py:258-266: xavier_uniform everywhere, zero-ish (1e-5) output convs, sqrt(0.2) for qkv.
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=np.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
            emb_channels_s=emb_channels if ctm_s_branch else None,
        )

        # Mapping network (networks.py:268-273).
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        # docs/ctm.md#12-cifar-10-student: same shapes as map_layer0/1, fresh xavier_uniform init, zero bias.
        if ctm_s_branch:
            self.map_layer0_s = Linear(noise_channels, emb_channels, **init)
            self.map_layer1_s = Linear(emb_channels, emb_channels, **init)

        # Encoder (networks.py:276-298).
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs
                )
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder (networks.py:300-318).
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def _embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """map_noise + half swap to [sin, cos] (networks.py:323) + scaled label embedding (328)."""
        emb = self.map_noise(noise_labels)  # (B, C_noise) = [cos, sin]
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # -> [sin, cos]
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"class_labels must be given for label_dim={self.label_dim}, got None")
            emb = emb + self.map_label(class_labels * np.sqrt(self.map_label.in_features))
        return emb

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
        noise_labels_s: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_s_branch_input(self.ctm_s_branch, noise_labels_s)
        if self.map_label is not None and class_labels is not None:
            class_labels = _label_dropout_mask(class_labels, self.label_dropout, self.training)

        # Mapping (networks.py:320-332).
        emb = self._embed(noise_labels, class_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))  # (B, E)
        emb_s = None
        if self.ctm_s_branch:  # docs/ctm.md#12-cifar-10-student: same embedding and label, own layers, no augment.
            emb_s = self._embed(noise_labels_s, class_labels)
            emb_s = F.silu(self.map_layer0_s(emb_s))
            emb_s = F.silu(self.map_layer1_s(emb_s))

        # Encoder (networks.py:334-347).
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb, emb_s) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder (networks.py:349-363).
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb, emb_s)
        return aux

    def last_layer_weight(self) -> nn.Parameter:
        """The final output conv ``dec.<R>x<R>_aux_conv.weight`` (CTM adaptive loss weight,
        docs/ctm.md#12-cifar-10-student)."""
        R = self.img_resolution
        return self.dec[f"{R}x{R}_aux_conv"].weight


class DhariwalUNet(nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021) as in NVlabs/edm training/networks.py:371-461.

    forward(x: (B, C_in, H, W), noise_labels: (B,) or (1,) = c_noise(t), class_labels: (B, L) or None,
    augment_labels: (B, augment_dim) or None, noise_labels_s: (B,) or (1,), required iff ``ctm_s_branch``)
    -> F_x: (B, C_out, H, W).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0,
        ctm_s_branch: bool = False,
    ) -> None:
        check_positive("img_resolution", img_resolution)
        check_positive("model_channels", model_channels)
        if len(channel_mult) < 1:
            raise ValueError(f"channel_mult must be non-empty, got {list(channel_mult)!r}")
        _check_resolution(img_resolution, len(channel_mult))
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.ctm_s_branch = ctm_s_branch
        emb_channels = model_channels * channel_mult_emb
        # networks.py:391-393: kaiming_uniform with sqrt(1/3) (= torch.nn.Linear/Conv2d defaults), zero output convs.
        init = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(
            emb_channels=emb_channels,
            channels_per_head=64,
            dropout=dropout,
            init=init,
            init_zero=init_zero,
            emb_channels_s=emb_channels if ctm_s_branch else None,
        )

        # Mapping network (networks.py:396-400).
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal", init_weight=np.sqrt(label_dim))
            if label_dim
            else None
        )
        # docs/ctm.md#14-imagenet-64-student: time_embed_s, same shapes, torch-default-like init (not zero).
        if ctm_s_branch:
            self.map_layer0_s = Linear(model_channels, emb_channels, **init)
            self.map_layer1_s = Linear(emb_channels, emb_channels, **init)

        # Encoder (networks.py:403-416).
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs
                )
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder (networks.py:419-433).
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs
                )
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
        noise_labels_s: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_s_branch_input(self.ctm_s_branch, noise_labels_s)
        # Mapping (networks.py:436-447): no half swap, label unscaled and added after map_layer1, then one SiLU.
        emb = self.map_noise(noise_labels)  # (B, C) = [cos, sin]
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"class_labels must be given for label_dim={self.label_dim}, got None")
            emb = emb + self.map_label(_label_dropout_mask(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)  # (B, E)
        emb_s = None
        if self.ctm_s_branch:  # docs/ctm.md#14-imagenet-64-student: no label, no augment on the s path.
            emb_s = F.silu(self.map_layer0_s(self.map_noise(noise_labels_s)))
            emb_s = F.silu(self.map_layer1_s(emb_s))

        # Encoder (networks.py:450-453).
        skips = []
        for block in self.enc.values():
            x = block(x, emb, emb_s) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder (networks.py:456-460).
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb, emb_s)
        return self.out_conv(F.silu(self.out_norm(x)))

    def last_layer_weight(self) -> nn.Parameter:
        """``conv1.weight`` of the last decoder block (the zero-init conv of ADM's last ResBlock,
        docs/ctm.md#14-imagenet-64-student)."""
        last_block = [block for block in self.dec.values() if isinstance(block, UNetBlock)][-1]
        return last_block.conv1.weight
