"""Typed, validated `params.yaml`: one section per DVC stage plus `ray` and `mlflow` (STYLE.md §11-16).

`load_params()` parses the YAML (YAML 1.2 floats, so `1e-4` is a number as in DVC's ruamel), applies overrides,
validates every section with pydantic v2 models (`extra='forbid'`, strict types), runs the cross-field checks and
then the environment checks (GPU visible, S3 credentials, Ray address reachable). The first problem raises
`ParamsError` whose message is ONE line: `<dotted.key>: <expected>, got <received> (fix: <what to do>)`. Everything
happens before a stage does any work (and before Ray starts).

Examples:
    python -m pipelines.config --check                     # OK / one-line error, exit code 2
    python -m pipelines.config --check --set distill.K=18  # try an override
    python -m pipelines.config --show distill              # resolved section as JSON + its params_hash
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import socket
import sys
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

__all__ = [
    "DataParams",
    "DistillParams",
    "EvaluateParams",
    "InceptionParams",
    "LikelihoodParams",
    "MlflowParams",
    "Params",
    "ParamsError",
    "RayParams",
    "ReferenceParams",
    "RegisterParams",
    "TeacherParams",
    "TuneParams",
    "apply_trial",
    "check_environment",
    "distill_train_config",
    "load_params",
    "params_hash",
    "resolve_path",
    "teacher_train_config",
]

SHA256_RE = re.compile(r"^(sha256:)?[0-9a-fA-F]{64}$")
URI_SCHEMES = ("https", "s3", "file")
# Fallback when pipelines.support.fetch is not importable; the names of EDM_FACTS A3.1 (NVlabs/edm README.md:67-70).
_RELEASES_FALLBACK = (
    "edm-cifar10-32x32-cond-vp",
    "edm-cifar10-32x32-cond-ve",
    "edm-cifar10-32x32-uncond-vp",
    "edm-cifar10-32x32-uncond-ve",
    "edm-ffhq-64x64-uncond-vp",
    "edm-ffhq-64x64-uncond-ve",
    "edm-afhqv2-64x64-uncond-vp",
    "edm-afhqv2-64x64-uncond-ve",
    "edm-imagenet-64x64-cond-adm",
)


class ParamsError(ValueError):
    """Invalid params: `key` is the dotted key; `str(err)` is the one-line message `<key>: <problem>`."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


# --- YAML 1.2 floats (`1e-4`) -----------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` / `5E3` as floats (PyYAML follows YAML 1.1 and would return a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# --- schema -----------------------------------------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, frozen=True)


PosInt = Field(ge=1)


class DataParams(_Section):
    """`prepare` stage: where images come from and how they are sharded."""

    source: Literal["sklearn-digits", "imagefolder", "cifar10-python", "edm-zip"] = "sklearn-digits"
    path: str | None = None  # dir / .zip / .tar.gz (imagefolder), cifar-10-python.tar.gz, EDM zip; relative = repo
    sha256: str | None = None  # expected digest of `path`; required for https:// and s3:// sources
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # fraction kept out of training (bpd, FD reference)
    shard_size: int = Field(1024, ge=1)  # images per Parquet shard
    seed: int = Field(0, ge=0)  # held-out split permutation


class TeacherModelParams(_Section):
    """Constructor kwargs of the teacher's inner UNet (`ctm_core.nets.networks`, CONTRACTS.md)."""

    model_type: Literal["SongUNet", "DhariwalUNet"] = "SongUNet"
    model_channels: int = Field(32, ge=1)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    channel_mult_emb: int = Field(4, ge=1)
    num_blocks: int = Field(1, ge=1)
    attn_resolutions: list[int] = Field(default_factory=list)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    embedding_type: Literal["positional", "fourier"] = "positional"  # SongUNet only
    channel_mult_noise: int = Field(1, ge=1)  # SongUNet only
    encoder_type: Literal["standard", "skip", "residual"] = "standard"  # SongUNet only
    decoder_type: Literal["standard", "skip"] = "standard"  # SongUNet only
    resample_filter: list[int] = Field(default_factory=lambda: [1, 1], min_length=1)  # SongUNet only

    def to_kwargs(self) -> dict[str, Any]:
        """kwargs for `build_precond(..., model_type=..., **kwargs)`; SongUNet-only keys dropped for DhariwalUNet."""
        kw = self.model_dump()
        if self.model_type == "DhariwalUNet":
            for k in ("embedding_type", "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter"):
                kw.pop(k)
        return kw


class TeacherTrainParams(_Section):
    """Offline default: train an EDM teacher on the prepared data (EDM loss, Karras et al. 2022 Table 1)."""

    precond: Literal["EDMPrecond", "VPPrecond", "VEPrecond"] = "EDMPrecond"
    model: TeacherModelParams = Field(default_factory=TeacherModelParams)
    steps: int = Field(1200, ge=1)
    batch: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    lr_warmup_steps: int = Field(100, ge=0)
    ema_rate: float = Field(0.999, ge=0.0, lt=1.0)  # the EMA weights become the teacher
    P_mean: float = -1.2
    P_std: float = Field(1.2, gt=0.0)
    sigma_data: float = Field(0.5, gt=0.0)
    log_every: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)


