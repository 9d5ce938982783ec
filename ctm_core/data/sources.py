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

Sources are untrusted bytes. Member names are filtered before any body is read (non-images are skipped in the
stream), and an absolute or `..` name, an encrypted or unsupported zip member, or a file declaring more than
MAX_MEMBER_BYTES stops the read with one line. Images are decoded only as IMAGE_FORMATS (never by what the bytes
claim) and only after their header's C*H*W passed MAX_IMAGE_BYTES and matched the first image's shape. The CIFAR
pickles go through an unpickler whose only globals are stand-ins for numpy's own array reconstruction, so an array
exists only once its bytes are checked to be exactly its shape (no strides, no other callables). Names in messages
have control characters escaped. Class folders must be printable, distinct after NFC normalization and not empty.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import lzma
import math
import os
import pickle
import pickletools
import tarfile
import unicodedata
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
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
# The only image formats decoded, whatever a file's bytes claim: common lossless/lossy formats with in-process
# decoders (EPS would run Ghostscript, and the many rarer Pillow formats are attack surface no dataset needs).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
MAX_IMAGE_BYTES = 2**26  # decoded C*H*W per image, checked from the header (64 MiB: 4096x4096 RGB is 48 MiB)
MAX_MEMBER_BYTES = 2**28  # declared size of any one file read from a source (a CIFAR batch is 31 MB)
MAX_CLASSES = 2**16  # class ids of edm-zip labels (label_dim = max id + 1 names are written to the card)
MAX_PICKLE_OPS = 2**20  # opcodes per CIFAR pickle (a genuine batch has about 30,000)


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
@dataclasses.dataclass(frozen=True)
class _Member:
    """One entry of a folder or archive: its relative posix `name`, declared body `size` in bytes (0 for a folder)
    and `read()`, which returns the body; valid only until the next member is requested (tar members stream)."""

    name: str
    size: int
    read: Callable[[], bytes]
    is_dir: bool = False


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(_ARCHIVE_SUFFIXES)


def _skip_member(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _esc(text: str) -> str:
    """`text` for a message: control and format characters (ANSI escapes, newlines, bidi overrides) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _checked_name(archive: Path, name: str) -> str:
    """An archive member's name as a relative path, or DatasetError: an absolute or `..` name would put an image
    outside the archive's tree (and a class named '/' or '..' in the labels)."""
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        raise DatasetError(
            f"{archive}: member '{_esc(name)}': expected a relative path inside the archive, got an absolute or '..' "
            "path (fix: rebuild the archive from inside the dataset folder, e.g. tar -C <folder> -czf out.tar.gz .)"
        )
    return name


def _read_capped(name: str, size: int, read: Callable[[], bytes], archive: Path) -> bytes:
    """`read()` after checking the declared `size` against MAX_MEMBER_BYTES (nothing is read when over)."""
    if size > MAX_MEMBER_BYTES:
        raise DatasetError(
            f"{archive}: member '{_esc(name)}': expected at most {MAX_MEMBER_BYTES} bytes per file, got {size} "
            "(fix: remove the file from the source; no image or batch of a supported dataset is that large)"
        )
    return read()


_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError)


def _read_error(path: Path, e: BaseException) -> DatasetError:
    return DatasetError(
        f"cannot read {path} ({type(e).__name__}: {_esc(str(e))}): check the file (a truncated or corrupt archive?)"
    )


def _iter_members(path: Path, progress: bool, desc: str) -> Iterator[_Member]:
    """Every regular file (and folder entry) of a folder, .zip or tar archive, by name; bodies are read only on
    `_Member.read()`, so callers filter by name first. Tar members are streamed, never extracted to disk."""
    bar = tqdm(desc=desc, unit="file", disable=not progress, leave=False)
    try:
        yield from _iter_members_raw(path, bar)
    except _READ_ERRORS as e:
        raise _read_error(path, e) from None
    finally:
        bar.close()


