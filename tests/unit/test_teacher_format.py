"""Tests for ctm_core/io/teacher_format.py: safetensors teacher folders, format sniffing, strict loading."""

from __future__ import annotations

import io
import json
import os
import struct
import sys

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from ctm_core.io import teacher_format
from ctm_core.io.edm_pickle import read_edm_snapshot
from ctm_core.io.hashing import sha256_file
from ctm_core.io.teacher_format import (
    CONFIG_FILE,
    METADATA_KEY,
    WEIGHTS_FILE,
    convert_edm_pickle,
    load_edm_checkpoint,
    read_teacher,
    save_teacher,
    weights_sha256,
)

FIXTURES = ["tiny-uncond-vp", "tiny-cond-ve", "tiny-cond-adm"]


@pytest.fixture
def edm_pkl(shared_file):
    """name -> ../shared/fixtures/edm/<name>.pkl (default tiny-cond-ve); skips when absent."""
    return lambda name="tiny-cond-ve": shared_file("fixtures", "edm", f"{name}.pkl")


def _listing(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key  # bitwise for float32 without NaN


@pytest.mark.parametrize("name", FIXTURES)
def test_convert_round_trip(edm_pkl, tmp_path, name):
    snap = read_edm_snapshot(edm_pkl(name))
    out = tmp_path / "teacher"
    config = convert_edm_pickle(edm_pkl(name), out)
    assert _listing(out) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    class_name, init_kwargs, state_dict, read_config = read_teacher(out)
    assert class_name == snap.class_name == "EDMPrecond"
    assert init_kwargs == snap.init_kwargs
    _assert_same_tensors(state_dict, snap.state_dict)
    on_disk = json.loads((out / CONFIG_FILE).read_text())
    files = on_disk.pop("files")  # the artifact's digests: in config.json only, a file cannot hold its own sha256
    assert read_config == config == on_disk and config["kind"] == "teacher"
    assert files[WEIGHTS_FILE]["sha256"] == sha256_file(out / WEIGHTS_FILE)
    assert files[WEIGHTS_FILE]["weights_sha256"] == config["weights_sha256"]
    assert config["source_file_sha256"] == snap.file_sha256
    assert config["source_sha256"] == snap.source_sha256
    assert config["weights_sha256"] == weights_sha256(snap.state_dict)
    assert config["precond"] == "EDMPrecond" and config["format_version"] == teacher_format.FORMAT_VERSION
    assert config["num_tensors"] == len(snap.state_dict)


def test_metadata_json_in_safetensors(edm_pkl, tmp_path):
    out = tmp_path / "teacher"
    config = convert_edm_pickle(edm_pkl(), out)
    with safetensors.safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY]) == config
    # the weights file alone is a complete teacher
    class_name, init_kwargs, _, _ = read_teacher(out / WEIGHTS_FILE)
    assert (class_name, init_kwargs) == (config["class_name"], config["init_kwargs"])


def test_read_from_bytes_and_file_object(edm_pkl, tmp_path):
    out = tmp_path / "teacher"
    convert_edm_pickle(edm_pkl(), out)
    ref = read_teacher(out)
    data = (out / WEIGHTS_FILE).read_bytes()
    for source in (data, io.BytesIO(data)):
        got = read_teacher(source)
        assert got[0] == ref[0] and got[1] == ref[1] and got[3] == ref[3]
        _assert_same_tensors(got[2], ref[2])


def test_weights_sha256_is_a_function_of_the_tensors():
    a = {"x": torch.arange(4.0), "y": torch.ones(2, 2)}
    assert weights_sha256(a) == weights_sha256(dict(reversed(list(a.items()))))
    assert weights_sha256(a) != weights_sha256({"x": torch.arange(4.0), "y": torch.ones(4)})  # shape
    assert weights_sha256(a) != weights_sha256({"x": torch.arange(4.0).double(), "y": torch.ones(2, 2)})  # dtype
    b = {"x": torch.arange(4.0), "y": torch.ones(2, 2)}
    b["y"][1, 1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))  # one ulp
    assert weights_sha256(a) != weights_sha256(b)


