"""The one artifact format (ctm_core/io/artifact.py): round trip, digests, kind checks, atomic writes, old folders."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch

from ctm_core.errors import InputError
from ctm_core.io import artifact
from ctm_core.io.artifact import CONFIG_FILE, read_artifact, read_artifact_config, save_artifact, write_artifact
from ctm_core.io.hashing import sha256_file


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.zeros(4, dtype=torch.float64), "n": torch.arange(5)}


def _listing(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_round_trip_records_kind_version_and_both_digests(tmp_path):
    tensors = _tensors()
    digest = save_artifact(tmp_path / "a", tensors, {"x": 1}, kind="thing", weights_file="w.safetensors", meta={"m": 2})
    assert _listing(tmp_path / "a") == [CONFIG_FILE, "w.safetensors"]
    on_disk = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert on_disk["kind"] == "thing" and on_disk["artifact_version"] == artifact.ARTIFACT_VERSION
    assert on_disk["meta"] == {"m": 2} and on_disk["x"] == 1
    record = on_disk["files"]["w.safetensors"]
    assert record["sha256"] == digest == sha256_file(tmp_path / "a" / "w.safetensors")
    assert record["weights_sha256"] == artifact.weights_sha256(tensors)
    art = read_artifact(tmp_path / "a", "thing")
    assert art.config == {k: v for k, v in on_disk.items() if k != "files"} and art.files == on_disk["files"]
    assert art.sha256 == {"w.safetensors": digest}
    for key, value in tensors.items():
        assert (
            torch.equal(art.tensors["w.safetensors"][key], value)
            and art.tensors["w.safetensors"][key].dtype == value.dtype
        )
    # same inputs, same bytes
    assert (
        save_artifact(tmp_path / "b", tensors, {"x": 1}, kind="thing", weights_file="w.safetensors", meta={"m": 2})
        == digest
    )


def test_embedded_config_has_everything_but_the_files_record(tmp_path):
    save_artifact(tmp_path / "a", _tensors(), {"x": 1}, kind="thing", embed_key="cfg")
    with safetensors.safe_open(str(tmp_path / "a" / "weights.safetensors"), framework="pt") as f:
        embedded = json.loads(f.metadata()["cfg"])
    assert embedded == {"x": 1, "kind": "thing", "artifact_version": artifact.ARTIFACT_VERSION}


def test_refusals_are_one_line_input_errors(tmp_path):
    save_artifact(tmp_path / "a", _tensors(), {}, kind="thing")
    with pytest.raises(InputError, match="expected kind 'other', got 'thing'") as e:
        read_artifact(tmp_path / "a", "other")
    _one_line(e)
    with pytest.raises(InputError, match="expected a thing folder") as e:
        read_artifact(tmp_path / "missing", "thing")
    _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json: missing") as e:
        read_artifact(tmp_path / "empty", "thing")
    _one_line(e)
    with pytest.raises(InputError, match="expected a weights file listed"):
        read_artifact(tmp_path / "a", "thing", files=["other.safetensors"])
    (tmp_path / "a" / "weights.safetensors").unlink()
    with pytest.raises(InputError, match="weights.safetensors: missing") as e:
        read_artifact(tmp_path / "a", "thing")
    _one_line(e)
    # a config.json pointing outside its folder
    save_artifact(tmp_path / "c", _tensors(), {}, kind="thing")
    cfg = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())
    cfg["files"] = {"../a/x.safetensors": {"sha256": None}}
    (tmp_path / "c" / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="relative file name"):
        read_artifact(tmp_path / "c", "thing")


def test_tampered_weights_are_refused_before_use(tmp_path):
    save_artifact(tmp_path / "a", _tensors(), {}, kind="thing")
    path = tmp_path / "a" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # still valid safetensors, other tensor bytes
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="weights sha256 mismatch") as e:
        read_artifact(tmp_path / "a", "thing")
    _one_line(e)
    # same file bytes recorded, different tensors recorded: the tensors' digest catches it
    cfg = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    cfg["files"]["weights.safetensors"]["sha256"] = sha256_file(path)
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="weights sha256 mismatch"):
        read_artifact(tmp_path / "a", "thing")


def test_configs_without_kind_need_a_legacy_reader(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "w.safetensors").write_bytes(safetensors.torch.save(_tensors()))
    (folder / CONFIG_FILE).write_text(json.dumps({"format": "old/1", "digest": sha256_file(folder / "w.safetensors")}))
    with pytest.raises(InputError, match="expected 'kind' and 'files'"):
        read_artifact(folder, "thing")

    def legacy(config):
        if config.get("format") != "old/1":
            raise InputError("format: expected 'old/1'")
        return {"w.safetensors": {"sha256": config["digest"], "weights_sha256": None}}

    art = read_artifact(folder, "thing", legacy=legacy)
    assert set(art.tensors["w.safetensors"]) == {"w", "b", "n"} and art.config["format"] == "old/1"
    config, files = read_artifact_config(folder, "thing", legacy=legacy)
    assert files == {"w.safetensors": {"sha256": config["digest"], "weights_sha256": None}}


def test_invalid_inputs_write_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_artifact(tmp_path / "a", _tensors(), {"bad": object()}, kind="thing")
    with pytest.raises(InputError, match=r"tensors\['w'\]"):
        save_artifact(tmp_path / "a", {"w": "not a tensor"}, {}, kind="thing")
    with pytest.raises(InputError, match="files"):
        save_artifact(tmp_path / "a", _tensors(), {"files": {}}, kind="thing")
    (tmp_path / "f").write_text("keep")
    with pytest.raises(InputError, match="out_dir"):
        save_artifact(tmp_path / "f", _tensors(), {}, kind="thing")
    assert _listing(tmp_path) == ["f"] and (tmp_path / "f").read_text() == "keep"


def test_failed_writes_leave_the_old_folder_intact(tmp_path, monkeypatch):
    real_fsync, calls = os.fsync, {"n": 0}

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        real_fsync(fd)

    monkeypatch.setattr(artifact.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        save_artifact(tmp_path / "new", _tensors(), {}, kind="thing")
    assert _listing(tmp_path) == []

    monkeypatch.setattr(artifact.os, "fsync", real_fsync)
    save_artifact(tmp_path / "old", _tensors(0), {"v": 0}, kind="thing")
    (tmp_path / "old" / "notes.txt").write_text("kept")
    before = {p: (tmp_path / "old" / p).read_bytes() for p in _listing(tmp_path / "old")}
    for replace in (False, True):
        calls["n"] = 0
        monkeypatch.setattr(artifact.os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="simulated"):
            write_artifact(
                tmp_path / "old", {"weights.safetensors": _tensors(1)}, {"v": 1}, kind="thing", replace=replace
            )
        monkeypatch.setattr(artifact.os, "fsync", real_fsync)
        assert {p: (tmp_path / "old" / p).read_bytes() for p in _listing(tmp_path / "old")} == before
        assert _listing(tmp_path) == ["old", *[f"old/{p}" for p in sorted(before)]]


def test_existing_folders_keep_other_files_unless_replaced(tmp_path):
    out = tmp_path / "a"
    write_artifact(out, {"w/x.safetensors": _tensors(0), "w/y.safetensors": _tensors(1)}, {}, kind="thing")
    (out / "notes.txt").write_text("kept")
    write_artifact(out, {"w/x.safetensors": _tensors(2)}, {"v": 2}, kind="thing", extra_json={"run.json": {"r": 1}})
    assert _listing(out) == sorted([CONFIG_FILE, "notes.txt", "run.json", "w", "w/x.safetensors", "w/y.safetensors"])
    art = read_artifact(out, "thing")
    assert list(art.tensors) == ["w/x.safetensors"] and torch.equal(
        art.tensors["w/x.safetensors"]["w"], _tensors(2)["w"]
    )
    write_artifact(out, {"w/x.safetensors": _tensors(3)}, {}, kind="thing", replace=True)
    assert _listing(out) == sorted([CONFIG_FILE, "w", "w/x.safetensors"])
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert oct((out / "w" / "x.safetensors").stat().st_mode & 0o777) == "0o644"


def test_teacher_weights_sha256_is_the_artifact_one():
    from ctm_core.io import teacher_format

    assert teacher_format.weights_sha256 is artifact.weights_sha256


# ---------------------------------------------------------------------------------------------------------------------
# Folders written before the artifact format (no "kind", no "files") still read, with the digests they record.


def _tiny_student():
    from ctm_core.nets.student import CTMStudent

    torch.manual_seed(0)
    kw = dict(img_resolution=8, img_channels=1, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    return CTMStudent(**kw)


def test_old_teacher_folder_reads(tmp_path):
    from ctm_core.io.teacher_format import METADATA_KEY, read_teacher, save_teacher
    from ctm_core.nets.precond import EDMPrecond

    net = EDMPrecond(8, 1, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    config = save_teacher("EDMPrecond", net.init_kwargs, net.state_dict(), tmp_path / "new")
    old = {k: v for k, v in config.items() if k not in ("kind", "artifact_version")}
    folder = tmp_path / "old"
    folder.mkdir()
    blob = bytearray(safetensors.torch.save(net.state_dict(), metadata={METADATA_KEY: json.dumps(old)}))
    (folder / "teacher.safetensors").write_bytes(bytes(blob))
    (folder / CONFIG_FILE).write_text(json.dumps(old, indent=2))
    class_name, _, state_dict, read_config = read_teacher(folder)
    assert class_name == "EDMPrecond" and read_config == old
    assert all(torch.equal(state_dict[k], v) for k, v in net.state_dict().items())
    blob[-1] ^= 0x01
    (folder / "teacher.safetensors").write_bytes(bytes(blob))
    with pytest.raises(InputError, match="weights sha256 mismatch"):  # the tensors' digest it records
        read_teacher(folder)


def test_old_student_folder_reads(tmp_path):
    from ctm_core.io.hashing import sha256_bytes
    from ctm_core.io.student_format import FORMAT, load_student, read_student_config

    student = _tiny_student()
    blob = bytearray(safetensors.torch.save({k: v.contiguous() for k, v in student.state_dict().items()}))
    folder = tmp_path / "old"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "online.safetensors").write_bytes(bytes(blob))
    old = {
        "format": FORMAT,
        "class_name": "CTMStudent",
        "init_kwargs": student.init_kwargs,
        "variants": {"online": {"file": "weights/online.safetensors", "sha256": sha256_bytes(bytes(blob))}},
        "meta": {"steps": 3},
    }
    (folder / CONFIG_FILE).write_text(json.dumps(old, indent=2, sort_keys=True))
    assert read_student_config(folder) == old
    loaded = load_student(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in student.state_dict().items())
    blob[-1] ^= 0x01
    (folder / "weights" / "online.safetensors").write_bytes(bytes(blob))
    with pytest.raises(InputError, match="sha256 mismatch"):  # the file digest it records
        load_student(folder)


def test_old_classifier_folder_reads(tmp_path):
    from ctm_core.eval.classifier import SmallClassifier, load_classifier, save_classifier

    model = SmallClassifier(1, 8, 10, generator=torch.Generator().manual_seed(0))
    old = {"class_name": "SmallClassifier", "init_kwargs": model.init_kwargs, "meta": {"k": 1}}
    folder = tmp_path / "old"
    folder.mkdir()
    state = model.state_dict()
    blob = safetensors.torch.save(state, metadata={"config": json.dumps(old, sort_keys=True)})
    (folder / "classifier.safetensors").write_bytes(blob)
    (folder / CONFIG_FILE).write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    digest = sha256_file(folder / "classifier.safetensors")
    loaded = load_classifier(folder, expected_sha256=digest)
    assert loaded.meta == {"k": 1} and loaded.file_sha256 == digest
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    # written now: an artifact of kind "classifier", the returned digest is the weights file's
    new_digest = save_classifier(model, tmp_path / "new", meta={"k": 1})
    assert json.loads((tmp_path / "new" / CONFIG_FILE).read_text())["kind"] == "classifier"
    assert load_classifier(tmp_path / "new", expected_sha256=new_digest).meta == {"k": 1}
    assert load_classifier(tmp_path / "new" / "classifier.safetensors").file_sha256 == new_digest
    with pytest.raises(InputError, match="expected kind 'student', got 'classifier'"):
        from ctm_core.io.student_format import load_student

        load_student(tmp_path / "new")