class TeacherParams(_Section):
    """`teacher` stage: `train` (offline default), a released EDM name, or an https/s3/file URI + sha256."""

    source: str = "train"
    sha256: str | None = None  # 64 hex digits, or 'record' (fetch once, print the digest to pin)
    cache_dir: str = ".cache/teacher"  # content-addressed download cache (relative = repo root)
    train: TeacherTrainParams = Field(default_factory=TeacherTrainParams)


class GanParams(_Section):
    """CTM's GAN phase (CTM_FACTS §2.6); off by default (needs timm feature nets, not offline)."""

    enabled: bool = False
    weight: float = Field(1.0, ge=0.0)  # discriminator_weight
    d_lr: float = Field(2e-3, gt=0.0)
    start_step: int = Field(0, ge=0)
    g_learning_period: int = Field(2, ge=2)


class DistillParams(_Section):
    """`distill` stage: the CTM recipe (CTM_FACTS §0, §2; defaults = CIFAR-10 CTM+DSM, sizes = digits on CPU)."""

    mode: Literal["ctm", "cm"] = "ctm"
    N: int = Field(12, ge=2)  # grid points t_0 = sigma_max ... t_{N-1} = sigma_min (official CIFAR-10: 18)
    K: int = Field(8, ge=1)  # max teacher Heun steps, P(k) ∝ k on {1..K} (official CIFAR-10: 17)
    sigma_min: float = Field(0.002, gt=0.0)
    sigma_max: float = Field(80.0, gt=0.0)
    rho: float = Field(7.0, gt=0.0)
    sigma_data: float = Field(0.5, gt=0.0)
    lr: float = Field(4e-4, gt=0.0)  # RAdam, no schedule
    target_ema: float = Field(0.99, ge=0.0, lt=1.0)  # target network θ⁻ rate (start_ema; official: 0.999)
    eval_emas: list[float] = Field(default_factory=lambda: [0.99, 0.999], min_length=1)
    batch: int = Field(32, ge=1)  # global batch per step (all workers)
    microbatch: int = Field(16, ge=1)  # per-worker gradient-accumulation chunk
    steps: int = Field(300, ge=1)
    distance: Literal["l2", "pseudo_huber", "lpips"] = "l2"
    dsm_weight: float = Field(1.0, ge=0.0)
    gan: GanParams = Field(default_factory=GanParams)
    checkpoint_every: int = Field(100, ge=1)  # steps between ray.train.report checkpoints
    log_every: int = Field(25, ge=1)
    seed: int = Field(0, ge=0)


