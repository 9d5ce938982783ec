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
   ``--speed-batch``), with 1 worker and with 2 workers (1 CPU and 1 thread each); steps/s is what rank 0 measured
   over its training after the first checkpoint interval (``perf/steps_per_s`` in the stage's run record), the sync
   time the 2-worker run's mean wall time in the gradient all-reduce per step (``perf/sync_ms_per_step``).

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

from peak_memory import Sampler  # noqa: E402

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(work: Path, name: str, data: Path, teacher: Path, distill: dict, workers: int, interval: float):
    """The distill stage on a fresh local Ray cluster under `work/name`: (run record, memory figures, wall s)."""
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
        sampler = Sampler(proc.pid, interval=interval)
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
    ap.add_argument("--speed-steps", type=int, default=12)
    ap.add_argument("--speed-every", type=int, default=2, help="checkpoint_every of the speed runs (timed chunks)")
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
        speed |= {"K": args.K, "N": 8, "checkpoint_every": args.speed_every}
        for w in (1, 2):
            record, memory, wall = run_stage(work, f"speed_{w}", data, teacher, speed, w, args.interval)
            result["runs"][f"speed_{w}"] = {"wall_s": round(wall, 1), "metrics": record.get("metrics", {})}
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
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    print(f"\n{'quantity':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
