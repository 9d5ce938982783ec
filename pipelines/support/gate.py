"""The promotion gate: does a challenger's quality beat the champion's by more than the measured noise?

A Fréchet distance estimated from a finite sample is a random variable: two evaluations of the SAME model with
different seeds differ by about its standard deviation (Chong & Forsyth 2020, "Effectively Unbiased FID"; EDM
reports the minimum of 3 seed sets, SiD the mean of 10). So `@champion` moves only when

    improvement  = champion − challenger            (mode min; challenger − champion for mode max)
    noise        = sqrt(σ_challenger² + σ_champion²)  (independent evaluations)
    improvement  > max(noise_z · noise,  min_improvement · |champion|)

and both numbers come from the SAME protocol: feature network, reference statistics, sample count and seeds, as
fingerprinted by the evaluate stage's `protocol.json` (`protocol_sha256`). Different protocols are never compared.

σ of a metric `m` is read from the evaluate stage's own measurement (`ctm_core.eval.scoring`):
    1. `m_std`: the sample std of `m` over K disjoint seed sets (each 1/K of the images). Measured at 1/K of the
       sample size it OVERSTATES the noise of the full-size number (roughly by sqrt(K)): a conservative gate;
    2. else the bootstrap 95 % interval `m_ci_low`/`m_ci_high`: σ ≈ (high − low) / (2 · 1.96).
When only one side has a σ (e.g. a champion registered before the gate existed) the other is assumed equal (same
protocol ⇒ same sample count). With no σ at all the gate refuses to promote: an unmeasured noise is not zero.

Everything here is pure (no MLflow): `read_evaluation` reads an evaluate stage's folder; `pipelines.register` adds
the champion's version tags and calls `decide`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["Decision", "Evidence", "decide", "metric_noise", "read_eval", "read_evaluation", "read_protocol"]

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile: converts a bootstrap interval to a std


@dataclasses.dataclass(frozen=True)
class Evidence:
    """One evaluated version: its metric value, the 1σ noise of that value, the protocol fingerprint."""

    value: float | None
    noise: float | None = None
    protocol: str | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """decision ∈ {'champion', 'challenger', 'rejected'}; the numbers behind it (None where not applicable)."""

    decision: str
    reason: str
    improvement: float | None = None  # absolute, positive = challenger better
    relative_improvement: float | None = None
    noise: float | None = None  # 1σ of the difference
    threshold: float | None = None  # what the improvement had to exceed

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None)
            for k, v in dataclasses.asdict(self).items()
        }


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def metric_noise(metrics: dict[str, Any], metric: str) -> float | None:
    """1σ noise of `metrics[metric]` from the evaluation's own error bars (module doc), or None if unmeasured."""
    std = _finite(metrics.get(f"{metric}_std"))
    if std is not None and std >= 0:
        return std
    low, high = _finite(metrics.get(f"{metric}_ci_low")), _finite(metrics.get(f"{metric}_ci_high"))
    if low is not None and high is not None and high >= low:
        return (high - low) / (2 * Z_95)
    return None


def read_protocol(eval_dir: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, str | None]:
    """(protocol dict, its sha256) from `<eval_dir>/protocol.json`, or (None, None) when the file is absent.

    The fingerprint is the file's `protocol_sha256` if it has one, else the sha256 of its canonical JSON.
    Raises ValueError (one line) for a file that is not a JSON object.
    """
    path = Path(eval_dir) / "protocol.json"
    if not path.is_file():
        return None, None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds {type(raw).__name__}, expected an object")
    sha = raw.get("protocol_sha256")
    if not isinstance(sha, str) or not sha:
        body = {k: v for k, v in raw.items() if k != "protocol_sha256"}
        sha = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return raw, sha


def read_eval(eval_dir: str | os.PathLike[str], metric: str) -> tuple[dict[str, float], float | None, str]:
    """(all finite numeric metrics flattened, value of `metric` or None, status 'ok' | 'failed: <why>') from
    `<eval_dir>/metrics.json`. A missing or unreadable file, a missing or non-finite value and `"complete": false`
    (a partial evaluation) are failures."""
    path = Path(eval_dir) / "metrics.json"
    if not path.is_file():
        return {}, None, f"failed: {path} not found (the evaluate stage did not finish)"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return {}, None, f"failed: {path} is not valid JSON ({e})"
    if not isinstance(raw, dict):
        return {}, None, f"failed: {path} holds {type(raw).__name__}, expected an object"
    numbers: dict[str, float] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                numbers[key] = float(v)

    walk(raw, "")
    if raw.get("complete") is False:
        return numbers, None, f"failed: {path} says complete: false (partial evaluation)"
    if metric not in raw and metric not in numbers:
        return numbers, None, f"failed: {path} has no key {metric!r} (register.metric)"
    value = raw.get(metric, numbers.get(metric))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return numbers, None, f"failed: {path} {metric} = {value!r} is not a finite number"
    return numbers, float(value), "ok"