class SpaceParam(_Section):
    """One search dimension as data: loguniform/uniform (low, high), randint (low ≤ x < high), choice (values)."""

    type: Literal["loguniform", "uniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None


class SchedulerParams(_Section):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # in reports (one per tune.report_every steps)
    reduction_factor: int = Field(2, ge=2)
    max_t: int = Field(4, ge=1)


class TuneParams(_Section):
    """`tune` stage: Ray Tune over `distill` keys; writes artifacts/best_params.yaml (distill defaults if off)."""

    enabled: bool = False  # off by default: the 10-minute offline run has no room for trials on 2 cores
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    steps: int = Field(200, ge=1)  # distill steps per trial
    report_every: int = Field(50, ge=1)  # steps between trial reports (one Tune training_iteration each)
    scheduler: SchedulerParams = Field(default_factory=SchedulerParams)
    search_alg: Literal["optuna", "hyperopt"] = "optuna"
    metric: str = "fd_nfe1"
    mode: Literal["min", "max"] = "min"
    space: dict[str, SpaceParam] = Field(
        default_factory=lambda: {
            "lr": SpaceParam(type="loguniform", low=1e-4, high=1e-3),
            "target_ema": SpaceParam(type="choice", values=[0.99, 0.999]),
            "K": SpaceParam(type="choice", values=[4, 6, 8]),
            "dsm_weight": SpaceParam(type="uniform", low=0.5, high=1.0),
        }
    )
    seed: int = Field(0, ge=0)


class ClassifierParams(_Section):
    """Feature net for the Fréchet distance on non-CIFAR data: a small classifier trained on the prepared data."""

    steps: int = Field(300, ge=1)
    batch: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    seed: int = Field(0, ge=0)


# pytorch-fid's FID Inception weights (src/pytorch_fid/inception.py FID_WEIGHTS_URL). No checksum is published by
# pytorch-fid; this sha256 is the one several independent public projects pin for that exact file (e.g. an
# `InceptionModel` port that lists it next to FID_WEIGHTS_URL as 'tf_inception_v3', and launch scripts that verify
# the same file as torch-fidelity's weights-inception-2015-12-05-6726825d.pth, 95,628,359 bytes), and it starts with
# the `6726825d` in the file name (torch.hub's `<name>-<first 8 hex of sha256>` convention). Not verified here
# (no download): a mismatch stops the stage before any sampling.
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


class InceptionParams(_Section):
    """FID Inception-v3 weights (`evaluate.features: inception`), fetched through pipelines.support.fetch, sha256-pinned."""

    source: str = FID_WEIGHTS_URL  # https:// | s3:// | file:// URI or a local path (.pth state_dict / .safetensors)
    sha256: str | None = FID_WEIGHTS_SHA256  # 64 hex digits, or 'record' (fetch once, print the digest to pin)
    batch: int = Field(64, ge=1)  # images per Inception forward


class ReferenceParams(_Section):
    """Reference statistics: `data` = computed from the prepared images and cached, or an npz URI (mu, sigma)."""

    source: str = "data"  # 'data' | https:// | s3:// | file:// URI or local path of an npz (EDM's cifar10-32x32.npz)
    sha256: str | None = None  # required for a file source: 64 hex digits or 'record'
    splits: list[Literal["train", "heldout"]] = Field(default_factory=lambda: ["train", "heldout"], min_length=1)


PROTOCOL_NUM_SAMPLES = {"inception": 50_000, "classifier": 1_000}  # evaluate.num_samples when null


class EvaluateParams(_Section):
    """`evaluate` stage: student at each NFE × gamma, teacher Heun at `teacher_nfe`, Fréchet distance."""

    nfe: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1)
    gammas: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0], min_length=1)
    teacher_nfe: int = Field(35, ge=1)  # Heun: NFE = 2·steps − 1 (35 ↔ 18 steps)
    teacher_euler_nfe: int = Field(1, ge=1)  # the 1-step Euler baseline of the acceptance criterion
    num_samples: int = Field(1000, ge=2)  # images per FD estimate; null/absent = the protocol's default (below)
    batch: int = Field(250, ge=1)
    seed_start: int = Field(0, ge=0)  # image i uses seed seed_start + i (EDM generate.py style)
    grid_size: int = Field(8, ge=1)  # PNG grids are grid_size × grid_size
    ema: float | None = None  # which distill.eval_emas weights to evaluate (None = online weights)
    features: Literal["classifier", "inception"] = "classifier"  # feature space of the Fréchet distance
    num_bootstrap: int = Field(200, ge=0)  # bootstrap replicates per method (2048-d: seconds each, use ~20)
    inception: InceptionParams = Field(default_factory=InceptionParams)
    reference: ReferenceParams = Field(default_factory=ReferenceParams)
    cache_dir: str = ".cache/fid"  # fetched weights / reference files and computed reference statistics
    classifier: ClassifierParams = Field(default_factory=ClassifierParams)
    seed: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _protocol_num_samples(cls, data: Any) -> Any:
        """`num_samples: null` (or absent) = the feature space's protocol: 50,000 images for the Inception FID (EDM
        fid.py `--num 50000`, the number papers report), 1,000 for the digits classifier's FD."""
        if isinstance(data, dict) and data.get("num_samples") is None:
            data = {
                **data,
                "num_samples": (
                    PROTOCOL_NUM_SAMPLES["inception"]
                    if data.get("features") == "inception"
                    else PROTOCOL_NUM_SAMPLES["classifier"]
                ),
            }
        return data


class LikelihoodParams(_Section):
    """`likelihood` stage: bits/dim of held-out images, exact PF-ODE likelihood (`pipelines/likelihood.py`)."""

    enabled: bool = True  # false: metrics.json with complete=true and no bpd keys
    num_samples: int = Field(64, ge=1)  # the first num_samples held-out images
    divergence: Literal["exact", "hutchinson"] = "hutchinson"
    num_probes: int = Field(1, ge=1)
    rtol: float = Field(1e-4, gt=0.0)
    atol: float = Field(1e-4, gt=0.0)
    dequantize: Literal["uniform", "none"] = "uniform"
    seed: int = Field(0, ge=0)  # dequantisation noise, then Hutchinson probes


class RegisterParams(_Section):
    """`register` stage: pyfunc model, version, `@champion` only if better by more than the noise margin."""

    model_name: str = Field("ctm-digits", min_length=1)
    metric: str = "fd_nfe1"  # key in artifacts/eval/metrics.json
    mode: Literal["min", "max"] = "min"
    noise_z: float = Field(2.0, ge=0.0)  # promote only if better by > noise_z · σ(difference) (pipelines/gate.py)
    min_improvement: float = Field(0.0, ge=0.0, lt=1.0)  # and by > this fraction of |champion|
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"


