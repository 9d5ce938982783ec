"""Student folder round trip, sha256 verification and atomic replacement."""

from __future__ import annotations

import json

import pytest
import torch

from ctm_core.errors import InputError
from ctm_core.io.student_format import ema_variant, load_student, read_student_config, save_student
from ctm_core.nets.student import CTMStudent

KW = dict(
    img_resolution=8,
    img_channels=1,
    label_dim=0,
    model_type="SongUNet",
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
)


def _student(seed: int) -> CTMStudent:
    torch.manual_seed(seed)
    return CTMStudent(**KW)


def test_round_trip_variants(tmp_path):
    a, b = _student(0), _student(1)
    cfg = save_student(
        tmp_path / "s", a.init_kwargs, {"online": a.state_dict(), ema_variant(0.999): b.state_dict()}, meta={"steps": 3}
    )
    assert set(cfg["variants"]) == {"online", "ema_0.999"}
    assert read_student_config(tmp_path / "s")["meta"] == {"steps": 3}
    for variant, ref in (("online", a), ("ema_0.999", b)):
        got = load_student(tmp_path / "s", variant)
        assert not got.training
        for (k1, v1), (k2, v2) in zip(got.state_dict().items(), ref.state_dict().items(), strict=True):
            assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(load_student(tmp_path / "s").G(x, 1.0, 0.1), a.eval().G(x, 1.0, 0.1))


def test_tampered_and_bad_inputs(tmp_path):
    a = _student(0)
    save_student(tmp_path / "s", a.init_kwargs, {"online": a.state_dict()})
    with pytest.raises(ValueError, match="variant: expected one of"):
        load_student(tmp_path / "s", "ema_0.5")
    f = tmp_path / "s" / "weights" / "online.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_student(tmp_path / "s")
    with pytest.raises(ValueError, match="variants"):
        save_student(tmp_path / "t", a.init_kwargs, {})
    with pytest.raises(InputError, match="expected a student folder"):
        load_student(tmp_path / "missing")


def test_failed_write_keeps_previous(tmp_path):
    a = _student(0)
    save_student(tmp_path / "s", a.init_kwargs, {"online": a.state_dict()})
    before = json.loads((tmp_path / "s" / "config.json").read_text())
    with pytest.raises(TypeError):  # not JSON-serialisable meta: fails before anything replaces the folder
        save_student(tmp_path / "s", a.init_kwargs, {"online": a.state_dict()}, meta={"bad": object()})
    assert json.loads((tmp_path / "s" / "config.json").read_text()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
