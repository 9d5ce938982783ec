"""The prepare stage's work: resolve the source (local path or fetched URI), read it, write the prepared folder.

The readers and the shard / card writer are pure library code (`ctm_core.data.sources`, `ctm_core.data.writer`);
this module adds what belongs to the pipeline: the stage's parameters, the fetcher for remote sources and the
all-or-nothing output folder.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ctm_core.config import DataParams
from ctm_core.data.card import DatasetCard
from ctm_core.data.sources import SOURCES, DatasetError, read_source
from ctm_core.data.writer import write_prepared
from ctm_core.redact import redact_uri
from pipelines.support.io_utils import normalize_sha256, sha256_file, staged_dir

__all__ = ["PrepareConfig", "prepare_dataset", "prepare_from_params", "resolve_source"]

_DEFAULTS = DataParams.model_fields  # the one copy of the data section's defaults


@dataclass
class PrepareConfig:
    """The validated arguments of one `prepare_dataset` call, as recorded in the card's `params`.

    The stage fills them from the `data` section of params.yaml (`ctm_core.config.DataParams`, which holds the
    defaults); library callers pass them to `prepare_dataset` directly (a held-out fraction of 0 is allowed here).
    """

    source: str
    source_path: str | None
    source_sha256: str | None
    heldout_fraction: float
    seed: int
    shard_size: int

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"prepare.source: expected one of {list(SOURCES)}, got {self.source!r}")
        if self.source != "sklearn-digits" and not self.source_path:
            raise ValueError(f"prepare.source_path: required for source {self.source!r}, got {self.source_path!r}")
        if not (isinstance(self.heldout_fraction, int | float) and 0.0 <= float(self.heldout_fraction) < 1.0):
            raise ValueError(f"prepare.heldout_fraction: expected a number in [0, 1), got {self.heldout_fraction!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"prepare.seed: expected a non-negative int, got {self.seed!r}")
        if not isinstance(self.shard_size, int) or isinstance(self.shard_size, bool) or self.shard_size < 1:
            raise ValueError(f"prepare.shard_size: expected a positive int, got {self.shard_size!r}")
        if self.source_sha256 is not None:
            self.source_sha256 = normalize_sha256(self.source_sha256, name="prepare.source_sha256")


def resolve_source(config: PrepareConfig, cache_dir: str | os.PathLike[str] | None, progress: bool) -> Path | None:
    """Local path of the source; remote URIs go through pipelines.support.fetch (sha256 verified)."""
    if config.source == "sklearn-digits":
        return None
    assert config.source_path is not None
    scheme = urllib.parse.urlparse(config.source_path).scheme.lower()
    if scheme in ("http", "https", "s3", "file"):
        from pipelines.support.fetch import fetch

        if config.source_sha256 is None:
            raise ValueError(f"prepare.source_sha256: required to fetch {redact_uri(config.source_path)}, got None")
        if cache_dir is None:
            raise ValueError(f"cache_dir: required to fetch {redact_uri(config.source_path)}, got None")
        return fetch(config.source_path, cache_dir, sha256=config.source_sha256, progress=progress)
    path = Path(config.source_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"prepare.source_path: {path} does not exist")
    return path


def prepare_dataset(
    source: str,
    source_path: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    heldout_fraction: float = _DEFAULTS["heldout_fraction"].default,
    seed: int = _DEFAULTS["seed"].default,
    shard_size: int = _DEFAULTS["shard_size"].default,
    source_sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> DatasetCard:
    """Read `source`, split it and write shards + `card.json` to `out_dir` all-or-nothing; return the card.

    Raises DatasetError listing every corrupt / mixed-size image (nothing is written then), ValueError for bad
    parameters, and a sha256 mismatch error when `source_sha256` is given and does not match the source.
    """
    config = PrepareConfig(
        source=source,
        source_path=None if source_path is None else str(source_path),
        source_sha256=source_sha256,
        heldout_fraction=heldout_fraction,
        seed=seed,
        shard_size=shard_size,
    )
    path = resolve_source(config, cache_dir, progress)
    if path is not None and config.source_sha256 is not None and path.is_file():
        got = sha256_file(path)
        if got != config.source_sha256:
            raise DatasetError(
                f"prepare.source_sha256: expected {config.source_sha256}, got {got} for {path}: wrong or changed file"
            )
    loaded = read_source(config.source, path, progress)
    # The card names the source without secrets: a presigned URL's query or a URI's user-info grants access.
    recorded = dataclasses.replace(config, source_path=redact_uri(config.source_path))
    with staged_dir(out_dir) as tmp:
        card = write_prepared(
            loaded,
            tmp,
            source=recorded.source,
            source_path=recorded.source_path,
            heldout_fraction=recorded.heldout_fraction,
            seed=recorded.seed,
            shard_size=recorded.shard_size,
            params=dataclasses.asdict(recorded),
            progress=progress,
        )
    return card


def prepare_from_params(
    data: DataParams,
    out_dir: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> DatasetCard:
    """`prepare_dataset` for the validated `data` section. `data.path` is recorded in the card as written in
    params.yaml (relative to the repository root, where DVC runs the stage), so the card does not name the machine."""
    return prepare_dataset(
        data.source,
        data.path,
        out_dir,
        heldout_fraction=data.heldout_fraction,
        seed=data.seed,
        shard_size=data.shard_size,
        source_sha256=data.sha256,
        cache_dir=cache_dir,
        progress=progress,
    )
