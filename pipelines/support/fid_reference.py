"""FID on the field's protocol for the evaluate stage: Inception weights, reference statistics, protocol identity.

    python -m pipelines.support.fid_reference --params params.yaml --data data/prepared   # compute / reuse the cache

Used by `pipelines.evaluate` when `evaluate.features: inception` (params.yaml; docs/edm.md#a32-fid-references,
docs/edm.md#a33-fid-protocol):

* Detector: pytorch-fid's TF-ported Inception-v3 pool3 (`ctm_core.eval.inception.FIDInception`, 2048-d), weights
  from `evaluate.inception.{source, sha256}` through the project's fetcher (`pipelines.support.fetch`: https / s3 /
  file URI or a local path, sha256-verified, content-addressed cache under `evaluate.cache_dir`; `sha256: record`
  fetches once and logs the digest to pin). Nothing is ever downloaded without a pin, and the file is read with
  `torch.load(weights_only=True)`. (torch-fidelity / pytorch-fid themselves are not imported: both need
  torchvision, which does not import beside this project's CPU torch 2.13 wheel; ctm_core/eval/inception.py.)
* Images: what the generator would save, `uint8 = clip(x·127.5 + 128, 0, 255)` (EDM generate.py:297), grey repeated
  to RGB (EDM fid.py:66-67), then the detector's own resize to 299×299. Real images take the same path: prepared
  levels k → x = k/(L−1)·2 − 1 (float64) → the same uint8 mapping, which for 8-bit data returns k exactly.
* Reference statistics, float64 mean and unbiased covariance (`ctm_core.eval.metrics.feature_statistics`):
    - `reference.source: data`: computed from the prepared images of `reference.splits` (default train + heldout =
      every image of the source; for `cifar10-python` that is EDM's 50,000 training images, `fid.py ref`) and
      cached as `<cache_dir>/reference/<key>.npz` (mu, sigma, num_images, meta_json, and a 2,000-image feature
      subset for KID), written atomically with deterministic bytes. `key` = sha256 of {data hash (the card's
      shard sha256s of those splits, image shape, levels), Inception weights sha256, PREPROCESS_VERSION}: a changed
      dataset, detector or preprocessing never reuses old statistics.
    - `reference.source: <URI or path>`: an npz with `mu` (2048,) and `sigma` (2048, 2048), e.g. EDM's
      `https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz` (EDM README.md:140, fid.py:150-155), fetched
      with its pinned sha256 and read with `allow_pickle=False`. EDM computed it with NVIDIA's detector pickle
      (`inception-2015-12-05.pkl`), a different port of the same TF graph with its own resize: pytorch-fid reports
      such ports agree to ~0.1 % relative FID, so numbers against it are close to, not bit-identical with, EDM's.
  Wrong feature dimension, non-finite values or an asymmetric sigma stop the stage with one line before sampling.
* Protocol identity (`protocol_dict`): features, feature-net sha256, reference source / sha256, num_samples,
  seed_start, preprocessing version; its canonical-JSON sha256 is what a promotion gate compares.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ctm_core.config import Params, ParamsError
from ctm_core.data.card import DatasetCard
from pipelines.support.io_utils import one_line
from pipelines.support.logs import setup_logging
from pipelines.support.params import load_params, resolve_path

__all__ = [
    "FIDSetup",
    "FIDSetupError",
    "KID_REFERENCE_FEATURES",
    "MIN_CLASSIFIER_ACCURACY",
    "PREPROCESS_VERSION",
    "ReferenceInfo",
    "data_hash",
    "levels_to_uint8",
    "load_inception",
    "protocol_dict",
    "protocol_sha256",
    "reference_from_data",
    "reference_from_file",
    "setup_inception_fid",
    "warn_if_weak_classifier",
]

logger = logging.getLogger(__name__)

# Bump when anything between prepared levels / sampler output and the detector's input changes.
PREPROCESS_VERSION = "fid-v2:edm-uint8(x*127.5+128,clip)|gray->rgb|tf1-bilinear-299|(x-128)/128"
KID_REFERENCE_FEATURES = 2000  # reference features kept for KID (2 subsets' worth of torch-fidelity's 1000)
CACHE_FORMAT = 1


# Below this held-out accuracy the feature classifier confuses too many classes for its features (and an FD on them)
# to tell good samples from bad: on the digits default it reaches ~0.95; a small net on CIFAR-10 ~0.5.
MIN_CLASSIFIER_ACCURACY = 0.8


def warn_if_weak_classifier(accuracy: float | None) -> bool:
    """Log one warning line when the FD feature classifier's held-out `accuracy` is below `MIN_CLASSIFIER_ACCURACY`;
    returns whether it warned."""
    if accuracy is None or accuracy >= MIN_CLASSIFIER_ACCURACY:
        return False
    logger.warning(
        "evaluate: the feature classifier's held-out accuracy is %.2f (< %.2f), so its Fréchet distances mean little "
        "(fix: raise evaluate.classifier.steps, or use evaluate.features: inception for 8-bit RGB data)",
        accuracy,
        MIN_CLASSIFIER_ACCURACY,
    )
    return True


class FIDSetupError(ValueError):
    """The Inception weights or the reference statistics are unusable; the message is one line naming the key."""


@dataclasses.dataclass(frozen=True)
class ReferenceInfo:
    """Reference statistics in the Inception feature space and where they came from."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    sha256: str  # of the npz file used (cached or fetched)
    source: str  # 'data' or the URI / path
    path: Path
    num_images: int | None  # None when the file does not say (EDM's npz)
    cached: bool  # data: True when the cache already held the statistics
    kid_features: np.ndarray | None  # (M, D) float64 subset of the reference features (data only)
    splits: tuple[str, ...] | None = None  # data only
    data_hash: str | None = None  # data only
    key: str | None = None  # data only: the cache key


