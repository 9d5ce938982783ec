"""Hostile remote inputs: a tampered card.json / teacher config.json on S3 (moto on 127.0.0.1) must not make the
driver write outside its input cache, and a presigned URL given as data.path must not be stored in the card."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctm_core.errors import InputError
from pipelines.support.datasets import prepare_dataset
from pipelines.support.remote_inputs import confined, resolve_inputs


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "prepared"
    prepare_dataset("sklearn-digits", None, out, heldout_fraction=0.1, seed=0, shard_size=4096, progress=False)
    return out


@pytest.mark.parametrize("shard_path", ["{victim}", "train/../../../../../../../..{victim}", "../../escape.parquet"])
def test_tampered_card_shard_path_writes_nothing_outside_the_cache(remote, s3, prepared, tmp_path, shard_path):
    c, bucket = s3["client"], s3["bucket"]
    victim = tmp_path / "home" / ".bashrc"  # stands in for ~/.bashrc
    victim.parent.mkdir()
    victim.write_text("# my shell settings\n")
    remote.upload_tree(c, bucket, "ctm/prepared", prepared)
    card = json.loads((prepared / "card.json").read_text())
    shard = card["splits"]["train"]["shards"][0]
    bad = shard_path.format(victim=victim)
    # the attacker uploads a replacement body under the key the tampered path names, with a matching sha256
    body = b"echo pwned\n"
    c.put_object(Bucket=bucket, Key=f"ctm/prepared/{bad}", Body=body)
    shard["path"], shard["sha256"] = bad, remote.sha256_bytes(body)
    c.put_object(Bucket=bucket, Key="ctm/prepared/card.json", Body=json.dumps(card).encode())
    cache = tmp_path / "cache"
    outside_before = _files(tmp_path) - _files(cache) if cache.exists() else _files(tmp_path)

    with pytest.raises(InputError) as ei:
        resolve_inputs(f"s3://{bucket}/ctm/prepared", str(tmp_path / "teacher"), cache_dir=cache)
    msg = str(ei.value)
    assert "\n" not in msg and f"s3://{bucket}/ctm/prepared/card.json: splits.train.shards[0].path" in msg
    assert "expected a relative path inside the split folder" in msg and "fix:" in msg
    assert victim.read_text() == "# my shell settings\n"
    assert _files(tmp_path) - _files(cache) == outside_before  # nothing new outside the cache
    assert not list(cache.glob("prepared/*/card.json")) and not [p for p in cache.glob("tmp/*") if p.is_file()]


def test_cache_confinement_second_line(tmp_path):
    folder = tmp_path / "cache" / "prepared" / "abc"
    folder.mkdir(parents=True)
    assert confined(folder, "train/shard-00000.parquet", "x") == folder.resolve() / "train" / "shard-00000.parquet"
    (folder / "train").symlink_to(tmp_path)  # a link out of the cache, e.g. left by someone else
    for rel in (str(tmp_path / "home" / ".bashrc"), "../../../x", "train/x.parquet", "", "."):
        with pytest.raises(InputError, match="expected a path inside") as ei:
            confined(folder, rel, "s3://b/p/card.json: shard path")
        assert "\n" not in str(ei.value)


def test_tampered_teacher_config_names_no_folder_outside_the_cache(remote, s3, tmp_path):
    c, bucket = s3["client"], s3["bucket"]
    cfg = {"weights_sha256": "../../../../../../../../" + str(tmp_path / "escape")[-40:], "format": "x"}
    c.put_object(Bucket=bucket, Key="ctm/teacher/config.json", Body=json.dumps(cfg).encode())
    c.put_object(Bucket=bucket, Key="ctm/teacher/teacher.safetensors", Body=b"not weights")
    cache = tmp_path / "cache"
    before = _files(tmp_path)
    with pytest.raises(InputError) as ei:
        resolve_inputs(str(tmp_path / "data"), f"s3://{bucket}/ctm/teacher", cache_dir=cache)
    assert "\n" not in str(ei.value) and "failed verification" in str(ei.value)
    assert {p for p in _files(tmp_path) - before if not p.is_relative_to(cache)} == set()
    assert not list(cache.glob("teacher/*"))


def test_presigned_url_as_data_path_is_recorded_redacted(tmp_path):
    """A presigned URL (credential + signature in its query) as data.path: the card names the place, not the key."""
    src = tmp_path / "src.tar.gz"
    rng = np.random.default_rng(0)
    with tarfile.open(src, "w:gz") as tf:
        for c in ("a", "b"):
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"{c}/{i}.png")
                info.size = len(buf.getvalue())
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    from pipelines.support.io_utils import sha256_file

    secret = "X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature=deadbeefcafe0123456789"
    uri = f"file://{src}?{secret}"
    out = tmp_path / "out"
    card = prepare_dataset(
        "imagefolder", uri, out, source_sha256=sha256_file(src), cache_dir=tmp_path / "fetch", progress=False
    )
    text = (out / "card.json").read_text()
    assert "AKIAEXAMPLE" not in text and "deadbeef" not in text
    assert card.source.path == card.params["source_path"] == f"file://{src}?***"
    assert card.count == 6 and card.labels.class_names == ("a", "b")