def _iter_members_raw(path: Path, bar: tqdm) -> Iterator[_Member]:
    """Unwrapped `_iter_members` (no error translation)."""

    def counted(read: Callable[[], bytes]) -> Callable[[], bytes]:
        def run() -> bytes:
            bar.update()
            try:
                return read()
            except _READ_ERRORS as e:
                raise _read_error(path, e) from None

        return run

    if path.is_dir():
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if _skip_member(rel) or p.is_symlink():
                continue
            if p.is_dir():
                yield _Member(rel, 0, bytes, is_dir=True)
            elif p.is_file():
                size = p.stat().st_size
                yield _Member(
                    rel, size, counted(lambda p=p, rel=rel, size=size: _read_capped(rel, size, p.read_bytes, path))
                )
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = _checked_name(path, info.filename)
                if _skip_member(name):
                    continue
                if info.is_dir():
                    yield _Member(name.rstrip("/"), 0, bytes, is_dir=True)
                else:
                    yield _Member(name, info.file_size, counted(lambda info=info: _read_zip_member(zf, info, path)))
    elif _is_archive(path):
        # "r|*": sequential stream, transparent compression; extractfile reads the current member only, and
        # members nobody reads are skipped without being kept in memory.
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                name = _checked_name(path, member.name.removeprefix("./"))
                if _skip_member(name) or name in ("", "."):
                    continue
                if member.isdir():
                    yield _Member(name.rstrip("/"), 0, bytes, is_dir=True)
                elif member.isfile():
                    yield _Member(name, member.size, counted(lambda m=member, n=name: _read_tar_member(tf, m, n, path)))
    elif path.name.lower().endswith(".zip") or _starts_like_zip(path):
        raise DatasetError(
            f"cannot read {path}: not a complete zip archive (no end-of-central-directory record: the file is "
            "truncated or corrupt); fix: download or create it again"
        )
    else:
        raise DatasetError(f"source_path: expected a folder, .zip or .tar[.gz] archive, got {path}")


def _starts_like_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def _read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path) -> bytes:
    """The body of one zip member (size-capped); an encrypted or unsupported-compression member is one line."""
    if info.flag_bits & 0x1:
        raise DatasetError(
            f"{archive}: member '{_esc(info.filename)}' is encrypted (fix: re-create the zip without a password)"
        )
    try:
        return _read_capped(info.filename, info.file_size, lambda: zf.read(info), archive)
    except NotImplementedError:
        raise DatasetError(
            f"{archive}: member '{_esc(info.filename)}': compression method {info.compress_type} is not supported "
            "(expected stored, deflate, bzip2 or lzma; fix: re-create the zip, e.g. with zip -r or python -m zipfile)"
        ) from None


def _read_tar_member(tf: tarfile.TarFile, member: tarfile.TarInfo, name: str, archive: Path) -> bytes:
    def read() -> bytes:
        f = tf.extractfile(member)
        assert f is not None
        return f.read()

    return _read_capped(name, member.size, read, archive)


def _pillow_extensions() -> dict[str, str]:
    """Every file extension Pillow knows -> its format name ('.png' -> 'PNG')."""
    from PIL import Image

    Image.init()
    return {ext.lower(): fmt for ext, fmt in Image.registered_extensions().items()}


def _image_extensions() -> set[str]:
    """Extensions of the accepted formats (IMAGE_FORMATS)."""
    return {ext for ext, fmt in _pillow_extensions().items() if fmt in IMAGE_FORMATS}


def _classify(rel: str, exts: set[str], known: dict[str, str]) -> str | None:
    """'image' for an accepted image name, a problem line for an image format that is not accepted, None (ignore)
    for any other file (README.txt, labels.csv ...)."""
    ext = os.path.splitext(rel)[1].lower()
    if ext in exts:
        return "image"
    if ext in known:
        return (
            f"{_esc(rel)}: {known[ext]} images are not accepted (formats: {', '.join(IMAGE_FORMATS)}; "
            "fix: convert the file to PNG or remove it)"
        )
    return None


