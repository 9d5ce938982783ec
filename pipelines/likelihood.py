"""DVC stage `likelihood`: bits/dim of held-out images under the teacher and the CTM student.

    python -m pipelines.likelihood --params params.yaml --data data/prepared --teacher artifacts/teacher \\
        --student artifacts/student --out artifacts/likelihood

A stage of its own (not part of `evaluate`) so that changing Fréchet-distance params does not recompute the
expensive ODE likelihood. Works on unlabelled data (no feature classifier here).

Protocol (section `likelihood` of params.yaml; the student weights are the ones `evaluate.ema` picks):

* The first `likelihood.num_samples` images of the prepared HELD-OUT split, scored by the teacher D(x; σ) and by the
  student through g(x, σ, σ) (`ctm_core.diffusion.likelihood.student_as_denoiser`, the student's own score), each with the
  exact PF-ODE likelihood (`ctm_core.diffusion.likelihood.log_likelihood`: integrate dx/dσ = (x − D(x; σ))/σ with its
  divergence from sigma_min to sigma_max, the Gaussian prior at sigma_max); NOT the official CTM ELBO with its σ
  bug (sony/ctm#13). Teacher: sigma in [max(0.002, net.sigma_min), min(80, net.sigma_max)]; student: its own
  sigma_min / sigma_max. `divergence: exact` or `hutchinson` with `num_probes` Rademacher probes per image;
  solver tolerances `rtol` / `atol`.
* Discretisation: `bits_per_dim_levels` (below). Power-of-two levels (8-bit data) use the field's convention
  (`ctm_core.diffusion.likelihood.bits_per_dim`); the 17-level digits (not a power of 2) use bins of width Δ = 2/(L − 1)
  centred on prepare's levels, with uniform dequantisation (`dequantize: uniform`, a Jensen upper bound) or the
  bin centres (`none`).
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
store, else to a `likelihood-<params hash>` run (`pipelines.support.stage_common.log_stage_to_mlflow`). Exit codes: 0 ok,
2 bad params or missing inputs (one line on stderr, nothing written), 1 failure during the work (nothing written).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipelines.config import Params, ParamsError, load_params, params_hash
from pipelines.support.io_utils import atomic_write_json, staged_dir
from pipelines.support.stage_common import InputError, check_inputs, log_stage_to_mlflow, stage_arg_parser

__all__ = ["bits_per_dim_levels", "check_likelihood_inputs", "likelihood", "main"]


# --- bits/dim ---------------------------------------------------------------------------------------------------------
def bits_per_dim_levels(
    denoiser: Callable[..., torch.Tensor],
    levels: torch.Tensor,
    num_levels: int,
    *,
    dequantize: str,
    generator: torch.Generator,
    **likelihood_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image bits/dim of integer images with `num_levels` levels; returns (bpd (B,), Hutchinson stderr (B,)).

    Power-of-two levels (8-bit data): `ctm_core.diffusion.likelihood.bits_per_dim` with bits = log2(L), the field's
    convention (bins of width 2/L on [-1, 1], `+ bits − 1` offset) so numbers compare with published ones.

    Other L (17-level digits): the data were mapped by prepare to the L points x_k = k·Δ − 1 with Δ = 2/(L − 1),
    so the model's bins are the cells of width Δ CENTRED on those points, B_k = [x_k − Δ/2, x_k + Δ/2) (the
    outer cells stick out of [-1, 1] by Δ/2). With uniform dequantisation x = x_k + (u − ½)Δ, u ~ U[0,1)^D:

        P(k) = ∫_{B_k} p(x) dx,   −log P(k) ≤ E_u[−log p(x)] − D log Δ      (Jensen; Theis et al. 2016)
        bpd  = (−log p(x) − D log Δ) / (D ln 2),

    i.e. −log2 p(x)/D + log2((L − 1)/2). Check: the uniform density on the L cells, p = (LΔ)^(−D), gives exactly
    log2 L bits (4.09 for digits), the cost of a uniform guess. `dequantize='none'` uses the bin centres (u = ½):
    the point density times the bin volume, an approximation rather than a bound. The log-density comes from
    `ctm_core.diffusion.likelihood.log_likelihood` (exact PF-ODE, sigma from sigma_min to sigma_max).

    levels: (B, C, H, W) integers in 0..L−1. The dequantisation noise is drawn from `generator` first, then the
    Hutchinson probes (the same order as `bits_per_dim`).
    """
    from ctm_core.diffusion.likelihood import bits_per_dim, log_likelihood

    L = int(num_levels)
    if L < 2:
        raise ValueError(f"num_levels: expected an int >= 2, got {num_levels!r}")
    q = torch.as_tensor(levels).to(torch.int64)
    if L & (L - 1) == 0:
        bpd, se = bits_per_dim(
            denoiser,
            q,
            bits=L.bit_length() - 1,
            dequantize=dequantize,
            generator=generator,
            return_stderr=True,
            **likelihood_kwargs,
        )
        return bpd, se
    if dequantize not in ("uniform", "none"):
        raise ValueError(f"dequantize: expected 'uniform' or 'none', got {dequantize!r}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= L):
        raise ValueError(f"levels: expected values in [0, {L - 1}], got [{int(q.min())}, {int(q.max())}]")
    delta = 2.0 / (L - 1)
    if dequantize == "uniform":
        u = torch.rand(q.shape, generator=generator, dtype=torch.float64, device=generator.device).to(q.device)
    else:
        u = torch.full(q.shape, 0.5, dtype=torch.float64, device=q.device)
    x = (q.to(torch.float64) + u - 0.5) * delta - 1.0  # (B, C, H, W)
    D = q[0].numel()
    log_p, stderr = log_likelihood(denoiser, x, generator=generator, return_stderr=True, **likelihood_kwargs)
    bpd = -(log_p + D * math.log(delta)) / (D * math.log(2.0))
    return bpd, stderr / (D * math.log(2.0))


# --- inputs -----------------------------------------------------------------------------------------------------------
def check_likelihood_inputs(params: Params, data: Path, teacher: Path, student: Path) -> dict[str, Any]:
    """`stage_common.check_inputs` without the class-label requirement, plus a non-empty held-out split when enabled.
    Returns {'card', 'student_config', 'variant'}; raises InputError (one line) before any work."""
    checked = check_inputs(params, data, teacher, student, need_labels=False)
    held = int(checked["card"]["splits"]["heldout"]["count"])
    if params.likelihood.enabled and held < 1:
        raise InputError(
            f"--data: {data} has an empty held-out split; bits/dim is measured on held-out images "
            "(fix: set data.heldout_fraction > 0, or likelihood.enabled: false)"
        )
    return checked


# --- the stage --------------------------------------------------------------------------------------------------------
def _bpd(
    params: Params,
    name: str,
    denoiser,
    levels: torch.Tensor,
    num_levels: int,
    sigma_min: float,
    sigma_max: float,
    progress: bool,
) -> dict[str, float]:
    b = params.likelihood
    gen = torch.Generator().manual_seed(b.seed)
    t0 = time.perf_counter()
    with tqdm(total=len(levels), desc=f"bits/dim {name}", unit="img", disable=not progress, leave=False) as bar:
        bpd, se = bits_per_dim_levels(
            denoiser,
            levels,
            num_levels,
            dequantize=b.dequantize,
            generator=gen,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            divergence=b.divergence,
            num_probes=b.num_probes,
            rtol=b.rtol,
            atol=b.atol,
        )
        bar.update(len(levels))
    n = len(bpd)
    out = {f"bpd_{name}": float(bpd.mean())}
    if n > 1:
        out[f"bpd_{name}_stderr"] = float(bpd.std(unbiased=True)) / math.sqrt(n)
    if b.divergence == "hutchinson" and b.num_probes > 1:
        out[f"bpd_{name}_hutchinson_stderr"] = float(se.pow(2).sum().sqrt()) / n
    out[f"bpd_{name}_seconds"] = time.perf_counter() - t0
    return out


def _protocol_text(card: dict[str, Any]) -> str:
    """The discretisation actually used for this dataset (from `bits_per_dim_levels`' doc), one paragraph."""
    paras = [" ".join(p.split()) for p in bits_per_dim_levels.__doc__.split("\n\n")]
    L = int(card["image"]["num_levels"])
    body = paras[1] if L & (L - 1) == 0 else " ".join(paras[2:5])
    return (
        f"Exact PF-ODE likelihood (ctm_core.diffusion.likelihood.log_likelihood; not the official ELBO, sony/ctm#13); "
        f"teacher D(x; sigma), student g(x, sigma, sigma); {L} levels: {body}"
    )


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
    checked = check_likelihood_inputs(params, data, teacher, student)
    card, variant = checked["card"], checked["variant"]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    protocol = _protocol_text(card) if lk.enabled else None
    details: dict[str, Any] = {
        "enabled": lk.enabled,
        "protocol": protocol,
        "errors": [],
        "networks": {},
        "student": {"dir": str(student), "variant": variant},
        "teacher": {"dir": str(teacher)},
        "device": str(dev),
        "params": params.section("likelihood"),
        "params_hash": params_hash(params.section("likelihood")),
    }
    metrics: dict[str, Any] = {}
    with staged_dir(out) as tmp:
        if not lk.enabled:
            metrics = {"enabled": False, "complete": True}
        else:
            from ctm_core.data.prepared import load_prepared
            from ctm_core.diffusion.likelihood import student_as_denoiser
            from ctm_core.io.student_format import load_student
            from ctm_core.io.teacher_format import load_edm_checkpoint

            num_levels = int(card["image"]["num_levels"])
            held = load_prepared(data, "heldout")[0][: lk.num_samples]
            levels = torch.as_tensor(held).to(torch.int64).to(dev)
            teacher_net = load_edm_checkpoint(teacher).to(dev).eval().requires_grad_(False)
            student_net = load_student(student, variant, device=dev)
            metrics["num_images"] = int(len(levels))
            for name, den, smin, smax in (
                (
                    "teacher",
                    teacher_net,
                    max(0.002, float(getattr(teacher_net, "sigma_min", 0.0))),
                    min(80.0, float(getattr(teacher_net, "sigma_max", 80.0))),
                ),
                (
                    "student",
                    student_as_denoiser(student_net),
                    float(student_net.sigma_min),
                    float(student_net.sigma_max),
                ),
            ):
                try:
                    r = _bpd(params, name, den, levels, num_levels, smin, smax, progress)
                except (ValueError, RuntimeError) as e:  # e.g. a diverged network (non-finite ODE)
                    details["errors"].append(f"bpd_{name}: {type(e).__name__}: {e}")
                    continue
                details["networks"][name] = {
                    "sigma_min": smin,
                    "sigma_max": smax,
                    "seconds": r.pop(f"bpd_{name}_seconds"),
                    **r,
                }
                metrics.update({k: v for k, v in r.items() if math.isfinite(v)})
            missing = [k for k in ("bpd_teacher", "bpd_student") if k not in metrics]
            details["missing"] = missing
            metrics["complete"] = not details["errors"] and not missing
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


# --- entrypoint -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = stage_arg_parser("python -m pipelines.likelihood", __doc__.split("\n\n")[0])
    args = ap.parse_args(argv)
    try:
        # Ray is not used here: skip the Ray-address / GPU / S3 reachability checks of the other stages.
        params = load_params(args.params, check_env=False)
    except ParamsError as e:
        print(f"params error: {e}", file=sys.stderr)
        return 2
    try:
        check_likelihood_inputs(params, Path(args.data), Path(args.teacher), Path(args.student))
        metrics = likelihood(
            params,
            args.data,
            args.teacher,
            args.student,
            args.out,
            progress=not args.no_progress,
            device=args.device,
            log_mlflow=not args.no_mlflow,
        )
    except InputError as e:
        print(f"input error: {e}", file=sys.stderr)
        return 2
    shown = [k for k in ("bpd_teacher", "bpd_student", "complete") if k in metrics]
    print(
        "likelihood: "
        + ", ".join(f"{k}={metrics[k]}" if isinstance(metrics[k], bool) else f"{k}={metrics[k]:.4g}" for k in shown)
        + f" -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
