#!/usr/bin/env python
"""GPU speed of CTM+DSM distillation and CTM sampling, measured against the network-pass floor (benchmarks/README.md).

One process, one device, one run of a few minutes. Every part is wrapped: a failing part is recorded under
``errors`` and the rest continues; the JSON is rewritten after every part, so a run killed halfway still leaves
what it measured. Random weights (the timings do not depend on them); zero-initialised EDM output layers are
filled with small random values so that no output or gradient is trivially zero.

Floor accounting (docs/ctm.md#210-step-cost, one microbatch of B images, the same k for the batch):

    teacher k-step Heun x_t -> x_u (no grad)           2·k  teacher forwards              t_teacher_fwd
    estimate inner  G_θ(x_t, t, s)   (grad to θ)       1    student forward+backward      t_student_fwdbwd
    estimate outer  G_θ⁻(x_s, s, σ_min) (input grad)   1    target forward+input-backward t_target_fwd_inputgrad
    target inner    G_sg(θ)(x_u, u, s) (no grad)       1    student forward               t_student_nograd_fwd
    target outer    G_θ⁻(x̂_s, s, σ_min) (no grad)      1    target forward (same net)     t_student_nograd_fwd
    DSM             g_θ(x_σ, σ, σ)                     1    student forward+backward      t_student_fwdbwd

    floor(step) = 2·E[k]·t_teacher_fwd + 2·t_student_nograd_fwd + 2·t_student_fwdbwd + t_target_fwd_inputgrad,
    E[k] = Σ k·P(k) with P(k) ∝ k on {1..K} = (2K+1)/3   (11.67 for K = 17; docs/ctm.md#21-drawing-k).

Not in the floor (reported as they are): the adaptive λ_DSM's last-layer gradients (the DSM one a short pass; the
CTM one read during the CTM backward when (b/B)·ctm_weight is a power of two, otherwise a second pass through the
target), the recomputed inner jump (the trainer checkpoints it: one more student forward), the LPIPS passes when
``--distance lpips``, the optimizer step and the three EMA updates. ``fid50k_seconds``: the evaluate stage's path
(1-step samples → uint8 → Inception-v3 pool3 features with random weights → statistics → Fréchet distance) timed
on ``--fid-images`` images and scaled to 50 000. Each pass is timed on its own at batch B in the settings named
below; the floor in images/s is B / floor(step).

Settings: ``fp32_eager`` (plain fp32, torch's default TF32 flags), ``bf16_eager`` (bf16 autocast + channels_last),
``bf16_compiled`` (bf16 + channels_last + torch.compile of student, target and teacher). The fast training
step runs ``ctm_core.training.trainer.CTMTrainer.train_step`` in the fastest settings (``bf16_compiled`` unless turned
off or the compile fails or exceeds ``--compile-timeout-s``; then ``bf16_eager``); the naive step is the same trainer
in fp32 eager. To compare with the floor at E[k], every timed repeat is one cycle of 3 steps whose k values
average exactly (2K+1)/3 (for K = 17: 12, 12, 11); the trainer's k sampler is replaced for this only.

Run on a GPU from the repository root:  python benchmarks/gpu_bench.py --out benchmarks/results
CPU smoke test:                          python benchmarks/gpu_bench.py --tiny --device cpu --out /tmp/benchout
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import itertools
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ctm_core.config import DistillParams  # noqa: E402
from ctm_core.diffusion.samplers import edm_sampler, gamma_sampler  # noqa: E402
from ctm_core.nets.presets import build_preset  # noqa: E402
from ctm_core.nets.student import CTMStudent  # noqa: E402
from ctm_core.training.ema import frozen_copy  # noqa: E402
from ctm_core.training.trainer import CTMTrainer, TensorDataSource  # noqa: E402

# A tiny SongUNet for CPU smoke runs (shapes as in tests/unit/test_student.py).
TINY_OVERRIDES = dict(img_resolution=16, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
SETTINGS = ("fp32_eager", "bf16_eager", "bf16_compiled")
GIB = float(1 << 30)


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def expected_k(K: int) -> float:
    """E[k] for P(k) ∝ k on {1..K}: Σk²/Σk = (2K+1)/3."""
    return (2 * K + 1) / 3


def k_cycle(K: int) -> list[int]:
    """Three k values whose mean is exactly (2K+1)/3 (3·E[k] = 2K+1 is an integer)."""
    q, r = divmod(2 * K + 1, 3)
    return [q + 1] * r + [q] * (3 - r)


def floor_seconds(t: dict[str, float], K: int) -> float:
    """The per-step floor (module docstring) from the per-pass medians in seconds."""
    return (
        2 * expected_k(K) * t["teacher_fwd"]
        + 2 * t["student_nograd_fwd"]
        + 2 * t["student_fwdbwd"]
        + t["target_fwd_inputgrad"]
    )


class SkipPart(Exception):
    """Raised by a part that does not apply to this run (reported as skipped, not as an error)."""


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str):
    """Raise CompileTimeout in the main thread after ``seconds`` (SIGALRM; no-op when unavailable)."""
    if not seconds or seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise CompileTimeout(f"{what} exceeded {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, old)


class Clock:
    """Per-call timing: CUDA events on GPU, perf_counter (after a sync) elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable[[], Any], *, warmup: int, repeats: int, per: int = 1) -> dict[str, Any]:
        """Run ``fn`` ``warmup`` times, then time ``repeats`` calls; seconds per call divided by ``per``."""
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        self.sync()
        warm_s = time.perf_counter() - t0
        times = []
        for _ in range(max(1, repeats)):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000.0 / per)
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) / per)
        med = statistics.median(times)
        return {
            "median_s": med,
            "min_s": min(times),
            "max_s": max(times),
            "spread": (max(times) - min(times)) / med if med > 0 else 0.0,
            "repeats": len(times),
            "warmup_wall_s": warm_s,
        }