def _decode_image(data: bytes, reference: tuple[int, int, int] | None = None) -> tuple[tuple[int, int, int], Any]:
    """Decode one image file to uint8 (C, H, W); C = 1 for 'L', 3 for 'RGB'. Raises ValueError on anything else.

    Only IMAGE_FORMATS are tried, whatever the bytes claim (Pillow would otherwise pick the decoder from the bytes,
    e.g. Ghostscript for an EPS named .png). The header's C*H*W is checked against MAX_IMAGE_BYTES before any
    pixel is decoded, and an image whose header shape differs from `reference` is not decoded at all (one shape
    per dataset). Returns (shape, array), the array None when the shape differs from `reference`.
    """
    from PIL import Image, UnidentifiedImageError

    Image.init()  # registers WEBP and TIFF too (an explicit `formats` list only tries registered plugins)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            raise ValueError(
                f"not a {'/'.join(IMAGE_FORMATS)} image (only these formats are decoded; fix: convert it to PNG)"
            ) from None
        with img:
            if img.mode not in ("L", "RGB"):
                raise ValueError(f"unsupported image mode {img.mode!r} (expected 'L' or 'RGB')")
            W, H = img.size
            shape = (1 if img.mode == "L" else 3, H, W)
            if shape[0] * H * W > MAX_IMAGE_BYTES:
                raise ValueError(
                    f"{W}x{H} {img.mode} decodes to {shape[0] * H * W} bytes, over the {MAX_IMAGE_BYTES}-byte cap "
                    "per image (fix: resize the images)"
                )
            if reference is not None and shape != reference:
                return shape, None
            img.load()
            if img.mode == "L":
                arr = np.asarray(img, dtype=np.uint8)[None]  # (1, H, W)
            elif img.mode == "RGB":
                arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
            else:
                raise ValueError(f"unsupported image mode {img.mode!r} (expected 'L' or 'RGB')")
    return shape, np.ascontiguousarray(arr)


@dataclasses.dataclass
class _Decoded:
    """Images decoded so far: (name, shape, array or None for an image of another shape, not decoded)."""

    entries: list[tuple[str, tuple[int, int, int], np.ndarray | None]] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    reference: tuple[int, int, int] | None = None

    def add(self, name: str, data: bytes, problems: list[str]) -> None:
        try:
            shape, arr = _decode_image(data, self.reference)
        except Exception as e:  # noqa: BLE001 (any decoder failure is a problem to report)
            problems.append(f"{_esc(name)}: cannot decode ({type(e).__name__}: {_esc(str(e))})")
            self.failed.append(name)
            return
        self.reference = self.reference or shape
        self.entries.append((name, shape, arr))


def _stack_checked(entries: list[tuple[str, tuple[int, int, int], Any]], problems: list[str]) -> np.ndarray | None:
    """Stack the (C, H, W) arrays; images whose shape differs from the most common one are added to `problems`."""
    if not entries:
        return None
    shapes = Counter(shape for _, shape, _ in entries)
    ref = shapes.most_common(1)[0][0]
    for n, shape, _ in entries:
        if shape != ref:
            problems.append(f"{_esc(n)}: size {'x'.join(map(str, shape))} (CxHxW), expected {'x'.join(map(str, ref))}")
    if len(shapes) > 1:
        return None
    return np.stack([a for _, _, a in entries])