def test_tampered_weights_rejected(edm_pkl, tmp_path):
    out = tmp_path / "teacher"
    convert_edm_pickle(edm_pkl(), out)
    path = out / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # last byte of the last tensor: the file is still valid safetensors
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="weights sha256 mismatch"):
        read_teacher(out)
    with pytest.raises(ValueError, match="weights sha256 mismatch"):
        load_edm_checkpoint(out)


def test_config_json_disagreeing_with_weights_rejected(edm_pkl, tmp_path):
    out = tmp_path / "teacher"
    config = convert_edm_pickle(edm_pkl(), out)
    config["init_kwargs"]["model_channels"] = 128
    (out / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="disagrees"):
        read_teacher(out)


def test_read_errors(edm_pkl, tmp_path):
    with pytest.raises(ValueError, match=f"expected a teacher folder with {WEIGHTS_FILE}"):
        read_teacher(tmp_path)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_teacher(b"\x05\x00")
    with pytest.raises(ValueError, match="convert_edm_pickle"):
        read_teacher(edm_pkl())
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(safetensors.torch.save({"w": torch.zeros(2)}))
    with pytest.raises(ValueError, match=f"without '{METADATA_KEY}' metadata"):
        read_teacher(plain)


def test_no_partial_output_when_out_dir_is_a_file(edm_pkl, tmp_path):
    target = tmp_path / "teacher"
    target.write_text("keep me")
    snap = read_edm_snapshot(edm_pkl())
    with pytest.raises(ValueError, match="out_dir"):
        save_teacher(snap.class_name, snap.init_kwargs, snap.state_dict, target)
    assert target.read_text() == "keep me"
    assert _listing(tmp_path) == ["teacher"]


def test_no_partial_output_on_bad_input(tmp_path):
    out = tmp_path / "teacher"
    with pytest.raises(ValueError, match=r"state_dict\['w'\]"):
        save_teacher("EDMPrecond", {}, {"w": "not a tensor"}, out)
    with pytest.raises(ValueError, match="init_kwargs"):
        save_teacher("EDMPrecond", {"f": object()}, {"w": torch.zeros(1)}, out)
    assert _listing(tmp_path) == []


