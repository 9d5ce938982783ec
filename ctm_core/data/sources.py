"""Image sources of the prepare stage, read into memory as raw levels: sklearn digits, image folders and archives,
the official CIFAR-10 python batches, EDM dataset_tool output.

Sources (`SOURCES`):
    sklearn-digits  `sklearn.datasets.load_digits` (1,797 real 8x8 grey images, 17 levels 0..16; no download).
    imagefolder     a folder, `.zip` or `.tar[.gz|.bz2|.xz]` of class folders (`<root>/<class>/<img>`; labels from
                    the sorted class-folder names, like EDM dataset_tool.py:57-84; images directly in the root are
                    unlabelled). Tar members are streamed, never extracted to disk.
    cifar10-python  the official `cifar-10-python.tar.gz`: the 50,000 training images of data_batch_1..5 in order
                    (EDM dataset_tool.py:141-169), read with an allow-list unpickler.
    edm-zip         EDM `dataset_tool.py` output (`00000/img00000000.png` + `dataset.json` with labels or null),
                    as `.zip` or folder (docs/edm.md#a5-dataset-layout).

Every problem of a source (corrupt or mixed-size images, bad labels, bad layout) is collected and reported at once
(`DatasetError`), so a user fixes them in one pass. Needs numpy and Pillow (scikit-learn for the digits only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import lzma
import os
import pickle
import tarfile
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from tqdm import tqdm

from ctm_core.errors import InputError
from ctm_core.io.hashing import sha256_file

__all__ = ["CIFAR10_CLASSES", "SOURCES", "DatasetError", "SourceImages", "UnsafePickleError", "read_source"]

SOURCES = ("sklearn-digits", "imagefolder", "cifar10-python", "edm-zip")
MAX_LISTED_PROBLEMS = 50
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class DatasetError(InputError):
    """The source has problems (corrupt / mixed-size images, bad labels, bad layout); the message lists them."""


class UnsafePickleError(DatasetError):
    """A pickle in the source references a global outside the allow-list (possible code execution)."""


@dataclasses.dataclass
class SourceImages:
    """A source read into memory."""

    images: np.ndarray  # (N, C, H, W) uint8 raw levels
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    class_names: list[str] | None
    num_levels: int
    description: str
    source_sha256: str


def read_source(kind: str, path: Path | None, progress: bool = False) -> SourceImages:
    """Read the source `kind` (one of SOURCES) at `path` (None for sklearn-digits); raises DatasetError."""
    if kind == "sklearn-digits":
        return _load_sklearn_digits()
    if kind not in SOURCES:
        raise ValueError(f"prepare.source: expected one of {list(SOURCES)}, got {kind!r}")
    if path is None:
        raise ValueError(f"prepare.source_path: required for source {kind!r}, got None")
    return {"imagefolder": _load_imagefolder, "cifar10-python": _load_cifar10_python, "edm-zip": _load_edm_zip}[kind](
        path, progress
    )


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
def _load_sklearn_digits() -> SourceImages:
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
    return SourceImages(
        images=images,
        labels=labels,
        class_names=[str(c) for c in d.target_names],
        num_levels=17,
        description=f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}): 8x8 UCI digits, levels 0..16",
        source_sha256=h.hexdigest(),
    )


def _load_imagefolder(path: Path, progress: bool) -> SourceImages:
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
    return SourceImages(
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


def _load_cifar10_python(path: Path, progress: bool) -> SourceImages:
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
    return SourceImages(
        images=images,
        labels=labels,
        class_names=class_names or CIFAR10_CLASSES,
        num_levels=256,
        description=f"cifar-10-python training batches {order} from {path.name}",
        source_sha256=sha256_file(path),
    )


def _load_edm_zip(path: Path, progress: bool) -> SourceImages:
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
    return SourceImages(
        images=images,
        labels=labels,
        class_names=[str(i) for i in range(label_dim)] if label_dim else None,
        num_levels=256,
        description=f"EDM dataset_tool output {path.name}: {len(names)} images, labels "
        + ("yes" if label_dim else "null"),
        source_sha256=_source_hash(path, manifest),
    )
