"""Constructor kwargs of NVIDIA's released EDM snapshots (``docs/edm.md#a14-released-presets``).

Derived from NVlabs/edm train.py:116-147 (arch, precond, augment_dim=9 when --augment > 0, dropout, use_fp16) with
the per-model options of README.md:204-212, in the order ``ema.init_kwargs`` stores them. "vp"/"ve" in the names
is the architecture (DDPM++ / NCSN++); every released network uses ``EDMPrecond`` (docs/edm.md#a12-preconditioning,
naming trap).
"""

from __future__ import annotations

import copy

from torch import nn

from ctm_core.nets.precond import build_precond

__all__ = ["PRESETS", "build_preset"]

# train.py:116-124 (--arch ddpmpp / ncsnpp)
_DDPMPP = dict(
    model_type="SongUNet",
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=128,
)
_NCSNPP = dict(
    model_type="SongUNet",
    embedding_type="fourier",
    encoder_type="residual",
    decoder_type="standard",
    channel_mult_noise=2,
    resample_filter=[1, 3, 3, 1],
    model_channels=128,
)


def _song(arch: dict, channel_mult: list[int], dropout: float, img_resolution: int, label_dim: int) -> dict:
    return dict(
        **arch,
        channel_mult=channel_mult,
        augment_dim=9,
        dropout=dropout,
        use_fp16=False,
        img_resolution=img_resolution,
        img_channels=3,
        label_dim=label_dim,
    )


PRESETS: dict[str, tuple[str, dict]] = {
    "edm-cifar10-32x32-cond-vp": ("EDMPrecond", _song(_DDPMPP, [2, 2, 2], 0.13, 32, 10)),
    "edm-cifar10-32x32-uncond-vp": ("EDMPrecond", _song(_DDPMPP, [2, 2, 2], 0.13, 32, 0)),
    "edm-cifar10-32x32-cond-ve": ("EDMPrecond", _song(_NCSNPP, [2, 2, 2], 0.13, 32, 10)),
    "edm-cifar10-32x32-uncond-ve": ("EDMPrecond", _song(_NCSNPP, [2, 2, 2], 0.13, 32, 0)),
    "edm-ffhq-64x64-uncond-vp": ("EDMPrecond", _song(_DDPMPP, [1, 2, 2, 2], 0.05, 64, 0)),
    "edm-ffhq-64x64-uncond-ve": ("EDMPrecond", _song(_NCSNPP, [1, 2, 2, 2], 0.05, 64, 0)),
    "edm-afhqv2-64x64-uncond-vp": ("EDMPrecond", _song(_DDPMPP, [1, 2, 2, 2], 0.25, 64, 0)),
    "edm-afhqv2-64x64-uncond-ve": ("EDMPrecond", _song(_NCSNPP, [1, 2, 2, 2], 0.25, 64, 0)),
    # train.py:124 (--arch adm), --augment=0 so no augment_dim, --fp16=1, dropout 0.10.
    "edm-imagenet-64x64-cond-adm": (
        "EDMPrecond",
        dict(
            model_type="DhariwalUNet",
            model_channels=192,
            channel_mult=[1, 2, 3, 4],
            dropout=0.1,
            use_fp16=True,
            img_resolution=64,
            img_channels=3,
            label_dim=1000,
        ),
    ),
}


def build_preset(name: str, **overrides) -> nn.Module:
    """Build the (randomly initialised) precond of a released EDM snapshot by name; ``overrides`` update its kwargs
    (e.g. ``ctm_s_branch=True``). Wrap in ``with torch.device('meta'):`` for a weight-less skeleton.
    """
    if name not in PRESETS:
        raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
    class_name, init_kwargs = PRESETS[name]
    init_kwargs = copy.deepcopy(init_kwargs)
    init_kwargs.update(overrides)
    return build_precond(class_name, init_kwargs)