def test_no_partial_output_when_a_write_fails(edm_pkl, tmp_path, monkeypatch):
    snap = read_edm_snapshot(edm_pkl())
    args = (snap.class_name, snap.init_kwargs, snap.state_dict)
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # while writing the second file
            raise OSError("disk full (simulated)")
        real_fsync(fd)

    # new folder: nothing appears
    monkeypatch.setattr(teacher_format.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        save_teacher(*args, tmp_path / "new")
    assert _listing(tmp_path) == []

    # existing folder: the old teacher stays intact, no temporary files left
    monkeypatch.setattr(teacher_format.os, "fsync", real_fsync)
    old = tmp_path / "old"
    save_teacher(*args, old)
    before = {p: (old / p).read_bytes() for p in _listing(old)}
    calls["n"] = 0
    monkeypatch.setattr(teacher_format.os, "fsync", failing_fsync)
    changed = {k: v + 1 for k, v in snap.state_dict.items()}
    with pytest.raises(OSError, match="simulated"):
        save_teacher(snap.class_name, snap.init_kwargs, changed, old)
    assert {p: (old / p).read_bytes() for p in _listing(old)} == before
    assert _listing(tmp_path) == sorted(["old", f"old/{CONFIG_FILE}", f"old/{WEIGHTS_FILE}"])


def test_save_into_existing_folder_replaces(edm_pkl, tmp_path):
    snap = read_edm_snapshot(edm_pkl())
    out = tmp_path / "teacher"
    save_teacher(snap.class_name, snap.init_kwargs, snap.state_dict, out)
    changed = {k: v * 2 for k, v in snap.state_dict.items()}
    save_teacher(snap.class_name, snap.init_kwargs, changed, out, source_file_sha256="ab" * 32)
    _, _, state_dict, config = read_teacher(out)
    _assert_same_tensors(state_dict, changed)
    assert config["source_file_sha256"] == "ab" * 32
    assert _listing(out) == sorted([CONFIG_FILE, WEIGHTS_FILE])


# ------------------------------------------------------------------------------------------------------------
# load_edm_checkpoint (builds ctm_core.nets.precond networks).


@pytest.mark.parametrize("name", FIXTURES)
def test_load_edm_checkpoint_all_formats(edm_pkl, tmp_path, name):
    pkl = edm_pkl(name)
    snap = read_edm_snapshot(pkl)
    out = tmp_path / "teacher"
    convert_edm_pickle(pkl, out)
    sources = [
        pkl,
        str(pkl),
        pkl.read_bytes(),
        open(pkl, "rb"),
        out,
        out / WEIGHTS_FILE,
        io.BytesIO((out / WEIGHTS_FILE).read_bytes()),
    ]
    for source in sources:
        net = load_edm_checkpoint(source)
        if hasattr(source, "close"):
            source.close()
        assert type(net).__name__ == "EDMPrecond"
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        sd = net.state_dict()
        assert list(sd) == list(snap.state_dict)  # same key order as EDM's own state_dict
        _assert_same_tensors(sd, snap.state_dict)
    assert not [m for m in sys.modules if m.split(".")[0] in ("torch_utils", "dnnlib")]


def test_loaded_teacher_matches_edm_reference(shared_file, edm_pkl, tmp_path):
    """D(x; sigma) of the loaded teacher equals what NVlabs/edm computed from the same pickle (fixture README)."""
    ref = np.load(shared_file("fixtures", "edm", "tiny-cond-adm.ref.npz"))
    out = tmp_path / "teacher"
    convert_edm_pickle(edm_pkl("tiny-cond-adm"), out)
    net = load_edm_checkpoint(out)
    labels = torch.from_numpy(ref["labels"])
    for k in (0, 5, 9):
        x = torch.from_numpy(ref["den_x"][k])
        sigma = torch.full((x.shape[0],), float(ref["den_sigmas"][k]), dtype=torch.float32)
        D = net(x, sigma, labels)
        torch.testing.assert_close(D, torch.from_numpy(ref["den_D"][k]), rtol=1e-5, atol=1e-5)


def test_load_rejects_mismatched_keys(edm_pkl, tmp_path):
    snap = read_edm_snapshot(edm_pkl("tiny-uncond-vp"))
    sd = dict(snap.state_dict)
    dropped = "model.map_layer0.bias"
    del sd[dropped]
    sd["model.extra.weight"] = torch.zeros(1)
    save_teacher(snap.class_name, snap.init_kwargs, sd, tmp_path / "bad")
    with pytest.raises(
        ValueError,
        match=r"missing keys \['model\.map_layer0\.bias'\].*unexpected keys "
        r"\['model\.extra\.weight'\]",
    ):
        load_edm_checkpoint(tmp_path / "bad")


def test_load_rejects_wrong_shapes(edm_pkl, tmp_path):
    snap = read_edm_snapshot(edm_pkl("tiny-uncond-vp"))
    sd = dict(snap.state_dict)
    sd["model.map_layer0.bias"] = torch.zeros(3)
    save_teacher(snap.class_name, snap.init_kwargs, sd, tmp_path / "bad")
    with pytest.raises(ValueError, match=r"model\.map_layer0\.bias: expected \[64\], got \[3\]"):
        load_edm_checkpoint(tmp_path / "bad")


def test_load_unknown_format(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"GIF89a not a checkpoint")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_edm_checkpoint(path)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_edm_checkpoint(struct.pack("<Q", 10**9) + b"{")
