"""DVC stage `likelihood`: bits/dim of held-out images under the teacher and the CTM student.

    python -m pipelines.likelihood --params params.yaml --data data/prepared --teacher artifacts/teacher \\
        --student artifacts/student --out artifacts/likelihood

A stage of its own (not part of `evaluate`) so that changing Fréchet-distance params does not recompute the
expensive ODE likelihood. Works on unlabelled data (no feature classifier here).

Protocol (section `likelihood` of params.yaml; the student weights are the ones `evaluate.ema` picks):

* The first `likelihood.num_samples` images of the prepared HELD-OUT split, scored by the teacher D(x; σ) and by
  the student through its own score g(x, σ, σ) (`ctm_core.diffusion.likelihood.student_as_denoiser`), each with the
  exact PF-ODE likelihood (`ctm_core.diffusion.likelihood.log_likelihood`: integrate dx/dσ = (x − D(x; σ))/σ with
  its divergence from sigma_min to sigma_max, the Gaussian prior at sigma_max); NOT the official CTM ELBO with its
  σ bug (sony/ctm#13). Teacher: sigma in [max(0.002, net.sigma_min), min(80, net.sigma_max)]; student: its own
  sigma_min / sigma_max. `divergence: exact` or `hutchinson` with `num_probes` Rademacher probes per image;
  solver tolerances `rtol` / `atol`.
* Discretisation (`ctm_core.eval.bits_per_dim`): power-of-two levels (8-bit data) use the field's convention
  (`ctm_core.diffusion.likelihood.bits_per_dim`); other level counts (the 17-level digits) use bins of width
  Δ = 2/(L − 1) centred on prepare's levels, with uniform dequantisation (`dequantize: uniform`, a Jensen upper
  bound) or the bin centres (`none`).
* Randomness: one `torch.Generator` seeded with `likelihood.seed` per network (teacher, then student), drawing the
  dequantisation noise first, then the Hutchinson probes: the same images get the same noise under both networks.
* Error bars: `bpd_*_stderr` is the standard error of the mean over images (it contains the dequantisation and
  Hutchinson Monte-Carlo noise); with `divergence: hutchinson` and `num_probes > 1` the Hutchinson-only part is
  `bpd_*_hutchinson_stderr` (the MC error of the probes, from their spread per image).

Outputs (`--out`, built in a temporary folder and renamed into place: all or nothing):
    metrics.json    flat: bpd_student, bpd_teacher (+ _stderr, _hutchinson_stderr), num_images, complete (true iff
                    both numbers were computed; `likelihood.enabled: false` writes only complete: true and
                    enabled: false, so `dvc metrics show` still works)
    details.json    protocol text, per-network timings and sigma range, errors, student / teacher folders, device,
                    the `likelihood` params and their params_hash

MLflow: metrics.json's numbers (bpd_* as they are, the others prefixed `likelihood_`) and both files (under
`likelihood/`) are logged to the distill run (`mlflow_run_id` in <student>/run.json) when it exists in the tracking
store, else to a `likelihood-<params hash>` run (`pipelines.support.stage_common.log_stage_to_mlflow`). Exit
codes: 0 ok, 2 bad params or missing inputs (one line on stderr, nothing written), 1 failure during the work
(nothing written).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ctm_core.config import Params, params_hash
from ctm_core.eval.bits_per_dim import protocol_text, score_bits_per_dim
from pipelines.support.io_utils import atomic_write_json, staged_dir
from pipelines.support.stage_common import (
    check_inputs,
    load_scored_networks,
    log_stage_to_mlflow,
    pick_device,
    run_scoring_stage,
)

__all__ = ["likelihood", "main"]

logger = logging.getLogger(__name__)


def _networks(teacher: Path, student: Path, variant: str, device: torch.device) -> list[tuple]:
    """(name, denoiser, sigma_min, sigma_max): the teacher D(x; σ) on [max(0.002, σ_min), min(80, σ_max)] and the
    student's own score g(x, σ, σ) on its σ range."""
    from ctm_core.diffusion.likelihood import student_as_denoiser

    teacher_net, student_net = load_scored_networks(teacher, student, variant, device)
    return [
        (
            "teacher",
            teacher_net,
            max(0.002, float(getattr(teacher_net, "sigma_min", 0.0))),
            min(80.0, float(getattr(teacher_net, "sigma_max", 80.0))),
        ),
        ("student", student_as_denoiser(student_net), float(student_net.sigma_min), float(student_net.sigma_max)),
    ]