class RayParams(_Section):
    """Where Ray runs. `address: null` = start a local cluster with `num_cpus` logical CPUs."""

    address: str | None = None  # ray://host:10001, host:6379, http://host:8265 (submit) or 'auto'; env RAY_ADDRESS
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    num_cpus: int = Field(4, ge=1)  # logical CPUs of the local cluster (> workers' CPUs, STACK_FACTS 1.11.1)
    object_store_mb: int = Field(200, ge=75)
    storage_path: str = "ray_results"  # local dir (relative = repo root) or s3://bucket/prefix
    max_failures: int = Field(1, ge=-1)  # FailureConfig; -1 = infinite
    dashboard_port: int = Field(8276, ge=1024, le=65535)
    temp_dir: str = "/tmp/ray_ctm"  # keep short: AF_UNIX socket paths are limited to 107 bytes
    submit: bool = False  # true: the stage runs `ray job submit` against `address` and blocks


class MlflowParams(_Section):
    tracking_uri: str | None = None  # null = sqlite:////<repo>/mlflow.db; env MLFLOW_TRACKING_URI wins
    experiment_name: str = Field("ctm-digits", min_length=1)


# `register` shadows ABCMeta.register on the class only; instances return the section (pydantic warns once).
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(_Section):
    data: DataParams = Field(default_factory=DataParams)
    teacher: TeacherParams = Field(default_factory=TeacherParams)
    distill: DistillParams = Field(default_factory=DistillParams)
    tune: TuneParams = Field(default_factory=TuneParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    likelihood: LikelihoodParams = Field(default_factory=LikelihoodParams)
    register: RegisterParams = Field(default_factory=RegisterParams)
    ray: RayParams = Field(default_factory=RayParams)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)

    _repo_root: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def repo_root(self) -> Path:
        """Directory of the params file (relative paths in params resolve against it)."""
        return self._repo_root

    def section(self, name: str) -> dict[str, Any]:
        """Plain JSON-able dict of one section (what `params_hash` and MLflow params see)."""
        return getattr(self, name).model_dump(mode="json")


