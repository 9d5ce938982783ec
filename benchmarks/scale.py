"""Scale benchmark (issue 15): per-worker memory against dataset size, 1 vs 2 worker speed, gradient sync time.

    python benchmarks/scale.py                                   # the issue's sizes: 10,000 and 1,281,167 rows
    python benchmarks/scale.py --rows-large 20000 --speed-steps 6    # a quick check of the script (minutes)

What it does (docs/data_streaming.md):

1. memory: writes two synthetic prepared datasets in the prepare stage's exact format (``card.json`` + one-row-group
   Parquet shards of ``--shard-size`` random 3×S×S uint8 images, ``ctm_core.data.writer.write_shard``; the large one
   is ~16 GB at the default sizes: mind the disk), then runs the distill stage (``python -m pipelines.distill``, a
   local Ray cluster, ``--workers`` CPU workers) for ``--mem-steps`` steps on each with a small teacher, sampling
   every Ray Train worker's RSS and the whole process tree's PSS from /proc (``peak_memory.Sampler``);
2. speed: the same stage on a compute-bound setting (a ``--speed-channels`` SongUNet at ``--speed-size`` px, batch
   ``--speed-batch``), with 1 worker and with 2 workers (1 CPU and 1 thread each), ``--speed-steps`` steps with a
   checkpoint every ``--speed-every``; steps/s is what rank 0 measured over its training after the first checkpoint
   interval (``perf/steps_per_s`` in the stage's run record; checkpoints and reports are not in it), the sync time
   the 2-worker run's mean wall time in the gradient all-reduce per step (``perf/sync_ms_per_step``; least and most
   over the ranks), and where the time goes: rank 0's CPU seconds per step and per wall second, and the CPU seconds
   of every other process of the tree (``CpuSampler``; no memory sampling in the speed runs).

Writes ``<out>/scale-<YYYY-MM-DD>.json`` (keys dataset_rows_small, dataset_rows_large, per_worker_peak_gib_small,
per_worker_peak_gib_large, tree_peak_pss_gib_large, speedup_2_workers, sync_ms_per_step, plus the settings and every
run's figures) and prints a table. The datasets are deleted afterwards unless ``--keep``. Needs Linux /proc.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from peak_memory import PeriodicSampler, Sampler, _cmdline, stat_fields, tree  # noqa: E402

from ctm_core.config import YamlLoader, merge_overrides  # noqa: E402
from ctm_core.data.card import DatasetCard, ImageSpec, LabelSpec, SourceSpec, Split  # noqa: E402
from ctm_core.data.writer import write_shard  # noqa: E402
from ctm_core.io.teacher_format import save_teacher  # noqa: E402
from ctm_core.nets.precond import EDMPrecond  # noqa: E402

CLEAR_ENV = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")


def make_dataset(folder: Path, rows: int, size: int, shard_size: int, seed: int) -> DatasetCard:
    """A prepared folder of `rows` random (3, size, size) uint8 train images (+ one held-out shard), unlabelled."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    heldout = min(shard_size, max(1, rows // 10))
    splits = {}
    for split, n in (("train", rows), ("heldout", heldout)):
        (folder / split).mkdir()
        shards = []
        for k, start in enumerate(range(0, n, shard_size)):
            m = min(shard_size, n - start)
            images = rng.integers(0, 256, size=(m, 3, size, size), dtype=np.uint8)  # (m, C, H, W)
            index = np.arange(start, start + m, dtype=np.int64)
            shards.append(write_shard(folder, f"{split}/shard-{k:05d}.parquet", images, np.full(m, -1), index))
        splits[split] = Split(count=n, class_counts={}, shards=tuple(shards))
    card = DatasetCard(
        count=rows + heldout,
        image=ImageSpec(channels=3, height=size, width=size, num_levels=256),
        labels=LabelSpec(label_dim=0),
        source=SourceSpec(kind="synthetic", path=None, sha256="0" * 64, description="benchmarks/scale.py noise"),
        splits=splits,
        params={"rows": rows, "size": size, "shard_size": shard_size, "seed": seed},
        versions={"numpy": np.__version__},
    )
    card.write(folder)
    return card


def make_teacher(folder: Path, size: int, channels: int, channel_mult: list[int], blocks: int) -> int:
    """A random-weights EDM SongUNet teacher (3 channels, `size` px); returns its parameter count."""
    torch.manual_seed(0)
    teacher = EDMPrecond(
        img_resolution=size,
        img_channels=3,
        label_dim=0,
        model_type="SongUNet",
        model_channels=channels,
        channel_mult=channel_mult,
        num_blocks=blocks,
        attn_resolutions=[],
        dropout=0.0,
    )
    with torch.no_grad():  # EDM zero-inits the output conv: a non-trivial function
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_teacher("EDMPrecond", teacher.init_kwargs, teacher.state_dict(), folder)
    return sum(p.numel() for p in teacher.parameters())


