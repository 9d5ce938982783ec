"""The distill stage's GAN phase (docs/gan.md): checks before Ray starts, feature-network fetch, the discriminator.

Driver side: ``check_gan_phase(params, card)`` refuses what cannot run (the projected discriminator on grey data)
and ``fetch_feature_networks(gan, root)`` fetches the projected discriminator's two timm weight files through
``pipelines.support.fetch`` with their sha256 pins (``record`` once), both before Ray starts. Worker side:
``build_phase_discriminator`` builds the fresh discriminator from a seed keyed by the run seed (the same on every
rank and restart) and its RAdam optimizer; the weight files are loaded weights-only (never unpickling code).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctm_core.config import DistillParams, GanParams, Params, ParamsError

if TYPE_CHECKING:
    import torch

    from ctm_core.data.card import DatasetCard

__all__ = ["FEATURE_NETS", "build_phase_discriminator", "check_gan_phase", "fetch_feature_networks"]

logger = logging.getLogger(__name__)

# GanParams field -> ctm_core.gan.discriminator backbone name (OFFICIAL_BACKBONES, C cm/enc_dec_lib.py)
FEATURE_NETS = {"deit": "deit_base_distilled_patch16_224", "efficientnet": "tf_efficientnet_lite0"}


def check_gan_phase(params: Params, card: DatasetCard) -> None:
    """What the config schema cannot know: the data's geometry against the discriminator (one line, no work)."""
    g = params.distill.gan
    if not g.enabled:
        return
    im = card.image
    if g.discriminator == "projected" and im.channels != 3:
        raise ParamsError(
            "distill.gan.discriminator",
            f"'projected' feeds RGB images to DeiT/EfficientNet, got {im.channels}-channel data (fix: "
            "discriminator: scratch)",
        )
    if g.discriminator == "scratch" and (im.height != im.width or im.height < 4 or im.height & (im.height - 1)):
        raise ParamsError(
            "distill.gan.discriminator",
            f"'scratch' needs square power-of-two images >= 4 px, got {im.height}x{im.width} (fix: prepare "
            "such images, or use discriminator: projected for RGB data)",
        )


def fetch_feature_networks(gan: GanParams, repo_root: Path) -> dict[str, str] | None:
    """{backbone name: local verified file} for ``discriminator: projected`` (None for scratch); fetches with the
    pinned sha256 (or records it once), raising ``FetchError`` with the fix."""
    if not gan.enabled or gan.discriminator != "projected":
        return None
    from pipelines.support.fetch import fetch

    cache = Path(gan.cache_dir)
    cache = cache if cache.is_absolute() else repo_root / cache
    out = {}
    for field, backbone in FEATURE_NETS.items():
        f = getattr(gan, field)
        out[backbone] = str(fetch(f.source, cache_dir=cache, sha256=f.sha256))
    return out


def build_phase_discriminator(
    cfg: DistillParams, card: DatasetCard, device: torch.device, feature_weights: dict[str, str] | None
):
    """(discriminator, d_optimizer) for a GAN-phase section: fresh weights from the run seed's
    ``discriminator_init`` stream, RAdam(d_lr, betas (0.5, 0.9)) over the trainable parameters."""
    import torch

    from ctm_core.gan.objective import build_discriminator, make_d_optimizer
    from ctm_core.training.loop import derive_seed

    g = cfg.gan
    im = card.image
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 0, "discriminator_init"))
    kwargs: dict[str, Any] = dict(img_resolution=im.height, img_channels=im.channels, generator=gen, device=device)
    if g.discriminator == "projected":
        if not feature_weights:
            raise ValueError("discriminator 'projected' needs the fetched feature networks, got none")
        d = build_discriminator("projected", weights=feature_weights, **kwargs)
    else:
        d = build_discriminator("scratch", channels=g.scratch_channels, **kwargs)
    return d, make_d_optimizer(d, lr=g.d_lr)
