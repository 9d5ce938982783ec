"""benchmarks/gpu_bench.py: the floor accounting and a tiny CPU run of the whole script in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"
REQUIRED = (
    "card",
    "batch",
    "date_utc",
    "floor_setting",
    "fid50k_seconds",
    "parity",
    "floor_img_per_s",
    "step_img_per_s",
    "naive_fp32_img_per_s",
    "compiled_forward_img_per_s",
    "sample_1step_img_per_s",
    "peak_mem_gib",
)


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out), "--threads", "1", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    assert files[0].name.startswith("tiny-cpu-")
    return json.loads(files[0].read_text()), proc.stdout


def _numbers(obj, path=""):
    """Every int/float leaf of a JSON object with its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_expected_k_and_cycle():
    gb = _load()
    # E[k] for P(k) ∝ k on {1..K}, computed directly.
    for K in (1, 2, 5, 17, 39):
        direct = sum(k * k for k in range(1, K + 1)) / sum(range(1, K + 1))
        assert gb.expected_k(K) == pytest.approx(direct, rel=1e-12)
        cyc = gb.k_cycle(K)
        assert len(cyc) == 3 and sum(cyc) / 3 == pytest.approx(direct, rel=1e-12)
        assert all(1 <= k <= K for k in cyc)
    assert gb.k_cycle(17) == [12, 12, 11]


def test_floor_accounting():
    gb = _load()
    t = {"teacher_fwd": 1.0, "student_nograd_fwd": 10.0, "student_fwdbwd": 100.0, "target_fwd_inputgrad": 1000.0}
    # 2·E[k] teacher forwards + 2 no-grad forwards + 2 student fwd+bwd (estimate inner, DSM) + 1 target input grad
    assert gb.floor_seconds(t, 17) == pytest.approx(2 * 35 / 3 + 20 + 200 + 1000)


def test_tiny_cpu_run(tmp_path):
    res, stdout = _run(
        tmp_path,
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--step-repeats",
        "1",
        "--sample-images",
        "32",
        "--sample-batch",
        "16",
        "--heun-images",
        "4",
        "--sample-repeats",
        "1",
        "--batch",
        "4",
    )
    for key in REQUIRED:
        assert key in res, key
    assert res["batch"] == 4 and res["card"].startswith("cpu")
    assert res["errors"] == {}, res["errors"]
    for key in ("floor_img_per_s", "step_img_per_s", "naive_fp32_img_per_s", "compiled_forward_img_per_s"):
        assert isinstance(res[key], float) and res[key] > 0, (key, res[key])
    for key in ("sample_1step_img_per_s", "fid50k_seconds"):
        assert isinstance(res[key], float) and res[key] > 0, (key, res[key])
    assert res["fid"]["images"] == 4 and res["fid"]["fd_finite"] and res["fid50k_extrapolated"]
    assert res["date_utc"].endswith("Z")
    assert res["peak_mem_gib"] is None  # CPU: no CUDA allocator statistics
    for path, v in _numbers(res):
        assert math.isfinite(v), path
    # Every part ran; the compiled floor is skipped (compile is off on CPU by default), not failed.
    status = {k: v["status"] for k, v in res["parts"].items()}
    assert status.pop("floor_bf16_compiled") == "skipped"
    assert set(status.values()) == {"ok"}, status
    assert set(res["floors"]) == {"fp32_eager", "bf16_eager"}
    assert res["floor_setting"] == "bf16_eager"
    assert res["floor_img_per_s"] == res["floors"]["bf16_eager"]["floor_img_per_s"]
    assert res["ratios"]["step_over_floor"] == pytest.approx(res["step_img_per_s"] / res["floor_img_per_s"])
    for name in ("naive_fp32_step", "fast_step"):
        assert res[name]["finite"] and res[name]["last_metrics"]["k"] in (11.0, 12.0)
    assert res["sample_1step"]["images"] == 32 and res["sample_1step"]["finite"]
    assert res["teacher_heun"]["finite"] and res["batch2x"]["status"] == "ok"
    # On CPU the trainer runs fp32 in both arms of the parity check, so they must agree to rounding.
    assert res["parity"]["finite"]
    assert res["parity"]["loss_rel_diff"] < 1e-4 and res["parity"]["update_rel_diff"] < 1e-3
    assert "step / floor" in stdout


def test_time_budget_skips_parts(tmp_path):
    res, _ = _run(tmp_path, "--time-budget-s", "0")
    assert res["parts"] and all(p["status"] == "skipped" for p in res["parts"].values())
    for key in REQUIRED:
        assert key in res
    assert res["step_img_per_s"] is None and res["fid50k_seconds"] is None and res["errors"] == {}
