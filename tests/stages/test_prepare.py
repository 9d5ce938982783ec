"""pipelines.prepare end to end on real bytes: sklearn digits, generated folders/archives, the shared CIFAR JPEGs."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ctm_core.data.card import DatasetCard
from ctm_core.data.prepared import levels_to_unit, load_card, load_prepared
from ctm_core.errors import InputError
from pipelines.prepare import (
    DatasetError,
    PrepareConfig,
    UnsafePickleError,
    main,
    prepare_dataset,
    split_indices,
)
from pipelines.support.io_utils import sha256_file

ROOT = Path(__file__).resolve().parents[2]

RNG = np.random.default_rng(1234)


def _png(arr_chw: np.ndarray) -> bytes:
    hwc = arr_chw[0] if arr_chw.shape[0] == 1 else arr_chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="PNG")
    return buf.getvalue()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- sklearn digits ---------------------------------------------------------------------------------------------
def test_digits_end_to_end_and_deterministic(tmp_path):
    card = prepare_dataset("sklearn-digits", None, tmp_path / "a", heldout_fraction=0.1, seed=7, progress=False)
    assert card.count == 1797
    tr, ho = card.splits["train"], card.splits["heldout"]
    assert tr.count + ho.count == 1797 and 170 <= ho.count <= 190
    assert all(17 <= v <= 19 for v in ho.class_counts.values()) and len(ho.class_counts) == 10  # stratified
    im = card.image
    assert (im.channels, im.height, im.width, im.resolution) == (1, 8, 8, 8)
    assert (im.num_levels, im.max_level, im.bit_depth) == (17, 16, None)
    assert card.labels.label_dim == 10 and card.labels.class_names == tuple(str(i) for i in range(10))
    assert card.params["seed"] == 7 and card.source.kind == "sklearn-digits"
    assert load_card(tmp_path / "a") == card

    x_tr, y_tr = load_prepared(tmp_path / "a", "train")
    x_ho, y_ho = load_prepared(tmp_path / "a", "heldout")
    assert x_tr.shape == (tr.count, 1, 8, 8) and x_tr.dtype == np.uint8 and y_tr.dtype == np.int64
    assert x_tr.max() == 16 and x_ho.max() <= 16 and y_tr.min() == 0 and y_tr.max() == 9
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.sort(
        np.concatenate(
            [
                pq.read_table(tmp_path / "a" / s.path)["index"].to_numpy()
                for sp in ("train", "heldout")
                for s in card.splits[sp].shards
            ]
        )
    )
    assert np.array_equal(idx, np.arange(1797))  # a partition of the source
    ho_idx = pq.read_table(tmp_path / "a" / ho.shards[0].path)["index"].to_numpy()
    assert np.array_equal(x_ho[:, 0], d.images[ho_idx].astype(np.uint8)) and np.array_equal(y_ho, d.target[ho_idx])
    u = levels_to_unit(x_tr, im.num_levels)
    assert u.dtype == np.float32 and u.min() == -1.0 and u.max() == 1.0

    # Same seed -> byte-identical output; another seed -> another split.
    card_b = prepare_dataset("sklearn-digits", None, tmp_path / "b", heldout_fraction=0.1, seed=7, progress=False)
    assert card_b == card
    card_c = prepare_dataset("sklearn-digits", None, tmp_path / "c", heldout_fraction=0.1, seed=8, progress=False)
    assert card_c.splits["heldout"].shards[0].sha256 != ho.shards[0].sha256
    assert _leftovers(tmp_path) == []


def test_shard_hash_checked_and_sharding(tmp_path):
    card = prepare_dataset("sklearn-digits", None, tmp_path / "p", heldout_fraction=0.0, shard_size=500, progress=False)
    shards = card.splits["train"].shards
    assert [s.rows for s in shards] == [500, 500, 500, 297] and card.splits["heldout"].count == 0
    assert all(sha256_file(tmp_path / "p" / s.path) == s.sha256 for s in shards)
    x, y = load_prepared(tmp_path / "p", "heldout")
    assert x.shape == (0, 1, 8, 8) and y.shape == (0,)
    victim = tmp_path / "p" / shards[2].path
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match=f"shard-00002.parquet: sha256 expected {shards[2].sha256}"):
        load_prepared(tmp_path / "p", "train")


def test_split_indices_and_config_errors():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    tr, ho = split_indices(labels, 0.1, seed=0)
    assert np.bincount(labels[ho]).tolist() == [1, 2, 3, 4] and len(np.intersect1d(tr, ho)) == 0
    assert np.array_equal(np.sort(np.concatenate([tr, ho])), np.arange(100))
    assert np.array_equal(split_indices(labels, 0.1, seed=0)[1], ho)
    tr_u, ho_u = split_indices(np.full(50, -1), 0.2, seed=0)  # unlabelled: plain random split
    assert len(ho_u) == 10 and len(tr_u) == 40
    ok = dict(source="sklearn-digits", source_path=None, source_sha256=None, heldout_fraction=0.1, seed=0, shard_size=8)
    PrepareConfig(**ok)
    with pytest.raises(ValueError, match="prepare.source: expected one of"):
        PrepareConfig(**{**ok, "source": "mnist"})
    with pytest.raises(ValueError, match="prepare.heldout_fraction: expected a number in \\[0, 1\\), got 1.0"):
        PrepareConfig(**{**ok, "heldout_fraction": 1.0})
    with pytest.raises(ValueError, match="prepare.source_path: required for source 'imagefolder'"):
        PrepareConfig(**{**ok, "source": "imagefolder"})
    with pytest.raises(ValueError, match="prepare.shard_size"):
        PrepareConfig(**{**ok, "shard_size": 0})


# --- the dataset card --------------------------------------------------------------------------------------------
def test_card_round_trip_bytes_and_one_line_errors(tmp_path):
    card = prepare_dataset("sklearn-digits", None, tmp_path / "a", heldout_fraction=0.1, seed=0, progress=False)
    on_disk = (tmp_path / "a" / "card.json").read_bytes()
    assert card.to_json().encode() == on_disk and DatasetCard.read(tmp_path / "a") == card
    card.write(tmp_path)  # write reproduces the bytes
    assert (tmp_path / "card.json").read_bytes() == on_disk
    # attributes carry the JSON values
    assert card.image.num_levels == card.to_dict()["image"]["num_levels"] == 17
    assert card.splits["train"].count == card.to_dict()["splits"]["train"]["count"]
    raw = json.loads(on_disk)
    for edit, fragment in (
        (lambda d: d["image"].update(num_levels=1), "image.num_levels: expected an int >= 2 and <= 256, got 1"),
        (lambda d: d["labels"].update(class_names=["a"]), "labels.class_names: expected null or 10 strings"),
        (lambda d: d["splits"]["train"]["shards"][0].update(rows="x"), "splits.train.shards[0].rows: expected an int"),
        (lambda d: d["splits"]["heldout"].update(count=3), "splits.heldout.count: expected the sum of its shard rows"),
        (lambda d: d.pop("source"), "source: expected an object, got None"),
        (lambda d: d.update(format="v0"), "expected format 'ctm-prepared/v1', got 'v0'"),
    ):
        bad = json.loads(on_disk)
        edit(bad)
        (tmp_path / "card.json").write_text(json.dumps(bad))
        with pytest.raises(InputError) as info:
            load_card(tmp_path)
        msg = str(info.value)
        assert fragment in msg and "\n" not in msg and str(tmp_path / "card.json") in msg, msg
    assert DatasetCard.from_dict(raw) == card
    (tmp_path / "card.json").unlink()
    with pytest.raises(FileNotFoundError, match="run the prepare stage"):
        load_card(tmp_path)


# --- imagefolder -------------------------------------------------------------------------------------------------
def _class_images(n_per_class: int = 3, size: int = 8):
    """{'train/<class>/<i>.png': (3, size, size) uint8} for classes dog, cat, zebra (sorted: cat, dog, zebra)."""
    return {
        f"train/{c}/{i:04d}.png": RNG.integers(0, 256, (3, size, size), dtype=np.uint8)
        for c in ("dog", "cat", "zebra")
        for i in range(n_per_class)
    }


def _write_source(kind: str, files: dict[str, bytes], root: Path) -> Path:
    if kind == "dir":
        for name, data in files.items():
            (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "src" / name).write_bytes(data)
        return root / "src"
    if kind == "zip":
        path = root / "src.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in reversed(list(files.items())):  # member order must not matter
                zf.writestr(name, data)
        return path
    path = root / "src.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in reversed(list(files.items())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind", ["dir", "zip", "tar.gz"])
def test_imagefolder_sources(tmp_path, kind):
    images = _class_images()
    files = {k: _png(v) for k, v in images.items()}
    files["train/README.txt"] = b"not an image, ignored"
    src = _write_source(kind, files, tmp_path)
    card = prepare_dataset("imagefolder", src, tmp_path / "out", heldout_fraction=0.0, progress=False)
    assert card.labels.class_names == ("cat", "dog", "zebra") and card.labels.label_dim == 3
    assert card.count == 9 and card.image.num_levels == 256 and card.image.bit_depth == 8
    if kind != "dir":
        assert card.source.sha256 == sha256_file(src)
    x, y = load_prepared(tmp_path / "out", "train")
    names = sorted(images)  # sorted relative paths: cat/*, dog/*, zebra/*
    assert np.array_equal(x, np.stack([images[n] for n in names]))
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("kind", ["dir", "tar.gz"])
def test_imagefolder_problems_listed_and_nothing_written(tmp_path, kind):
    images = _class_images()
    files = {k: _png(v) for k, v in images.items()}
    files["train/cat/broken.png"] = files["train/cat/0000.png"][:40]  # truncated PNG
    files["train/dog/big.png"] = _png(RNG.integers(0, 256, (3, 16, 16), dtype=np.uint8))
    src = _write_source(kind, files, tmp_path)
    out = tmp_path / "out"
    prepare_dataset("sklearn-digits", None, out, progress=False)  # a previous good output
    before = (out / "card.json").read_bytes()
    with pytest.raises(DatasetError) as ei:
        prepare_dataset("imagefolder", src, out, progress=False)
    msg = str(ei.value)
    assert "2 problem(s)" in msg
    assert "train/cat/broken.png: cannot decode" in msg
    assert "train/dog/big.png: size 3x16x16 (CxHxW), expected 3x8x8" in msg
    assert (out / "card.json").read_bytes() == before  # previous output untouched
    assert _leftovers(tmp_path) == []  # no temp dir left next to out


def test_truncated_archive_is_one_clear_error(tmp_path):
    src = _write_source("tar.gz", {k: _png(v) for k, v in _class_images(20, 16).items()}, tmp_path)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"cannot read .*cut\.tar\.gz .*truncated or corrupt"):
        prepare_dataset("imagefolder", cut, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_grey_unlabelled_folder(tmp_path):
    imgs = {f"{i}.png": RNG.integers(0, 256, (1, 4, 4), dtype=np.uint8) for i in range(5)}
    src = _write_source("dir", {k: _png(v) for k, v in imgs.items()}, tmp_path)
    card = prepare_dataset("imagefolder", src, tmp_path / "out", heldout_fraction=0.4, progress=False)
    assert card.labels.label_dim == 0 and card.labels.class_names is None
    assert card.image.channels == 1 and card.splits["heldout"].count == 2
    x, y = load_prepared(tmp_path / "out", "train")
    assert x.shape == (3, 1, 4, 4) and (y == -1).all()


# --- cifar10-python ----------------------------------------------------------------------------------------------
def _py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A protocol-2 pickle laid out like the Python 2 originals (str as BINSTRING, numpy.core._reconstruct)."""
    n, d = data.shape
    raw = data.tobytes()
    lab = b"".join(b"K" + bytes([v]) for v in labels)
    return (
        b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03K\x00\x85U"
        b"\x01b\x87Rq\x04(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", d) + b"\x86cnumpy\ndtype\nq\x05U"
        b"\x02u1K\x00K\x01\x87Rq\x06(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T"
        + struct.pack("<I", len(raw))
        + raw
        + b"tbU\x06labelsq\x07]("
        + lab
        + b"eu."
    )


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def _cifar_tarball(path: Path, n: int = 4, evil_batch: int | None = None):
    data = RNG.integers(0, 256, (5 * n, 3072), dtype=np.uint8)
    labels = RNG.integers(0, 10, 5 * n).tolist()
    members = {
        "cifar-10-batches-py/batches.meta": pickle.dumps(
            {
                b"label_names": [
                    c.encode() for c in ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
                ],
                b"num_vis": 3072,
            },
            protocol=4,
        )
    }
    for b in range(5):
        x, y = data[b * n : (b + 1) * n], labels[b * n : (b + 1) * n]
        if b + 1 == evil_batch:
            blob = pickle.dumps({b"data": _Evil(), b"labels": y}, protocol=4)
        elif b == 0:
            blob = _py2_pickle(x, y)
        else:
            blob = pickle.dumps({b"batch_label": b"training batch", b"data": x, b"labels": y}, protocol=4)
        members[f"cifar-10-batches-py/data_batch_{b + 1}"] = blob
    members["cifar-10-batches-py/test_batch"] = pickle.dumps({b"data": data[:n], b"labels": labels[:n]}, protocol=4)
    with tarfile.open(path, "w:gz") as tf:
        for name in sorted(members, reverse=True):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tf.addfile(info, io.BytesIO(members[name]))
    return data, np.array(labels)


