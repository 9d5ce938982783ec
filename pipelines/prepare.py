"""DVC stage `prepare`: turn an image source into verified Parquet shards with a train / held-out split.

Sources (`--source`, `ctm_core.data.sources`): sklearn-digits (1,797 real 8x8 grey images, 17 levels, no
download), imagefolder (folder / .zip / .tar[.gz] of class folders), cifar10-python (the official
`cifar-10-python.tar.gz`), edm-zip (EDM `dataset_tool.py` output). A remote `--source-path` (https://, s3://,
file://) is fetched with its pinned `--source-sha256`.

Output (`--out`, replaced all-or-nothing; `ctm_core.data.writer`):
    card.json                       counts, image shape, num_levels, classes, shard sha256s, source sha256, params
                                    (`ctm_core.data.card.DatasetCard`)
    train/shard-00000.parquet ...   columns image (binary: raw uint8 C*H*W bytes, C-order), label (int64, -1 = none),
    heldout/shard-00000.parquet ... index (int64, position in the source order)

Pixels are stored as the source's raw levels (uint8 in 0..num_levels-1); map them to [-1, 1] with
`x / (num_levels - 1) * 2 - 1` (`levels_to_unit`), which for 8-bit data is EDM's `x / 127.5 - 1`
(training_loop.py:128).

`--dry-run` prints the resolved config as JSON on stdout (machine-readable) and writes nothing. Exit codes: 0 ok,
1 a bad source (every problem listed), 2 bad parameters.

The `data` section of `--params` (the whole file is validated first, `ctm_core.config`) says what to read; the
flags below override single keys of it.

Examples:
    python -m pipelines.prepare --params params.yaml --out data/prepared
    python -m pipelines.prepare --source imagefolder --source-path ../shared/data/cifar10-jpg/train.tar.gz \\
        --out data/prepared --heldout-fraction 0.02 --seed 0 --dry-run
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctm_core.config import ParamsError
from ctm_core.data.card import CARD_FORMAT
from ctm_core.data.sources import SOURCES, DatasetError, UnsafePickleError
from ctm_core.data.writer import split_indices
from pipelines.support.datasets import PrepareConfig, prepare_dataset, prepare_from_params
from pipelines.support.fetch import FetchError
from pipelines.support.io_utils import json_dumps
from pipelines.support.logs import progress_enabled, setup_logging
from pipelines.support.params import load_params

__all__ = [
    "CARD_FORMAT",
    "SOURCES",
    "DatasetError",
    "PrepareConfig",
    "UnsafePickleError",
    "main",
    "prepare_dataset",
    "split_indices",
]

logger = logging.getLogger(__name__)

# Convenience flags: each sets one key of the `data` section (what `--set data.<key>=...` would).
_FLAGS = {
    "source": "source",
    "source_path": "path",
    "source_sha256": "sha256",
    "heldout_fraction": "heldout_fraction",
    "seed": "seed",
    "shard_size": "shard_size",
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.prepare",
        description="Prepare an image dataset as Parquet shards + card.json (DVC stage 'prepare').",
        epilog=__doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", required=True, help="output folder (replaced all-or-nothing)")
    ap.add_argument("--params", default="params.yaml", help="params.yaml (validated whole; section `data`)")
    ap.add_argument("--source", choices=SOURCES, help="overrides data.source")
    ap.add_argument("--source-path", help="overrides data.path")
    ap.add_argument("--source-sha256", help="overrides data.sha256")
    ap.add_argument("--heldout-fraction", type=float, help="overrides data.heldout_fraction")
    ap.add_argument("--seed", type=int, help="overrides data.seed")
    ap.add_argument("--shard-size", type=int, help="overrides data.shard_size")
    ap.add_argument("--cache-dir", default=".cache/fetch", help="download cache for URI sources")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, write nothing")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = _parse_args(argv)
    overrides = {f"data.{key}": getattr(args, flag) for flag, key in _FLAGS.items() if getattr(args, flag) is not None}
    try:
        data = load_params(args.params, overrides).data
    except ParamsError as e:
        logger.error("params error: %s", e)
        return 2
    if args.dry_run:
        plan = {"config": data.model_dump(mode="json"), "out": str(args.out)}
        if data.path and "://" not in data.path:
            plan["source_exists"] = Path(data.path).expanduser().exists()
        print(json_dumps(plan), end="")  # the CLI's machine-readable output (stdout)
        return 0 if plan.get("source_exists", True) else 1
    try:
        card = prepare_from_params(
            data, args.out, cache_dir=args.cache_dir, progress=not args.no_progress and progress_enabled()
        )
    except (DatasetError, FetchError, ValueError, FileNotFoundError) as e:
        logger.error("error: %s", e)
        return 1
    counts = {name: split.count for name, split in card.splits.items()}
    logger.info("prepared %d images %s -> %s", card.count, counts, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
