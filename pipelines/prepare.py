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

Examples:
    python -m pipelines.prepare --source sklearn-digits --out data/prepared
    python -m pipelines.prepare --source imagefolder --source-path ../shared/data/cifar10-jpg/train.tar.gz \\
        --out data/prepared --heldout-fraction 0.02 --seed 0 --dry-run
    python -m pipelines.prepare --params params.yaml --params-section data --out data/prepared
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from ctm_core.data.card import CARD_FORMAT
from ctm_core.data.sources import SOURCES, DatasetError, UnsafePickleError
from ctm_core.data.writer import split_indices
from pipelines.support.datasets import PrepareConfig, prepare_dataset
from pipelines.support.fetch import FetchError
from pipelines.support.io_utils import json_dumps
from pipelines.support.logs import progress_enabled, setup_logging

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

# pipelines/config.py DataParams spells source_path as `path` (and a pinned hash as `sha256`).
_PARAM_ALIASES = {"path": "source_path", "sha256": "source_sha256"}


def _parse_args(argv: list[str] | None) -> tuple[PrepareConfig, argparse.Namespace]:
    """The config: the `--params` section (if given) overridden by the CLI flags; raises ValueError."""
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.prepare",
        description="Prepare an image dataset as Parquet shards + card.json (DVC stage 'prepare').",
        epilog=__doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", required=True, help="output folder (replaced all-or-nothing)")
    ap.add_argument("--params", help="params.yaml to read the section from (CLI flags override it)")
    ap.add_argument("--params-section", default="data", help="section of --params (default: data)")
    ap.add_argument("--source", choices=SOURCES)
    ap.add_argument("--source-path")
    ap.add_argument("--source-sha256")
    ap.add_argument("--heldout-fraction", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--shard-size", type=int)
    ap.add_argument("--cache-dir", default=".cache/fetch", help="download cache for URI sources")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, write nothing")
    args = ap.parse_args(argv)
    values: dict[str, Any] = {}
    if args.params:
        import yaml

        with open(args.params, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        section = doc.get(args.params_section)
        if not isinstance(section, dict):
            raise ValueError(
                f"--params {args.params}: expected a mapping under {args.params_section!r}, got {section!r}"
            )
        section = {_PARAM_ALIASES.get(k, k): v for k, v in section.items()}
        fields = {f.name for f in dataclasses.fields(PrepareConfig)}
        unknown = sorted(set(section) - fields)
        if unknown:
            raise ValueError(
                f"--params {args.params} [{args.params_section}]: unknown keys {unknown}, known {sorted(fields)}"
            )
        values.update(section)
    for field in dataclasses.fields(PrepareConfig):
        v = getattr(args, field.name)
        if v is not None:
            values[field.name] = v
    return PrepareConfig(**values), args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        config, args = _parse_args(argv)
    except ValueError as e:
        logger.error("error: %s", e)
        return 2
    if args.dry_run:
        plan = {"config": dataclasses.asdict(config), "out": str(args.out)}
        if config.source_path and "://" not in config.source_path:
            plan["source_exists"] = Path(config.source_path).expanduser().exists()
        print(json_dumps(plan), end="")  # the CLI's machine-readable output (stdout)
        return 0 if plan.get("source_exists", True) else 1
    try:
        card = prepare_dataset(
            config.source,
            config.source_path,
            args.out,
            heldout_fraction=config.heldout_fraction,
            seed=config.seed,
            shard_size=config.shard_size,
            source_sha256=config.source_sha256,
            cache_dir=args.cache_dir,
            progress=not args.no_progress and progress_enabled(),
        )
    except (DatasetError, FetchError, ValueError, FileNotFoundError) as e:
        logger.error("error: %s", e)
        return 1
    counts = {name: split.count for name, split in card.splits.items()}
    logger.info("prepared %d images %s -> %s", card.count, counts, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