class CpuSampler(PeriodicSampler):
    """CPU seconds (user + system, /proc/<pid>/stat) of every process in `root`'s tree (``peak_memory.tree``), read
    every `interval` s and grouped by what the process is (``_label``): where the machine's cores went during a speed
    run. A process's last reading counts, so a process that ends between readings loses at most `interval` s."""

    def __init__(self, root: int, interval: float = 1.0):
        super().__init__(interval)
        self.root = root
        self.ticks: dict[int, tuple[int, str]] = {}  # pid -> (utime + stime in clock ticks, label)
        self.series: list[tuple[float, int, int]] = []  # (time, Train workers' ticks, the others' ticks) per sample
        self._hz = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _label(pid: int, root: int) -> str:
        cmd = _cmdline(pid)
        if cmd == "?":
            return cmd
        if pid == root:
            return "stage driver (python -m pipelines.distill)"
        if "TrainWorker" in cmd:
            return "Ray Train workers"
        if cmd.startswith("ray::"):
            return cmd.split()[0]  # an actor's title, e.g. ray::TrainController
        words = cmd.split()
        script = next((w for w in words[1:] if w.endswith(".py")), words[0] if words else "?")
        return os.path.basename(script)

    def sample(self) -> None:
        for pid in tree(self.root):
            fields = stat_fields(pid)
            if not fields:
                continue
            ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
            old = self.ticks.get(pid, (0, ""))[1]  # a Ray worker is retitled (setup_worker.py, ray::IDLE, ...)
            new = self._label(pid, self.root) if old != "Ray Train workers" else old
            label = old if new == "?" and old else new  # "?": it ended while being read
            self.ticks[pid] = (ticks, label)
        workers = sum(t for t, label in self.ticks.values() if label == "Ray Train workers")
        self.series.append((time.monotonic(), workers, sum(t for t, _ in self.ticks.values()) - workers))

    def stop(self) -> dict:
        """{"cpu_s": {label: CPU seconds}, largest first; "cpu_s_train_workers"; "cpu_s_other"}."""
        self.halt()
        by: dict[str, float] = {}
        for ticks, label in self.ticks.values():
            by[label] = by.get(label, 0.0) + ticks / self._hz
        workers = by.get("Ray Train workers", 0.0)
        return {
            "cpu_s": {k: round(v, 1) for k, v in sorted(by.items(), key=lambda kv: -kv[1])},
            "cpu_s_train_workers": round(workers, 1),
            "cpu_s_other": round(sum(by.values()) - workers, 1),
            "training_cores": self._training_cores(),
            "interval_s": self.interval,
        }

    def _training_cores(self) -> dict[str, float] | None:
        """Mean cores used by the Train workers and by the other processes while the workers did the middle of their
        work (from 25 % to 90 % of their CPU seconds: past the build and the first steps, before the final save)."""
        if not self.series or self.series[-1][1] == 0:
            return None
        final = self.series[-1][1]
        a = next(x for x in self.series if x[1] >= 0.25 * final)
        b = next(x for x in self.series if x[1] >= 0.9 * final)
        if b[0] - a[0] < 5 * self.interval:
            return None
        dt = (b[0] - a[0]) * self._hz
        span = round(b[0] - a[0])
        return {"workers": round((b[1] - a[1]) / dt, 3), "others": round((b[2] - a[2]) / dt, 3), "s": span}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(
    work: Path, name: str, data: Path, teacher: Path, distill: dict, workers: int, interval: float, cpu: bool = False
):
    """The distill stage on a fresh local Ray cluster under `work/name`: (run record, figures, wall s). The figures
    are the memory peaks (``peak_memory.Sampler``, every `interval` s) or, with `cpu`, the CPU seconds of each
    kind of process (``CpuSampler``, every second: reading smaps is itself CPU work a speed run must not pay)."""
    run = work / name
    run.mkdir(parents=True)
    ray_tmp = tempfile.mkdtemp(prefix="ctms", dir="/tmp")  # short: Ray's unix socket paths are limited
    raw = yaml.load((ROOT / "params.yaml").read_text(), Loader=YamlLoader)  # noqa: S506 - SafeLoader subclass
    raw = merge_overrides(
        raw,
        {
            "distill": {"eval_emas": [0.999], "log_every": 1, **distill},
            "ray": {
                "address": None,
                "num_workers": workers,
                "cpus_per_worker": 1.0,
                "num_cpus": workers + 2,
                "use_gpu": False,
                "storage_path": str(run / "ray_results"),
                "temp_dir": ray_tmp,
                "dashboard_port": _free_port(),
                "max_failures": 0,
                "submit": False,
            },
            "mlflow": {"tracking_uri": f"sqlite:///{run}/mlflow.db", "experiment_name": "ctm-scale"},
        },
    )
    (run / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in CLEAR_ENV}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-m", "pipelines.distill", "--params", str(run / "params.yaml"), "--data", str(data)]
    cmd += ["--teacher", str(teacher), "--out", str(run / "student")]
    t0 = time.monotonic()
    with open(run / "stage.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=run, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = CpuSampler(proc.pid) if cpu else Sampler(proc.pid, interval=interval)
        sampler.start()
        code = proc.wait()
        memory = sampler.stop()
    shutil.rmtree(ray_tmp, ignore_errors=True)  # the stage shut its local cluster down
    wall = time.monotonic() - t0
    if code != 0:
        tail = (run / "stage.log").read_text()[-3000:]
        raise SystemExit(f"{name}: the distill stage exited with {code}; log tail:\n{tail}")
    record = json.loads((run / "student" / "run.json").read_text())
    return record, memory, wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows-small", type=int, default=10_000)
    ap.add_argument("--rows-large", type=int, default=1_281_167, help="ImageNet-64's train images")
    ap.add_argument("--size", type=int, default=64, help="image height = width of the memory datasets")
    ap.add_argument("--shard-size", type=int, default=1024, help="rows per shard (prepare.shard_size)")
    ap.add_argument("--workers", type=int, default=2, help="workers of the memory runs")
    ap.add_argument("--mem-steps", type=int, default=4)
    ap.add_argument("--mem-batch", type=int, default=16)
    ap.add_argument("--speed-size", type=int, default=32)
    ap.add_argument("--speed-rows", type=int, default=4096)
    ap.add_argument("--speed-channels", type=int, default=64, help="SongUNet model_channels of the speed runs")
    ap.add_argument("--speed-batch", type=int, default=8)
    ap.add_argument("--speed-microbatch", type=int, default=2)
    ap.add_argument(
        "--speed-steps", type=int, default=20, help="steps of the speed runs: an untimed first chunk, then timed ones"
    )
    ap.add_argument(
        "--speed-every",
        type=int,
        default=10,
        help="checkpoint_every (and log_every) of the speed runs: the first chunk of this many steps is untimed",
    )
    ap.add_argument("--K", type=int, default=4, help="distill.K (teacher Heun steps at most)")
    ap.add_argument("--interval", type=float, default=0.2, help="memory sampling interval, s")
    ap.add_argument("--work-dir", default=None, help="datasets and runs (default: a new folder under /tmp)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--keep", action="store_true", help="keep the datasets and runs")
    args = ap.parse_args(argv)
    if not Path("/proc/self/smaps_rollup").exists():
        ap.error("needs Linux /proc (smaps_rollup)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ctm-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    result: dict = {"date_utc": date, "settings": vars(args) | {"work_dir": str(work)}, "runs": {}}
    result["settings"]["cpus"] = os.cpu_count()
    result["settings"]["torch"] = torch.__version__
    try:
        # 1. memory against dataset size
        teacher = work / "teacher_small_net"
        result["settings"]["mem_teacher_params"] = make_teacher(teacher, args.size, 16, [1, 2], 1)
        mem = {"steps": args.mem_steps, "batch": args.mem_batch, "microbatch": args.mem_batch // args.workers}
        mem |= {"K": args.K, "N": 8, "checkpoint_every": args.mem_steps}
        for tag, rows in (("small", args.rows_small), ("large", args.rows_large)):
            data = work / f"data_{tag}"
            t0 = time.monotonic()
            make_dataset(data, rows, args.size, args.shard_size, seed=1)
            made = time.monotonic() - t0
            size_gb = sum(p.stat().st_size for p in data.rglob("*.parquet")) / 1e9
            record, memory, wall = run_stage(work, f"mem_{tag}", data, teacher, mem, args.workers, args.interval)
            result["runs"][f"mem_{tag}"] = {"rows": rows, "disk_gb": round(size_gb, 2), "write_s": round(made, 1)}
            result["runs"][f"mem_{tag}"] |= {"wall_s": round(wall, 1), "memory": memory, "steps": record.get("steps")}
            if not args.keep:
                shutil.rmtree(data)
        # 2. speed, 1 vs 2 workers, compute-bound
        data = work / "data_speed"
        make_dataset(data, args.speed_rows, args.speed_size, args.shard_size, seed=2)
        teacher = work / "teacher_speed"
        result["settings"]["speed_teacher_params"] = make_teacher(
            teacher, args.speed_size, args.speed_channels, [1, 2, 2], 2
        )
        speed = {"steps": args.speed_steps, "batch": args.speed_batch, "microbatch": args.speed_microbatch}
        speed |= {"K": args.K, "N": 8, "checkpoint_every": args.speed_every, "log_every": args.speed_every}
        for w in (1, 2):
            record, cpu, wall = run_stage(work, f"speed_{w}", data, teacher, speed, w, args.interval, cpu=True)
            result["runs"][f"speed_{w}"] = {"wall_s": round(wall, 1), "metrics": record.get("metrics", {}), "cpu": cpu}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    runs = result["runs"]
    sps = {w: runs[f"speed_{w}"]["metrics"].get("perf/steps_per_s") for w in (1, 2)}
    result |= {
        "dataset_rows_small": args.rows_small,
        "dataset_rows_large": args.rows_large,
        "per_worker_peak_gib_small": max(runs["mem_small"]["memory"]["worker_peak_rss_gib"], default=None),
        "per_worker_peak_gib_large": max(runs["mem_large"]["memory"]["worker_peak_rss_gib"], default=None),
        "tree_peak_pss_gib_small": runs["mem_small"]["memory"]["tree_peak_pss_gib"],
        "tree_peak_pss_gib_large": runs["mem_large"]["memory"]["tree_peak_pss_gib"],
        "steps_per_s_1_worker": sps[1],
        "steps_per_s_2_workers": sps[2],
        "speedup_2_workers": None if not (sps[1] and sps[2]) else round(sps[2] / sps[1], 3),
        "sync_ms_per_step": runs["speed_2"]["metrics"].get("perf/sync_ms_per_step"),
        "sync_ms_per_step_min_rank": runs["speed_2"]["metrics"].get("perf/sync_ms_per_step_min"),
        "sync_ms_per_step_max_rank": runs["speed_2"]["metrics"].get("perf/sync_ms_per_step_max"),
        "buckets_overlapped_per_step": runs["speed_2"]["metrics"].get("perf/buckets_overlapped_per_step"),
        # rank 0's own CPU seconds (all threads) per step and per wall second over the timed steps:
        # speedup = (cpu_s_per_step[1] / cpu_s_per_step[2]) * (cpu_per_wall_s[2] / cpu_per_wall_s[1]) exactly
        "cpu_s_per_step": {w: runs[f"speed_{w}"]["metrics"].get("perf/cpu_s_per_step") for w in (1, 2)},
        "cpu_per_wall_s": {w: runs[f"speed_{w}"]["metrics"].get("perf/cpu_per_wall_s") for w in (1, 2)},
        "cpu_cores_outside_workers": {  # mean cores the rest of the tree used (Ray, driver) while a run lasted
            w: round(runs[f"speed_{w}"]["cpu"]["cpu_s_other"] / runs[f"speed_{w}"]["wall_s"], 3) for w in (1, 2)
        },
        "training_cores": {w: runs[f"speed_{w}"]["cpu"]["training_cores"] for w in (1, 2)},  # mid-training only
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"scale-{date}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("dataset rows (small / large)", f"{args.rows_small:,} / {args.rows_large:,}"),
        ("peak RSS per Ray Train worker, small (GiB)", result["per_worker_peak_gib_small"]),
        ("peak RSS per Ray Train worker, large (GiB)", result["per_worker_peak_gib_large"]),
        ("process tree peak PSS, small / large (GiB)", f"{result['tree_peak_pss_gib_small']} / "
         f"{result['tree_peak_pss_gib_large']}"),
        ("steps/s, 1 worker / 2 workers", f"{sps[1]} / {sps[2]}"),
        ("speed-up, 2 workers", result["speedup_2_workers"]),
        ("gradient sync per step, 2 workers (ms)", result["sync_ms_per_step"]),
        ("  least / most over the ranks (ms)", f"{result['sync_ms_per_step_min_rank']} / "
         f"{result['sync_ms_per_step_max_rank']}"),
        ("rank 0 CPU s per step, 1 / 2 workers", f"{result['cpu_s_per_step'][1]} / {result['cpu_s_per_step'][2]}"),
        ("rank 0 CPU s per wall s, 1 / 2 workers", f"{result['cpu_per_wall_s'][1]} / {result['cpu_per_wall_s'][2]}"),
        ("cores used outside the workers, 1 / 2 workers", f"{result['cpu_cores_outside_workers'][1]} / "
         f"{result['cpu_cores_outside_workers'][2]}"),
        ("  mid-training: workers / others, 1 worker", result["training_cores"][1]),
        ("  mid-training: workers / others, 2 workers", result["training_cores"][2]),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    print(f"\n{'quantity':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