def likelihood(
    params: Params,
    data: str | os.PathLike,
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    out: str | os.PathLike,
    *,
    progress: bool = True,
    device: str | None = None,
    log_mlflow: bool = True,
) -> dict[str, Any]:
    """Run the whole stage (module doc); returns the flat metrics. Raises InputError before any work."""
    data, teacher, student, out = Path(data), Path(teacher), Path(student), Path(out)
    lk = params.likelihood
    checked = check_inputs(params, data, teacher, student, need_labels=False, need_heldout=lk.enabled)
    card, variant = checked["card"], checked["variant"]
    dev = pick_device(device)
    t_start = time.perf_counter()
    details: dict[str, Any] = {
        "enabled": lk.enabled,
        "protocol": protocol_text(card.image.num_levels) if lk.enabled else None,
        "errors": [],
        "networks": {},
        "student": {"dir": str(student), "variant": variant},
        "teacher": {"dir": str(teacher)},
        "device": str(dev),
        "params": params.section("likelihood"),
        "params_hash": params_hash(params.section("likelihood")),
    }
    metrics: dict[str, Any] = {"enabled": False, "complete": True}
    with staged_dir(out) as tmp:
        if lk.enabled:
            from ctm_core.data.prepared import load_prepared

            held = load_prepared(data, "heldout")[0][: lk.num_samples]
            levels = torch.as_tensor(held).to(torch.int64).to(dev)
            networks = _networks(teacher, student, variant, dev)
            metrics = {"num_images": int(len(levels))}
            for name, den, smin, smax in networks:
                try:
                    r = score_bits_per_dim(
                        name,
                        den,
                        levels,
                        card.image.num_levels,
                        sigma_min=smin,
                        sigma_max=smax,
                        seed=lk.seed,
                        dequantize=lk.dequantize,
                        divergence=lk.divergence,
                        num_probes=lk.num_probes,
                        rtol=lk.rtol,
                        atol=lk.atol,
                        progress=progress,
                    )
                except (ValueError, RuntimeError) as e:  # e.g. a diverged network (non-finite ODE)
                    details["errors"].append(f"bpd_{name}: {type(e).__name__}: {e}")
                    logger.warning("bpd_%s failed: %s: %s", name, type(e).__name__, e)
                    continue
                seconds = r.pop(f"bpd_{name}_seconds")
                details["networks"][name] = {"sigma_min": smin, "sigma_max": smax, "seconds": seconds, **r}
                metrics.update({k: v for k, v in r.items() if math.isfinite(v)})
            details["missing"] = [k for k in ("bpd_teacher", "bpd_student") if k not in metrics]
            metrics["complete"] = not details["errors"] and not details["missing"]
            details["num_images"] = metrics["num_images"]
        details["seconds"] = time.perf_counter() - t_start
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_json(tmp / "details.json", details)
        if log_mlflow:
            # bpd_* keep their names; complete / num_images would clash with evaluate's in the distill run
            logged = {k if k.startswith("bpd_") else f"likelihood_{k}": v for k, v in metrics.items()}
            log_stage_to_mlflow(
                params,
                student,
                tmp,
                logged,
                stage="likelihood",
                artifact_prefix="likelihood",
                extra_tags={"ctm.likelihood.enabled": str(lk.enabled).lower()},
                complete=bool(metrics["complete"]),
            )
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_scoring_stage(
        argv,
        prog="python -m pipelines.likelihood",
        description=__doc__.split("\n\n")[0],
        run=likelihood,
        summary_keys=lambda params: ("bpd_teacher", "bpd_student", "complete"),
        log=logger,
    )


if __name__ == "__main__":
    sys.exit(main())