def read_evaluation(
    eval_dir: str | os.PathLike[str], metric: str
) -> tuple[dict[str, float], float | None, str, str | None]:
    """`read_eval` plus the protocol fingerprint: (metrics, value, status, protocol sha256 or None).

    An evaluation without a usable protocol.json is a failure too (the gate never compares without a protocol);
    `value` is then still returned, for display only: promote only when status is 'ok'. An evaluation of a released
    checkpoint (`evaluate.student_source`) raises RegisterError instead (`student_source.check_registrable`)."""
    from pipelines.support.registry import RegisterError
    from pipelines.support.student_source import check_registrable

    check_registrable(eval_dir, RegisterError)
    metrics, value, status = read_eval(eval_dir, metric)
    try:
        _, sha = read_protocol(eval_dir)
        why = (
            f"{Path(eval_dir) / 'protocol.json'} not found (the evaluate stage did not finish, or wrote no "
            "protocol fingerprint: re-run it)"
        )
    except ValueError as e:
        sha, why = None, str(e)
    if status == "ok" and sha is None:
        status = f"failed: {why}"
    return metrics, value, status, sha


def decide(
    challenger: Evidence,
    status: str,
    champion: Evidence | None,
    *,
    mode: str = "min",
    noise_z: float = 2.0,
    min_improvement: float = 0.0,
) -> Decision:
    """The gate (module doc). `status` is 'ok' or 'failed: <why>' from reading the challenger's evaluation;
    `champion` is None when the model has no champion yet."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode: expected 'min' or 'max', got {mode!r}")
    if noise_z < 0 or min_improvement < 0:
        raise ValueError(f"noise_z, min_improvement: expected >= 0, got {noise_z!r}, {min_improvement!r}")
    value = _finite(challenger.value)
    if status != "ok" or value is None:
        return Decision("rejected", status if status != "ok" else "the evaluation has no finite metric value")
    if champion is None:
        return Decision("champion", "first version with a valid evaluation: no champion yet")
    champ_value = _finite(champion.value)
    if champ_value is None:
        return Decision("champion", "the current champion has no valid metric tag")
    if challenger.protocol is None or champion.protocol is None or challenger.protocol != champion.protocol:
        return Decision(
            "challenger",
            f"not comparable: evaluation protocol {challenger.protocol} differs from the "
            f"champion's {champion.protocol} (features, reference statistics, sample count or seeds); "
            "re-evaluate the champion with this protocol or move @champion by hand",
        )
    diff = champ_value - value if mode == "min" else value - champ_value
    scale = abs(champ_value)
    rel = diff / scale if scale > 0 else None
    sig_a, sig_b = _finite(challenger.noise), _finite(champion.noise)
    if sig_a is None and sig_b is None:
        return Decision(
            "challenger",
            "no measured noise for either evaluation (need seed-set std or bootstrap interval): champion kept",
            diff,
            rel,
        )
    sig_a = sig_b if sig_a is None else sig_a
    sig_b = sig_a if sig_b is None else sig_b
    noise = math.sqrt(sig_a**2 + sig_b**2)
    threshold = max(noise_z * noise, min_improvement * scale)
    if diff > threshold:
        return Decision(
            "champion",
            f"better than the champion by {diff:.4g} > {threshold:.4g} "
            f"(= max({noise_z:g}·noise {noise:.4g}, {min_improvement:g}·|champion|))",
            diff,
            rel,
            noise,
            threshold,
        )
    margin = f"(= max({noise_z:g}·noise {noise:.4g}, {min_improvement:g}·|champion|))"
    if diff < 0:
        reason = (
            f"worse than the champion by {-diff:.4g} ({value:.4g} vs {champ_value:.4g}, mode {mode}): champion kept"
        )
    elif diff == 0:
        reason = f"equal to the champion ({value:.4g}): champion kept"
    else:
        reason = f"better by {diff:.4g} <= {threshold:.4g} {margin}: within the noise, champion kept"
    return Decision("challenger", reason, diff, rel, noise, threshold)
