"""Streaming a prepared split: a block-shuffled row order keyed by (seed, position), read shard by shard.

Memory per reader is bounded by ``cache_shards`` decoded shards (one Parquet row group each, as the prepare stage
writes them) plus the batch, not by the dataset (docs/data_streaming.md#design). The order is a pure function of
(seed, global row position): epoch e = position // N permutes the shards (key (seed, "stream_shards", e)), cuts
the permuted list into windows of ``window_shards`` shards, and permutes the rows of window w (key (seed,
"stream_rows", e, w)). A data-parallel rank asks only for the rows of its own microbatches and reads only the
shards that hold them. Each shard is read whole, its sha256 checked against the card, then decoded from the
verified bytes (docs/data_streaming.md#checksums), from a local folder or any pyarrow filesystem (s3://).

Legend: N rows in the split, S shards, B global batch, C/H/W image channels/height/width, L label dimension.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ctm_core.data.card import SPLITS, DatasetCard
from ctm_core.data.prepared import decode_images, levels_to_unit
from ctm_core.errors import InputError
from ctm_core.redact import redact_uri
from ctm_core.training.loop import derive_seed

__all__ = ["ShardStream", "open_filesystem"]

_FIX = "re-run the prepare stage (dvc repro prepare) or re-upload the folder (aws s3 sync / dvc push)"


def open_filesystem(root: str | os.PathLike[str]):
    """(pyarrow filesystem, base path) of a prepared folder: a local path or a URI such as ``s3://bucket/prefix``.

    S3 reads use pyarrow's ``S3FileSystem`` with the usual AWS variables (``AWS_ENDPOINT_URL`` included)."""
    from pyarrow import fs

    root = os.fspath(root)
    if "://" in root:
        filesystem, path = fs.FileSystem.from_uri(root)
        return filesystem, path.rstrip("/")
    return fs.LocalFileSystem(), os.path.abspath(root)


