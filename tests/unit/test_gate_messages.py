"""The promotion gate's reasons say which way a challenger differs from the champion (pipelines/support/gate.py)."""

from __future__ import annotations

import pytest

from pipelines.support.gate import Evidence, decide

P = "a" * 64


@pytest.mark.parametrize(
    ("value", "champ", "mode", "expected"),
    [
        (207.0, 10.0, "min", "worse than the champion by 197 (207 vs 10, mode min): champion kept"),
        (10.1, 10.0, "min", "worse than the champion by 0.1 (10.1 vs 10, mode min): champion kept"),
        (0.5, 0.75, "max", "worse than the champion by 0.25 (0.5 vs 0.75, mode max): champion kept"),
        (10.0, 10.0, "min", "equal to the champion (10): champion kept"),
    ],
)
def test_worse_or_equal_challenger_is_named_so(value, champ, mode, expected):
    d = decide(Evidence(value, 0.3, P), "ok", Evidence(champ, 0.3, P), mode=mode, noise_z=2.0)
    assert (d.decision, d.reason) == ("challenger", expected)


def test_better_within_noise_says_so():
    d = decide(Evidence(9.8, 0.3, P), "ok", Evidence(10.0, 0.3, P), mode="min", noise_z=2.0)
    assert d.decision == "challenger" and d.reason.startswith("better by 0.2 <= 0.8485 ")
    assert d.reason.endswith("within the noise, champion kept")