# --- pydantic errors → one line ---------------------------------------------------------------------------------------
_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "finite_number": "a finite number",
    "int_parsing": "an integer",
    "float_parsing": "a number",
    "bool_parsing": "true or false",
    "none_required": "null",
}


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of `loc` (to list the allowed keys)."""
    model: Any = Params
    in_space = False
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if in_space:  # a tune.space entry name
            model, in_space = SpaceParam, False
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif model is TuneParams and part == "space":
            in_space = True
        else:
            return None
    return None if in_space else model


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, dict):
        return "a mapping"
    return json.dumps(v) if isinstance(v, (bool, type(None), list)) else repr(v)


def _from_validation_error(err: ValidationError, prefix: tuple = ()) -> ParamsError:
    e = err.errors()[0]
    loc = prefix + tuple(e["loc"])
    # Drop pydantic's union branch tags, e.g. ('x', 'float') / ('x', 'none').
    loc = tuple(p for p in loc if p not in ("float", "int", "str", "none", "bool", "list[float]", "list[any]"))
    key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
    typ, inp, ctx = e["type"], e.get("input"), e.get("ctx") or {}
    if typ == "extra_forbidden":
        owner = _model_at(loc)
        allowed = sorted(owner.model_fields) if owner is not None else []
        return ParamsError(key, f"unknown key (allowed here: {', '.join(allowed)}; fix: remove or rename it)")
    if typ == "missing":
        return ParamsError(key, "required key is missing (fix: add it)")
    if typ == "literal_error":
        return ParamsError(key, f"expected one of {ctx.get('expected')}, got {_fmt(inp)}")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if typ in bounds:
        bound = next(iter(ctx.values()))
        return ParamsError(key, f"must be {bounds[typ]} {bound}, got {_fmt(inp)}")
    if typ == "string_too_short":
        return ParamsError(key, f"must be a non-empty string, got {_fmt(inp)}")
    if typ == "too_short":
        return ParamsError(key, f"must have at least {ctx.get('min_length')} item(s), got {_fmt(inp)}")
    if typ == "too_long":
        return ParamsError(key, f"must have at most {ctx.get('max_length')} item(s), got {_fmt(inp)}")
    expected = _EXPECTED.get(typ, e["msg"])
    got = f"{_fmt(inp)} ({type(inp).__name__})" if not isinstance(inp, dict) else "a mapping"
    return ParamsError(key, f"expected {expected}, got {got}")


# --- loading ----------------------------------------------------------------------------------------------------------
def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ParamsError(dotted, f"cannot set below {p!r}, which is {_fmt(nxt)} not a mapping")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def _merge(base: dict, overrides: dict) -> dict:
    """Apply overrides: keys may be dotted (`'distill.K': 8`) or nested dicts (`{'distill': {'K': 8}}`)."""
    out = copy.deepcopy(base)

    def walk(prefix: str, node: dict) -> None:
        for k, v in node.items():
            dotted = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v and not (dotted.startswith("tune.space") and dotted.count(".") >= 2):
                walk(dotted, v)
            else:
                _set_dotted(out, dotted, v)

    walk("", overrides)
    return out


def _require(cond: bool, key: str, problem: str) -> None:
    if not cond:
        raise ParamsError(key, problem)


def _check_distill(d: DistillParams, pre: str = "distill") -> None:
    _require(
        d.sigma_min < d.sigma_max,
        f"{pre}.sigma_min",
        f"must be < {pre}.sigma_max ({d.sigma_max}), got {d.sigma_min} (fix: lower sigma_min or raise sigma_max)",
    )
    _require(
        d.K < d.N, f"{pre}.K", f"must be < {pre}.N ({d.N}), got {d.K} (fix: set {pre}.K <= {d.N - 1} or raise {pre}.N)"
    )
    _require(
        d.batch % d.microbatch == 0,
        f"{pre}.microbatch",
        f"must divide {pre}.batch ({d.batch}), got {d.microbatch} (fix: pick a divisor of {d.batch})",
    )
    for i, r in enumerate(d.eval_emas):
        _require(0.0 < r < 1.0, f"{pre}.eval_emas[{i}]", f"must be in (0, 1), got {r}")
    _require(
        len(set(d.eval_emas)) == len(d.eval_emas), f"{pre}.eval_emas", f"rates must be distinct, got {d.eval_emas}"
    )
    for name in ("lr", "sigma_min", "sigma_max", "rho", "sigma_data", "dsm_weight", "target_ema"):
        v = getattr(d, name)
        _require(math.isfinite(v), f"{pre}.{name}", f"must be finite, got {v}")
    _require(
        not (d.gan.enabled and d.mode == "cm"),
        f"{pre}.gan.enabled",
        "the GAN phase is a CTM feature, got true with distill.mode 'cm' (fix: set mode: ctm or disable gan)",
    )


def _check_space(p: Params) -> None:
    t = p.tune
    distill_keys = set(DistillParams.model_fields)
    for name, spec in t.space.items():
        key = f"tune.space.{name}"
        _require(
            name.split(".")[0] in distill_keys,
            key,
            f"not a distill key (allowed: {', '.join(sorted(distill_keys))}; fix: use a distill.<key> name)",
        )
        if spec.type == "choice":
            _require(bool(spec.values), f"{key}.values", f"choice needs a non-empty list, got {_fmt(spec.values)}")
            _require(spec.low is None and spec.high is None, key, "choice takes only 'values', got low/high too")
            candidates = list(spec.values)
        else:
            _require(spec.values is None, f"{key}.values", f"{spec.type} takes low/high, not values")
            _require(
                spec.low is not None and spec.high is not None,
                key,
                f"{spec.type} needs both low and high, got low={spec.low}, high={spec.high}",
            )
            _require(spec.low < spec.high, f"{key}.low", f"must be < {key}.high ({spec.high}), got {spec.low}")
            if spec.type == "loguniform":
                _require(spec.low > 0, f"{key}.low", f"loguniform needs low > 0, got {spec.low}")
            if spec.type == "randint":
                for b in ("low", "high"):
                    v = getattr(spec, b)
                    _require(float(v).is_integer(), f"{key}.{b}", f"randint needs integers, got {v}")
                candidates = [int(spec.low), int(spec.high) - 1]
            else:
                candidates = [spec.low, spec.high]
        if not t.enabled:  # feasibility against the current distill section only matters when trials run
            continue
        for value in candidates:  # every endpoint / choice must give a valid distill section
            try:
                apply_trial(p.distill, {name: value}, num_workers=p.ray.num_workers)
            except ParamsError as e:
                raise ParamsError(key, f"value {_fmt(value)} makes {e}") from None


def apply_trial(distill: DistillParams, trial: dict[str, Any], *, num_workers: int | None = None) -> DistillParams:
    """`distill` with a Tune trial's values (keys are distill keys, dotted for nested ones) applied and validated."""
    raw = _merge(distill.model_dump(), trial)
    try:
        d = DistillParams.model_validate(raw)
    except ValidationError as e:
        raise _from_validation_error(e, ("distill",)) from None
    _check_distill(d)
    if num_workers is not None:
        _check_batch_split(d, num_workers)
    return d


def _check_batch_split(d: DistillParams, num_workers: int) -> None:
    per = num_workers * d.microbatch
    _require(
        d.batch % per == 0,
        "distill.batch",
        f"must be divisible by ray.num_workers × distill.microbatch ({num_workers} × {d.microbatch} = {per}), "
        f"got {d.batch} (fix: set distill.batch to a multiple of {per})",
    )


