"""DVC stage `prepare`: turn an image source into verified Parquet shards with a train / held-out split.

Sources (`--source`):
    sklearn-digits  `sklearn.datasets.load_digits` (1,797 real 8x8 grey images, 17 levels 0..16; no download).
    imagefolder     a folder, `.zip` or `.tar[.gz|.bz2|.xz]` of class folders (`<root>/<class>/<img>`; labels from
                    the sorted class-folder names, like EDM dataset_tool.py:57-84; images directly in the root are
                    unlabelled). Tar members are streamed, never extracted to disk.
    cifar10-python  the official `cifar-10-python.tar.gz`: the 50,000 training images of data_batch_1..5 in order
                    (EDM dataset_tool.py:141-169), read with an allow-list unpickler.
    edm-zip         EDM `dataset_tool.py` output (`00000/img00000000.png` + `dataset.json` with labels or null),
                    as `.zip` or folder (EDM_FACTS A5).

Output (`--out`, replaced all-or-nothing):
    card.json                       counts, image shape, num_levels, classes, shard sha256s, source sha256, params
    train/shard-00000.parquet ...   columns image (binary: raw uint8 C*H*W bytes, C-order), label (int64, -1 = none),
    heldout/shard-00000.parquet ... index (int64, position in the source order)

Pixels are stored as the source's raw levels (uint8 in 0..num_levels-1); map them to [-1, 1] with
`x / (num_levels - 1) * 2 - 1` (`levels_to_unit`), which for 8-bit data is EDM's `x / 127.5 - 1`
(training_loop.py:128).

Examples:
    python -m pipelines.prepare --source sklearn-digits --out data/prepared
    python -m pipelines.prepare --source imagefolder --source-path ../shared/data/cifar10-jpg/train.tar.gz \\
        --out data/prepared --heldout-fraction 0.02 --seed 0 --dry-run
    python -m pipelines.prepare --params params.yaml --params-section data --out data/prepared
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import lzma
import os
import pickle
import sys
import tarfile
import urllib.parse
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ctm_core.data.prepared import CARD_FORMAT
from pipelines.support.fetch import FetchError
from pipelines.support.io_utils import (
    atomic_write_json,
    json_dumps,
    normalize_sha256,
    sha256_file,
    staged_dir,
)

__all__ = [
    "CARD_FORMAT",
    "SOURCES",
    "DatasetError",
    "PrepareConfig",
    "UnsafePickleError",
    "prepare_dataset",
    "split_indices",
]

SOURCES = ("sklearn-digits", "imagefolder", "cifar10-python", "edm-zip")
MAX_LISTED_PROBLEMS = 50
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class DatasetError(ValueError):
    """The source has problems (corrupt / mixed-size images, bad labels, bad layout); the message lists them."""


class UnsafePickleError(DatasetError):
    """A pickle in the source references a global outside the allow-list (possible code execution)."""


@dataclass
class PrepareConfig:
    """Parameters of the prepare stage (`params.yaml` section, keys = field names)."""

    source: str = "sklearn-digits"
    """One of SOURCES."""
    source_path: str | None = None
    """Path or URI (https://, s3://, file://) of the source; unused for sklearn-digits."""
    source_sha256: str | None = None
    """Expected sha256 of the source file; required when source_path is a remote URI."""
    heldout_fraction: float = 0.1
    """Fraction of images in the held-out split, per class when labelled; 0 <= f < 1."""
    seed: int = 0
    """Seed of the split permutation (numpy.random.default_rng)."""
    shard_size: int = 10_000
    """Images per Parquet shard."""

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


@dataclass
class _Loaded:
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    class_names: list[str] | None
    num_levels: int
    description: str
    source_sha256: str


# --- reading members of folders and archives --------------------------------------------------------------------
def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(_ARCHIVE_SUFFIXES)


def _skip_member(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _iter_members(path: Path, progress: bool, desc: str) -> Iterator[tuple[str, bytes]]:
    """Yield (relative posix name, bytes) of every regular file in a folder, .zip or tar archive (streamed)."""
    bar = tqdm(desc=desc, unit="file", disable=not progress, leave=False)
    try:
        yield from _iter_members_raw(path, bar)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        raise DatasetError(
            f"cannot read {path} ({type(e).__name__}: {e}): check the file (a truncated or corrupt archive?)"
        ) from None
    finally:
        bar.close()


def _iter_members_raw(path: Path, bar: tqdm) -> Iterator[tuple[str, bytes]]:
    """Unwrapped `_iter_members` (no error translation)."""
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if p.is_file() and not p.is_symlink() and not _skip_member(rel):
                bar.update()
                yield rel, p.read_bytes()
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir() and not _skip_member(info.filename):
                    bar.update()
                    yield info.filename, zf.read(info)
    elif _is_archive(path):
        # "r|*": sequential stream, transparent compression; extractfile reads the current member only.
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                if member.isfile() and not _skip_member(member.name):
                    f = tf.extractfile(member)
                    assert f is not None
                    bar.update()
                    yield member.name.removeprefix("./"), f.read()
    else:
        raise DatasetError(f"source_path: expected a folder, .zip or .tar[.gz] archive, got {path}")


def _image_extensions() -> set[str]:
    from PIL import Image

    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _decode_image(data: bytes) -> np.ndarray:
    """Decode one image file to uint8 (C, H, W); C = 1 for 'L', 3 for 'RGB'. Raises ValueError on anything else."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode == "L":
                arr = np.asarray(img, dtype=np.uint8)[None]  # (1, H, W)
            elif img.mode == "RGB":
                arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
            else:
                raise ValueError(f"unsupported image mode {img.mode!r} (expected 'L' or 'RGB')")
    return np.ascontiguousarray(arr)


def _stack_checked(arrays: list[np.ndarray], names: list[str], problems: list[str]) -> np.ndarray | None:
    """Stack (C, H, W) arrays; images whose shape differs from the most common one are added to `problems`."""
    if not arrays:
        return None
    shapes = Counter(a.shape for a in arrays)
    ref = shapes.most_common(1)[0][0]
    for a, n in zip(arrays, names, strict=True):
        if a.shape != ref:
            problems.append(f"{n}: size {'x'.join(map(str, a.shape))} (CxHxW), expected {'x'.join(map(str, ref))}")
    if len(shapes) > 1:
        return None
    return np.stack(arrays)


def _raise_problems(source: str, problems: list[str]) -> None:
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DatasetError(
            f"{len(problems)} problem(s) in {source}; fix or remove these files and re-run:\n  - "
            + "\n  - ".join(shown)
            + more
        )


def _source_hash(path: Path, manifest: hashlib._Hash) -> str:
    return sha256_file(path) if path.is_file() else manifest.hexdigest()


# --- sources ----------------------------------------------------------------------------------------------------
def _load_sklearn_digits() -> _Loaded:
    import sklearn
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.asarray(d.images)  # (1797, 8, 8) float64 holding integer levels 0..16
    if not (np.array_equal(x, np.round(x)) and x.min() >= 0 and x.max() <= 16):
        raise DatasetError(f"sklearn digits: expected integer levels in 0..16, got range [{x.min()}, {x.max()}]")
    images = x.astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = np.asarray(d.target, dtype=np.int64)
    h = hashlib.sha256(images.tobytes())
    h.update(labels.tobytes())
    return _Loaded(
        images=images,
        labels=labels,
        class_names=[str(c) for c in d.target_names],
        num_levels=17,
        description=f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}): 8x8 UCI digits, levels 0..16",
        source_sha256=h.hexdigest(),
    )


def _load_imagefolder(path: Path, progress: bool) -> _Loaded:
    exts = _image_extensions()
    problems: list[str] = []
    entries: list[tuple[str, np.ndarray]] = []
    manifest = hashlib.sha256()
    for rel, data in _iter_members(path, progress, desc=f"decode {path.name}"):
        if os.path.splitext(rel)[1].lower() not in exts:
            continue
        manifest.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
        try:
            entries.append((rel, _decode_image(data)))
        except Exception as e:  # noqa: BLE001 (any decoder failure is a problem to report)
            problems.append(f"{rel}: cannot decode ({type(e).__name__}: {e})")
    entries.sort(key=lambda e: e[0])  # archive member order is arbitrary; EDM sorts by relative path
    names = [n for n, _ in entries]
    bad_names = {p.split(":")[0] for p in problems}
    if not names and not bad_names:
        raise DatasetError(f"imagefolder: no image files found in {path} (extensions: {sorted(exts)[:8]}...)")

    # Strip wrapper folders shared by every image ("train/<class>/x.jpg" -> "<class>/x.jpg").
    parts = [PurePosixPath(n).parts for n in names + sorted(bad_names)]
    depth_cut = 0
    while all(len(p) >= depth_cut + 3 for p in parts) and len({p[depth_cut] for p in parts}) == 1:
        depth_cut += 1
    rel_parts = [PurePosixPath(n).parts[depth_cut:] for n in names]
    nested = [len(p) >= 2 for p in rel_parts]
    if any(nested) and not all(nested):
        for n, is_nested in zip(names, nested, strict=True):
            if not is_nested:
                problems.append(f"{n}: image outside a class folder while others are inside class folders")
    class_names = sorted({p[0] for p in rel_parts}) if all(nested) else None
    if class_names is not None:
        cid = {c: i for i, c in enumerate(class_names)}
        labels = np.array([cid[p[0]] for p in rel_parts], dtype=np.int64)
    else:
        labels = np.full(len(names), -1, dtype=np.int64)
    images = _stack_checked([a for _, a in entries], names, problems)
    _raise_problems(f"imagefolder {path}", problems)
    assert images is not None
    return _Loaded(
        images=images,
        labels=labels,
        class_names=class_names,
        num_levels=256,
        description=f"imagefolder {path.name}: {len(names)} images"
        + (f", {len(class_names)} class folders" if class_names else ", unlabelled"),
        source_sha256=_source_hash(path, manifest),
    )


class _AllowListUnpickler(pickle.Unpickler):
    """Unpickler that resolves only builtin containers and numpy array reconstruction (no other callables)."""

    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file, encoding="bytes")  # the CIFAR pickles were written by Python 2 (str -> bytes)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        from numpy._core import multiarray, numeric

        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            **{(m, c.__name__): c for m in ("builtins", "__builtin__") for c in (list, dict, tuple, set, frozenset)},
        }
        if (module, name) not in allowed:
            raise UnsafePickleError(
                f"{self.source}: refusing to unpickle global {module}.{name} (only numpy arrays and builtin "
                "containers are allowed); the file is not a genuine CIFAR-10 batch, re-download it and check its hash"
            )
        return allowed[(module, name)]


def _safe_unpickle(data: bytes, source: str) -> Any:
    try:
        return _AllowListUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from None


def _get(d: dict, key: str) -> Any:
    return d[key.encode()] if key.encode() in d else d.get(key)


def _load_cifar10_python(path: Path, progress: bool) -> _Loaded:
    if not path.is_file():
        raise DatasetError(f"cifar10-python: expected the cifar-10-python.tar.gz file, got {path}")
    batches: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    class_names: list[str] | None = None
    problems: list[str] = []
    for rel, data in _iter_members(path, progress, desc=f"read {path.name}"):
        base = PurePosixPath(rel).name
        if base == "batches.meta":
            meta = _safe_unpickle(data, rel)
            names = _get(meta, "label_names") if isinstance(meta, dict) else None
            if isinstance(names, list) and all(isinstance(n, bytes | str) for n in names):
                class_names = [n.decode() if isinstance(n, bytes) else n for n in names]
        elif base.startswith("data_batch_") and base.removeprefix("data_batch_").isdigit():
            d = _safe_unpickle(data, rel)
            x = _get(d, "data") if isinstance(d, dict) else None
            y = _get(d, "labels") if isinstance(d, dict) else None
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                desc = f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}"
                problems.append(f"{rel}: 'data' must be uint8 [n, 3072], got {desc}")
                continue
            y = np.asarray(y if isinstance(y, list) else [], dtype=np.int64)
            if y.shape != (x.shape[0],) or (y.size and (y.min() < 0 or y.max() > 9)):
                problems.append(f"{rel}: 'labels' must be {x.shape[0]} ints in 0..9, got shape {y.shape}")
                continue
            batches[int(base.removeprefix("data_batch_"))] = (x, y)
    missing = sorted(set(range(1, 6)) - set(batches))
    if missing and not problems:
        problems.append(f"data_batch_{missing} not found in {path.name} (expected data_batch_1..5)")
    _raise_problems(f"cifar10-python {path}", problems)
    order = sorted(batches)  # data_batch_1..5 in order (EDM dataset_tool.py:141-169)
    images = np.concatenate([batches[k][0] for k in order]).reshape(-1, 3, 32, 32)  # rows are R,G,B planes
    labels = np.concatenate([batches[k][1] for k in order])
    return _Loaded(
        images=images,
        labels=labels,
        class_names=class_names or CIFAR10_CLASSES,
        num_levels=256,
        description=f"cifar-10-python training batches {order} from {path.name}",
        source_sha256=sha256_file(path),
    )


def _load_edm_zip(path: Path, progress: bool) -> _Loaded:
    exts = _image_extensions()
    problems: list[str] = []
    entries: dict[str, np.ndarray] = {}
    manifest = hashlib.sha256()
    meta: Any = None
    for rel, data in _iter_members(path, progress, desc=f"decode {path.name}"):
        if rel == "dataset.json":
            try:
                meta = json.loads(data)
            except json.JSONDecodeError as e:
                problems.append(f"dataset.json: not valid JSON ({e})")
            continue
        if os.path.splitext(rel)[1].lower() not in exts:
            continue
        manifest.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
        try:
            entries[rel] = _decode_image(data)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{rel}: cannot decode ({type(e).__name__}: {e})")
    names = sorted(entries)  # EDM ImageFolderDataset sorts by relative path (training/dataset.py:187)
    if not names and not problems:
        raise DatasetError(f"edm-zip: no images found in {path}")
    labels = np.full(len(names), -1, dtype=np.int64)
    raw = meta.get("labels") if isinstance(meta, dict) else None
    if meta is not None and not isinstance(meta, dict):
        problems.append("dataset.json: expected an object {'labels': [[name, label], ...] | null}")
    if raw is not None:
        if not isinstance(raw, list) or not all(isinstance(r, list) and len(r) == 2 for r in raw):
            problems.append("dataset.json: 'labels' must be a list of [filename, label] pairs or null")
        else:
            lut = {str(n).replace("\\", "/"): v for n, v in raw}
            for i, n in enumerate(names):
                v = lut.get(n)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    problems.append(f"{n}: label {v!r} in dataset.json, expected a non-negative int class id")
                else:
                    labels[i] = v
    images = _stack_checked([entries[n] for n in names], names, problems)
    _raise_problems(f"edm-zip {path}", problems)
    assert images is not None
    label_dim = int(labels.max()) + 1 if raw is not None and len(labels) else 0
    return _Loaded(
        images=images,
        labels=labels,
        class_names=[str(i) for i in range(label_dim)] if label_dim else None,
        num_levels=256,
        description=f"EDM dataset_tool output {path.name}: {len(names)} images, labels "
        + ("yes" if label_dim else "null"),
        source_sha256=_source_hash(path, manifest),
    )


# --- split, shards, card ----------------------------------------------------------------------------------------
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


def _write_split(
    root: Path, split: str, images: np.ndarray, labels: np.ndarray, idx: np.ndarray, shard_size: int, progress: bool
) -> list[dict[str, Any]]:
    (root / split).mkdir()
    C, H, W = images.shape[1:]
    meta = {b"ctm.image_shape": json.dumps([int(C), int(H), int(W)]).encode(), b"ctm.image_dtype": b"uint8"}
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())], metadata=meta)
    shards = []
    starts = range(0, len(idx), shard_size)
    for k, start in enumerate(tqdm(starts, desc=f"write {split}", unit="shard", disable=not progress, leave=False)):
        sel = idx[start : start + shard_size]
        block = np.ascontiguousarray(images[sel]).reshape(len(sel), -1)  # (n, C*H*W)
        table = pa.table(
            {"image": pa.array([r.tobytes() for r in block], pa.binary()), "label": labels[sel], "index": sel},
            schema=schema,
        )
        rel = f"{split}/shard-{k:05d}.parquet"
        pq.write_table(table, root / rel, compression="zstd", row_group_size=len(sel))
        shards.append({"path": rel, "rows": int(len(sel)), "sha256": sha256_file(root / rel)})
    return shards


def _resolve_source(config: PrepareConfig, cache_dir: str | os.PathLike[str] | None, progress: bool) -> Path | None:
    """Local path of the source; remote URIs go through pipelines.support.fetch (sha256 verified)."""
    if config.source == "sklearn-digits":
        return None
    assert config.source_path is not None
    scheme = urllib.parse.urlparse(config.source_path).scheme.lower()
    if scheme in ("http", "https", "s3", "file"):
        from pipelines.support.fetch import fetch

        if config.source_sha256 is None:
            raise ValueError(f"prepare.source_sha256: required to fetch {config.source_path}, got None")
        if cache_dir is None:
            raise ValueError(f"cache_dir: required to fetch {config.source_path}, got None")
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
    heldout_fraction: float = 0.1,
    seed: int = 0,
    shard_size: int = 10_000,
    source_sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
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
    path = _resolve_source(config, cache_dir, progress)
    if path is not None and config.source_sha256 is not None and path.is_file():
        got = sha256_file(path)
        if got != config.source_sha256:
            raise DatasetError(
                f"prepare.source_sha256: expected {config.source_sha256}, got {got} for {path}: wrong or changed file"
            )
    if config.source == "sklearn-digits":
        loaded = _load_sklearn_digits()
    elif config.source == "imagefolder":
        loaded = _load_imagefolder(path, progress)
    elif config.source == "cifar10-python":
        loaded = _load_cifar10_python(path, progress)
    else:
        loaded = _load_edm_zip(path, progress)

    images, labels = loaded.images, loaded.labels  # (N, C, H, W) uint8, (N,) int64
    N, C, H, W = images.shape
    if int(images.max(initial=0)) >= loaded.num_levels:
        raise DatasetError(f"{source}: pixel level {int(images.max())} >= num_levels {loaded.num_levels}")
    train_idx, heldout_idx = split_indices(labels, config.heldout_fraction, config.seed)
    labelled = bool(labels.size and (labels >= 0).all())
    label_dim = len(loaded.class_names) if (labelled and loaded.class_names) else 0

    with staged_dir(out_dir) as tmp:
        splits: dict[str, Any] = {}
        for split, idx in (("train", train_idx), ("heldout", heldout_idx)):
            shards = _write_split(tmp, split, images, labels, idx, config.shard_size, progress)
            counts = Counter(labels[idx].tolist()) if labelled else Counter()
            splits[split] = {
                "count": int(len(idx)),
                "class_counts": {str(k): int(v) for k, v in sorted(counts.items())},
                "shards": shards,
            }
        num_levels = loaded.num_levels
        card = {
            "format": CARD_FORMAT,
            "count": int(N),
            "splits": splits,
            "image": {
                "layout": "CHW",
                "dtype": "uint8",
                "channels": int(C),
                "height": int(H),
                "width": int(W),
                "resolution": int(H) if H == W else None,
                "num_levels": int(num_levels),
                "max_level": int(num_levels - 1),
                # log2(num_levels) when that is an integer; digits have 17 levels, so no bit depth: use num_levels.
                "bit_depth": int(np.log2(num_levels)) if num_levels & (num_levels - 1) == 0 else None,
                "to_unit_range": "x / max_level * 2 - 1",
                "parquet_encoding": "image column = raw uint8 bytes of one (C, H, W) image in C order",
            },
            "labels": {
                "label_dim": int(label_dim),
                "class_names": loaded.class_names if label_dim else None,
                "unlabelled_value": -1,
            },
            "source": {
                "kind": config.source,
                "path": config.source_path,
                "sha256": loaded.source_sha256,
                "description": loaded.description,
            },
            "params": dataclasses.asdict(config),
            "versions": {"numpy": np.__version__, "pyarrow": pa.__version__},
        }
        atomic_write_json(tmp / "card.json", card)
    return card


# --- entrypoint -------------------------------------------------------------------------------------------------
_PARAM_ALIASES = {"path": "source_path", "sha256": "source_sha256"}


def _parse_args(argv: list[str] | None) -> tuple[PrepareConfig, argparse.Namespace]:
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
        # pipelines/config.py DataParams spells source_path as `path` (and a pinned hash as `sha256`).
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
    try:
        config, args = _parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        plan = {"config": dataclasses.asdict(config), "out": str(args.out)}
        if config.source_path and "://" not in config.source_path:
            plan["source_exists"] = Path(config.source_path).expanduser().exists()
        print(json_dumps(plan), end="")
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
            progress=not args.no_progress,
        )
    except (DatasetError, FetchError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    counts = {k: v["count"] for k, v in card["splits"].items()}
    print(f"prepared {card['count']} images {counts} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
