"""Peak memory and wall time of a command and EVERY process it starts (Ray's GCS, raylet, workers included).

    python benchmarks/peak_memory.py [--interval 0.25] [--json out.json] -- dvc repro

`/usr/bin/time -v` reports the largest single process; a Ray run is a tree of a dozen processes, so this script
samples the whole tree every `--interval` seconds from /proc (Linux only) and reports:

* peak_pss_gib   the peak of the SUM of PSS (proportional set size, /proc/<pid>/smaps_rollup) over the tree: shared
                 pages (torch's libraries, Ray's plasma store) are split between the processes that map them, so the
                 sum is what the tree really costs the machine. This is the number to compare with a memory budget.
* peak_rss_gib   the peak of the sum of RSS: counts shared pages once per process (an upper bound).
* peak_single    the largest single process (what `time -v` would say) and its command.

Processes are found by walking /proc/<pid>/task/*/children from the command's PID, plus processes that Ray
re-parents away from the tree but that carry the command's session id. Sampling can miss a spike shorter than the
interval; the result is a lower bound on the true peak at that resolution. Prints progress lines every 30 s.

`Sampler` does the same in a thread while a caller runs something (benchmarks/scale.py): the whole tree's peak PSS
and the peak RSS of each Ray Train worker process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 1024**3


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (field 3 onwards: index 0 is the state), or None if the
    process is gone (the name, in parentheses, may itself hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _session(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[3]) if fields else None  # field 6: session id


def tree(root: int) -> set[int]:
    """PIDs of `root`, its descendants, and processes in root's session (re-parented daemons)."""
    seen, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack += _children(pid)
    sid = _session(root)
    if sid is not None:
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) not in seen and _session(int(d)) == sid:
                seen.add(int(d))
    return seen


def memory(pid: int) -> tuple[int, int]:
    """(rss, pss) in bytes of one process; (0, 0) if it is gone or unreadable."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        return 0, 0
    return rss, pss


def _cmdline(pid: int) -> str:
    """The whole command line (matching needs all of it: a long interpreter path pushes a worker's marker far right;
    truncate only for display)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


class PeriodicSampler(threading.Thread):
    """Calls ``sample()`` every `interval` seconds in a daemon thread, from ``start()`` until ``halt()``."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self._done = threading.Event()

    def sample(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def halt(self) -> None:
        """Stop sampling and wait for the thread (the last sample is complete when this returns)."""
        self._done.set()
        self.join()


class Sampler(PeriodicSampler):
    """Samples the tree of `root` from /proc every `interval` seconds in a background thread (``start()`` ...
    ``stop()``): the peak RSS of each process whose command line contains `match` (Ray Train workers' process
    titles contain "TrainWorker") and the peak of the sum of PSS over the whole tree (``tree``)."""

    def __init__(self, root: int, interval: float = 0.25, match: str = "TrainWorker"):
        super().__init__(interval)
        self.root, self.match = root, match
        self.worker_peak: dict[int, tuple[int, str]] = {}  # pid -> (peak RSS bytes, command line)
        self.tree_peak_pss = 0

    def sample(self) -> None:
        pss_sum = 0
        for pid in tree(self.root):
            rss, pss = memory(pid)
            pss_sum += pss
            cmd = _cmdline(pid)
            if self.match in cmd and rss > self.worker_peak.get(pid, (0, ""))[0]:
                self.worker_peak[pid] = (rss, cmd[:120])
        self.tree_peak_pss = max(self.tree_peak_pss, pss_sum)

    def stop(self) -> dict:
        """Stop sampling; {"worker_peak_rss_gib": [per matched process, largest first], "tree_peak_pss_gib"}."""
        self.halt()
        peaks = sorted((rss for rss, _ in self.worker_peak.values()), reverse=True)
        return {
            "worker_peak_rss_gib": [round(r / GIB, 3) for r in peaks],
            "tree_peak_pss_gib": round(self.tree_peak_pss / GIB, 3),
            "interval_s": self.interval,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=0.25)
    ap.add_argument("--json", default=None, help="write the figures here as JSON")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("expected a command after --")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True)  # own session: Ray's daemons stay findable by sid
    peak = {"pss": 0, "rss": 0, "single": 0, "single_cmd": "", "processes": 0, "t_pss": 0.0}
    last_print = t0
    while proc.poll() is None:
        pids = tree(proc.pid)
        rss_sum = pss_sum = 0
        for pid in pids:
            rss, pss = memory(pid)
            rss_sum, pss_sum = rss_sum + rss, pss_sum + pss
            if rss > peak["single"]:
                peak["single"], peak["single_cmd"] = rss, _cmdline(pid)[:120]
        if pss_sum > peak["pss"]:
            peak["pss"], peak["t_pss"], peak["processes"] = pss_sum, time.monotonic() - t0, len(pids)
        peak["rss"] = max(peak["rss"], rss_sum)
        now = time.monotonic()
        if now - last_print > 30:
            print(
                f"[peak_memory] {now - t0:6.0f} s  {len(pids):3d} processes  PSS {pss_sum / GIB:.2f} GiB  "
                f"(peak {peak['pss'] / GIB:.2f})",
                file=sys.stderr,
                flush=True,
            )
            last_print = now
        time.sleep(args.interval)
    result = {
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "wall_s": round(time.monotonic() - t0, 1),
        "peak_pss_gib": round(peak["pss"] / GIB, 3),
        "peak_rss_gib": round(peak["rss"] / GIB, 3),
        "peak_pss_at_s": round(peak["t_pss"], 1),
        "processes_at_peak": peak["processes"],
        "peak_single_rss_gib": round(peak["single"] / GIB, 3),
        "peak_single_cmd": peak["single_cmd"],
        "interval_s": args.interval,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
