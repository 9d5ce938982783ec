"""benchmarks/peak_memory.py sums the memory of a whole process tree (what a Ray run's budget needs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")


def test_sums_children_and_grandchildren(tmp_path):
    hold = tmp_path / "hold.py"
    hold.write_text(
        "import sys, time\na = bytearray(int(sys.argv[1]) * 2**20)\n"
        "a[::4096] = bytes(len(a[::4096]))  # touch every page\ntime.sleep(2)\n"
    )
    # bash -> (python 150 MiB) & (bash -> python 250 MiB): the peak must see both at once (~400 MiB),
    # more than any single process (250 MiB).
    script = f"{sys.executable} {hold} 150 & bash -c '{sys.executable} {hold} 250'; wait"
    out = tmp_path / "peak.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "peak_memory.py"),
            "--interval",
            "0.1",
            "--json",
            str(out),
            "--",
            "bash",
            "-c",
            script,
        ],
        check=True,
        timeout=60,
        capture_output=True,
    )
    r = json.loads(out.read_text())
    assert r["returncode"] == 0
    assert 0.37 <= r["peak_pss_gib"] <= 0.60, r  # 400 MiB of touched pages + interpreters
    assert 0.24 <= r["peak_single_rss_gib"] < 0.37, r
    assert r["peak_rss_gib"] >= r["peak_pss_gib"]
