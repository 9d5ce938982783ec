"""DiffAugment as CTM's discriminator applies it (docs/ctm.md#26-gan-phase).

Zhao et al. (2020), "Differentiable Augmentation for Data-Efficient GAN Training" (arXiv 2006.10738),
policy 'color,translation,cutout', with the parameters CTM draws (sony/ctm code/cm/enc_dec_lib.py
``get_xl_feature``; docs/ctm.md#26-gan-phase cites C enc_dec_lib.py:73-183) and the operations of sony/ctm
code/pg_modules/diffaug.py:9-65, applied in this order to images in [-1, 1]:

1. brightness: x + b,                              b ~ U[-0.5, 0.5)      per sample;
2. saturation: (x - mean_C x) * s + mean_C x,      s ~ U[0, 2)           per sample;
3. contrast:   (x - mean_CHW x) * c + mean_CHW x,  c ~ U[0.5, 1.5)       per sample;
4. translation by (tx, ty) in {-S..S}^2, S = int(0.125 H + 0.5), zero fill:
   out[i, j] = x[i + tx, j + ty], 0 outside the image;
5. cutout of a K x K square, K = int(0.2 H + 0.5), centred at (ox, oy) with
   ox ~ U{0 .. H - (K mod 2)} (the official ``randint(0, H + 1 - K % 2)``): rows ox - K//2 .. ox - K//2 + K - 1
   (clipped to the image) are zeroed, likewise columns.

All draws come from an injected ``torch.Generator`` (never the global RNG). ``prob_aug=1.0`` in CTM, so
every sample is augmented. The operations are differentiable in x.

Shape legend: B batch, C channels, H/W spatial size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DiffAugmentParams", "sample_diffaugment_params", "apply_diffaugment", "diff_augment"]

TRANSLATION_RATIO = 0.125  # CTM args.shift_ratio (enc_dec_lib.py get_xl_feature; official diffaug.py rand_translation)
CUTOUT_RATIO = 0.2  # CTM args.cutout_ratio (enc_dec_lib.py get_xl_feature; diffaug.py rand_cutout ratio=0.2)


@dataclass(frozen=True)
class DiffAugmentParams:
    """Per-sample DiffAugment parameters; tensors live on the images' device.

    brightness, saturation, contrast: (B,) floats; translation_x/y, offset_x/y: (B,) int64.
    ``x`` indexes rows (dim H), ``y`` columns (dim W), as in the official code.
    """

    brightness: torch.Tensor
    saturation: torch.Tensor
    contrast: torch.Tensor
    translation_x: torch.Tensor
    translation_y: torch.Tensor
    offset_x: torch.Tensor
    offset_y: torch.Tensor


def _shift(size: int) -> int:
    return int(size * TRANSLATION_RATIO + 0.5)


def _cutout(size: int) -> int:
    return int(size * CUTOUT_RATIO + 0.5)


def sample_diffaugment_params(
    batch: int, height: int, width: int, *, generator: torch.Generator, device: torch.device | str | None = None
) -> DiffAugmentParams:
    """Draw one set of DiffAugment parameters per sample from ``generator`` (order fixed, see source)."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"sample_diffaugment_params: generator must be a torch.Generator, got {type(generator).__name__}"
        )
    if batch < 0 or height < 1 or width < 1:
        raise ValueError(
            f"sample_diffaugment_params: expected batch >= 0 and H, W >= 1, got {batch}, {height}, {width}"
        )
    gdev = generator.device
    device = gdev if device is None else torch.device(device)

    def rand() -> torch.Tensor:
        return torch.rand(batch, generator=generator, device=gdev)

    def randint(low: int, high: int) -> torch.Tensor:  # high exclusive
        return torch.randint(low, high, (batch,), generator=generator, device=gdev)

    brightness = rand() - 0.5
    saturation = rand() * 2.0
    contrast = rand() + 0.5
    sx, sy = _shift(height), _shift(width)
    translation_x = randint(-sx, sx + 1)
    translation_y = randint(-sy, sy + 1)
    kx, ky = _cutout(height), _cutout(width)
    offset_x = randint(0, height + (1 - kx % 2))
    offset_y = randint(0, width + (1 - ky % 2))
    return DiffAugmentParams(
        *(t.to(device) for t in (brightness, saturation, contrast, translation_x, translation_y, offset_x, offset_y))
    )


def _translate(x: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i + tx_b, j + ty_b], zero where the source lies outside the image."""
    B, C, H, W = x.shape
    rows = torch.arange(H, device=x.device)[None, :] + tx[:, None]  # (B, H)
    cols = torch.arange(W, device=x.device)[None, :] + ty[:, None]  # (B, W)
    valid = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]  # (B, H, W)
    b = torch.arange(B, device=x.device)[:, None, None]
    out = x[b, :, rows.clamp(0, H - 1)[:, :, None], cols.clamp(0, W - 1)[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2) * valid[:, None].to(x.dtype)


def _cutout_mask(B: int, H: int, W: int, ox: torch.Tensor, oy: torch.Tensor, dtype, device) -> torch.Tensor:
    """(B, 1, H, W) mask: 0 inside the K x K square starting at (ox - K//2, oy - K//2), 1 elsewhere."""
    kx, ky = _cutout(H), _cutout(W)
    r = torch.arange(H, device=device)[None, :] - (ox[:, None] - kx // 2)  # (B, H) offset inside the square
    c = torch.arange(W, device=device)[None, :] - (oy[:, None] - ky // 2)  # (B, W)
    inside = ((r >= 0) & (r < kx))[:, :, None] & ((c >= 0) & (c < ky))[:, None, :]  # (B, H, W)
    return (~inside).to(dtype)[:, None]


def apply_diffaugment(x: torch.Tensor, params: DiffAugmentParams) -> torch.Tensor:
    """Apply brightness, saturation, contrast, translation, cutout (in this order). x: (B, C, H, W) -> same."""
    if x.ndim != 4:
        raise ValueError(f"apply_diffaugment: expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    if params.brightness.shape != (B,):
        raise ValueError(f"apply_diffaugment: params are for batch {tuple(params.brightness.shape)}, x has batch {B}")
    p = params
    x = x + p.brightness.to(x.dtype).view(B, 1, 1, 1)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * p.saturation.to(x.dtype).view(B, 1, 1, 1) + mean_c
    mean_chw = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean_chw) * p.contrast.to(x.dtype).view(B, 1, 1, 1) + mean_chw
    x = _translate(x, p.translation_x.to(x.device), p.translation_y.to(x.device))
    x = x * _cutout_mask(B, H, W, p.offset_x.to(x.device), p.offset_y.to(x.device), x.dtype, x.device)
    return x.contiguous()


def diff_augment(x: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Draw fresh parameters from ``generator`` and augment. x: (B, C, H, W) in [-1, 1] -> same shape."""
    B, _, H, W = x.shape
    return apply_diffaugment(x, sample_diffaugment_params(B, H, W, generator=generator, device=x.device))