def randomize_zero_params_(module: nn.Module, generator: torch.Generator, scale: float = 0.02) -> None:
    """Fill the all-zero parameters (EDM zero-inits output layers) with N(0, scale²)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def set_dropout_(module: nn.Module, p: float) -> None:
    """Set the UNet blocks' ``dropout`` probability (a float attribute used with F.dropout) and nn.Dropout."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = p


@contextlib.contextmanager
def tf32_off(report: dict[str, Any]):
    """True fp32 for a reference computation (legacy flags only, restored after; torch >= 2.9 refuses some mixes
    of the legacy and the new ``fp32_precision`` API, so any failure to toggle is reported and ignored)."""
    old = None
    try:
        old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        report["reference_tf32_off"] = True
    except Exception as e:  # noqa: BLE001
        report["reference_tf32_off"] = f"could not turn TF32 off: {type(e).__name__}: {e}"[:300]
        old = None
    try:
        yield
    finally:
        if old is not None:
            with contextlib.suppress(Exception):
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"[:200]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else float("inf")


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-")


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t_start = time.perf_counter()
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.clock = Clock(self.device)
        self.compile_enabled = args.compile == "on" or (args.compile == "auto" and self.device.type == "cuda")
        self.compile_failed: str | None = None
        self.cl = not args.no_channels_last
        self.bf16 = not args.no_bf16
        self.K = args.K
        self.B = args.batch
        self.res: dict[str, Any] = {
            "card": card_name(self.device),
            "batch": self.B,
            "arch": args.arch,
            "tiny": bool(args.tiny),
            "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "floor_img_per_s": None,
            "step_img_per_s": None,
            "naive_fp32_img_per_s": None,
            "compiled_forward_img_per_s": None,
            "sample_1step_img_per_s": None,
            "sample_2step_img_per_s": None,
            "teacher_heun_img_per_s": None,
            "peak_mem_gib": None,
            "fid50k_seconds": None,
            "floor_setting": None,
            "parity": None,
            "ratios": {},
            "floors": {},
            "passes": {},
            "parts": {},
            "errors": {},
        }
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d")
        name = f"{'tiny-' if args.tiny else ''}{slug(self.res['card'])}-{stamp}.json"
        self.out_path = Path(args.out) / name
        self.gen = torch.Generator().manual_seed(args.seed)

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def write(self) -> None:
        self.res["wall_s"] = self.elapsed()
        with contextlib.suppress(Exception):
            self.summarize()
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.res, indent=2, default=_json_default))
        os.replace(tmp, self.out_path)

    def part(self, name: str, fn: Callable[[], None]) -> None:
        if self.elapsed() > self.args.time_budget_s:
            self.res["parts"][name] = {"status": "skipped", "reason": f"time budget {self.args.time_budget_s} s"}
            print(f"[{self.elapsed():7.1f}s] {name}: skipped (time budget)", flush=True)
            self.write()
            return
        print(f"[{self.elapsed():7.1f}s] {name} ...", flush=True)
        t0 = time.perf_counter()
        status = "ok"
        reason = None
        try:
            fn()
        except SkipPart as e:
            status, reason = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - every failure is reported and the run goes on
            status = "error"
            self.res["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            self.res["parts"].setdefault(name, {})["traceback"] = traceback.format_exc()[-4000:]
            print(f"  {name} FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
        finally:
            if self.device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(self.device)
                    torch.cuda.empty_cache()
        self.res["parts"].setdefault(name, {}).update({"status": status, "wall_s": time.perf_counter() - t0})
        if reason:
            self.res["parts"][name]["reason"] = reason
        print(f"[{self.elapsed():7.1f}s] {name}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
        self.write()

    # -- model construction --------------------------------------------------------------------------------------
    def build_teacher(self) -> nn.Module:
        overrides = dict(TINY_OVERRIDES) if self.args.tiny else {}
        teacher = build_preset(self.args.arch, **overrides)
        randomize_zero_params_(teacher, self.gen)
        return teacher.eval().requires_grad_(False).to(self.device)

    def fmt(self, x: torch.Tensor, cl: bool) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if cl and x.ndim == 4 else x

    def autocast(self, bf16: bool):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def compile_inplace(self, module: nn.Module) -> None:
        """Compile the inner UNet in place (as ``Trainer._maybe_compile`` does; state_dict keys unchanged)."""
        inner = getattr(module, "model", module)
        if self.args.compile_backend == "inductor":
            inner.compile(dynamic=False)
        else:
            inner.compile(backend=self.args.compile_backend, dynamic=False)

    def make_config(self, *, batch: int, precision: str, cl: bool, compile_: bool) -> DistillParams:
        """The distill section of the benchmarked step (official CIFAR-10 EMA rates; RAdam lr 4e-4)."""
        return DistillParams(
            K=self.K,
            N=self.args.N,
            distance=self.args.distance,
            target_ema=0.999,
            eval_emas=[0.999, 0.9999],
            batch=batch,
            microbatch=batch if self.args.microbatch <= 0 else self.args.microbatch,
            precision=precision,
            channels_last=cl,
            compile=compile_,
            seed=self.args.seed,
        )

    def make_trainer(
        self,
        teacher: nn.Module,
        *,
        batch: int,
        precision: str,
        cl: bool,
        compile_: bool,
        student: nn.Module | None = None,
    ) -> CTMTrainer:
        """A CTMTrainer on random data held on the device; the trainer compiles student and target itself when
        ``compile_`` and the backend is inductor (other backends: compiled here, the same way)."""
        own_compile = compile_ and self.args.compile_backend != "inductor"
        cfg = self.make_config(batch=batch, precision=precision, cl=cl, compile_=compile_ and not own_compile)
        if student is None:
            student = CTMStudent.from_teacher(teacher)
        R = student.img_resolution
        data = (torch.rand(4 * batch, student.img_channels, R, R, generator=self.gen) * 2 - 1).to(self.device)
        lpips = None
        if self.args.distance == "lpips":
            from ctm_core.gan.lpips import LPIPS

            lpips = LPIPS(random_init=True, generator=torch.Generator().manual_seed(0))
            lpips = lpips.to(self.device).eval().requires_grad_(False)
        tr = CTMTrainer(
            cfg,
            student,
            teacher,
            TensorDataSource(data, batch_size=batch, seed=self.args.seed),
            device=self.device,
            lpips=lpips,
            progress=False,
        )
        if own_compile:
            self.compile_inplace(tr.model)
            self.compile_inplace(tr.target)
        cyc = itertools.cycle(k_cycle(self.K))
        tr.iteration_context = lambda: {"k": next(cyc)}  # mean k over each 3-step cycle = (2K+1)/3 exactly
        return tr

    # -- parts ---------------------------------------------------------------------------------------------------
    def part_setup(self) -> None:
        a = self.args
        # Every SongUNet instance shares one code object, hence one dynamo cache: student (grad / no grad),
        # target (input grad / no grad), teacher, the sampling copies. The default limit (8) would silently fall
        # back to eager.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark
        self.teacher = self.build_teacher()
        self.R = self.teacher.img_resolution
        n_params = sum(p.numel() for p in self.teacher.parameters())
        student_tmp = CTMStudent.from_teacher(self.teacher)
        self.res["settings"] = {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "device": str(self.device),
            "arch": a.arch,
            "tiny": bool(a.tiny),
            "img_resolution": self.R,
            "teacher_params": n_params,
            "student_params": sum(p.numel() for p in student_tmp.parameters()),
            "K": self.K,
            "N": a.N,
            "E_k": expected_k(self.K),
            "k_cycle": k_cycle(self.K),
            "distance": a.distance,
            "microbatch": self.B if a.microbatch <= 0 else a.microbatch,
            "bf16": self.bf16,
            "channels_last": self.cl,
            "compile": self.compile_enabled,
            "compile_backend": a.compile_backend,
            "compile_timeout_s": a.compile_timeout_s,
            "repeats": a.repeats,
            "warmup": a.warmup,
            "sample_images": a.sample_images,
            "sample_batch": a.sample_batch,
            "heun_images": a.heun_images,
            "time_budget_s": a.time_budget_s,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": _safe(lambda: torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": _safe(lambda: torch.backends.cuda.matmul.allow_tf32),
            "float32_matmul_precision": _safe(torch.get_float32_matmul_precision),
            "autocast_in_trainer": self.device.type == "cuda",
        }
        del student_tmp

    def time_passes(
        self, setting: str, teacher: nn.Module, student: nn.Module, target: nn.Module, bf16: bool, cl: bool
    ) -> None:
        """Time the four network passes of a CTM+DSM step at batch B (module docstring) in one setting."""
        B, R, a = self.B, self.R, self.args
        g = torch.Generator().manual_seed(1)
        x = self.fmt((torch.randn(B, 3, R, R, generator=g) * 2).to(self.device), cl)
        t = (torch.rand(B, generator=g) * 10 + 0.1).to(self.device)
        s = (t.cpu() * torch.rand(B, generator=g)).clamp(min=0.002).to(self.device)
        s_end = torch.full_like(t, 0.002)
        student.train()
        target.train()
        outs: dict[str, torch.Tensor] = {}

        def teacher_fwd():
            with torch.no_grad(), self.autocast(bf16):
                outs["teacher"] = teacher(x, t)

        def student_nograd_fwd():
            with torch.no_grad(), self.autocast(bf16):
                outs["student_nograd"] = student.G(x, t, s)

        def student_fwdbwd():
            student.zero_grad(set_to_none=True)
            with self.autocast(bf16):
                out = student.G(x, t, s)
            out.float().square().mean().backward()
            outs["student_grad"] = student.last_layer_weight().grad

        def target_fwd_inputgrad():
            xi = x.detach().requires_grad_(True)
            with self.autocast(bf16):
                out = target.G(xi, s, s_end)
            (gx,) = torch.autograd.grad(out.float().square().mean(), xi)
            outs["target_inputgrad"] = gx

        compiled = setting == "bf16_compiled"
        timings = {}
        for name, fn in [
            ("teacher_fwd", teacher_fwd),
            ("student_nograd_fwd", student_nograd_fwd),
            ("student_fwdbwd", student_fwdbwd),
            ("target_fwd_inputgrad", target_fwd_inputgrad),
        ]:
            limit = a.compile_timeout_s if compiled else None
            with time_limit(limit, f"{setting}/{name} warm-up (compile)"):
                fn()  # first call: compiles when compiled
                self.clock.sync()
            timings[name] = self.clock.measure(fn, warmup=a.warmup, repeats=a.repeats)
        student.zero_grad(set_to_none=True)
        finite = all_finite(v for v in outs.values() if v is not None)
        med = {k: v["median_s"] for k, v in timings.items()}
        fl = floor_seconds(med, self.K)
        self.res["passes"][setting] = timings
        self.res["floors"][setting] = {
            "floor_s_per_step": fl,
            "floor_img_per_s": B / fl,
            "outputs_finite": finite,
            "teacher_fwd_img_per_s": B / med["teacher_fwd"],
            "share_teacher": 2 * expected_k(self.K) * med["teacher_fwd"] / fl,
        }
        if not finite:
            raise FloatingPointError(f"{setting}: non-finite network outputs or gradients")

    def part_eager_modules(self) -> None:
        self.student_e = CTMStudent.from_teacher(self.teacher).to(self.device)
        self.target_e = frozen_copy(self.student_e)

    def part_floor_fp32(self) -> None:
        self.student_e.to(memory_format=torch.contiguous_format)
        self.target_e.to(memory_format=torch.contiguous_format)
        self.teacher.to(memory_format=torch.contiguous_format)
        self.time_passes("fp32_eager", self.teacher, self.student_e, self.target_e, bf16=False, cl=False)

    def part_floor_bf16_eager(self) -> None:
        mf = torch.channels_last if self.cl else torch.contiguous_format
        for m in (self.student_e, self.target_e, self.teacher):
            m.to(memory_format=mf)
        self.time_passes("bf16_eager", self.teacher, self.student_e, self.target_e, bf16=self.bf16, cl=self.cl)
        self.teacher.to(memory_format=torch.contiguous_format)

    def _time_step(self, tr: CTMTrainer, label: str, compiled: bool) -> dict[str, Any]:
        a = self.args
        cyc = len(k_cycle(self.K))

        def cycle():
            for _ in range(cyc):
                self._last_metrics = tr.train_step()

        with time_limit(a.compile_timeout_s if compiled else None, f"{label} first step (compile)"):
            t0 = time.perf_counter()
            self._last_metrics = tr.train_step()
            self.clock.sync()
            first = time.perf_counter() - t0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        m = self.clock.measure(cycle, warmup=min(1, a.warmup), repeats=a.step_repeats, per=cyc)
        m["first_step_wall_s"] = first
        m["img_per_s"] = self.B / m["median_s"]
        if self.device.type == "cuda":
            m["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
        metrics = {k: float(v) for k, v in self._last_metrics.items()}
        m["last_metrics"] = metrics
        m["finite"] = all(math.isfinite(v) for v in metrics.values()) and all_finite(tr.model.parameters())
        if not m["finite"]:
            raise FloatingPointError(f"{label}: non-finite loss/metrics or parameters: {metrics}")
        return m

    def part_naive_step(self) -> None:
        self.teacher.to(memory_format=torch.contiguous_format)
        tr = self.make_trainer(self.teacher, batch=self.B, precision="fp32", cl=False, compile_=False)
        m = self._time_step(tr, "naive_fp32_step", compiled=False)
        self.res["naive_fp32_step"] = m
        self.res["naive_fp32_img_per_s"] = m["img_per_s"]
        del tr

    def part_fast_step(self) -> None:
        precision = "bf16" if self.bf16 else "fp32"
        compiled = self.compile_enabled
        self.teacher_c = copy.deepcopy(self.teacher)
        if self.cl:
            self.teacher_c.to(memory_format=torch.channels_last)
        if compiled:
            self.compile_inplace(self.teacher_c)
        info: dict[str, Any] = {"precision": precision, "channels_last": self.cl, "compiled": compiled}
        failed = None
        try:
            self.fast = self.make_trainer(
                self.teacher_c, batch=self.B, precision=precision, cl=self.cl, compile_=compiled
            )
            m = self._time_step(self.fast, "fast_step", compiled=compiled)
        except (CompileTimeout, Exception) as e:  # noqa: BLE001
            if not compiled:
                raise
            failed = f"{type(e).__name__}: {e}"[:2000]
        if failed is not None:
            # Compile failed or was too slow: record it, and time the same step eager (bf16 + channels_last). Out of
            # the except block, so the exception's frames (and the failed trainer) are gone before the eager step.
            self.compile_failed = failed
            self.res["errors"]["fast_step_compiled"] = failed
            print(f"  compiled step failed ({failed[:200]}); falling back to eager", flush=True)
            self.fast = None
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.teacher_c = copy.deepcopy(self.teacher)
            if self.cl:
                self.teacher_c.to(memory_format=torch.channels_last)
            info["compiled"] = False
            self.fast = self.make_trainer(self.teacher_c, batch=self.B, precision=precision, cl=self.cl, compile_=False)
            m = self._time_step(self.fast, "fast_step_eager_fallback", compiled=False)
        m.update(info)
        self.res["fast_step"] = m
        self.res["step_img_per_s"] = m["img_per_s"]
        self.res["peak_mem_gib"] = m.get("peak_mem_gib")

    def part_floor_compiled(self) -> None:
        if not self.compile_enabled:
            raise SkipPart("compile is off (--compile off, or auto on a non-CUDA device)")
        if self.compile_failed:
            raise RuntimeError(f"compile failed in the fast step: {self.compile_failed[:300]}")
        # The trainer's own compiled modules: the same graphs serve the step and these passes.
        self.time_passes("bf16_compiled", self.teacher_c, self.fast.model, self.fast.target, bf16=self.bf16, cl=self.cl)

    def part_parity(self) -> None:
        """One bf16 (+channels_last) step vs one fp32 step (TF32 off) from the same state, dropout off in both.

        Compile is left out here: compiled dropout draws other random numbers than eager, and with dropout off a
        compiled module would be recompiled; the compiled forward is checked against fp32 in part ``sample``.
        """
        B = min(self.B, self.args.parity_batch) if self.args.parity_batch > 0 else self.B
        base = CTMStudent.from_teacher(self.teacher)
        set_dropout_(base, 0.0)
        trainers = {}
        for precision, cl in (("fp32", False), ("bf16" if self.bf16 else "fp32", self.cl)):
            self.gen.manual_seed(self.args.seed + 7)  # same data for both
            tr = self.make_trainer(
                self.teacher, batch=B, precision=precision, cl=cl, compile_=False, student=copy.deepcopy(base)
            )
            set_dropout_(tr.target, 0.0)
            trainers[precision + ("_cl" if cl else "")] = tr
        (name_ref, ref), (name_fast, fast) = trainers.items()
        before = [p.detach().clone() for p in ref.model.parameters()]
        tf32: dict[str, Any] = {}
        with tf32_off(tf32):
            m_ref = ref.train_step()
        m_fast = fast.train_step()
        d_ref = torch.cat([(p.detach() - b).flatten() for p, b in zip(ref.model.parameters(), before)])
        d_fast = torch.cat([(p.detach() - b).flatten() for p, b in zip(fast.model.parameters(), before)])
        out = {
            "reference": name_ref,
            "fast": name_fast,
            "batch": B,
            "k": k_cycle(self.K)[0],
            "loss_ref": float(m_ref["loss"]),
            "loss_fast": float(m_fast["loss"]),
            "loss_rel_diff": abs(float(m_fast["loss"]) - float(m_ref["loss"])) / max(abs(float(m_ref["loss"])), 1e-30),
            "update_rel_diff": rel_diff(d_fast, d_ref),
            "update_norm_ref": d_ref.norm().item(),
            "finite": all_finite([d_fast, d_ref]) and all(math.isfinite(float(v)) for v in m_fast.values()),
            **tf32,
        }
        for key in ("loss_ctm", "loss_dsm", "lambda_dsm"):
            if key in m_ref and key in m_fast:
                r, f = float(m_ref[key]), float(m_fast[key])
                out[f"{key}_rel_diff"] = abs(f - r) / max(abs(r), 1e-30)
        self.res["parity"] = out
        del trainers, ref, fast

    def part_fid(self) -> None:
        """FID-50k wall time on the evaluate stage's code path: ``sample_method`` (1-step γ-sampler) → uint8 →
        ``extract_features`` (FID Inception-v3 pool3, random weights) → statistics → Fréchet distance."""
        import numpy as np

        from ctm_core.eval.inception import FIDInception, extract_features
        from ctm_core.eval.methods import Method, sample_method
        from ctm_core.eval.metrics import feature_statistics, frechet_distance, images_to_uint8

        a = self.args
        student = CTMStudent.from_teacher(self.teacher).to(self.device)
        if getattr(self, "fast", None) is not None:
            student.load_state_dict(self.fast.model.state_dict())
        student.eval().requires_grad_(False)
        inception = FIDInception(random_init=True, generator=torch.Generator().manual_seed(0))
        method = Method(key="fd_nfe1", kind="gamma", nfe=1, gamma=0.0)
        n = a.fid_images
        shape = (3, self.R, self.R)
        # Warm-up on one batch of each (cuDNN algorithm choice, allocator), untimed.
        warm = sample_method(
            method,
            student,
            None,
            seeds=range(min(n, a.sample_batch)),
            batch=a.sample_batch,
            img_shape=shape,
            device=self.device,
        )
        extract_features(inception, images_to_uint8(warm), batch_size=a.fid_batch, device=self.device)
        self.clock.sync()
        t0 = time.perf_counter()
        x = sample_method(
            method, student, None, seeds=range(n), batch=a.sample_batch, img_shape=shape, device=self.device
        )
        self.clock.sync()
        t1 = time.perf_counter()
        feats = extract_features(inception, images_to_uint8(x), batch_size=a.fid_batch, device=self.device)
        self.clock.sync()
        t2 = time.perf_counter()
        dims = feats.shape[1] if a.fid_fd_dims <= 0 else min(a.fid_fd_dims, feats.shape[1])
        feats = feats[:, :dims]
        mu, sigma = feature_statistics(feats)
        # A reference distribution of the same size (the stage compares with stored statistics: one sqrtm either way).
        mu_ref, sigma_ref = feature_statistics(np.flip(feats, axis=0) * 1.01 + 0.01)
        fd = frechet_distance(mu, sigma, mu_ref, sigma_ref)
        t3 = time.perf_counter()
        per_image = (t2 - t0) / n
        self.res["fid"] = {
            "images": n,
            "sample_s": t1 - t0,
            "features_s": t2 - t1,
            "statistics_and_fd_s": t3 - t2,
            "fd_dims": dims,
            "fd_finite": math.isfinite(fd),
            "sample_batch": a.sample_batch,
            "inception_batch": a.fid_batch,
        }
        # Sampling and features scale with the number of images; the statistics and the sqrtm are paid once.
        self.res["fid50k_seconds"] = per_image * 50_000 + (t3 - t2)
        self.res["fid50k_extrapolated"] = n != 50_000 or dims != 2048

    def part_sample(self) -> None:
        a = self.args
        b = a.sample_batch
        n_batches = max(1, math.ceil(a.sample_images / b))
        src = self.fast.model if getattr(self, "fast", None) is not None else self.student_e
        # Fresh, uncompiled copy (a deepcopy of a compiled module keeps the compiled call): rebuild from state.
        fresh = CTMStudent.from_teacher(self.teacher).to(self.device)
        if src is not None:
            fresh.load_state_dict(src.state_dict())
        fresh.eval().requires_grad_(False)
        if self.cl:
            fresh.to(memory_format=torch.channels_last)
        ref_net = copy.deepcopy(fresh).to(memory_format=torch.contiguous_format)  # fp32 eager reference
        compiled = self.compile_enabled and not self.compile_failed
        if compiled:
            self.compile_inplace(fresh)
        g = torch.Generator().manual_seed(3)
        lat = [self.fmt(torch.randn(b, 3, self.R, self.R, generator=g).to(self.device), self.cl) for _ in range(2)]
        t = torch.full((b,), 80.0, device=self.device)
        s = torch.full((b,), 0.002, device=self.device)
        sd = fresh.sigma_data
        c_in = 1 / math.sqrt(sd**2 + 80.0**2)
        x_in = [self.fmt(l * 80.0 * c_in, self.cl) for l in lat]
        c_t, c_s = t.log() / 4, s.log() / 4
        outs = {}

        def bare():
            with torch.no_grad(), self.autocast(self.bf16):
                outs["fwd"] = fresh.model(x_in[0], c_t, None, noise_labels_s=c_s)

        def sample(nfe):
            def run():
                for i in range(n_batches):
                    with torch.no_grad(), self.autocast(self.bf16):
                        outs[f"s{nfe}"] = gamma_sampler(fresh, lat[i % 2], nfe=nfe, gamma=0.0)

            return run

        with time_limit(a.compile_timeout_s if compiled else None, "sample forward warm-up (compile)"):
            bare()
            self.clock.sync()
        fwd = self.clock.measure(bare, warmup=a.warmup, repeats=a.repeats)
        fwd["img_per_s"] = b / fwd["median_s"]
        fwd["compiled"] = compiled
        self.res["compiled_forward"] = fwd
        self.res["compiled_forward_img_per_s"] = fwd["img_per_s"]
        # Accuracy of the fast forward against fp32 eager (eval mode, same weights, same input).
        tf32: dict[str, Any] = {}
        with tf32_off(tf32), torch.no_grad():
            ref = ref_net.model(x_in[0].contiguous(), c_t, None, noise_labels_s=c_s).float()
        fwd.update(tf32)
        fwd["rel_diff_vs_fp32"] = rel_diff(outs["fwd"].float(), ref)
        del ref_net, ref
        n_img = n_batches * b
        for nfe in (1, 2):
            with time_limit(a.compile_timeout_s if compiled else None, f"sample nfe={nfe} warm-up"):
                with torch.no_grad(), self.autocast(self.bf16):
                    gamma_sampler(fresh, lat[0], nfe=nfe, gamma=0.0)
                self.clock.sync()
            m = self.clock.measure(sample(nfe), warmup=0, repeats=a.sample_repeats)
            m["images"] = n_img
            m["img_per_s"] = n_img / m["median_s"]
            m["finite"] = all_finite([outs[f"s{nfe}"]])
            self.res[f"sample_{nfe}step"] = m
            self.res[f"sample_{nfe}step_img_per_s"] = m["img_per_s"]
            if not m["finite"]:
                raise FloatingPointError(f"sample nfe={nfe}: non-finite samples")

    def part_teacher_heun(self) -> None:
        a = self.args
        teacher = copy.deepcopy(self.teacher)
        if self.cl:
            teacher.to(memory_format=torch.channels_last)
        compiled = self.compile_enabled and not self.compile_failed and a.heun_compile
        if compiled:
            self.compile_inplace(teacher)
        g = torch.Generator().manual_seed(4)
        lat = self.fmt(torch.randn(a.heun_images, 3, self.R, self.R, generator=g).to(self.device), self.cl)
        outs = {}

        def run():
            with torch.no_grad(), self.autocast(self.bf16):
                outs["x"] = edm_sampler(teacher, lat, num_steps=18)

        with time_limit(a.compile_timeout_s if compiled else None, "teacher Heun warm-up (compile)"):
            run()
            self.clock.sync()
        m = self.clock.measure(run, warmup=0, repeats=a.heun_repeats)
        m.update(
            {
                "images": a.heun_images,
                "nfe": 35,
                "compiled": compiled,
                "img_per_s": a.heun_images / m["median_s"],
                "finite": all_finite([outs["x"]]),
            }
        )
        self.res["teacher_heun"] = m
        self.res["teacher_heun_img_per_s"] = m["img_per_s"]
        if not m["finite"]:
            raise FloatingPointError("teacher Heun: non-finite samples")

    def part_batch2x(self) -> None:
        """One training step at 2·B in the fast settings without compile (eager uses at least as much memory as
        compiled), to see whether it fits (ok/oom) and its peak memory."""
        B2 = 2 * self.B
        info: dict[str, Any] = {"batch": B2, "compiled": False}
        self.res["batch2x"] = info
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        teacher = copy.deepcopy(self.teacher)
        if self.cl:
            teacher.to(memory_format=torch.channels_last)
        try:
            tr = self.make_trainer(
                teacher, batch=B2, precision="bf16" if self.bf16 else "fp32", cl=self.cl, compile_=False
            )
            metrics = tr.train_step()
            self.clock.sync()
            info["status"] = "ok"
            info["finite"] = all(math.isfinite(float(v)) for v in metrics.values())
        except torch.cuda.OutOfMemoryError as e:
            info["status"] = "oom"
            info["error"] = str(e)[:500]
        finally:
            tr = None  # noqa: F841
        if self.device.type == "cuda":
            info["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
            info["total_mem_gib"] = torch.cuda.get_device_properties(self.device).total_memory / GIB

    # -- summary -------------------------------------------------------------------------------------------------
    def summarize(self) -> None:
        r = self.res
        fast = r.get("fast_step") or {}
        setting = "bf16_compiled" if fast.get("compiled") else ("bf16_eager" if self.bf16 else "fp32_eager")
        fl = r["floors"].get(setting)
        r["floor_setting"] = setting
        r["floor_img_per_s"] = fl["floor_img_per_s"] if fl else None

        def ratio(a, b):
            return a / b if (a is not None and b) else None

        r["ratios"] = {
            "step_over_floor": ratio(r["step_img_per_s"], r["floor_img_per_s"]),
            "step_over_naive": ratio(r["step_img_per_s"], r["naive_fp32_img_per_s"]),
            "sample_1step_over_compiled_forward": ratio(r["sample_1step_img_per_s"], r["compiled_forward_img_per_s"]),
            "naive_over_fp32_floor": ratio(
                r["naive_fp32_img_per_s"], (r["floors"].get("fp32_eager") or {}).get("floor_img_per_s")
            ),
        }
        r["targets"] = {
            "step_over_floor>=0.8": _ge(r["ratios"]["step_over_floor"], 0.8),
            "step_over_naive>=2.5": _ge(r["ratios"]["step_over_naive"], 2.5),
            "sample_1step_over_compiled_forward>=0.9": _ge(r["ratios"]["sample_1step_over_compiled_forward"], 0.9),
            "batch2x_no_oom": (r.get("batch2x") or {}).get("status") == "ok" if "batch2x" in r else None,
            "peak_mem_gib<=24": None if r["peak_mem_gib"] is None else bool(r["peak_mem_gib"] <= 24),
            "fid50k_seconds<=30": None if r["fid50k_seconds"] is None else bool(r["fid50k_seconds"] <= 30),
            "parity_loss_rel_diff<=1e-3": None
            if (r.get("parity") or {}).get("loss_rel_diff") is None
            else bool(r["parity"]["loss_rel_diff"] <= 1e-3),
        }

    def table(self) -> str:
        r = self.res
        rows = [("card", r["card"]), ("batch", r["batch"])]
        for s in SETTINGS:
            f = r["floors"].get(s)
            rows.append((f"floor {s} img/s", _f(f["floor_img_per_s"]) if f else "-"))
        rows += [
            (f"floor used ({r.get('floor_setting')}) img/s", _f(r["floor_img_per_s"])),
            ("train step (fast) img/s", _f(r["step_img_per_s"])),
            ("train step naive fp32 img/s", _f(r["naive_fp32_img_per_s"])),
            ("compiled forward img/s", _f(r["compiled_forward_img_per_s"])),
            ("sample 1-step img/s", _f(r["sample_1step_img_per_s"])),
            ("sample 2-step img/s", _f(r["sample_2step_img_per_s"])),
            ("teacher Heun 35 NFE img/s", _f(r["teacher_heun_img_per_s"])),
            ("peak mem @batch GiB", _f(r["peak_mem_gib"])),
            ("FID-50k s" + (" (extrapolated)" if r.get("fid50k_extrapolated") else ""), _f(r["fid50k_seconds"])),
            ("batch 2x", (r.get("batch2x") or {}).get("status", "-")),
            ("step / floor", _f(r["ratios"].get("step_over_floor"))),
            ("step / naive", _f(r["ratios"].get("step_over_naive"))),
            ("sample_1step / compiled_forward", _f(r["ratios"].get("sample_1step_over_compiled_forward"))),
            ("parity loss rel diff", _f((r.get("parity") or {}).get("loss_rel_diff"), 3)),
            ("parity update rel diff", _f((r.get("parity") or {}).get("update_rel_diff"), 3)),
            ("errors", ", ".join(r["errors"]) or "none"),
        ]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)

    def run(self) -> dict[str, Any]:
        self.part("setup", self.part_setup)
        if "setup" in self.res["errors"]:
            self.write()
            return self.res
        self.part("eager_modules", self.part_eager_modules)
        self.part("floor_fp32_eager", self.part_floor_fp32)
        self.part("floor_bf16_eager", self.part_floor_bf16_eager)
        self.part("naive_fp32_step", self.part_naive_step)
        self.part("parity", self.part_parity)
        self.part("batch2x", self.part_batch2x)
        self.part("teacher_heun", self.part_teacher_heun)
        # The compiled parts last: if compiling runs long, the eager numbers are already in the JSON.
        self.part("fast_step", self.part_fast_step)
        self.part("floor_bf16_compiled", self.part_floor_compiled)
        self.part("sample", self.part_sample)
        self.part("fid50k", self.part_fid)
        self.write()
        return self.res


def _ge(x, thr):
    return None if x is None else bool(x >= thr)


def _f(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 0.01 or abs(x) >= 1e6):
            return f"{x:.{max(digits, 2)}e}"
        return f"{x:.{digits if abs(x) >= 10 else 3}f}"
    return str(x)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    return repr(o)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default="benchmarks/results", help="folder for <card>-<date>.json")
    p.add_argument("--arch", default="edm-cifar10-32x32-uncond-vp", help="ctm_core.nets.presets name (random weights)")
    p.add_argument("--tiny", action="store_true", help="tiny SongUNet (16x16, 16 channels) for CPU tests")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="training batch per GPU (default 128; --tiny: 8)")
    p.add_argument("--microbatch", type=int, default=0, help="trainer microbatch (0 = the whole batch)")
    p.add_argument("--K", type=int, default=17, help="max teacher Heun steps (E[k] = (2K+1)/3)")
    p.add_argument("--N", type=int, default=18, help="grid points")
    p.add_argument(
        "--distance",
        default="l2",
        choices=("l2", "pseudo_huber", "lpips"),
        help="CTM distance (lpips uses random VGG weights; not part of the floor)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per pass, median reported (5; --tiny: 2)")
    p.add_argument(
        "--step-repeats", type=int, default=None, help="timed 3-step cycles per training step (3; --tiny: 1)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the first one (2; tiny: 1)")
    p.add_argument("--sample-images", type=int, default=None, help="default 10000; --tiny: 64")
    p.add_argument("--sample-batch", type=int, default=None, help="default 1000; --tiny: 32")
    p.add_argument("--sample-repeats", type=int, default=None, help="timed runs of all sample batches (2; --tiny: 1)")
    p.add_argument("--heun-images", type=int, default=None, help="default 1024; --tiny: 16")
    p.add_argument("--fid-images", type=int, default=None, help="images of the FID timing (default 50000; --tiny: 4)")
    p.add_argument("--fid-batch", type=int, default=None, help="Inception batch (default 500; --tiny: 4)")
    p.add_argument(
        "--fid-fd-dims",
        type=int,
        default=None,
        help="feature dims of the Fréchet distance (0 = all 2048, the stage's; --tiny: 64, a fast CPU sqrtm)",
    )
    p.add_argument("--heun-repeats", type=int, default=1)
    p.add_argument(
        "--heun-compile",
        action="store_true",
        help="compile the teacher for the Heun run (one more compile; default: eager bf16)",
    )
    p.add_argument("--parity-batch", type=int, default=0, help="batch of the bf16-vs-fp32 step check (0 = --batch)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="auto = on for CUDA only")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' to test on CPU)")
    p.add_argument(
        "--compile-timeout-s",
        type=float,
        default=270.0,
        help="abort a compile warm-up after this long (then eager fallback)",
    )
    p.add_argument("--no-bf16", action="store_true", help="fast path in fp32")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-cudnn-benchmark", action="store_true")
    p.add_argument("--time-budget-s", type=float, default=360.0, help="parts starting after this are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (0 = torch's default; default: 1 with --tiny on CPU, else 0)",
    )
    args = p.parse_args(argv)
    for name, full, tiny in (
        ("batch", 128, 8),
        ("sample_images", 10_000, 64),
        ("sample_batch", 1000, 32),
        ("heun_images", 1024, 16),
        ("fid_images", 50_000, 4),
        ("fid_batch", 500, 4),
        ("fid_fd_dims", 0, 64),
        ("repeats", 5, 2),
        ("step_repeats", 3, 1),
        ("warmup", 2, 1),
        ("sample_repeats", 2, 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is None:
        args.threads = 1 if (args.tiny and args.device == "cpu") else 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.write()
    print(bench.table())
    print(f"wrote {bench.out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