def _raise_problems(source: str, problems: list[str]) -> None:
    if len(problems) == 1:
        raise DatasetError(f"1 problem in {source}: {problems[0]}; fix or remove that file and re-run")
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
    exts, known = _image_extensions(), _pillow_extensions()
    problems: list[str] = []
    decoded = _Decoded()
    folders: set[str] = set()  # every folder that appears, with or without files
    manifest = hashlib.sha256()
    for m in _iter_members(path, progress, desc=f"decode {path.name}"):
        folders.update(p.as_posix() for p in PurePosixPath(m.name).parents if p.name)
        if m.is_dir:
            folders.add(m.name)
            continue
        kind = _classify(m.name, exts, known)
        if kind is None:
            continue  # not an image: never read
        if kind != "image":
            problems.append(kind)
            decoded.failed.append(m.name)
            continue
        data = m.read()
        manifest.update(f"{m.name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
        decoded.add(m.name, data, problems)
    entries = sorted(decoded.entries, key=lambda e: e[0])  # member order is arbitrary; EDM sorts by relative path
    names = [n for n, _, _ in entries]
    bad_names = sorted(set(decoded.failed))  # image files that could not be used
    if not names and not bad_names:
        raise DatasetError(f"imagefolder: no image files found in {path} (extensions: {sorted(exts)[:8]}...)")

    # Strip wrapper folders shared by every image ("train/<class>/x.jpg" -> "<class>/x.jpg").
    parts = [PurePosixPath(n).parts for n in names + bad_names]
    depth_cut = 0
    while all(len(p) >= depth_cut + 3 for p in parts) and len({p[depth_cut] for p in parts}) == 1:
        depth_cut += 1
    rel_parts = [PurePosixPath(n).parts[depth_cut:] for n in names]
    nested = [len(p) >= 2 for p in rel_parts]
    if any(nested) and not all(nested):
        for n, is_nested in zip(names, nested, strict=True):
            if not is_nested:
                problems.append(f"{_esc(n)}: image outside a class folder while others are inside class folders")
    class_names = sorted({p[0] for p in rel_parts}) if all(nested) else None
    if class_names:
        with_files = {p[depth_cut] for p in parts if len(p) > depth_cut + 1}  # decoded or not
        _check_class_folders(class_names, with_files, folders, parts[0][:depth_cut], problems)
    if class_names is not None:
        cid = {c: i for i, c in enumerate(class_names)}
        labels = np.array([cid[p[0]] for p in rel_parts], dtype=np.int64)
    else:
        labels = np.full(len(names), -1, dtype=np.int64)
    images = _stack_checked(entries, problems)
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


def _check_class_folders(
    class_names: list[str], with_files: set[str], folders: set[str], wrapper: tuple[str, ...], problems: list[str]
) -> None:
    """Class folders must be distinct, printable names and none may be empty.

    Labels are ids into the sorted class-folder names, so a class folder without images would drop out of
    `label_dim` and shift the id of every later class against a copy of the dataset where it has images (the
    train vs the test archive). Two names equal after Unicode NFC normalization (`café` typed with é, or with e
    and a combining accent) look the same everywhere but would be two classes."""
    for c in class_names:
        if not c.isprintable():
            problems.append(f"{_esc(c)}: class folder name has control or format characters (fix: rename the folder)")
    by_nfc: dict[str, list[str]] = {}
    for c in class_names:
        by_nfc.setdefault(unicodedata.normalize("NFC", c), []).append(c)
    for same in by_nfc.values():
        if len(same) > 1:
            shown = " and ".join(ascii(c) for c in same)
            problems.append(
                f"class folders {shown}: the same name in two Unicode forms (NFC/NFD) would be two classes "
                "(fix: rename one folder so both are one, e.g. convmv -f utf8 -t utf8 --nfc)"
            )
    prefix = "/".join(wrapper)
    for f in sorted(folders):
        fp = PurePosixPath(f).parts
        if len(fp) == len(wrapper) + 1 and fp[: len(wrapper)] == tuple(wrapper) and fp[-1] not in with_files:
            where = f"{prefix}/{fp[-1]}" if prefix else fp[-1]
            problems.append(
                f"{_esc(where)}: class folder without image files (labels are ids into the sorted class folders, "
                "so it would shift the id of every later class; fix: add its images or remove the folder)"
            )


# --- CIFAR-10 python batches -----------------------------------------------------------------------------------
class _DtypePlan:
    """`numpy.dtype(name, align, copy)` from a pickle: only uint8, the one dtype of a CIFAR batch."""

    def __init__(self, source: str, name: Any, *args: Any) -> None:
        if name not in ("u1", b"u1"):
            raise UnsafePickleError(
                f"{source}: refusing numpy dtype {_esc(repr(name)[:40])} (a CIFAR-10 batch holds uint8 arrays only); "
                "the file is not a genuine CIFAR-10 batch, re-download it and check its hash"
            )
        self.source = source

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byte order, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) == 8 and state[1] in ("|", b"|") and state[2:5] == (None,) * 3):
            raise UnsafePickleError(
                f"{self.source}: refusing a uint8 dtype with extra state {_esc(repr(state)[:80])} (a plain uint8 "
                "has byte order '|' and no fields); the file is not a genuine CIFAR-10 batch, re-download it"
            )