def test_cifar10_python(tmp_path):
    data, labels = _cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    card = prepare_dataset(
        "cifar10-python",
        tmp_path / "cifar-10-python.tar.gz",
        tmp_path / "out",
        heldout_fraction=0.0,
        shard_size=7,
        progress=False,
    )
    assert card.count == 20 and len(card.splits["train"].shards) == 3
    assert card.labels.class_names[:2] == ("plane", "car") and card.labels.label_dim == 10
    assert card.source.sha256 == sha256_file(tmp_path / "cifar-10-python.tar.gz")
    x, y = load_prepared(tmp_path / "out", "train")
    assert np.array_equal(x, data.reshape(20, 3, 32, 32)) and np.array_equal(y, labels)  # batch order kept
    # Channel planes: the first 1024 values of a row are the red plane.
    assert np.array_equal(x[0, 0].ravel(), data[0, :1024])


def test_cifar10_python_hostile_pickle_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _cifar_tarball(tmp_path / "c.tar.gz", evil_batch=3)
    with pytest.raises(UnsafePickleError, match=r"data_batch_3: refusing to unpickle global (posix|os)\.system"):
        prepare_dataset("cifar10-python", tmp_path / "c.tar.gz", tmp_path / "out", progress=False)
    assert not (tmp_path / "pwned-by-pickle").exists() and not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


