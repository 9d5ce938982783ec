"""benchmarks/peak_memory.py's Sampler (used by benchmarks/scale.py): per-process peak RSS of the processes whose
command line matches, and the tree's peak PSS, sampled in a thread while the tree runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")


def test_sampler_sees_each_matching_worker_and_the_tree(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from peak_memory import Sampler

    hold = tmp_path / "hold.py"
    hold.write_text(
        "import sys, time\na = bytearray(int(sys.argv[1]) * 2**20)\n"
        "a[::4096] = bytes(len(a[::4096]))  # touch every page\ntime.sleep(2)\n"
    )
    # bash -> two "workers" (120 and 200 MiB, marked by their argv) and one unmarked 80 MiB process
    script = (
        f"{sys.executable} {hold} 120 FakeTrainWorker & {sys.executable} {hold} 200 FakeTrainWorker & "
        f"{sys.executable} {hold} 80 other; wait"
    )
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    sampler = Sampler(proc.pid, interval=0.1, match="FakeTrainWorker")
    sampler.start()
    proc.wait(timeout=60)
    got = sampler.stop()
    assert len(got["worker_peak_rss_gib"]) == 2, got
    big, small = got["worker_peak_rss_gib"]
    assert 200 / 1024 <= big < 300 / 1024 and 120 / 1024 <= small < 220 / 1024, got
    assert got["tree_peak_pss_gib"] >= (120 + 200 + 80) / 1024 * 0.95, got  # every process of the tree, shared split
