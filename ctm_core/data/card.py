"""The dataset card: what the prepare stage wrote (`<dir>/card.json`), as a typed, validated, immutable object.

A card records the image geometry and number of levels, the labels, where the images came from, and per split the
Parquet shards with their row counts and sha256s. Every reader of prepared data goes through `DatasetCard.read`, so
a damaged or foreign card fails with one line naming the field before any work. On disk the JSON keys are the
`ctm-prepared/v1` layout (canonical JSON: sorted keys, 2-space indent); `write` reproduces it byte for byte.
See docs/data.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctm_core.errors import InputError
from ctm_core.io.atomic import atomic_write_bytes

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT",
    "SPLITS",
    "DatasetCard",
    "ImageSpec",
    "LabelSpec",
    "Shard",
    "SourceSpec",
    "Split",
]

CARD_FORMAT = "ctm-prepared/v1"
CARD_FILE = "card.json"
SPLITS = ("train", "heldout")
_FIX = "(fix: re-run the prepare stage: dvc repro prepare, or python -m pipelines.prepare)"


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """One image: `channels` x `height` x `width` uint8 raw levels 0..num_levels-1, stored C-order (CHW)."""

    channels: int
    height: int
    width: int
    num_levels: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return (self.channels, self.height, self.width)

    @property
    def max_level(self) -> int:
        return self.num_levels - 1

    @property
    def resolution(self) -> int | None:
        """H for square images, else None."""
        return self.height if self.height == self.width else None

    @property
    def bit_depth(self) -> int | None:
        """log2(num_levels) when that is an integer (8 for 8-bit data); None for e.g. the 17-level digits."""
        L = self.num_levels
        return L.bit_length() - 1 if L & (L - 1) == 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": "CHW",
            "dtype": "uint8",
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "resolution": self.resolution,
            "num_levels": self.num_levels,
            "max_level": self.max_level,
            "bit_depth": self.bit_depth,
            "to_unit_range": "x / max_level * 2 - 1",
            "parquet_encoding": "image column = raw uint8 bytes of one (C, H, W) image in C order",
        }


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """Class labels: `label_dim` classes named `class_names` (None and 0 when unlabelled; label -1 = none)."""

    label_dim: int
    class_names: tuple[str, ...] | None = None
    unlabelled_value = -1

    def to_dict(self) -> dict[str, Any]:
        names = None if self.class_names is None else list(self.class_names)
        return {"label_dim": self.label_dim, "class_names": names, "unlabelled_value": self.unlabelled_value}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where the images came from: prepare's `source` kind, its path or URI, sha256 and a one-line description."""

    kind: str
    path: str | None
    sha256: str
    description: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Shard:
    """One Parquet file of a split: path relative to the card's folder, row count, sha256 of the file."""

    path: str
    rows: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Split:
    """A split: image count, images per class (keys are class ids as strings; empty when unlabelled), shards."""

    count: int
    class_counts: dict[str, int]
    shards: tuple[Shard, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "class_counts": dict(self.class_counts),
            "shards": [s.to_dict() for s in self.shards],
        }