# --- edm-zip -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("labelled", [True, False])
def test_edm_zip(tmp_path, labelled):
    imgs = [RNG.integers(0, 256, (3, 4, 4), dtype=np.uint8) for _ in range(6)]
    names = [f"{i:08d}"[:5] + f"/img{i:08d}.png" for i in range(6)]  # EDM dataset_tool.py layout
    labels = [2, 0, 1, 2, 0, 1]
    path = tmp_path / "ds.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for n, a in zip(names, imgs, strict=True):
            zf.writestr(n, _png(a))
        meta = {"labels": [[n, lab] for n, lab in zip(names, labels, strict=True)] if labelled else None}
        zf.writestr("dataset.json", json.dumps(meta))
    card = prepare_dataset("edm-zip", path, tmp_path / "out", heldout_fraction=0.0, progress=False)
    x, y = load_prepared(tmp_path / "out", "train")
    assert np.array_equal(x, np.stack(imgs))
    assert y.tolist() == (labels if labelled else [-1] * 6)
    assert card.labels.label_dim == (3 if labelled else 0)


# --- the real CIFAR-10 JPEG test set in ../shared ------------------------------------------------------------------
def test_real_cifar10_jpg_test_set(tmp_path, shared_file):
    src = shared_file("data", "cifar10-jpg", "test.tar.gz")
    card = prepare_dataset("imagefolder", src, tmp_path / "out", heldout_fraction=0.1, seed=0, progress=False)
    assert card.source.sha256 == "c6f385b9653df35ff64f210ad8674f3d0b99564ea0cd389e1b3aa41dbc5bf703"
    assert card.count == 10_000 and card.splits["heldout"].count == 1_000
    assert card.labels.class_names[0] == "airplane" and card.labels.label_dim == 10
    assert set(card.splits["heldout"].class_counts.values()) == {100}
    x, y = load_prepared(tmp_path / "out", "train")
    assert x.shape == (9_000, 3, 32, 32) and np.bincount(y).tolist() == [900] * 10
    assert 100 < x.mean() < 140  # real photos, not noise or zeros


# --- entrypoint ----------------------------------------------------------------------------------------------------
def test_cli_dry_run_and_params(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  source: sklearn-digits\n  path: null\n  heldout_fraction: 0.2\n  seed: 3\n")
    out = tmp_path / "out"
    assert main(["--params", str(params), "--out", str(out), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["config"]["heldout_fraction"] == 0.2 and not out.exists()
    assert main(["--params", str(params), "--out", str(out), "--seed", "4", "--no-progress"]) == 0
    assert load_card(out).params["seed"] == 4 and load_card(out).splits["heldout"].count == 359
    params.write_text("data:\n  sorce: sklearn-digits\n")
    assert main(["--params", str(params), "--out", str(out), "--dry-run"]) == 2
    assert "data.sorce: unknown key" in capsys.readouterr().err  # the whole params.yaml goes through the schema


def test_cli_error_is_one_line_named_after_the_stage(tmp_path):
    """Under `python -m` the stage's logger is `__main__`; the log line still names the stage module."""
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.prepare", "--out", str(tmp_path / "o"), "--heldout-fraction", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("ERROR pipelines.prepare: params error: data.heldout_fraction"), lines[0]
    assert not (tmp_path / "o").exists()