def _check_cross(p: Params) -> None:
    """Relations between keys (one section or several)."""
    data = p.data
    _require(
        data.source == "sklearn-digits" or bool(data.path),
        "data.path",
        f"required for data.source {data.source!r}, got null (fix: point it at the dataset file or folder)",
    )
    if data.path and data.path.startswith(("https://", "http://", "s3://")):
        _require(
            data.sha256 is not None,
            "data.sha256",
            f"required to download data.path {data.path!r}, got null (fix: pin the file's 64-hex sha256)",
        )
    if data.sha256 is not None:
        _require(bool(SHA256_RE.match(data.sha256)), "data.sha256", f"expected 64 hex digits, got {data.sha256!r}")
    t = p.teacher
    src = t.source
    scheme = urllib.parse.urlparse(src).scheme.lower() if "://" in src else ""
    if scheme:
        _require(
            scheme in URI_SCHEMES,
            "teacher.source",
            f"expected 'train', a release name or an https://, s3:// or file:// URI, got {src!r}",
        )
    elif src != "train":
        _require(
            not (src.startswith((".", "~")) or "/" in src.removeprefix("baseline/")),
            "teacher.source",
            f"local paths must be file:// URIs, got {src!r} (fix: teacher.source: file:///abs/path/teacher.pkl)",
        )
        releases = _release_names()
        name = src[:-4] if src.endswith(".pkl") else src
        _require(
            name in releases,
            "teacher.source",
            f"unknown release name {src!r} (expected 'train', a URI or one of: {', '.join(sorted(releases))})",
        )
    if src != "train":
        _require(
            t.sha256 is not None,
            "teacher.sha256",
            f"required when teacher.source is {src!r}, got null (fix: pin the 64-hex digest, or set "
            "sha256: record to fetch once and print it)",
        )
    if t.sha256 is not None:
        _require(
            t.sha256 == "record" or bool(SHA256_RE.match(t.sha256)),
            "teacher.sha256",
            f"expected 64 hex digits or 'record', got {t.sha256!r}",
        )
    _check_distill(p.distill)
    _check_batch_split(p.distill, p.ray.num_workers)
    d = p.distill
    _require(
        d.checkpoint_every <= d.steps,
        "distill.checkpoint_every",
        f"must be <= distill.steps ({d.steps}), got {d.checkpoint_every}",
    )
    ev = p.evaluate
    for i, n in enumerate(ev.nfe):
        _require(n >= 1, f"evaluate.nfe[{i}]", f"must be an integer >= 1, got {n}")
    _require(len(set(ev.nfe)) == len(ev.nfe), "evaluate.nfe", f"values must be distinct, got {ev.nfe}")
    for i, g in enumerate(ev.gammas):
        _require(0.0 <= g <= 1.0, f"evaluate.gammas[{i}]", f"must be in [0, 1], got {g} (0 = deterministic, 1 = CM)")
    _require(
        ev.teacher_nfe % 2 == 1,
        "evaluate.teacher_nfe",
        f"must be odd (Heun NFE = 2·steps − 1), got {ev.teacher_nfe} (fix: e.g. 35 for 18 steps)",
    )
    if ev.ema is not None:
        _require(
            ev.ema in d.eval_emas,
            "evaluate.ema",
            f"must be one of distill.eval_emas {d.eval_emas} or null, got {ev.ema}",
        )
    _check_evaluate_fid(ev)
    tu = p.tune
    _require(
        tu.scheduler.grace_period <= tu.scheduler.max_t,
        "tune.scheduler.grace_period",
        f"must be <= tune.scheduler.max_t ({tu.scheduler.max_t}), got {tu.scheduler.grace_period}",
    )
    reports = tu.steps // tu.report_every
    _require(
        tu.report_every <= tu.steps, "tune.report_every", f"must be <= tune.steps ({tu.steps}), got {tu.report_every}"
    )
    _require(
        tu.scheduler.max_t <= reports,
        "tune.scheduler.max_t",
        f"must be <= tune.steps // tune.report_every ({reports} reports per trial), got {tu.scheduler.max_t}",
    )
    _check_space(p)
    r = p.ray
    if r.address is None and "RAY_ADDRESS" not in os.environ:
        need = r.num_workers * r.cpus_per_worker
        _require(
            r.num_cpus > need,
            "ray.num_cpus",
            f"must be > ray.num_workers × ray.cpus_per_worker ({need:g}) so Ray Data keeps a CPU, got "
            f"{r.num_cpus} (fix: raise ray.num_cpus; logical CPUs may exceed physical cores)",
        )
    _require(
        not r.submit or bool(r.address or os.environ.get("RAY_ADDRESS")),
        "ray.submit",
        "true needs a cluster, got ray.address null and no RAY_ADDRESS (fix: set ray.address to the "
        "dashboard URL, e.g. http://head:8265)",
    )
    if r.address:
        is_http = r.address.startswith(("http://", "https://"))
        if r.submit:
            _require(is_http, "ray.address", f"ray.submit needs the dashboard URL http://host:8265, got {r.address!r}")
        else:
            _require(
                not is_http,
                "ray.address",
                f"{r.address!r} is a job-submission URL, which ray.init cannot join (fix: set ray.submit: true, "
                "or use ray://host:10001 / host:6379)",
            )
    _require(
        len(r.temp_dir) <= 60,
        "ray.temp_dir",
        f"must be a short path (<= 60 chars, unix socket limit 107), got {len(r.temp_dir)} chars",
    )