class _ArrayPlan:
    """An ndarray as a pickle describes it (shape, dtype, raw bytes), kept as data until `to_array` checks that
    the bytes are exactly shape x itemsize; no array exists before that, and the array then views those bytes."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.shape: Any = None
        self.dtype: Any = None
        self.order: Any = "C"
        self.raw: Any = None

    def __setstate__(self, state: Any) -> None:  # ndarray state: (version, shape, dtype, is_fortran, raw bytes)
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise self.error(f"array state {_esc(repr(state)[:80])}")
        self.shape, self.dtype, fortran, self.raw = state
        self.order = "F" if fortran else "C"

    def error(self, what: str) -> DatasetError:
        return DatasetError(
            f"{self.source}: expected a C-ordered uint8 array with its bytes inline, got {what} (the file is not a "
            "genuine CIFAR-10 batch; fix: re-download it and check its hash)"
        )

    def to_array(self) -> np.ndarray:
        shape = self.shape
        if not (
            isinstance(shape, tuple) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise self.error(f"shape {_esc(repr(shape)[:80])}")
        if not isinstance(self.dtype, _DtypePlan) or self.order not in ("C", b"C"):
            raise self.error(f"dtype {type(self.dtype).__name__}, order {self.order!r}")
        if not isinstance(self.raw, bytes | bytearray):
            raise self.error(f"data of type {type(self.raw).__name__}")
        want = math.prod(shape)  # uint8: one byte per element, computed in Python ints (no overflow)
        if want != len(self.raw):
            raise self.error(f"shape {shape} ({want} bytes) over {len(self.raw)} bytes of data")
        return np.frombuffer(self.raw, dtype=np.uint8).reshape(shape)


class _AllowListUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 python batches: dicts, lists, bytes, ints and numpy's own array reconstruction.

    numpy's reconstruction globals resolve to stand-ins that record shape, dtype and bytes without calling numpy
    (`_ArrayPlan`); `numpy.ndarray` itself cannot be called (a direct call can set strides, e.g. a zero stride that
    makes a few bytes look like a huge array). No other global resolves."""

    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file, encoding="bytes")  # the CIFAR pickles were written by Python 2 (str -> bytes)
        self.source = source

        def ndarray(*args: Any, **kwargs: Any) -> None:
            raise UnsafePickleError(
                f"{source}: refusing a direct call of numpy.ndarray (it can set strides and map a few bytes to a huge "
                "array; numpy pickles its arrays through _reconstruct); the file is not a genuine CIFAR-10 batch, "
                "re-download it and check its hash"
            )

        def reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayPlan:  # what ndarray.__reduce__ names
            if cls is not ndarray or shape != (0,) or typecode not in (b"b", "b"):
                raise UnsafePickleError(
                    f"{source}: refusing numpy _reconstruct{_esc(repr((shape, typecode))[:60])} (expected numpy's own "
                    "(ndarray, (0,), b'b')); the file is not a genuine CIFAR-10 batch, re-download it"
                )
            return _ArrayPlan(source)

        def frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> _ArrayPlan:  # protocol 5, bytes inline
            plan = _ArrayPlan(source)
            plan.raw, plan.dtype, plan.shape, plan.order = buf, dtype, shape, order
            return plan

        self.allowed: dict[tuple[str, str], Any] = {
            **{(m, "_reconstruct"): reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
            **{(m, "_frombuffer"): frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
            ("numpy", "ndarray"): ndarray,
            ("numpy", "dtype"): lambda *args: _DtypePlan(source, *args),
        }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise UnsafePickleError(
                f"{self.source}: refusing to unpickle global {_esc(module)[:80]}.{_esc(name)[:80]} (only numpy "
                "arrays and builtin containers are allowed); the file is not a genuine CIFAR-10 batch, re-download "
                "it and check its hash"
            )
        return self.allowed[(module, name)]


def _safe_unpickle(data: bytes, source: str) -> Any:
    """Unpickle a CIFAR batch; DatasetError (one line) for anything but plain containers and uint8 arrays.

    At most MAX_PICKLE_OPS opcodes (counted without executing anything) so a small file cannot build millions of
    objects: a genuine batch has about 30,000 (one per label and file name)."""
    try:
        for i, _ in enumerate(pickletools.genops(data)):
            if i >= MAX_PICKLE_OPS:
                raise DatasetError(
                    f"{source}: more than {MAX_PICKLE_OPS} pickle opcodes (a CIFAR-10 batch has about 30,000); the "
                    "file is not a genuine CIFAR-10 batch, re-download it and check its hash"
                )
        return _AllowListUnpickler(io.BytesIO(data), source).load()
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"{source}: not a readable pickle ({type(e).__name__}: {_esc(str(e))[:200]})") from None


def _get(d: dict, key: str) -> Any:
    return d[key.encode()] if key.encode() in d else d.get(key)


def _load_cifar10_python(path: Path, progress: bool) -> SourceImages:
    if not path.is_file():
        raise DatasetError(f"cifar10-python: expected the cifar-10-python.tar.gz file, got {path}")
    batches: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    class_names: list[str] | None = None
    problems: list[str] = []
    for m in _iter_members(path, progress, desc=f"read {path.name}"):
        base = PurePosixPath(m.name).name
        rel = _esc(m.name)
        if m.is_dir:
            continue
        if base == "batches.meta":
            meta = _safe_unpickle(m.read(), rel)
            names = _get(meta, "label_names") if isinstance(meta, dict) else None
            if isinstance(names, list) and all(isinstance(n, bytes | str) for n in names):
                class_names = [n.decode() if isinstance(n, bytes) else n for n in names]
        elif base.startswith("data_batch_") and base.removeprefix("data_batch_").isdigit():
            d = _safe_unpickle(m.read(), rel)
            x = _get(d, "data") if isinstance(d, dict) else None
            y = _get(d, "labels") if isinstance(d, dict) else None
            if isinstance(x, _ArrayPlan):
                x = x.to_array()
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                desc = f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}"
                problems.append(f"{rel}: 'data' must be uint8 [n, 3072], got {desc}")
                continue
            ints = isinstance(y, list) and all(type(v) is int for v in y)
            y = np.asarray(y if ints and len(y) == x.shape[0] else [], dtype=np.int64)
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
    exts, known = _image_extensions(), _pillow_extensions()
    problems: list[str] = []
    decoded = _Decoded()
    manifest = hashlib.sha256()
    meta: Any = None
    for m in _iter_members(path, progress, desc=f"decode {path.name}"):
        if m.is_dir:
            continue
        if m.name == "dataset.json":
            try:
                meta = json.loads(m.read())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                problems.append(f"dataset.json: not valid JSON ({type(e).__name__}: {_esc(str(e))[:200]})")
            continue
        kind = _classify(m.name, exts, known)
        if kind is None:
            continue  # not an image: never read
        if kind != "image":
            problems.append(kind)
            continue
        data = m.read()
        manifest.update(f"{m.name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
        decoded.add(m.name, data, problems)
    entries = {n: (n, shape, a) for n, shape, a in decoded.entries}  # a repeated member name: the last one
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
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_CLASSES:
                    problems.append(
                        f"{_esc(n)}: label {_esc(repr(v)[:40])} in dataset.json, expected an int class id in "
                        f"0..{MAX_CLASSES - 1}"
                    )
                else:
                    labels[i] = v
    images = _stack_checked([entries[n] for n in names], problems)
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