@dataclasses.dataclass(frozen=True)
class FIDSetup:
    model: torch.nn.Module  # FIDInception with the pinned weights, eval mode
    weights_sha256: str
    weights_path: Path
    weights_source: str
    reference: ReferenceInfo


# --- images -----------------------------------------------------------------------------------------------------------
def levels_to_uint8(levels: np.ndarray | torch.Tensor, num_levels: int) -> torch.Tensor:
    """Prepared integer levels (N, C, H, W) in 0..L−1 → the uint8 images a generator would save for those pixels.

    k → x = k/(L−1)·2 − 1 in float64 (prepare's mapping) → `images_to_uint8` (EDM's clip(x·127.5 + 128)). For
    L = 256 this is the identity on k; for other L (17-level digits) real and generated images share the mapping.
    """
    from ctm_core.eval.metrics import images_to_uint8

    q = torch.as_tensor(np.asarray(levels)).to(torch.float64)
    return images_to_uint8(q / (num_levels - 1) * 2 - 1)


# --- weights ----------------------------------------------------------------------------------------------------------
def load_inception(params: Params, *, progress: bool = False) -> tuple[torch.nn.Module, str, Path]:
    """Fetch (sha256-pinned) and load the FID Inception; returns (model, weights sha256, cached file path)."""
    from ctm_core.eval.inception import FIDInception
    from pipelines.support.fetch import ChecksumMismatchError, FetchError, fetch, recorded_sha256

    inc = params.evaluate.inception
    if inc.sha256 is None:
        raise FIDSetupError(
            "evaluate.inception.sha256: required for features 'inception', got null (fix: pin the "
            "64-hex digest or set sha256: record)"
        )
    cache = Path(resolve_path(params.evaluate.cache_dir, params.repo_root))
    source = resolve_path(inc.source, params.repo_root) if "://" not in inc.source else inc.source
    try:
        path = fetch(source, cache, sha256=inc.sha256, progress=progress)
        digest = recorded_sha256(path)
    except ChecksumMismatchError as e:  # fetched, but not the pinned file: a wrong pin or a tampered copy
        raise FIDSetupError(f"evaluate.inception.source: {one_line(e, limit=600)}") from None
    except FetchError as e:  # offline, or the server is down: name both ways out
        pin = inc.sha256 if inc.sha256 != "record" else "its sha256"
        raise FIDSetupError(
            f"evaluate.inception.source: cannot fetch {Path(source).name} ({one_line(e, limit=300)}) (fix: copy "
            f"that file to this machine and set evaluate.inception.source to its path, keeping evaluate.inception."
            f"sha256 {pin}; or set evaluate.features: classifier, which needs no download)"
        ) from None
    except (ValueError, OSError) as e:
        raise FIDSetupError(f"evaluate.inception.source: {one_line(e, limit=600)}") from None
    try:
        model = FIDInception.from_file(path, expected_sha256=digest)
    except (ValueError, RuntimeError, OSError) as e:  # not a state_dict / wrong keys / wrong shapes
        raise FIDSetupError(
            f"evaluate.inception.source: {path.name} is not a FID Inception-v3 state_dict "
            f"(pytorch-fid layout): {one_line(e, limit=600)}"
        ) from None
    return model, digest, path