def _check_file_source(key: str, value: str) -> None:
    """An https:// / s3:// / file:// URI or a local path (what pipelines.support.fetch accepts besides release names)."""
    _require(bool(value.strip()), key, "must be an https://, s3:// or file:// URI or a local path, got ''")
    if "://" in value:
        scheme = urllib.parse.urlparse(value).scheme.lower()
        _require(
            scheme in URI_SCHEMES, key, f"expected an https://, s3:// or file:// URI or a local path, got {value!r}"
        )


def _check_evaluate_fid(ev: EvaluateParams) -> None:
    """evaluate.features / inception / reference: pinned weights and reference files, consistent choices."""
    inc, ref = ev.inception, ev.reference
    _check_file_source("evaluate.inception.source", inc.source)
    if ev.features == "inception":
        _require(
            inc.sha256 is not None,
            "evaluate.inception.sha256",
            "required when evaluate.features is 'inception', got null (fix: pin the weights' 64-hex sha256, "
            f"{FID_WEIGHTS_SHA256} for pytorch-fid's file, or set sha256: record to fetch once and print it)",
        )
    if inc.sha256 is not None:
        _require(
            inc.sha256 == "record" or bool(SHA256_RE.match(inc.sha256)),
            "evaluate.inception.sha256",
            f"expected 64 hex digits or 'record', got {inc.sha256!r}",
        )
    _require(
        len(set(ref.splits)) == len(ref.splits),
        "evaluate.reference.splits",
        f"values must be distinct, got {ref.splits}",
    )
    if ref.source == "data":
        _require(
            ref.sha256 is None,
            "evaluate.reference.sha256",
            f"must be null when evaluate.reference.source is 'data' (the pipeline computes and caches the "
            f"statistics), got {ref.sha256!r}",
        )
        return
    _check_file_source("evaluate.reference.source", ref.source)
    _require(
        ev.features == "inception",
        "evaluate.reference.source",
        f"a reference file ({ref.source!r}) needs evaluate.features: inception, got {ev.features!r} (the "
        "classifier's reference is always computed from the data: set reference.source: data)",
    )
    _require(
        ref.sha256 is not None,
        "evaluate.reference.sha256",
        f"required when evaluate.reference.source is {ref.source!r}, got null (fix: pin the file's 64-hex "
        "sha256, or set sha256: record to fetch once and print it)",
    )
    _require(
        ref.sha256 == "record" or bool(SHA256_RE.match(ref.sha256)),
        "evaluate.reference.sha256",
        f"expected 64 hex digits or 'record', got {ref.sha256!r}",
    )


def _release_names() -> set[str]:
    try:
        from pipelines.support.fetch import KNOWN_RELEASES
    except ImportError:
        return set(_RELEASES_FALLBACK)
    return set(KNOWN_RELEASES)


# --- environment checks (lazy imports, short timeouts) ----------------------------------------------------------------
def _has_s3_credentials() -> bool:
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return True
    try:
        import boto3
    except ImportError:
        return False
    try:
        return boto3.session.Session().get_credentials() is not None
    except Exception:  # a broken profile is as good as none
        return False


def _parse_address(addr: str) -> tuple[str, int] | None:
    """(host, port) to probe for a Ray address; None for 'auto'/'local' (nothing to probe)."""
    if addr in ("auto", "local"):
        return None
    parsed = urllib.parse.urlparse(addr if "://" in addr else f"tcp://{addr}")
    default = {"ray": 10001, "http": 8265, "https": 443}.get(parsed.scheme, 6379)
    if not parsed.hostname:
        raise ParamsError("ray.address", f"expected host:port, ray://host:port or http://host:port, got {addr!r}")
    return parsed.hostname, parsed.port or default


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_environment(p: Params, *, timeout_s: float = 1.0) -> None:
    """Checks that depend on this machine: GPU visible, S3 credentials, Ray address reachable."""
    env_addr = os.environ.get("RAY_ADDRESS")
    addr_key, addr = ("ray.address", p.ray.address) if p.ray.address else ("RAY_ADDRESS (env)", env_addr)
    if p.ray.use_gpu and not addr:  # a remote cluster's GPUs are not visible from here
        import torch

        _require(
            torch.cuda.is_available(),
            "ray.use_gpu",
            "true but no CUDA GPU is visible on this machine (fix: set ray.use_gpu: false, or set ray.address "
            "to a GPU cluster)",
        )
    s3_paths = [
        ("ray.storage_path", p.ray.storage_path),
        ("teacher.source", p.teacher.source),
        ("data.path", p.data.path or ""),
    ]
    for key, value in s3_paths:
        if value.startswith("s3://"):
            _require(
                _has_s3_credentials(),
                key,
                f"{value!r} needs S3 credentials, found none (fix: export AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; plus AWS_ENDPOINT_URL for MinIO)",
            )
    if addr:
        target = _parse_address(addr)
        if target is not None:
            host, port = target
            _require(
                _reachable(host, port, timeout_s),
                addr_key,
                f"cannot reach {addr!r} ({host}:{port}) within {timeout_s:g} s (fix: start the cluster, "
                "correct the address, or set it to null for a local Ray)",
            )
    if p.tune.enabled and p.tune.search_alg == "hyperopt":
        import importlib.util

        _require(
            importlib.util.find_spec("hyperopt") is not None,
            "tune.search_alg",
            "'hyperopt' is not installed (fix: pip install hyperopt, or use optuna)",
        )


