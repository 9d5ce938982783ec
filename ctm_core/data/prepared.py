"""Reading the prepare stage's output: `card.json` and the Parquet shards of each split.

Layout (written by `pipelines/prepare.py`): `<dir>/card.json` (format `ctm-prepared/v1`, `ctm_core.data.card`: image
shape and number of levels, labels, and per split the shards with their row count and sha256) and
`<dir>/<split>/*.parquet` with columns `image` (C·H·W raw bytes, one image per row) and `label` (int64,
-1 = unlabelled). See docs/data.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ctm_core.data.card import CARD_FORMAT, SPLITS, DatasetCard
from ctm_core.io.hashing import sha256_file

__all__ = ["CARD_FORMAT", "SPLITS", "DatasetCard", "decode_images", "levels_to_unit", "load_card", "load_prepared"]


def load_card(out_dir: str | os.PathLike[str]) -> DatasetCard:
    """Read and validate `out_dir/card.json` (`DatasetCard.read`)."""
    return DatasetCard.read(out_dir)


def load_prepared(out_dir: str | os.PathLike[str], split: str, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load a split written by the prepare stage.

    Returns:
        images: (N, C, H, W) uint8 raw levels (0..num_levels-1, see `card.image`), labels: (N,) int64 (-1 = none).
    Raises:
        ValueError when a shard's sha256 or row count differs from the card (verify=True).
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    root = Path(out_dir)
    card = load_card(root)
    shape = card.image.shape
    images, labels = [], []
    for shard in card.splits[split].shards:
        p = root / shard.path
        if verify:
            got = sha256_file(p)
            if got != shard.sha256:
                raise ValueError(
                    f"{p}: sha256 expected {shard.sha256} (card.json), got {got}: the shard was modified or "
                    "corrupted; re-run the prepare stage (dvc repro) or dvc checkout"
                )
        table = pq.read_table(p, columns=["image", "label"])
        if table.num_rows != shard.rows:
            raise ValueError(f"{p}: expected {shard.rows} rows (card.json), got {table.num_rows}")
        images.append(decode_images(table, shape, p))
        labels.append(table.column("label").to_numpy().astype(np.int64))
    if not images:
        return np.zeros((0, *shape), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    return np.concatenate(images), np.concatenate(labels)


def decode_images(table, shape: tuple[int, int, int], where: object) -> np.ndarray:
    """The ``image`` column of a shard's Arrow table as (R, C, H, W) uint8; ValueError naming `where` on bad sizes."""
    nbytes = int(np.prod(shape))
    blob = b"".join(table.column("image").to_pylist())
    if len(blob) != table.num_rows * nbytes:
        raise ValueError(f"{where}: expected {table.num_rows} images of {nbytes} bytes, got {len(blob)} bytes")
    return np.frombuffer(blob, dtype=np.uint8).reshape(-1, *shape)


def levels_to_unit(images: np.ndarray | torch.Tensor, num_levels: int) -> np.ndarray | torch.Tensor:
    """Map integer levels (N, C, H, W) in 0..num_levels-1 to float32 `level / (L − 1) · 2 − 1` in [-1, 1].

    For 8-bit data this is EDM's `x / 127.5 - 1` (docs/data.md#levels). numpy in, numpy out; torch in, torch out
    (the same float32 arithmetic). Raises ValueError / TypeError for float input or levels outside the range.
    """
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"levels_to_unit: num_levels must be an int >= 2, got {num_levels!r}")
    is_torch = isinstance(images, torch.Tensor)
    x = images if is_torch else np.asarray(images)
    if x.dtype in (torch.bool, np.bool_) or (
        x.is_floating_point() if is_torch else not np.issubdtype(x.dtype, np.integer)
    ):
        raise TypeError(f"levels_to_unit: expected integer levels, got dtype {x.dtype}")
    if x.numel() if is_torch else x.size:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= num_levels:
            raise ValueError(f"levels_to_unit: levels must lie in [0, {num_levels - 1}], got [{lo}, {hi}]")
    if is_torch:
        return x.to(torch.float32) / (num_levels - 1) * 2 - 1
    return (x.astype(np.float32) / np.float32(num_levels - 1)) * 2.0 - 1.0