# --- reference statistics ---------------------------------------------------------------------------------------------
def data_hash(card: DatasetCard, splits: list[str] | tuple[str, ...]) -> str:
    """sha256 of the prepared images of `splits` as the dataset card records them (shard sha256s, shape, levels)."""
    im = card.image
    blob = {
        "splits": {s: [sh.sha256 for sh in card.splits[s].shards] for s in splits},
        "counts": {s: card.splits[s].count for s in splits},
        "image": [im.channels, im.height, im.width, im.num_levels],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _cache_key(dhash: str, weights_sha256: str) -> str:
    blob = {
        "format": CACHE_FORMAT,
        "data": dhash,
        "inception_sha256": weights_sha256,
        "preprocessing": PREPROCESS_VERSION,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_reference(where: str, mu: np.ndarray, sigma: np.ndarray, dim: int) -> None:
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise FIDSetupError(
            f"{where}: expected mu ({dim},) and sigma ({dim}, {dim}) for the {dim}-d Inception pool3 "
            f"features, got {tuple(mu.shape)} and {tuple(sigma.shape)} (wrong statistics file?)"
        )
    if (np.diagonal(sigma) < 0).any():
        raise FIDSetupError(f"{where}: sigma has negative variances on its diagonal: not a covariance")


def reference_from_file(
    source: str, sha256: str, cache_dir: str | Path, *, dim: int = 2048, progress: bool = False
) -> ReferenceInfo:
    """Fetch an npz (mu, sigma) with its pinned sha256 and validate it; raises FIDSetupError (one line)."""
    from ctm_core.eval.metrics import load_reference_stats
    from pipelines.support.fetch import FetchError, fetch, recorded_sha256

    try:
        path = fetch(source, cache_dir, sha256=sha256, progress=progress)
        digest = recorded_sha256(path)
        ref = load_reference_stats(path, expected_sha256=digest)
    except (FetchError, ValueError, OSError) as e:
        raise FIDSetupError(f"evaluate.reference.source: {one_line(e, limit=600)}") from None
    _check_reference(f"evaluate.reference.source: {Path(path).name}", ref.mu, ref.sigma, dim)
    return ReferenceInfo(
        mu=ref.mu,
        sigma=ref.sigma,
        sha256=digest,
        source=source,
        path=Path(path),
        num_images=ref.num_images,
        cached=True,
        kid_features=None,
    )


def reference_from_data(
    model: torch.nn.Module,
    weights_sha256: str,
    data: str | Path,
    card: DatasetCard,
    splits: list[str] | tuple[str, ...],
    cache_dir: str | Path,
    *,
    batch: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ReferenceInfo:
    """Statistics of the prepared images of `splits` in the Inception feature space, cached by (data, weights,
    preprocessing). A cache hit reads the npz (no feature extraction); a damaged cache entry is recomputed."""
    from ctm_core.data.prepared import load_prepared
    from ctm_core.eval.inception import extract_features
    from ctm_core.eval.metrics import feature_statistics, load_reference_stats, save_reference_stats

    splits = tuple(splits)
    dhash = data_hash(card, splits)
    key = _cache_key(dhash, weights_sha256)
    path = Path(cache_dir) / "reference" / f"{key}.npz"
    if path.is_file():
        try:
            ref = load_reference_stats(path)
            if ref.meta.get("key") != key:
                raise ValueError(f"meta key {ref.meta.get('key')!r} != file name")
            _check_reference(str(path), ref.mu, ref.sigma, ref.mu.shape[0])
            with np.load(path, allow_pickle=False) as npz:
                kid_feats = npz["kid_features"].astype(np.float64) if "kid_features" in npz.files else None
            return ReferenceInfo(
                mu=ref.mu,
                sigma=ref.sigma,
                sha256=ref.sha256,
                source="data",
                path=path,
                num_images=ref.num_images,
                cached=True,
                kid_features=kid_feats,
                splits=splits,
                data_hash=dhash,
                key=key,
            )
        except (ValueError, OSError, KeyError) as e:
            logger.warning("cached statistics %s are unusable (%s); recomputing", path, one_line(e, limit=600))
    num_levels = card.image.num_levels
    images = np.concatenate([load_prepared(data, s)[0] for s in splits])  # (N, C, H, W) levels
    if len(images) < 2:
        raise FIDSetupError(f"evaluate.reference.splits: {list(splits)} hold {len(images)} images, need >= 2")
    t0 = time.perf_counter()
    feats = []
    step = 4096  # convert to uint8 chunk by chunk (float64 copies of 50k images would take 1.2 GB)
    for i in tqdm(
        range(0, len(images), step), desc="reference features", unit="chunk", disable=not progress, leave=False
    ):
        feats.append(
            extract_features(model, levels_to_uint8(images[i : i + step], num_levels), batch_size=batch, device=device)
        )
    f = np.concatenate(feats)  # (N, D) float64
    mu, sigma = feature_statistics(f)
    m = min(len(f), KID_REFERENCE_FEATURES)
    idx = np.sort(torch.randperm(len(f), generator=torch.Generator().manual_seed(0))[:m].numpy())
    meta = {
        "key": key,
        "data_hash": dhash,
        "splits": list(splits),
        "inception_sha256": weights_sha256,
        "preprocessing": PREPROCESS_VERSION,
        "num_images": int(len(f)),
        "format": CACHE_FORMAT,
        "data_source_sha256": card.source.sha256,
    }  # no timings: bytes = f(statistics)
    digest = save_reference_stats(
        path, mu, sigma, meta=meta, num_images=int(len(f)), extra={"kid_features": f[idx].astype(np.float32)}
    )
    logger.info("reference statistics of %d images -> %s (%.1f s)", len(f), path, time.perf_counter() - t0)
    return ReferenceInfo(
        mu=mu,
        sigma=sigma,
        sha256=digest,
        source="data",
        path=path,
        num_images=int(len(f)),
        cached=False,
        kid_features=f[idx],
        splits=splits,
        data_hash=dhash,
        key=key,
    )


def setup_inception_fid(
    params: Params,
    card: DatasetCard,
    data: str | Path,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> FIDSetup:
    """Weights, then a fetched reference (cheap checks first), then a data reference; raises FIDSetupError."""
    ev = params.evaluate
    cache = Path(resolve_path(ev.cache_dir, params.repo_root))
    model, digest, wpath = load_inception(params, progress=progress)
    dim = int(model.fc.in_features)
    ref = ev.reference
    if ref.source != "data":
        if ref.sha256 is None:
            raise FIDSetupError(f"evaluate.reference.sha256: required for {ref.source!r}, got null")
        src = resolve_path(ref.source, params.repo_root) if "://" not in ref.source else ref.source
        info = reference_from_file(src, ref.sha256, cache, dim=dim, progress=progress)
    else:
        info = reference_from_data(
            model, digest, data, card, ref.splits, cache, batch=ev.inception.batch, device=device, progress=progress
        )
    return FIDSetup(
        model=model, weights_sha256=digest, weights_path=wpath, weights_source=ev.inception.source, reference=info
    )


# --- protocol identity ------------------------------------------------------------------------------------------------
def protocol_dict(
    *,
    features: str,
    feature_net_sha256: str,
    reference_source: str,
    reference_sha256: str,
    num_samples: int,
    seed_start: int,
    preprocessing: str,
    feature_dim: int,
    set_size: int | None = None,
) -> dict[str, Any]:
    """What must be equal for two FIDs to be comparable (a promotion gate compares `protocol_sha256`); `set_size`:
    images per seed set when the FD is a mean over sets (docs/evaluation.md#seed-sets)."""
    protocol = {
        "features": features,
        "feature_net_sha256": feature_net_sha256,
        "feature_dim": int(feature_dim),
        "reference_source": reference_source,
        "reference_sha256": reference_sha256,
        "num_samples": int(num_samples),
        "seed_start": int(seed_start),
        "preprocessing": preprocessing,
    }
    if set_size is not None:
        protocol["set_size"] = int(set_size)
    return protocol


def protocol_sha256(protocol: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- entrypoint -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.support.fid_reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", required=True, help="prepared dataset folder (prepare stage)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    setup_logging()
    from ctm_core.data.prepared import load_card

    try:
        params = load_params(args.params, {"evaluate.features": "inception"}, check_env=False)
        card = load_card(args.data)
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        s = setup_inception_fid(params, card, args.data, device=dev, progress=not args.no_progress)
    except (ParamsError, FIDSetupError, FileNotFoundError, ValueError) as e:
        logger.error("error: %s", one_line(e, limit=600))
        return 2
    r = s.reference
    print(  # the CLI's machine-readable output (stdout)
        json.dumps(
            {
                "path": str(r.path),
                "sha256": r.sha256,
                "num_images": r.num_images,
                "cached": r.cached,
                "inception_sha256": s.weights_sha256,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