@dataclasses.dataclass(frozen=True)
class DatasetCard:
    """The card of a prepared dataset (module doc). `splits` holds SPLITS in order; `params` are the prepare
    parameters and `versions` the library versions that wrote the shards (both as recorded, read-only)."""

    count: int
    image: ImageSpec
    labels: LabelSpec
    source: SourceSpec
    splits: dict[str, Split]
    params: dict[str, Any]
    versions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of card.json."""
        return {
            "format": CARD_FORMAT,
            "count": self.count,
            "splits": {name: split.to_dict() for name, split in self.splits.items()},
            "image": self.image.to_dict(),
            "labels": self.labels.to_dict(),
            "source": self.source.to_dict(),
            "params": json.loads(json.dumps(self.params)),
            "versions": dict(self.versions),
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, 2-space indent, trailing newline): the bytes of card.json."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def write(self, folder: str | os.PathLike[str]) -> Path:
        """Write `folder/card.json` atomically (temp file + rename); returns its path."""
        return atomic_write_bytes(Path(folder) / CARD_FILE, self.to_json().encode("utf-8"))

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> DatasetCard:
        """Read and validate `folder/card.json`. FileNotFoundError when absent; InputError (one line) when invalid."""
        path = Path(folder) / CARD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the prepare stage (python -m pipelines.prepare) first")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: expected JSON, got a parse error ({e}) {_FIX}") from None
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: Any, *, where: str = CARD_FILE) -> DatasetCard:
        """Validate the JSON object of a card; raises InputError naming `where` and the field."""
        if not isinstance(raw, dict) or raw.get("format") != CARD_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise InputError(f"{where}: expected format {CARD_FORMAT!r}, got {got!r}")
        r = _Reader(where)
        im = r.mapping(raw, "image")
        if (im.get("layout"), im.get("dtype")) != ("CHW", "uint8"):
            raise InputError(
                f"{where}: image.layout/dtype: expected 'CHW'/'uint8', got {im.get('layout')!r}/{im.get('dtype')!r} "
                f"{_FIX}"
            )
        image = ImageSpec(
            channels=r.integer(im, "image.channels", lo=1),
            height=r.integer(im, "image.height", lo=1),
            width=r.integer(im, "image.width", lo=1),
            num_levels=r.integer(im, "image.num_levels", lo=2, hi=256),
        )
        lb = r.mapping(raw, "labels")
        label_dim = r.integer(lb, "labels.label_dim", lo=0)
        names = lb.get("class_names")
        if names is not None and not (
            isinstance(names, list) and len(names) == label_dim and all(isinstance(n, str) for n in names)
        ):
            raise InputError(
                f"{where}: labels.class_names: expected null or {label_dim} strings (label_dim), got {names!r} {_FIX}"
            )
        src = r.mapping(raw, "source")
        source = SourceSpec(
            kind=r.text(src, "source.kind"),
            path=r.text(src, "source.path", optional=True),
            sha256=r.text(src, "source.sha256"),
            description=r.text(src, "source.description"),
        )
        splits_raw = r.mapping(raw, "splits")
        if sorted(splits_raw) != sorted(SPLITS):
            raise InputError(f"{where}: splits: expected {list(SPLITS)}, got {sorted(splits_raw)} {_FIX}")
        splits = {name: r.split(splits_raw, name) for name in SPLITS}
        count = r.integer(raw, "count", lo=0)
        if sum(s.count for s in splits.values()) != count:
            raise InputError(
                f"{where}: count: expected the sum of the split counts "
                f"{sum(s.count for s in splits.values())}, got {count} {_FIX}"
            )
        return cls(
            count=count,
            image=image,
            labels=LabelSpec(label_dim=label_dim, class_names=None if names is None else tuple(names)),
            source=source,
            splits=splits,
            params=r.mapping(raw, "params"),
            versions=r.mapping(raw, "versions"),
        )


def _shown(value: str, limit: int = 200) -> str:
    """`value` quoted for a one-line message: control and format characters escaped, long values cut."""
    text = repr(value[:limit]).encode("ascii", "backslashreplace").decode("ascii")
    return text + (f"... ({len(value)} characters)" if len(value) > limit else "")


class _Reader:
    """Typed field access on the raw JSON with one-line InputErrors that name the card file and the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, expected: str, got: Any) -> InputError:
        return InputError(f"{self.where}: {key}: expected {expected}, got {got!r} {_FIX}")

    def mapping(self, d: dict, key: str) -> dict[str, Any]:
        v = d.get(key.rsplit(".", 1)[-1])
        if not isinstance(v, dict):
            raise self.fail(key, "an object", v)
        return v

    def integer(self, d: dict, key: str, *, lo: int, hi: int | None = None) -> int:
        v = d.get(key.rsplit(".", 1)[-1])
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise self.fail(key, f"an int >= {lo}" + (f" and <= {hi}" if hi is not None else ""), v)
        return v

    def text(self, d: dict, key: str, *, optional: bool = False) -> str | None:
        v = d.get(key.rsplit(".", 1)[-1])
        if not (isinstance(v, str) or (optional and v is None)):
            raise self.fail(key, "a string" + (" or null" if optional else ""), v)
        return v

    def shard_path(self, d: dict, key: str, split: str) -> str:
        """A shard path as the writer makes it: relative, '/'-separated, inside the split's folder (`<split>/...`).

        Readers join it to the card's folder (and download to it), so an absolute path, a `..`, a backslash or a
        control character would name a file outside that folder."""
        v = self.text(d, key)
        assert v is not None
        parts = v.split("/")
        if (
            len(parts) < 2
            or parts[0] != split
            or any(p in ("", ".", "..") for p in parts)
            or "\\" in v
            or any(unicodedata.category(c)[0] == "C" for c in v)
        ):
            raise InputError(
                f"{self.where}: {key}: expected a relative path inside the split folder ({split}/<file>, no '..', "
                f"no backslash, no control character), got {_shown(v)} (fix: the card was edited or is not a prepare "
                "output; re-run the prepare stage and upload its folder again)"
            )
        return v

    def split(self, splits: dict, name: str) -> Split:
        key = f"splits.{name}"
        s = self.mapping(splits, key)
        shards = s.get("shards")
        if not isinstance(shards, list):
            raise self.fail(f"{key}.shards", "a list", shards)
        parsed = []
        for i, sh in enumerate(shards):
            if not isinstance(sh, dict):
                raise self.fail(f"{key}.shards[{i}]", "an object", sh)
            parsed.append(
                Shard(
                    path=self.shard_path(sh, f"{key}.shards[{i}].path", name),
                    rows=self.integer(sh, f"{key}.shards[{i}].rows", lo=0),
                    sha256=self.text(sh, f"{key}.shards[{i}].sha256"),
                )
            )
        count = self.integer(s, f"{key}.count", lo=0)
        if sum(sh.rows for sh in parsed) != count:
            raise self.fail(f"{key}.count", f"the sum of its shard rows {sum(sh.rows for sh in parsed)}", count)
        cc = s.get("class_counts")
        if not isinstance(cc, Mapping) or not all(isinstance(v, int) and not isinstance(v, bool) for v in cc.values()):
            raise self.fail(f"{key}.class_counts", "an object of class id -> int", cc)
        return Split(count=count, class_counts=dict(cc), shards=tuple(parsed))
