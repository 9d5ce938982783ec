"""ShardStream's order (docs/data_streaming.md#design): every epoch visits each row once, a window's positions come
from its own shards only, epochs differ, and the order depends on (seed, position) alone."""

from __future__ import annotations

import numpy as np
import torch

from ctm_core.data.card import DatasetCard, ImageSpec, LabelSpec, SourceSpec, Split
from ctm_core.data.stream import ShardStream
from ctm_core.data.writer import write_shard

ROWS = (5, 5, 5, 5, 5, 3)  # 6 shards, the last one short: N = 28


def _card(root) -> DatasetCard:
    rng = np.random.default_rng(0)
    splits, at = {}, 0
    for split, sizes in (("train", ROWS), ("heldout", (2,))):
        (root / split).mkdir()
        shards = []
        for k, n in enumerate(sizes):
            images = rng.integers(0, 4, size=(n, 1, 2, 2), dtype=np.uint8)
            shards.append(write_shard(root, f"{split}/shard-{k:05d}.parquet", images, np.full(n, -1), np.arange(n)))
            at += n
        splits[split] = Split(count=sum(sizes), class_counts={}, shards=tuple(shards))
    card = DatasetCard(
        count=at,
        image=ImageSpec(channels=1, height=2, width=2, num_levels=4),
        labels=LabelSpec(label_dim=0),
        source=SourceSpec(kind="synthetic", path=None, sha256="0" * 64, description="test"),
        splits=splits,
        params={},
        versions={},
    )
    card.write(root)
    return card


def test_epochs_windows_and_keys(tmp_path):
    card = _card(tmp_path)
    N = sum(ROWS)
    stream = ShardStream(card, tmp_path, seed=3, window_shards=4)
    shard, row = stream.locate(torch.arange(3 * N))
    for e in range(3):
        pairs = list(zip(shard[e * N : (e + 1) * N].tolist(), row[e * N : (e + 1) * N].tolist(), strict=True))
        assert sorted(pairs) == [(k, r) for k, n in enumerate(ROWS) for r in range(n)], e  # each row once
        # windows of 4 shards: the epoch splits into a prefix holding all rows of 4 shards, the rest the other 2
        ks = shard[e * N : (e + 1) * N].tolist()
        cuts = [c for c in range(1, N) if not set(ks[:c]) & set(ks[c:])]
        assert any(len(set(ks[:c])) == 4 and c == sum(ROWS[k] for k in set(ks[:c])) for c in cuts), (e, cuts)
    assert not torch.equal(shard[:N], shard[N : 2 * N])  # another epoch, another order
    again = ShardStream(card, tmp_path, seed=3, window_shards=4)
    s2, r2 = again.locate(torch.arange(3 * N).flip(0))  # any query order: a pure function of the position
    assert torch.equal(s2.flip(0), shard) and torch.equal(r2.flip(0), row)
    other = ShardStream(card, tmp_path, seed=4, window_shards=4)
    assert not torch.equal(other.locate(torch.arange(N))[0], shard[:N])
