"""Hostile data sources and cards: small crafted bytes that a plain reader would let run a decoder subprocess, write
outside its folder, or turn into gigabytes. Each test builds the input, shows (where that is safe) what a plain
implementation does with it, and checks that the readers refuse it with one line naming the input and the fix."""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import tracemalloc
import unicodedata
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from ctm_core.data import sources
from ctm_core.data.card import DatasetCard
from ctm_core.data.sources import DatasetError, UnsafePickleError, read_source
from ctm_core.data.writer import write_prepared
from ctm_core.errors import InputError

RNG = np.random.default_rng(12)
MiB = 2**20


def _png(arr_chw: np.ndarray) -> bytes:
    hwc = arr_chw[0] if arr_chw.shape[0] == 1 else arr_chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="PNG")
    return buf.getvalue()


def _img(c: int = 3, size: int = 8) -> bytes:
    return _png(RNG.integers(0, 256, (c, size, size), dtype=np.uint8))


def _tar(path: Path, members: dict[str, bytes | None], mode: str = "w:gz") -> Path:
    """A tar with the given members (None = a folder entry)."""
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _one_line_error(exc_type: type[Exception], fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    assert "\n" not in msg and "\x1b" not in msg, msg
    return msg


def _traced_peak(fn) -> int:
    """Peak bytes traced (Python objects and numpy buffers) while `fn()` runs; exceptions are swallowed."""
    tracemalloc.start()
    try:
        fn()
    except DatasetError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def _classes(n: int = 2) -> dict[str, bytes]:
    return {f"train/{c}/{i}.png": _img() for c in ("cat", "dog") for i in range(n)}


# --- card.json: shard paths stay inside the card's folder ----------------------------------------------------------
def _card_dict(tmp_path: Path) -> dict:
    loaded = sources.SourceImages(
        images=RNG.integers(0, 17, (10, 1, 8, 8), dtype=np.uint8),
        labels=np.zeros(10, dtype=np.int64),
        class_names=["0"],
        num_levels=17,
        description="test",
        source_sha256="0" * 64,
    )
    out = tmp_path / "prepared"
    out.mkdir()
    card = write_prepared(
        loaded, out, source="sklearn-digits", source_path=None, heldout_fraction=0.2, seed=0, shard_size=8, params={}
    )
    return card.to_dict()


@pytest.mark.parametrize(
    "bad",
    [
        "/home/user/.bashrc",
        "train/../../../outside.parquet",
        "../train/shard-00000.parquet",
        "train\\..\\..\\x.parquet",
        "train/shard\x1b[2J.parquet",
        "train/shard\u202e.parquet",
        "heldout/shard-00000.parquet",  # another split's folder
        "shard-00000.parquet",  # not under the split folder
        "train//shard.parquet",
        "train/./shard.parquet",
        "train",
    ],
)
def test_card_refuses_shard_paths_outside_the_split_folder(tmp_path, bad):
    raw = _card_dict(tmp_path)
    DatasetCard.from_dict(raw)  # the genuine card is fine
    # a plain reader joins the path to the card's folder: an absolute path replaces the folder altogether
    assert (tmp_path / "prepared" / "/home/user/.bashrc") == Path("/home/user/.bashrc")
    raw["splits"]["train"]["shards"][0]["path"] = bad
    msg = _one_line_error(InputError, DatasetCard.from_dict, raw, where="s3://b/p/card.json")
    assert msg.startswith("s3://b/p/card.json: splits.train.shards[0].path: expected a relative path inside")
    assert "fix:" in msg and "\u202e" not in msg


# --- images: only the listed formats are decoded, with a cap on decoded bytes --------------------------------------
_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n"


def test_eps_named_png_never_reaches_ghostscript(tmp_path, monkeypatch):
    canary = tmp_path / "ghostscript-ran"

    def fake_ghostscript(tile, size, fp, scale=1, transparency=False):  # stands in for the `gs` subprocess
        canary.write_text("ran")
        return Image.new("RGB", size).im

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", fake_ghostscript)
    # a plain Image.open picks the decoder from the bytes: EPS, whose load() runs Ghostscript
    with Image.open(io.BytesIO(_EPS)) as plain:
        assert plain.format == "EPS"
        plain.load()
    assert canary.read_text() == "ran"
    canary.unlink()

    src = _tar(tmp_path / "src.tar.gz", {"a/good.png": _img(), "a/evil.png": _EPS})
    msg = _one_line_error(DatasetError, read_source, "imagefolder", src)
    assert "a/evil.png: cannot decode" in msg and "not a PNG/JPEG/BMP/GIF/WEBP/TIFF/PPM image" in msg
    assert "fix" in msg and not canary.exists()
    # an .eps file is an image format that is not accepted: reported, never decoded
    src = _tar(tmp_path / "src2.tar.gz", {"a/good.png": _img(), "a/figure.eps": _EPS})
    msg = _one_line_error(DatasetError, read_source, "imagefolder", src)
    assert "a/figure.eps: EPS images are not accepted" in msg and not canary.exists()


def _png_zeros(width: int, height: int) -> bytes:
    """A valid black RGB PNG of width x height, compressed row by row (a decompression bomb: ~1000:1)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte 0 + the row's pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


_PEAK_RSS = """
import resource, sys
from pathlib import Path
from ctm_core.data.sources import DatasetError, read_source
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_source(sys.argv[1], Path(sys.argv[2]))
except DatasetError:
    pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def _peak_rss(kind: str, path: Path) -> int:
    """Peak resident bytes added by `read_source(kind, path)` in a fresh interpreter (covers Pillow's C buffers)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, kind, str(path)], cwd=root, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def test_declared_image_size_capped_before_decoding(tmp_path):
    bomb = _png_zeros(8192, 8192)  # 192 MiB of RGB in a ~200 KB file
    assert len(bomb) < 300_000
    with Image.open(io.BytesIO(bomb)) as plain:  # a plain reader learns the size when it has allocated it
        assert plain.size == (8192, 8192) and 3 * 8192 * 8192 > sources.MAX_IMAGE_BYTES
    src = _tar(tmp_path / "bomb.tar.gz", {"a/ok.png": _img(), "a/bomb.png": bomb})
    msg = _one_line_error(DatasetError, read_source, "imagefolder", src)
    assert f"a/bomb.png: cannot decode (ValueError: 8192x8192 RGB decodes to {3 * 8192 * 8192} bytes" in msg
    assert "fix: resize" in msg
    peak = _peak_rss("imagefolder", src)
    print(f"\n[8192x8192 PNG bomb] peak RSS +{peak / MiB:.0f} MiB (declared {3 * 8192 * 8192 / MiB:.0f} MiB)")
    assert peak < 32 * MiB  # before: decoded (192 MiB) and copied (another 192 MiB)
    # an image of another size than the first is reported without being decoded
    shape, arr = sources._decode_image(_png_zeros(1024, 1024), reference=(3, 8, 8))
    assert shape == (3, 1024, 1024) and arr is None


# --- CIFAR-10 python batches ----------------------------------------------------------------------------------------
class _ZeroStride:
    """Pickles as numpy.ndarray(shape, 'u1', buffer=b'\\0', offset=0, strides=(0, 0)): one byte seen as rows x 3072."""

    def __init__(self, rows: int):
        self.rows = rows

    def __reduce__(self):
        return (np.ndarray, ((self.rows, 3072), "u1", b"\0", 0, (0, 0)))


def _cifar(path: Path, batches: dict[int, bytes]) -> Path:
    meta = pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}, protocol=4)
    members = {"cifar-10-batches-py/batches.meta": meta}
    members |= {f"cifar-10-batches-py/data_batch_{k}": v for k, v in batches.items()}
    return _tar(path, members)


def _legit_batch(rows: int, protocol: int = 4) -> bytes:
    x = RNG.integers(0, 256, (rows, 3072), dtype=np.uint8)
    return pickle.dumps({b"data": x, b"labels": [int(v) for v in RNG.integers(0, 10, rows)]}, protocol=protocol)


class _PlainAllowList(pickle.Unpickler):
    """What the reader did before: numpy.ndarray was an allowed global."""

    def find_class(self, module, name):
        assert (module, name) == ("numpy", "ndarray")
        return np.ndarray


def test_cifar_zero_stride_ndarray_refused_without_allocating(tmp_path):
    rows = 300_000  # 879 MiB declared
    blob = pickle.dumps({b"data": _ZeroStride(rows), b"labels": [0] * 0}, protocol=4)
    plain = _PlainAllowList(io.BytesIO(blob), encoding="bytes").load()[b"data"]
    assert plain.strides == (0, 0) and plain.nbytes == rows * 3072 > 800 * MiB  # accepted as a valid uint8 batch
    hostile = _cifar(tmp_path / "hostile.tar.gz", {k: blob for k in range(1, 6)})
    assert hostile.stat().st_size < 1000
    msg = _one_line_error(UnsafePickleError, read_source, "cifar10-python", hostile)
    assert "data_batch_" in msg and "refusing a direct call of numpy.ndarray" in msg and "re-download" in msg

    legit = _cifar(tmp_path / "legit.tar.gz", {k: _legit_batch(0) for k in range(1, 6)})
    assert read_source("cifar10-python", legit).images.shape == (0, 3, 32, 32)
    peak_legit = _traced_peak(lambda: read_source("cifar10-python", legit))
    peak_hostile = _traced_peak(lambda: read_source("cifar10-python", hostile))
    print(f"\n[cifar zero stride] peak {peak_hostile / MiB:.2f} MiB (legit same size {peak_legit / MiB:.2f} MiB)")
    assert peak_hostile <= 2 * peak_legit + MiB


def test_cifar_array_bytes_must_match_shape(tmp_path):
    # numpy's own pickle layout, with a shape claiming 10^6 rows over 3072 bytes of data
    blob = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=4)
    blob = blob.replace(b"K\x01M\x00\x0c\x86", b"J" + struct.pack("<i", 10**6) + b"M\x00\x0c\x86")
    msg = _one_line_error(DatasetError, read_source, "cifar10-python", _cifar(tmp_path / "c.tar.gz", {1: blob}))
    assert f"shape (1000000, 3072) ({10**6 * 3072} bytes) over 3072 bytes of data" in msg
    # other dtypes and globals are refused; genuine batches of protocols 2, 4 and 5 are read
    for bad, fragment in (
        (pickle.dumps({b"data": np.zeros((1, 3072), np.int64)}, protocol=4), "refusing numpy dtype 'i8'"),
        (pickle.dumps({b"data": Path("x")}, protocol=4), "refusing to unpickle global pathlib.PosixPath"),
        (b"\x80\x04" + b"N" + b"2" * (sources.MAX_PICKLE_OPS + 1) + b".", "more than 1048576 pickle opcodes"),
    ):
        msg = _one_line_error(DatasetError, read_source, "cifar10-python", _cifar(tmp_path / "b.tar.gz", {1: bad}))
        assert fragment in msg, msg
    good = {k: _legit_batch(2, protocol=(4, 5)[k % 2]) for k in range(1, 6)}
    assert read_source("cifar10-python", _cifar(tmp_path / "g.tar.gz", good)).images.shape == (10, 3, 32, 32)


# --- archives: names, sizes, encodings -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x.png", "a/../../x.png", "/abs/a/y.png"])
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_member_names_outside_the_archive_refused(tmp_path, name, kind):
    members = {**_classes(), name: _img()}
    src = _tar(tmp_path / "s.tar", members, "w") if kind == "tar" else _zip(tmp_path / "s.zip", members)
    msg = _one_line_error(DatasetError, read_source, "imagefolder", src)
    assert f"member {name!r}: expected a relative path inside the archive" in msg and "fix:" in msg


class _Zeros(io.RawIOBase):
    """`size` zero bytes, read in chunks (a big member without holding it in memory)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def test_bodies_filtered_by_name_before_reading(tmp_path):
    size = 128 * MiB
    small = _tar(tmp_path / "small.tar.gz", _classes(), "w:gz")
    big = tmp_path / "big.tar.gz"
    with tarfile.open(big, "w:gz", compresslevel=1) as tf:
        for name, data in _classes().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("train/notes.txt")
        info.size = size
        tf.addfile(info, _Zeros(size))
    assert big.stat().st_size < 1 * MiB
    peak_small = _traced_peak(lambda: read_source("imagefolder", small))
    peak_big = _traced_peak(lambda: read_source("imagefolder", big))
    print(f"\n[128 MiB .txt in a tar] peak {peak_big / MiB:.2f} MiB (without it {peak_small / MiB:.2f} MiB)")
    # before: the body was read whole (>= 128 MiB) and then dropped by its extension; now it is skipped in the stream,
    # which costs one decompressed buffer (tarfile reads 10 KiB of gzip at a time: < 11 MiB of zeros), whatever its size
    assert peak_big <= peak_small + 12 * MiB
    assert read_source("imagefolder", big).images.shape == (4, 3, 8, 8)


def test_member_declared_size_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_MEMBER_BYTES", 4096)
    for src in (
        _tar(tmp_path / "s.tar.gz", {**_classes(), "train/cat/huge.png": bytes(5000)}),
        _zip(tmp_path / "s.zip", {**_classes(), "train/cat/huge.png": bytes(5000)}, zipfile.ZIP_DEFLATED),
    ):
        msg = _one_line_error(DatasetError, read_source, "imagefolder", src)
        assert "member 'train/cat/huge.png': expected at most 4096 bytes per file, got 5000" in msg


def _patch_zip_headers(path: Path, *, flag: int | None = None, method: int | None = None) -> None:
    """Set the general-purpose flag / compression method of every member in both local and central headers."""
    blob = bytearray(path.read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = blob.find(sig)
        while i >= 0:
            if flag is not None:
                blob[i + flag_at : i + flag_at + 2] = struct.pack("<H", flag)
            if method is not None:
                blob[i + flag_at + 2 : i + flag_at + 4] = struct.pack("<H", method)
            i = blob.find(sig, i + 4)
    path.write_bytes(bytes(blob))


def test_encrypted_deflate64_and_truncated_zips_are_one_line(tmp_path):
    enc = _zip(tmp_path / "enc.zip", _classes())
    _patch_zip_headers(enc, flag=0x1)
    with zipfile.ZipFile(enc) as zf, pytest.raises(RuntimeError, match="encrypted"):  # a plain zf.read: traceback
        zf.read(zf.infolist()[0])
    msg = _one_line_error(DatasetError, read_source, "imagefolder", enc)
    assert "member 'train/cat/0.png' is encrypted (fix: re-create the zip without a password)" in msg

    d64 = _zip(tmp_path / "d64.zip", _classes())
    _patch_zip_headers(d64, method=9)  # deflate64
    with zipfile.ZipFile(d64) as zf, pytest.raises(NotImplementedError):
        zf.read(zf.infolist()[0])
    msg = _one_line_error(DatasetError, read_source, "imagefolder", d64)
    assert "compression method 9 is not supported" in msg and "fix:" in msg

    whole = _zip(tmp_path / "whole.zip", _classes(20))
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    msg = _one_line_error(DatasetError, read_source, "imagefolder", cut)
    assert "not a complete zip archive" in msg and "truncated or corrupt" in msg and "expected a folder" not in msg


def test_control_characters_escaped_in_messages(tmp_path):
    name = "train/cat/\x1b[31mred\x1b[0m\u202egnp.png"
    src = _tar(tmp_path / "s.tar.gz", {**_classes(), name: b"not a png"})
    msg = _one_line_error(DatasetError, read_source, "imagefolder", src)
    assert "train/cat/\\x1b[31mred\\x1b[0m\\u202egnp.png: cannot decode" in msg and "\u202e" not in msg


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_empty_class_folder_is_an_error(tmp_path, kind):
    if kind == "dir":
        src = tmp_path / "src"
        for name, data in _classes().items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(data)
        (src / "train" / "bird").mkdir()
    else:
        src = _tar(tmp_path / "s.tar.gz", {"train/": None, "train/bird/": None, **_classes()})
    msg = _one_line_error(DatasetError, read_source, "imagefolder", src)
    assert "train/bird: class folder without image files" in msg and "shift the id of every later class" in msg


def test_nfc_nfd_lookalike_class_names_refused(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    src = _tar(tmp_path / "s.tar.gz", {f"{c}/{i}.png": _img() for c in (nfc, nfd) for i in range(2)})
    msg = _one_line_error(DatasetError, read_source, "imagefolder", src)
    assert f"class folders {ascii(nfd)} and {ascii(nfc)}" in msg or f"{ascii(nfc)} and {ascii(nfd)}" in msg
    assert "NFC/NFD" in msg


def test_edm_zip_label_ids_bounded(tmp_path):
    # label_dim = max id + 1 and the card lists that many class names: a huge id must not size that list
    name = "00000/img00000000.png"
    meta = json.dumps({"labels": [[name, 10**12]]}).encode()
    src = _zip(tmp_path / "ds.zip", {name: _img(), "dataset.json": meta})
    msg = _one_line_error(DatasetError, read_source, "edm-zip", src)
    assert f"{name}: label 1000000000000 in dataset.json, expected an int class id in 0..65535" in msg
