"""Typed, validated training configuration for CTM distillation and EDM teacher training.

Defaults are the official CIFAR-10 CTM+DSM recipe (Kim-Dongjun/ctm-cifar10 cm/script_util.py and
commands/cond_CTM+DSM_command.sh; CTM_FACTS §0, §2.8-2.9) and EDM's loss constants (Karras et al. 2022,
Table 1: P_mean −1.2, P_std 1.2, σ_data 0.5). Every invalid value raises ``ValueError`` naming its key as
``section.field``; ``from_dict`` rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ctm_core.training.losses import DISTANCES, MODES

__all__ = [
    "CTMLossConfig",
    "EDMLossConfig",
    "OptimConfig",
    "EMAConfig",
    "RunConfig",
    "EvalConfig",
    "GANConfig",
    "CTMTrainConfig",
    "EDMTrainConfig",
]


def _err(key: str, expected: str, got) -> ValueError:
    return ValueError(f"{key}: expected {expected}, got {got!r}")


def _num(key: str, v, *, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or (not integer and not math.isfinite(v)):
        raise _err(key, "an integer" if integer else "a finite number", v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise _err(key, f"a value {'>' if lo_open else '>='} {lo}", v)
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise _err(key, f"a value {'<' if hi_open else '<='} {hi}", v)


def _choice(key: str, v, allowed) -> None:
    if v not in allowed:
        raise _err(key, f"one of {list(allowed)}", v)


def _bool(key: str, v) -> None:
    if not isinstance(v, bool):
        raise _err(key, "a bool", v)


@dataclass
class CTMLossConfig:
    """CTM + DSM loss knobs (CTM_FACTS §0, §2.1-2.5)."""

    sigma_min: float = 0.002  # jumps to data end here (C script_util.py:151)
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    N: int = 18  # grid points ("start_scales"; 40 for ImageNet64)
    K: int = 17  # max teacher Heun steps; P(k) ∝ k on {1..K}
    distance: str = "l2"  # official: 'lpips' (needs ctm_core.gan.lpips); 'l2' is the offline default here
    mode: str = "ctm"  # 'ctm' | 'cm' (s = σ_min, no DSM; ablation)
    ctm_weight: float = 1.0  # consistency_weight
    dsm_weight: float = 1.0  # denoising_weight (× adaptive λ_DSM)
    P_mean: float = -1.2  # DSM half-lognormal σ
    P_std: float = 1.2
    diffusion_mult: float = 0.7  # DSM Karras half: v ~ U[0, diffusion_mult]

    def validate(self, prefix: str = "ctm") -> None:
        p = prefix + "."
        _num(p + "sigma_min", self.sigma_min, lo=0, lo_open=True)
        _num(p + "sigma_max", self.sigma_max, lo=0, lo_open=True)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(
                f"{p}sigma_min / {p}sigma_max: expected sigma_min < sigma_max, got sigma_min="
                f"{self.sigma_min!r}, sigma_max={self.sigma_max!r}"
            )
        _num(p + "rho", self.rho, lo=0, lo_open=True)
        _num(p + "sigma_data", self.sigma_data, lo=0, lo_open=True)
        _num(p + "N", self.N, lo=2, integer=True)
        _num(p + "K", self.K, lo=1, integer=True)
        if not self.K < self.N:
            raise _err(p + "K", f"an integer < N={self.N} (k Heun steps need n + k <= N - 1)", self.K)
        _choice(p + "distance", self.distance, DISTANCES)
        _choice(p + "mode", self.mode, MODES)
        _num(p + "ctm_weight", self.ctm_weight, lo=0)
        _num(p + "dsm_weight", self.dsm_weight, lo=0)
        _num(p + "P_mean", self.P_mean)
        _num(p + "P_std", self.P_std, lo=0, lo_open=True)
        _num(p + "diffusion_mult", self.diffusion_mult, lo=0, hi=1)


@dataclass
class EDMLossConfig:
    """EDM teacher loss (Karras et al. 2022, Table 1 / §5)."""

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    def validate(self, prefix: str = "edm") -> None:
        p = prefix + "."
        _num(p + "P_mean", self.P_mean)
        _num(p + "P_std", self.P_std, lo=0, lo_open=True)
        _num(p + "sigma_data", self.sigma_data, lo=0, lo_open=True)


@dataclass
class OptimConfig:
    """Optimizer. CTM: RAdam lr 4e-4, betas (0.9, 0.999), no weight decay, no schedule (C train_util.py:111-113).
    EDM teacher: Adam lr 1e-3 (EDM train.py defaults), eps 1e-8."""

    name: str = "radam"  # 'radam' | 'adam'
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0  # linear ramp lr·min(1, (step+1)/warmup); 0 = off (official CTM)
    grad_clip_norm: float = 0.0  # 0 = off (official: no clipping)

    def validate(self, prefix: str = "optim") -> None:
        p = prefix + "."
        _choice(p + "name", self.name, ("radam", "adam"))
        _num(p + "lr", self.lr, lo=0, lo_open=True)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise _err(p + "betas", "a pair (beta1, beta2)", self.betas)
        for i, b in enumerate(self.betas):
            _num(f"{p}betas[{i}]", b, lo=0, hi=1, hi_open=True)
        _num(p + "eps", self.eps, lo=0, lo_open=True)
        _num(p + "weight_decay", self.weight_decay, lo=0)
        _num(p + "lr_warmup_steps", self.lr_warmup_steps, lo=0, integer=True)
        _num(p + "grad_clip_norm", self.grad_clip_norm, lo=0)


@dataclass
class EMAConfig:
    """Target network rate μ (CTM only; start_ema) and evaluation EMA rates (ema_rate "0.999,0.9999")."""

    target_rate: float = 0.999
    eval_rates: tuple[float, ...] = (0.999, 0.9999)

    def validate(self, prefix: str = "ema") -> None:
        p = prefix + "."
        _num(p + "target_rate", self.target_rate, lo=0, hi=1, hi_open=True)
        if not isinstance(self.eval_rates, (tuple, list)):
            raise _err(p + "eval_rates", "a list of rates in [0, 1)", self.eval_rates)
        for i, r in enumerate(self.eval_rates):
            _num(f"{p}eval_rates[{i}]", r, lo=0, hi=1, hi_open=True)
        if len(set(self.eval_rates)) != len(self.eval_rates):
            raise _err(p + "eval_rates", "distinct rates", self.eval_rates)


@dataclass
class RunConfig:
    """Batching, steps, precision, checkpointing, seeding."""

    batch_size: int = 256  # global batch per iteration (per rank when run single-process)
    microbatch: int = 16  # gradient accumulation chunk; adaptive weights are per microbatch
    total_steps: int = 600_000  # a cap, as in the official code (C script_util.py:137)
    checkpoint_every_steps: int = 1000  # 0 = only at the end
    log_every_steps: int = 10
    seed: int = 0
    precision: str = "fp32"  # 'fp32' | 'bf16' (bf16 autocast on CUDA only)
    channels_last: bool = False
    compile: bool = False
    progress: bool = True

    def validate(self, prefix: str = "run") -> None:
        p = prefix + "."
        _num(p + "batch_size", self.batch_size, lo=1, integer=True)
        _num(p + "microbatch", self.microbatch, lo=1, integer=True)
        if self.batch_size % self.microbatch != 0:
            raise _err(p + "microbatch", f"a divisor of batch_size={self.batch_size}", self.microbatch)
        _num(p + "total_steps", self.total_steps, lo=0, integer=True)
        _num(p + "checkpoint_every_steps", self.checkpoint_every_steps, lo=0, integer=True)
        _num(p + "log_every_steps", self.log_every_steps, lo=1, integer=True)
        _num(p + "seed", self.seed, lo=0, integer=True)
        _choice(p + "precision", self.precision, ("fp32", "bf16"))
        _bool(p + "channels_last", self.channels_last)
        _bool(p + "compile", self.compile)
        _bool(p + "progress", self.progress)


@dataclass
class EvalConfig:
    """In-training sample evaluation (read by the pipeline's callback): γ-sampling with ``nfe`` steps."""

    every_steps: int = 0  # 0 = off
    nfe: tuple[int, ...] = (1, 2)
    gamma: float = 0.0  # 0 = deterministic 'exact' jumps, 1 = CM multistep (CTM_FACTS §3)
    num_samples: int = 1000

    def validate(self, prefix: str = "eval") -> None:
        p = prefix + "."
        _num(p + "every_steps", self.every_steps, lo=0, integer=True)
        if not isinstance(self.nfe, (tuple, list)) or not self.nfe:
            raise _err(p + "nfe", "a non-empty list of step counts", self.nfe)
        for i, n in enumerate(self.nfe):
            _num(f"{p}nfe[{i}]", n, lo=1, integer=True)
        _num(p + "gamma", self.gamma, lo=0, hi=1)
        _num(p + "num_samples", self.num_samples, lo=1, integer=True)


@dataclass
class GANConfig:
    """GAN phase (CTM_FACTS §2.6, §8.8): alternating G/D steps, λ_GAN-weighted generator term.

    Off in the first (CTM+DSM) phase; the official GAN phase resumes a CTM+DSM checkpoint with it on."""

    enabled: bool = False
    weight: float = 1.0  # discriminator_weight
    g_learning_period: int = 2  # steps with step % period == 0 update G, the others update D
    d_lr: float = 2e-3  # D RAdam lr (C script_util.py:49)
    d_betas: tuple[float, float] = (0.5, 0.9)  # (C train_util.py:123-125)

    def validate(self, prefix: str = "gan") -> None:
        p = prefix + "."
        _bool(p + "enabled", self.enabled)
        _num(p + "weight", self.weight, lo=0)
        _num(p + "g_learning_period", self.g_learning_period, lo=2 if self.enabled else 1, integer=True)
        _num(p + "d_lr", self.d_lr, lo=0, lo_open=True)
        if not (isinstance(self.d_betas, (tuple, list)) and len(self.d_betas) == 2):
            raise _err(p + "d_betas", "a pair (beta1, beta2)", self.d_betas)
        for i, b in enumerate(self.d_betas):
            _num(f"{p}d_betas[{i}]", b, lo=0, hi=1, hi_open=True)


def _section_from_dict(default, data: dict, prefix: str):
    """``default`` (a section instance) with the keys of ``data`` replaced; unknown keys raise by name."""
    if not isinstance(data, dict):
        raise _err(prefix, "a mapping", data)
    names = {f.name for f in dataclasses.fields(default)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{prefix}: unknown key(s) {[f'{prefix}.{k}' for k in unknown]}; allowed: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = tuple(v) if isinstance(getattr(default, k), tuple) and isinstance(v, list) else v
    return dataclasses.replace(default, **kwargs)


class _TopConfig:
    _sections: dict[str, type] = {}

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in self._sections:
            getattr(self, name).validate(name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a plain nested dict (params.yaml section / checkpoint); unknown keys raise by name."""
        if not isinstance(data, dict):
            raise _err("config", "a mapping", data)
        unknown = sorted(set(data) - set(cls._sections))
        if unknown:
            raise ValueError(f"config: unknown section(s) {unknown}; allowed: {sorted(cls._sections)}")
        defaults = cls()
        kwargs = {name: _section_from_dict(getattr(defaults, name), data.get(name, {}), name) for name in cls._sections}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists), loadable with ``from_dict`` and ``torch.load(weights_only)``."""

        def plain(v):
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            return v

        return {
            name: {k: plain(v) for k, v in dataclasses.asdict(getattr(self, name)).items()} for name in self._sections
        }


@dataclass
class CTMTrainConfig(_TopConfig):
    """Everything CTM distillation needs (official CIFAR-10 CTM+DSM defaults)."""

    ctm: CTMLossConfig = field(default_factory=CTMLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gan: GANConfig = field(default_factory=GANConfig)

    _sections = {
        "ctm": CTMLossConfig,
        "optim": OptimConfig,
        "ema": EMAConfig,
        "run": RunConfig,
        "eval": EvalConfig,
        "gan": GANConfig,
    }


def _edm_optim() -> OptimConfig:
    return OptimConfig(name="adam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8)


def _edm_run() -> RunConfig:
    return RunConfig(batch_size=512, microbatch=512, total_steps=400_000)


@dataclass
class EDMTrainConfig(_TopConfig):
    """EDM teacher training (EDM train.py CIFAR defaults: Adam lr 1e-3, batch 512). ``ema.target_rate`` unused."""

    edm: EDMLossConfig = field(default_factory=EDMLossConfig)
    optim: OptimConfig = field(default_factory=_edm_optim)
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(eval_rates=(0.999, 0.9999)))
    run: RunConfig = field(default_factory=_edm_run)

    _sections = {"edm": EDMLossConfig, "optim": OptimConfig, "ema": EMAConfig, "run": RunConfig}
