"""What a user without network access (or with a weak FD classifier) is told: the offline Inception error names both
ways out, and a low held-out classifier accuracy is flagged in one warning line."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from pipelines.support.fid_reference import (
    MIN_CLASSIFIER_ACCURACY,
    FIDSetupError,
    load_inception,
    warn_if_weak_classifier,
)
from pipelines.support.params import load_params

ROOT = Path(__file__).resolve().parents[2]


def test_offline_inception_error_names_a_local_file_with_its_pin_and_the_classifier(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sha = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
    over = {
        "evaluate": {
            "features": "inception",
            "cache_dir": str(tmp_path / "cache"),
            "inception": {"source": f"https://127.0.0.1:{port}/pt_inception-2015-12-05-6726825d.pth", "sha256": sha},
        }
    }
    params = load_params(ROOT / "params.yaml", over, check_env=False)
    with pytest.raises(FIDSetupError) as e:
        load_inception(params)
    msg = str(e.value)
    assert msg.startswith("evaluate.inception.source: cannot fetch pt_inception-2015-12-05-6726825d.pth"), msg
    assert "set evaluate.inception.source to its path" in msg and sha in msg
    assert "evaluate.features: classifier" in msg and "\n" not in msg


def test_weak_classifier_warns_once_in_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="pipelines.support.fid_reference"):
        assert not warn_if_weak_classifier(0.95) and not warn_if_weak_classifier(None)
        assert not warn_if_weak_classifier(MIN_CLASSIFIER_ACCURACY)
        assert warn_if_weak_classifier(0.52)
    (rec,) = caplog.records
    assert "held-out accuracy is 0.52 (< 0.80)" in rec.getMessage() and "\n" not in rec.getMessage()
    assert "evaluate.classifier.steps" in rec.getMessage()
