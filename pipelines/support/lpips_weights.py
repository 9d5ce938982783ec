"""The weight files of `distill.distance: lpips` for the Ray stages (docs/presets.md#lpips-weights).

Driver side, before Ray starts: `pin_lpips_weights(params)` fetches torchvision's VGG16 and the LPIPS linear weights
through `pipelines.support.fetch` (content-addressed cache, sha256 checked before use; `record` fetches once and
logs the digest to pin) and returns the params with both digests pinned and the cache folder absolute, so every
worker, on this node or another, gets exactly the bytes the driver checked.

Worker side: `build_lpips(d)` fetches the same pinned files (a cache hit on this node) and builds
`ctm_core.gan.lpips.LPIPS.from_files`, which reads tensors only (`torch.load(weights_only=True)` or safetensors).
"""

from __future__ import annotations

import torch

from ctm_core.config import DistillParams, Params, with_changes
from pipelines.support.io_utils import one_line
from pipelines.support.params import resolve_path

__all__ = ["LpipsWeightsError", "build_lpips", "pin_lpips_weights"]

FILES = ("vgg16", "linear")


class LpipsWeightsError(ValueError):
    """An LPIPS weight file could not be fetched, verified or read (one line naming the key and the fix)."""


def _fetch_file(d: DistillParams, name: str, *, progress: bool = False):
    from pipelines.support.fetch import FetchError, fetch

    lp = d.lpips
    source, sha256 = getattr(lp, f"{name}_source"), getattr(lp, f"{name}_sha256")
    try:
        return fetch(source, lp.cache_dir, sha256=sha256, progress=progress)
    except (FetchError, OSError) as e:
        raise LpipsWeightsError(f"distill.lpips.{name}_source: {one_line(e, limit=600)}") from None


def pin_lpips_weights(params: Params, *, progress: bool = False) -> Params:
    """`params` unchanged unless `distill.distance` is 'lpips'; then both files fetched and verified, and
    `distill.lpips` with their sha256 digests (`record` resolved) and an absolute cache folder. Raises
    LpipsWeightsError (a ValueError) before any training when a file is missing, altered or not LPIPS weights."""
    from pipelines.support.fetch import recorded_sha256

    d = params.distill
    if d.distance != "lpips":
        return params
    cache = resolve_path(d.lpips.cache_dir, params.repo_root)
    d = with_changes(d, {"lpips.cache_dir": cache})
    for name in FILES:
        source = getattr(d.lpips, f"{name}_source")
        if "://" not in source:
            d = with_changes(d, {f"lpips.{name}_source": resolve_path(source, params.repo_root)})
        digest = recorded_sha256(_fetch_file(d, name, progress=progress))
        d = with_changes(d, {f"lpips.{name}_sha256": digest})
    _load(d)  # the files must be LPIPS weights: refuse them here, not in every worker
    pinned = params.model_copy(update={"distill": d})
    pinned._repo_root = params.repo_root
    return pinned


def _load(d: DistillParams):
    from ctm_core.gan.lpips import LPIPS

    vgg, linear = (_fetch_file(d, name) for name in FILES)
    try:
        return LPIPS.from_files(vgg, linear)
    except (ValueError, RuntimeError, OSError) as e:  # wrong keys or shapes, not a tensor file
        raise LpipsWeightsError(
            f"distill.lpips: {vgg.name} + {linear.name} are not VGG16 + LPIPS linear weights: {one_line(e, limit=600)}"
        ) from None


def build_lpips(d: DistillParams, device: torch.device | str = "cpu"):
    """The frozen LPIPS module of a pinned `distill.lpips` (`pin_lpips_weights`'s output) on `device`."""
    for name in FILES:
        sha = getattr(d.lpips, f"{name}_sha256")
        if sha is None or sha == "record":
            raise LpipsWeightsError(
                f"distill.lpips.{name}_sha256: the workers need the digest the driver pinned, got {sha!r} "
                "(fix: call pin_lpips_weights(params) before starting Ray)"
            )
    return _load(d).to(device)