def load_params(
    path: str | os.PathLike[str] = "params.yaml",
    overrides: dict[str, Any] | None = None,
    *,
    check_env: bool = True,
) -> Params:
    """Read, validate and return `params.yaml` (+ overrides). Raises `ParamsError` (one line naming the key)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError("params", f"file {str(path)!r} not found (fix: run from the repo root or pass --params)")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        raise ParamsError("params", f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError("params", f"expected a mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = _merge(raw, overrides)
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise _from_validation_error(e) from None
    params._repo_root = path.resolve().parent
    _check_cross(params)
    if check_env:
        check_environment(params)
    return params


# --- helpers for stages -----------------------------------------------------------------------------------------------
def params_hash(section: Any) -> str:
    """Stable sha256 (hex) of canonical JSON (sorted keys, no whitespace) of a section dict or pydantic model."""
    if isinstance(section, BaseModel):
        section = section.model_dump(mode="json")
    blob = json.dumps(section, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def distill_train_config(d: DistillParams, num_workers: int = 1) -> dict[str, Any]:
    """`distill` → `ctm_core.training.train_config.CTMTrainConfig.from_dict(...)` input for every rank of `num_workers`.

    `run.batch_size` is the per-rank share (`distill.batch // num_workers`): the trainer assembles the global
    batch from `num_workers` draws of the shared data source, runs the microbatches i ≡ rank (mod num_workers) and
    sums gradients across ranks (pipelines/distill.py). The GAN keys are not part of it.
    """
    _check_batch_split(d, num_workers)
    return {
        "ctm": {
            "sigma_min": d.sigma_min,
            "sigma_max": d.sigma_max,
            "rho": d.rho,
            "sigma_data": d.sigma_data,
            "N": d.N,
            "K": d.K,
            "distance": d.distance,
            "mode": d.mode,
            "dsm_weight": d.dsm_weight,
        },
        "optim": {"name": "radam", "lr": d.lr},
        "ema": {"target_rate": d.target_ema, "eval_rates": list(d.eval_emas)},
        "run": {
            "batch_size": d.batch // num_workers,
            "microbatch": d.microbatch,
            "total_steps": d.steps,
            "checkpoint_every_steps": d.checkpoint_every,
            "log_every_steps": d.log_every,
            "seed": d.seed,
        },
    }


def teacher_train_config(t: TeacherTrainParams) -> dict[str, Any]:
    """`teacher.train` → `ctm_core.training.train_config.EDMTrainConfig.from_dict(...)` input (single process)."""
    return {
        "edm": {"P_mean": t.P_mean, "P_std": t.P_std, "sigma_data": t.sigma_data},
        "optim": {"name": "adam", "lr": t.lr, "lr_warmup_steps": t.lr_warmup_steps},
        "ema": {"eval_rates": [t.ema_rate]},
        "run": {
            "batch_size": t.batch,
            "microbatch": t.batch,
            "total_steps": t.steps,
            "log_every_steps": t.log_every,
            "seed": t.seed,
        },
    }


def resolve_path(value: str, repo_root: str | os.PathLike[str]) -> str:
    """URIs (`s3://…`) unchanged; local paths made absolute against the repo root."""
    if "://" in value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (Path(repo_root) / p).resolve())


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.config", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--check", action="store_true", help="validate and print OK or the one-line error (exit 2)")
    ap.add_argument("--show", metavar="SECTION", help="print the resolved section as JSON with its params_hash")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (YAML value)")
    ap.add_argument("--no-env", action="store_true", help="skip GPU / S3 / Ray-address checks")
    args = ap.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--set: expected KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key.strip()] = yaml.load(value, Loader=_Loader)  # noqa: S506
    try:
        params = load_params(args.params, overrides, check_env=not args.no_env)
    except ParamsError as e:
        print(f"params error: {e}", file=sys.stderr)
        return 2
    if args.show:
        if args.show not in Params.model_fields:
            print(f"--show: expected one of {', '.join(Params.model_fields)}, got {args.show!r}", file=sys.stderr)
            return 2
        sec = params.section(args.show)
        print(json.dumps({"params_hash": params_hash(sec), args.show: sec}, indent=2))
    else:
        print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
