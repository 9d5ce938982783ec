"""Peak memory of one CTM+DSM training step on CPU, in MiB per image, for the step's memory arrangements.

    python benchmarks/step_memory_cpu.py [--preset edm-cifar10-32x32-uncond-vp] [--batch 2] [--marginal-batch 4]
                                         [--channels 128] [--json out.json]

Accounting: the torch profiler's CPU allocator record (``profile_memory=True``): the peak, over one ``train_step``,
of the bytes allocated since the step began (activations, autograd buffers, gradients, optimizer temporaries),
divided by the microbatch size; with ``--marginal-batch``, also the slope between the two batch sizes (the MiB each
added image costs, without the fixed part such as the gradients). The models, optimizer state and data allocated
before the step are not counted (one warm-up step runs first so the optimizer state exists). ``K = 1`` (k = 1): the
teacher's Heun solve runs without grad, so k does not change the peak, only the time.

Arrangements, each in a fresh trainer on the same weights and data:

* ``combined``    one backward of the summed loss with λ_DSM from ``autograd.grad(..., retain_graph=True)`` on both
                  terms: the three autograd graphs (student.G with grad, target.G with input grad, the DSM forward)
                  alive together, and the target's convolutions keeping their inputs (the plain-conv arrangement).
* ``staged``      ``ctm_dsm_backward``: the CTM graph is backpropagated and freed before the DSM pass is built.
* ``staged+frozen_conv``  and the target's convolutions (frozen weights) keep no input.
* ``staged+frozen_conv+checkpoint``  and the estimate's inner jump G_θ(x_t, t, s) is recomputed in the backward
                  (the trainer's default).

Every arrangement makes the same parameter update (checked here with ``torch.equal`` on every parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ctm_core.nets.layers as layers  # noqa: E402
from ctm_core.config import DistillParams  # noqa: E402
from ctm_core.nets.presets import build_preset  # noqa: E402
from ctm_core.nets.student import CTMStudent  # noqa: E402
from ctm_core.training.loop import Trainer  # noqa: E402
from ctm_core.training.trainer import CTMTrainer, TensorDataSource  # noqa: E402

MIB = 1024**2
ARRANGEMENTS = ("combined", "staged", "staged+frozen_conv", "staged+frozen_conv+checkpoint")
_REAL_CONV = layers._conv


def _plain_conv(x, w, b=None, *, stride=1, padding=0, groups=1, transposed=False):
    """The convolution without the frozen-weight path: keeps its input whenever anything needs a gradient."""
    fn = F.conv_transpose2d if transposed else F.conv2d
    return fn(x, w, b, stride=stride, padding=padding, groups=groups)


class _CombinedTrainer(CTMTrainer):
    """One backward of ``ctm_dsm_loss``'s total per microbatch (the loop's default ``microbatch_backward``)."""

    def microbatch_backward(self, *args, **kwargs):
        return Trainer.microbatch_backward(self, *args, **kwargs)


def peak_step_bytes(trainer: CTMTrainer) -> tuple[int, float]:
    """(peak bytes allocated since the start of one train_step, seconds) from the profiler's memory record."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step()
    seconds = time.perf_counter() - t0
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    finally:
        os.remove(path)
    mem = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not mem:
        return 0, seconds
    # The allocator's running total carries over from earlier profiling sessions: measure from this one's start.
    start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(m["Total Allocated"] for m in mem) - start, seconds


def build(args, batch: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    overrides = {} if args.channels is None else {"model_channels": args.channels}
    if args.resolution is not None:
        overrides["img_resolution"] = args.resolution
    teacher = build_preset(args.preset, label_dim=0, **overrides).eval()
    with torch.no_grad():  # EDM zero-initialises the output convolutions: perturb so every gradient is non-zero
        for p in teacher.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    res = teacher.img_resolution
    data = torch.randn(4 * batch, 3, res, res, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    return teacher, data


def _measure(name: str, teacher, data, batch: int, dropout: float) -> tuple[float, float, list[torch.Tensor]]:
    """(peak bytes of one step, its seconds, the updated parameters) for one arrangement at one batch size."""
    cfg = DistillParams(N=18, K=1, lr=1e-4, target_ema=0.999, eval_emas=[0.999], batch=batch, microbatch=batch, seed=3)
    layers._conv = _plain_conv if name in ("combined", "staged") else _REAL_CONV
    try:
        torch.manual_seed(1)  # the s-branch's fresh init: the same in every arrangement
        student = CTMStudent.from_teacher(teacher, dropout=dropout)
        cls = _CombinedTrainer if name == "combined" else CTMTrainer
        kw = {} if name == "combined" else {"checkpoint_inner_jump": name.endswith("checkpoint")}
        source = TensorDataSource(data[: 4 * batch], batch_size=batch, seed=3)
        tr = cls(cfg, student, teacher, source, progress=False, **kw)
        tr.train_step()  # warm-up: optimizer state, grads
        peak, seconds = peak_step_bytes(tr)
    finally:
        layers._conv = _REAL_CONV
    return peak, seconds, [p.detach().clone() for p in tr.model.parameters()]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    big = args.marginal_batch
    if big is not None and big <= args.batch:
        raise ValueError(f"--marginal-batch: expected > --batch ({args.batch}), got {big}")
    teacher, data = build(args, max(args.batch, big or 0))
    results, states = {}, {}
    for name in args.arrangements:
        peak, seconds, states[name] = _measure(name, teacher, data, args.batch, args.dropout)
        r = {"peak_mib_per_img": peak / MIB / args.batch, "peak_mib": peak / MIB, "step_s": seconds}
        line = f"{name:32s} {peak / MIB / args.batch:9.1f} MiB/img at batch {args.batch} ({peak / MIB:8.1f} MiB)"
        if big is not None:
            peak_big, _, _ = _measure(name, teacher, data, big, args.dropout)
            marginal = (peak_big - peak) / (big - args.batch)
            r.update(
                peak_mib_at_marginal_batch=peak_big / MIB,
                marginal_mib_per_img=marginal / MIB,
                fixed_mib=(peak - marginal * args.batch) / MIB,
            )
            line += f"; {marginal / MIB:7.1f} MiB per added image + {r['fixed_mib']:7.1f} MiB"
        results[name] = r
        print(line, flush=True)
    ref = states[args.arrangements[0]]
    same = {n: all(torch.equal(a, b) for a, b in zip(ref, s)) for n, s in states.items()}
    print("same update as", args.arrangements[0], "(torch.equal, every parameter):", same)
    params = sum(p.numel() for p in teacher.parameters())
    return {
        "preset": args.preset,
        "model_channels": args.channels,
        "img_resolution": teacher.img_resolution,
        "teacher_params": params,
        "batch": args.batch,
        "marginal_batch": big,
        "dropout": args.dropout,
        "threads": args.threads,
        "torch": torch.__version__,
        "arrangements": results,
        "same_update": same,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="edm-cifar10-32x32-uncond-vp")
    p.add_argument("--channels", type=int, default=None, help="model_channels override (default: the preset's)")
    p.add_argument("--resolution", type=int, default=None, help="img_resolution override")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument(
        "--marginal-batch",
        type=int,
        default=None,
        help="also measure at this batch: MiB per added image (the slope) and the fixed MiB (the intercept)",
    )
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arrangements", nargs="+", default=list(ARRANGEMENTS), choices=ARRANGEMENTS)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    out = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if all(out["same_update"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
