"""Writing a prepared dataset: the seeded train / held-out split, the Parquet shards and the dataset card.

Shard columns: `image` (binary: raw uint8 C·H·W bytes, C-order), `label` (int64, -1 = none), `index` (int64, the
image's position in the source order); the schema metadata records the image shape. The same source, parameters
and library versions give byte-identical shards and card. See docs/data.md.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ctm_core.data.card import SPLITS, DatasetCard, ImageSpec, LabelSpec, Shard, SourceSpec, Split
from ctm_core.data.sources import DatasetError, SourceImages
from ctm_core.io.hashing import sha256_file

__all__ = ["split_indices", "write_prepared", "write_shard", "write_split"]


def split_indices(labels: np.ndarray, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / held-out split of range(N), stratified by class when every image is labelled.

    Args:
        labels: (N,) int64, -1 = unlabelled.
    Returns:
        (train_idx, heldout_idx), each sorted ascending; round(n_c * heldout_fraction) held out per class c.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    stratify = labels.size > 0 and bool((labels >= 0).all())
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if stratify else [np.arange(labels.size)]
    held = [rng.permutation(g)[: int(round(len(g) * heldout_fraction))] for g in groups]
    heldout = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(labels.size), heldout, assume_unique=True)
    return train.astype(np.int64), heldout.astype(np.int64)


def write_split(
    root: Path,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    idx: np.ndarray,
    shard_size: int,
    progress: bool = False,
) -> tuple[Shard, ...]:
    """Write images[idx] (N, C, H, W) uint8 and labels[idx] as `root/<split>/shard-00000.parquet` ... of
    `shard_size` rows each; returns the shards (path relative to `root`, rows, sha256)."""
    (root / split).mkdir()
    shards = []
    starts = range(0, len(idx), shard_size)
    for k, start in enumerate(tqdm(starts, desc=f"write {split}", unit="shard", disable=not progress, leave=False)):
        sel = idx[start : start + shard_size]
        rel = f"{split}/shard-{k:05d}.parquet"
        shards.append(write_shard(root, rel, images[sel], labels[sel], sel))
    return tuple(shards)


def write_shard(root: Path, rel: str, images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> Shard:
    """Write images (n, C, H, W) uint8, labels (n,) and source positions `index` (n,) as the one-row-group Parquet
    shard `root/rel`; returns its `Shard` (path, rows, sha256)."""
    C, H, W = images.shape[1:]
    meta = {b"ctm.image_shape": json.dumps([int(C), int(H), int(W)]).encode(), b"ctm.image_dtype": b"uint8"}
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())], metadata=meta)
    block = np.ascontiguousarray(images).reshape(len(images), -1)  # (n, C*H*W)
    table = pa.table(
        {"image": pa.array([r.tobytes() for r in block], pa.binary()), "label": labels, "index": index},
        schema=schema,
    )
    pq.write_table(table, root / rel, compression="zstd", row_group_size=len(images))
    return Shard(path=rel, rows=int(len(images)), sha256=sha256_file(root / rel))


def write_prepared(
    loaded: SourceImages,
    folder: str | os.PathLike[str],
    *,
    source: str,
    source_path: str | None,
    heldout_fraction: float,
    seed: int,
    shard_size: int,
    params: Mapping[str, Any],
    progress: bool = False,
) -> DatasetCard:
    """Split `loaded`, write its shards and `card.json` into the empty `folder`; return the card.

    `source` / `source_path` are recorded in the card's `source`, `params` (the prepare parameters) as its `params`.
    Raises DatasetError when a pixel level is not below the source's number of levels.
    """
    folder = Path(folder)
    images, labels = loaded.images, loaded.labels  # (N, C, H, W) uint8, (N,) int64
    N, C, H, W = images.shape
    if int(images.max(initial=0)) >= loaded.num_levels:
        raise DatasetError(f"{source}: pixel level {int(images.max())} >= num_levels {loaded.num_levels}")
    train_idx, heldout_idx = split_indices(labels, heldout_fraction, seed)
    labelled = bool(labels.size and (labels >= 0).all())
    label_dim = len(loaded.class_names) if (labelled and loaded.class_names) else 0
    splits = {}
    for split, idx in zip(SPLITS, (train_idx, heldout_idx), strict=True):
        shards = write_split(folder, split, images, labels, idx, shard_size, progress)
        counts = Counter(labels[idx].tolist()) if labelled else Counter()
        splits[split] = Split(
            count=int(len(idx)),
            class_counts={str(k): int(v) for k, v in sorted(counts.items())},
            shards=shards,
        )
    card = DatasetCard(
        count=int(N),
        image=ImageSpec(channels=int(C), height=int(H), width=int(W), num_levels=int(loaded.num_levels)),
        labels=LabelSpec(label_dim=int(label_dim), class_names=tuple(loaded.class_names) if label_dim else None),
        source=SourceSpec(kind=source, path=source_path, sha256=loaded.source_sha256, description=loaded.description),
        splits=splits,
        params=dict(params),
        versions={"numpy": np.__version__, "pyarrow": pa.__version__},
    )
    card.write(folder)
    return card
