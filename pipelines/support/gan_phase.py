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

from ctm_core.config import DistillParams, Params, ParamsError, with_changes

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


def fetch_feature_networks(params: Params) -> tuple[Params, dict[str, str] | None]:
    """For ``discriminator: projected``: fetch both timm files with their sha256 pins (``record``: fetched once and
    the digest taken from the cache entry) and return (params with the digests filled in, {backbone name: local
    verified file}); the params unchanged and None otherwise. Raises ``FetchError`` naming the fix."""
    gan = params.distill.gan
    if not gan.enabled or gan.discriminator != "projected":
        return params, None
    from pipelines.support.fetch import fetch, recorded_sha256

    cache = Path(gan.cache_dir)
    cache = cache if cache.is_absolute() else params.repo_root / cache
    files, pins = {}, {}
    for field, backbone in FEATURE_NETS.items():
        f = getattr(gan, field)
        path = fetch(f.source, cache_dir=cache, sha256=f.sha256)
        files[backbone] = str(path)
        pins[f"gan.{field}.sha256"] = recorded_sha256(path)  # the run identity names the bytes, never 'record'
    distill = with_changes(params.distill, pins)
    pinned = params.model_copy(update={"distill": distill})
    pinned._repo_root = params.repo_root
    return pinned, files


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