class ShardStream:
    """Keyed, block-shuffled rows of one split of a prepared folder (docs/data_streaming.md#design).

    Args:
        card: the folder's ``DatasetCard`` (shard paths, row counts, sha256s).
        root: the folder (local path or ``s3://`` URI); or give ``filesystem`` and ``root`` as its path there.
        seed: the run seed (``distill.seed``).
        window_shards: shards per shuffle window (``distill.stream_window_shards``).
        cache_shards: decoded shards kept (default ``window_shards``: each shard is read once per epoch per reader).
        on_load: called with the shard index after each shard read (tests count reads with it).

    The trainer protocol (``ctm_core.training.loop.Trainer``): ``read_global_batch(B, rows)`` returns rows ``rows``
    of the next global batch of B rows as (x (n, C, H, W) float32 in [-1, 1], one-hot labels (n, L) or None) and
    advances the position by B; ``state_dict()`` / ``load_state_dict()`` hold the position (rows consumed).
    """

    def __init__(
        self,
        card: DatasetCard,
        root: str | os.PathLike[str],
        *,
        seed: int,
        window_shards: int,
        split: str = "train",
        cache_shards: int | None = None,
        filesystem=None,
        on_load: Callable[[int], None] | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
        if window_shards < 1 or (cache_shards is not None and cache_shards < 1):
            raise ValueError(f"window_shards, cache_shards: expected >= 1, got {window_shards!r}, {cache_shards!r}")
        self.card, self.split = card, split
        self.shards = card.splits[split].shards
        if not self.shards:
            raise InputError(f"card.json: the {split} split has no shards; {_FIX}")
        self.fs, self.base = (filesystem, os.fspath(root)) if filesystem is not None else open_filesystem(root)
        self.where = redact_uri(os.fspath(root).rstrip("/"))  # as given (s3://...), for messages
        self.seed, self.window_shards = int(seed), int(window_shards)
        self.cache_shards = int(cache_shards or window_shards)
        self.on_load = on_load
        self.shard_rows = torch.tensor([s.rows for s in self.shards], dtype=torch.int64)  # (S,)
        self.num_rows = int(self.shard_rows.sum())
        if self.num_rows != card.splits[split].count:
            raise InputError(
                f"card.json: the {split} shards hold {self.num_rows} rows, the split lists "
                f"{card.splits[split].count}; {_FIX}"
            )
        self.position = 0  # global rows consumed
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._layout: tuple[int, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None = None
        self._window_perm: dict[tuple[int, int], torch.Tensor] = {}

    # -- the order (a pure function of seed and position) --------------------------------------------------------
    def _epoch_layout(self, e: int):
        """Epoch e's windows: [(shard ids (m,), cumulative row starts (m,))] and each window's first row (n_w,)."""
        if self._layout is None or self._layout[0] != e:
            g = torch.Generator().manual_seed(derive_seed(self.seed, 0, "stream_shards", e))
            order = torch.randperm(len(self.shards), generator=g)  # (S,)
            windows, starts, at = [], [], 0
            for w0 in range(0, len(order), self.window_shards):
                ids = order[w0 : w0 + self.window_shards]
                rows = self.shard_rows[ids]
                windows.append((ids, torch.cumsum(rows, 0) - rows))
                starts.append(at)
                at += int(rows.sum())
            self._layout = (e, windows, torch.tensor(starts))
            self._window_perm = {}
        return self._layout[1], self._layout[2]

    def locate(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global row positions (n,) int64 -> (shard index (n,), row within the shard (n,)).

        Position p is row p mod N of epoch p // N (docs/data_streaming.md#design)."""
        positions = torch.as_tensor(positions, dtype=torch.int64)
        shard, row = torch.empty_like(positions), torch.empty_like(positions)
        epochs = positions // self.num_rows
        for e in torch.unique(epochs).tolist():
            sel = epochs == e
            offset = positions[sel] - e * self.num_rows
            windows, starts = self._epoch_layout(e)
            w_of = torch.searchsorted(starts, offset, right=True) - 1
            s_out, r_out = torch.empty_like(offset), torch.empty_like(offset)
            for w in torch.unique(w_of).tolist():
                m = w_of == w
                ids, cum = windows[w]
                key = (e, w)
                if key not in self._window_perm:
                    n_w = int(self.shard_rows[ids].sum())
                    g = torch.Generator().manual_seed(derive_seed(self.seed, 0, "stream_rows", e, w))
                    self._window_perm[key] = torch.randperm(n_w, generator=g)  # (n_w,)
                j = self._window_perm[key][offset[m] - starts[w]]  # row within the window
                k = torch.searchsorted(cum, j, right=True) - 1
                s_out[m], r_out[m] = ids[k], j - cum[k]
            shard[sel], row[sel] = s_out, r_out
        return shard, row

    # -- reading --------------------------------------------------------------------------------------------------

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard k decoded: images (R, C, H, W) uint8, labels (R,) int64; read and verified when not cached."""
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        spec = self.shards[k]
        uri = f"{self.where}/{spec.path}"
        with self.fs.open_input_stream(f"{self.base}/{spec.path}") as f:
            blob = f.read()  # one shard: the reader's buffer (docs/data_streaming.md#memory)
        got = hashlib.sha256(blob).hexdigest()
        if got != spec.sha256:
            raise InputError(
                f"{uri}: sha256 expected {spec.sha256} (card.json), got {got}: the shards changed after the "
                f"prepare stage wrote them; {_FIX}"
            )
        table = pq.ParquetFile(pa.BufferReader(blob)).read(columns=["image", "label"])
        del blob
        if table.num_rows != spec.rows:
            raise InputError(f"{uri}: expected {spec.rows} rows (card.json), got {table.num_rows}; {_FIX}")
        decoded = (decode_images(table, self.card.image.shape, uri), table.column("label").to_numpy().astype(np.int64))
        while len(self._cache) >= self.cache_shards:
            self._cache.popitem(last=False)
        self._cache[k] = decoded
        if self.on_load is not None:
            self.on_load(k)
        return decoded

    def read_positions(self, positions: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Rows at global positions (n,): images (n, C, H, W) uint8 levels, labels (n,) int64 (-1 = none)."""
        shard, row = self.locate(positions)
        images = np.empty((len(shard), *self.card.image.shape), dtype=np.uint8)
        labels = np.empty(len(shard), dtype=np.int64)
        for k in torch.unique(shard).tolist():  # shard by shard: at most cache_shards + 1 decoded at once
            m = (shard == k).numpy()
            imgs, labs = self._shard(k)
            images[m], labels[m] = imgs[row[m].numpy()], labs[row[m].numpy()]
        return images, labels

    def read_global_batch(self, batch: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``rows`` (n,) of the next global batch of ``batch`` rows: x (n, C, H, W) float32, labels (n, L)."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= batch):
            raise ValueError(f"rows: expected indices in [0, {batch}), got [{int(rows.min())}, {int(rows.max())}]")
        images, labels = self.read_positions(self.position + rows)
        self.position += int(batch)
        x = torch.from_numpy(levels_to_unit(images, self.card.image.num_levels))
        L = self.card.labels.label_dim
        onehot = torch.nn.functional.one_hot(torch.from_numpy(labels), L).float() if L else None
        return x, onehot

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The position; a ``TensorDataSource`` state (epoch, index) of the same split maps to epoch·N + index."""
        if "position" in state:
            self.position = int(state["position"])
        else:
            self.position = int(state["epoch"]) * self.num_rows + int(state["index"])
