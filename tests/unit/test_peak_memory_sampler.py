"""benchmarks/peak_memory.py's Sampler (used by benchmarks/scale.py): per-process peak RSS of the processes whose
command line matches, and the tree's peak PSS, sampled in a thread while the tree runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")


def test_sampler_sees_each_matching_worker_and_the_tree(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from peak_memory import Sampler

    # a long path, so the marker sits past the first 120 characters of the command line (as on a CI machine whose
    # checkout and temporary paths are long): matching must read the whole command line
    long_dir = tmp_path / ("d" * 150)
    long_dir.mkdir()
    hold = long_dir / "hold.py"
    hold.write_text(
        "import sys, time\na = bytearray(int(sys.argv[1]) * 2**20)\n"
        "a[::4096] = bytes(len(a[::4096]))  # touch every page\ntime.sleep(2)\n"
    )
    # bash -> two "workers" (120 and 200 MiB, marked by their argv) and one unmarked 80 MiB process; the marker
    # comes from the environment, so bash's own command line does not contain it
    py = f"{sys.executable} {hold}"
    script = f"{py} 120 $MARK & {py} 200 $MARK & {py} 80 other; wait"
    env = {**os.environ, "MARK": "FakeTrainWorker"}
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True, env=env)
    sampler = Sampler(proc.pid, interval=0.1, match="FakeTrainWorker")
    sampler.start()
    proc.wait(timeout=60)
    got = sampler.stop()
    assert len(got["worker_peak_rss_gib"]) == 2, got
    big, small = got["worker_peak_rss_gib"]
    assert 200 / 1024 <= big < 300 / 1024 and 120 / 1024 <= small < 220 / 1024, got
    assert got["tree_peak_pss_gib"] >= (120 + 200 + 80) / 1024 * 0.95, got  # every process of the tree, shared split
