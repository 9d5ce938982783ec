"""Hostile params files: YAML alias bombs, duplicate keys, deep nesting, non-UTF-8 bytes, huge quoted values,
NaN/inf and numbers that size work. Each is refused with one `ParamsError` line naming the input and the fix, in
about the time and memory of reading a legitimate file of the same size."""

from __future__ import annotations

import math
import pathlib
import time
import tracemalloc

import pytest
import yaml

from ctm_core.config import YAML_MAX_DEPTH, ParamsError, load_config
from pipelines.support.params import load_params, read_overrides

ROOT = pathlib.Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"


def _bomb(levels: int, width: int = 9) -> str:
    """`levels` anchors, each a list of `width` aliases of the previous one: `width**levels` leaves."""
    lines = ["a0: &a0 [0.99]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _bomb_params(levels: int, where: str) -> str:
    """A params file whose `where` ("eval_emas" / "space") holds the bomb's last level."""
    body = _bomb(levels)
    last = f"*a{levels - 1}"
    if where == "eval_emas":
        return f"x_anchors:\n{_indent(body)}distill:\n  eval_emas: {last}\n"
    return f"x_anchors:\n{_indent(body)}tune:\n  space:\n    K:\n      type: choice\n      values: {last}\n"


def _indent(text: str) -> str:
    return "".join(f"  {ln}\n" for ln in text.splitlines())


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ParamsError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def _peak_bytes(fn) -> tuple[int, float]:
    """Peak traced Python allocation (bytes) and seconds of `fn()` (exceptions swallowed)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
    except ParamsError:
        pass
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, dt


def test_plain_safe_load_expands_an_alias_bomb():
    """What a plain loader does: ~100 bytes of aliases become 9**3 = 729 values (9**9 ≈ 387 M for 436 bytes)."""
    text = _bomb(4)
    assert len(text) < 200
    tree = yaml.safe_load(text)
    leaves = sum(len(b) for a in tree["a3"] for b in a)
    assert leaves == 729


@pytest.mark.parametrize("where", ["eval_emas", "space"])
def test_alias_bomb_refused_in_time_and_memory(tmp_path, where):
    bomb = tmp_path / "params.yaml"
    bomb.write_text(_bomb_params(10, where))  # 9**9 ≈ 387 M floats if expanded: gigabytes and tens of seconds
    assert len(bomb.read_bytes()) < 700
    legit = tmp_path / "legit.yaml"
    legit.write_text("distill:\n  eval_emas: [0.99, 0.999]\n" + "# pad\n" * (len(bomb.read_bytes()) // 6))
    msg = _one_line_error(load_config, bomb)
    assert msg.startswith("params: ") and str(bomb) in msg and "not allowed" in msg and "fix:" in msg, msg
    peak_bomb, dt = _peak_bytes(lambda: load_config(bomb))
    peak_legit, _ = _peak_bytes(lambda: load_config(legit))
    assert peak_bomb <= 2 * peak_legit, (peak_bomb, peak_legit)
    assert dt < 2.0


def test_alias_refused_by_check_cli_and_best_params(tmp_path, capsys):
    from pipelines.config import _main

    bomb = tmp_path / "params.yaml"
    bomb.write_text(_bomb_params(10, "space"))  # tune.enabled false: the values were never expanded before
    assert _main(["--check", "--params", str(bomb), "--no-env"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("alias" in err[0] or "anchor" in err[0]), err
    best = tmp_path / "best_params.yaml"
    best.write_text("distill:\n  lr: &x 0.001\n  dsm_weight: *x\n")
    msg = _one_line_error(read_overrides, best)
    assert msg.startswith("--best-params: ") and "anchor" in msg, msg
    assert _main(["--check", "--params", str(PARAMS), "--no-env", "--set", "distill.eval_emas=[&a 0.9, *a]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("params error: distill.eval_emas: --set") and "anchor" in err[0], err


def test_duplicate_keys_are_errors(tmp_path):
    text = "distill:\n  K: 8\n  K: 9\n"
    assert yaml.safe_load(text) == {"distill": {"K": 9}}  # a plain loader keeps the last one silently
    f = tmp_path / "params.yaml"
    f.write_text(text)
    msg = _one_line_error(load_config, f)
    assert "duplicate key 'K'" in msg and "line 3" in msg and "fix:" in msg, msg
    f.write_text("distill: {}\ndistill: {K: 9}\n")  # duplicate sections too
    assert "duplicate key 'distill'" in _one_line_error(load_config, f)
    best = tmp_path / "best.yaml"
    best.write_text("distill:\n  lr: 0.001\n  lr: 0.002\n")
    assert "duplicate key 'lr'" in _one_line_error(read_overrides, best)


def test_non_utf8_and_deep_nesting_and_huge_ints(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_bytes(b"distill:\n  mode: \xff\xfe ctm\n")
    msg = _one_line_error(load_config, f)
    assert "not UTF-8" in msg and "0xff at offset 17" in msg and "fix:" in msg, msg

    deep = "distill:\n  eval_emas: " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(RecursionError):  # what the plain loader does with it
        yaml.safe_load(deep)
    f.write_text(deep)
    msg = _one_line_error(load_config, f)
    assert f"deeper than {YAML_MAX_DEPTH}" in msg, msg

    f.write_text("distill:\n  steps: " + "9" * 5000 + "\n")  # over Python's int-to-str digit limit
    msg = _one_line_error(load_config, f)
    assert msg.startswith("params: ") and len(msg) < 400, msg

    f.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    assert "is over" in _one_line_error(load_config, f)


def test_long_values_are_cut_in_messages():
    long = "ftp://host/" + "k" * 100_000
    msg = _one_line_error(load_params, PARAMS, {"teacher.source": long, "teacher.sha256": "record"}, check_env=False)
    assert msg.startswith("teacher.source: expected 'train'") and len(msg) < 300 and msg.endswith("k…"), msg
    msg = _one_line_error(load_params, PARAMS, {"distill.eval_emas": [0.5] * 100_000}, check_env=False)
    assert len(msg) < 300 and "at most 16" in msg, msg
    msg = _one_line_error(load_params, PARAMS, {"distill": {"bad\nkey\x1b[31m": 1}}, check_env=False)
    assert "\\n" in msg and "\x1b" not in msg, msg


@pytest.mark.parametrize(
    "key",
    [
        "teacher.train.lr",
        "teacher.train.P_mean",
        "register.noise_z",
        "likelihood.rtol",
        "distill.P_mean",
        "evaluate.ema",
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_refused(key, value):
    msg = _one_line_error(load_params, PARAMS, {key: value}, check_env=False)
    assert msg.startswith(f"{key}: expected a finite number"), msg


def test_nan_in_yaml_and_in_search_space(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("likelihood:\n  rtol: .nan\nregister:\n  noise_z: .inf\n")
    assert "finite" in _one_line_error(load_config, f)
    msg = _one_line_error(
        load_params, PARAMS, {"tune.space.lr": {"type": "choice", "values": [1e-3, math.nan]}}, check_env=False
    )
    assert msg.startswith("tune.space.lr.values[1]: must be finite"), msg
    msg = _one_line_error(
        load_params, PARAMS, {"tune.space.K": {"type": "choice", "values": [[4, [6]]]}}, check_env=False
    )
    assert msg.startswith("tune.space.K.values[0]: expected a number, string or boolean"), msg


@pytest.mark.parametrize(
    "key,value,bound",
    [
        ("distill.steps", 10**12, "<= 10000000"),
        ("teacher.train.steps", 10**9, "<= 10000000"),
        ("teacher.train.batch", 10**7, "<= 65536"),
        ("distill.batch", 2**20, "<= 65536"),
        ("evaluate.num_samples", 10**9, "<= 1000000"),
        ("likelihood.num_samples", 10**9, "<= 1000000"),
        ("teacher.train.model.model_channels", 1 << 14, "<= 1024"),
        ("distill.N", 10**6, "<= 10000"),
        ("evaluate.nfe", [1, 10**6], "<= 10000"),
        ("data.seed", 2**64, "<= 4294967295"),
    ],
)
def test_numbers_that_size_work_are_bounded(key, value, bound):
    msg = _one_line_error(load_params, PARAMS, {key: value}, check_env=False)
    assert bound in msg, msg


def test_dvc_lock_read_with_the_params_loader(tmp_path):
    """The MLflow data-hash tag reads dvc.lock: an alias bomb there is refused (no hash), not expanded."""
    from pipelines.support.tracking import data_hash_from_lock

    (tmp_path / "dvc.lock").write_text(_bomb_params(10, "eval_emas"))
    t0 = time.perf_counter()
    assert data_hash_from_lock(tmp_path) is None and time.perf_counter() - t0 < 2.0
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: data/prepared\n      md5: abc.dir\n"
    )
    assert data_hash_from_lock(tmp_path) == "abc.dir"
