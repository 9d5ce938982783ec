"""The project's one typed config: every `params.yaml` key is a field here, with its only default and a docstring.

`load_config(path, overrides)` reads params.yaml (YAML 1.2 floats: `1e-4` is a number, as in DVC's ruamel),
applies overrides (dotted keys or nested mappings), and validates it with pydantic v2 (`extra='forbid'`, strict
types, frozen). Each section checks its own relations when it is built, so a `DistillParams` made anywhere (a Tune
trial, a test, `with_changes`) is as valid as the one from params.yaml; `Params` adds the checks across sections.
The first problem raises `ParamsError`, whose message is one line: `<dotted.key>: <problem> (fix: ...)`.

Params files are untrusted text: `read_yaml` refuses anchors/aliases (no expansion bombs), duplicate keys, nesting
deeper than `YAML_MAX_DEPTH`, files over `YAML_MAX_BYTES` and non-UTF-8 bytes, each with one line; every float is
finite, the numbers that size work (steps, batch, samples, network width) have documented maxima, and values quoted
in messages are cut to `_QUOTE_CHARS` characters with URIs redacted (`ctm_core.redact`).

The trainers take their section as it is: `CTMTrainer(params.distill)`, `EDMTrainer(params.teacher.train)`.
Checks that depend on the machine (GPU, S3 credentials, a reachable Ray address) live with the stages
(`pipelines.support.params`); this module imports no pipeline code.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
import urllib.parse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ctm_core.redact import redact_uri

__all__ = [
    "EDM_RELEASES",
    "FID_WEIGHTS_SHA256",
    "FID_WEIGHTS_URL",
    "PROTOCOL_NUM_SAMPLES",
    "ClassifierParams",
    "DataParams",
    "DistillParams",
    "EvaluateParams",
    "GanParams",
    "InceptionParams",
    "LpipsParams",
    "LikelihoodParams",
    "MlflowParams",
    "Params",
    "ParamsError",
    "RayParams",
    "ReferenceParams",
    "RegisterParams",
    "SchedulerParams",
    "SpaceParam",
    "TeacherModelParams",
    "TeacherParams",
    "TeacherTrainParams",
    "TuneParams",
    "YAML_MAX_BYTES",
    "YAML_MAX_DEPTH",
    "YamlLoader",
    "check_batch_split",
    "load_config",
    "merge_overrides",
    "params_hash",
    "parse_yaml",
    "read_yaml",
    "with_changes",
]

SHA256_RE = re.compile(r"^(sha256:)?[0-9a-fA-F]{64}$")
URI_SCHEMES = ("https", "s3", "file")

# Released EDM networks `teacher.source` may name (NVlabs/edm README.md:67-70, 77-224; docs/edm.md);
# pipelines.support.fetch maps each to its download URL.
EDM_RELEASES = (
    "edm-cifar10-32x32-cond-vp",
    "edm-cifar10-32x32-cond-ve",
    "edm-cifar10-32x32-uncond-vp",
    "edm-cifar10-32x32-uncond-ve",
    "edm-ffhq-64x64-uncond-vp",
    "edm-ffhq-64x64-uncond-ve",
    "edm-afhqv2-64x64-uncond-vp",
    "edm-afhqv2-64x64-uncond-ve",
    "edm-imagenet-64x64-cond-adm",
    "baseline-cifar10-32x32-uncond-vp",
    "baseline-cifar10-32x32-uncond-ve",
    "baseline-imagenet-64x64-cond-adm",
)

# pytorch-fid's FID Inception weights (src/pytorch_fid/inception.py FID_WEIGHTS_URL). No checksum is published by
# pytorch-fid; this sha256 is the one several independent public projects pin for that exact file (95,628,359
# bytes), and it starts with the `6726825d` in the file name (torch.hub's `<name>-<first 8 hex of sha256>`
# convention). A mismatch stops the evaluate stage before any sampling.
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

PROTOCOL_NUM_SAMPLES = {"inception": 50_000, "classifier": 1_000}  # evaluate.num_samples when null

# Upper bounds of the numbers that size work or memory (far above any real run; they stop a typo or a hostile
# params file from asking for years of compute or terabytes before anything checks).
MAX_STEPS = 10_000_000  # optimizer steps of any trainer
MAX_BATCH = 65_536  # images per step / forward
MAX_SAMPLES = 1_000_000  # images per evaluation
MAX_NFE = 10_000  # network evaluations per sample
SEED_MAX = 2**32 - 1  # numpy's legacy seed range; torch takes any of these


_QUOTE_CHARS = 80  # longest value quoted in a message (then "…")
_MESSAGE_CHARS = 2000  # longest message at all (a key or a YAML snippet can be long too)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(text: str) -> str:
    """`text` as one printable line: control characters escaped, at most `_MESSAGE_CHARS` characters."""
    text = _CONTROL_RE.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"


class ParamsError(ValueError):
    """Invalid params: `key` is the dotted key; `str(err)` is the one-line message `<key>: <problem>`."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(_one_line(f"{key}: {problem}"))


def _require(cond: bool, key: str, problem: str) -> None:
    if not cond:
        raise ParamsError(key, problem)


def _render(v: Any, budget: int) -> str:
    """`v` as a message shows it (strings quoted and URI-redacted, lists as JSON), stopping soon after `budget`
    characters: the cost follows the budget, not the size of `v`."""
    if isinstance(v, str):
        return repr(redact_uri(v[: budget + 1]) if "://" in v else v[: budget + 1])
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        out = "["
        for i, x in enumerate(v):
            if len(out) > budget:
                return out
            out += (", " if i else "") + _render(x, budget - len(out))
        return out + "]"
    if isinstance(v, (bool, type(None))):
        return json.dumps(v)
    if isinstance(v, int) and v.bit_length() > 4 * budget:  # str(int) is quadratic and capped by Python
        return f"an integer of {v.bit_length()} bits"
    return repr(v)


def _fmt(v: Any) -> str:
    """A value quoted in a message: at most `_QUOTE_CHARS` characters (cut with "…"), URIs without secrets."""
    text = _render(v, _QUOTE_CHARS)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 1] + "…"


# --- YAML: 1.2 floats (`1e-4`), no anchors/aliases, no duplicate keys, bounded depth and size ------------------------
YAML_MAX_BYTES = 1 << 20
"""Largest params / overrides file read (params.yaml is ~8 KB)."""
YAML_MAX_DEPTH = 32
"""Deepest nesting of mappings/lists (params.yaml nests 4 levels)."""


class _YamlRefused(yaml.MarkedYAMLError):
    """A construct the params loader refuses (alias, anchor, duplicate key, too deep)."""


class YamlLoader(yaml.SafeLoader):
    """SafeLoader for params: reads `1e-4` / `5E3` as floats (PyYAML follows YAML 1.1 and would return a string),
    refuses anchors and aliases (`&a` / `*a`: a few hundred bytes of aliases expand to gigabytes), duplicate keys
    (PyYAML would keep the last silently) and nesting deeper than `YAML_MAX_DEPTH` (the composer recurses)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _YamlRefused(
                None, None, f"alias *{event.anchor[:40]} is not allowed (fix: write the value out)", event.start_mark
            )
        if getattr(event, "anchor", None) is not None:
            raise _YamlRefused(
                None, None, f"anchor &{event.anchor[:40]} is not allowed (fix: write the value out)", event.start_mark
            )
        if self._depth >= YAML_MAX_DEPTH:
            raise _YamlRefused(
                None, None, f"nesting deeper than {YAML_MAX_DEPTH} levels (fix: flatten the value)", event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    break
                if dup:
                    raise _YamlRefused(
                        None, None, f"duplicate key {_fmt(key)} (fix: keep one of them)", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver(
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


def parse_yaml(text: str, key: str, source: str) -> Any:
    """`text` parsed with `YamlLoader`; any problem is one `ParamsError` line under `key` naming `source`."""
    try:
        return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        where = f" (line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1})" if e.problem_mark else ""
        what = " ".join(f"{e.context or ''} {e.problem or ''}".split())
        raise ParamsError(key, f"{source} is not valid params YAML{where}: {what}") from None
    except yaml.YAMLError as e:
        raise ParamsError(key, f"{source} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer over Python's 4300-digit str limit
        raise ParamsError(key, f"{source} has a value that cannot be read: {' '.join(str(e).split())[:200]}") from None


def read_yaml(path: str | os.PathLike[str], key: str) -> Any:
    """Parse the params-style YAML file `path` (at most `YAML_MAX_BYTES`, UTF-8); problems are one line under `key`."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size  # 0 for pipes and devices: read up to the cap
        data = f.read(min(size, YAML_MAX_BYTES) + 1 if size else YAML_MAX_BYTES + 1)
    if len(data) > YAML_MAX_BYTES:
        raise ParamsError(
            key, f"{path} is over {YAML_MAX_BYTES} bytes (fix: a params file is a few KB; check the path)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParamsError(
            key, f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}; fix: save it as UTF-8)"
        ) from None
    return parse_yaml(text, key, str(path))


# --- schema -----------------------------------------------------------------------------------------------------------
class _Section(BaseModel):
    """A params.yaml section: unknown keys refused, no type coercion, immutable; `_path` is its dotted name."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        validate_default=True,
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,  # NaN/inf pass `gt`/`ge` checks (or skip them) and crash later
    )
    _path: ClassVar[str] = ""


class DataParams(_Section):
    """`prepare` stage: where images come from and how they are sharded."""

    _path: ClassVar[str] = "data"

    source: Literal["sklearn-digits", "imagefolder", "cifar10-python", "edm-zip"] = "sklearn-digits"
    """Image source: sklearn's 8x8 digits (offline), an image folder, CIFAR-10's python archive or an EDM zip."""
    path: str | None = None
    """Folder / .zip / .tar.gz / cifar-10-python.tar.gz / URI (relative = repo root); null only for sklearn-digits."""
    sha256: str | None = None
    """Expected digest of `path`; required for https:// and s3:// paths."""
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Fraction kept out of training (bits/dim, Fréchet-distance reference)."""
    shard_size: int = Field(1024, ge=1, le=1_000_000)
    """Images per Parquet shard (at most 1,000,000)."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the held-out split permutation."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        _require(
            self.source == "sklearn-digits" or bool(self.path),
            "data.path",
            f"required for data.source {_fmt(self.source)}, got null (fix: point it at the dataset file or folder)",
        )
        if self.path and self.path.startswith(("https://", "http://", "s3://")):
            _require(
                self.sha256 is not None,
                "data.sha256",
                f"required to download data.path {_fmt(self.path)}, got null (fix: pin the file's 64-hex sha256)",
            )
        if self.sha256 is not None:
            _require(
                bool(SHA256_RE.match(self.sha256)), "data.sha256", f"expected 64 hex digits, got {_fmt(self.sha256)}"
            )
        return self


class TeacherModelParams(_Section):
    """Constructor kwargs of the teacher's inner UNet (`ctm_core.nets.networks`)."""

    _path: ClassVar[str] = "teacher.train.model"

    model_type: Literal["SongUNet", "DhariwalUNet"] = "SongUNet"
    """Inner network class (EDM's DDPM++/NCSN++ `SongUNet` or ADM's `DhariwalUNet`)."""
    model_channels: int = Field(16, ge=1, le=1024)
    """Base channel count (at most 1024; EDM's largest is 192)."""
    channel_mult: list[Annotated[int, Field(ge=1, le=16)]] = Field(
        default_factory=lambda: [1, 2], min_length=1, max_length=8
    )
    """Channel multiplier per resolution level (1 to 8 levels, each 1..16)."""
    channel_mult_emb: int = Field(4, ge=1, le=16)
    """Embedding width multiplier (at most 16)."""
    num_blocks: int = Field(1, ge=1, le=64)
    """Residual blocks per resolution (at most 64)."""
    attn_resolutions: list[int] = Field(default_factory=list, max_length=8)
    """Resolutions with self-attention (at most 8)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability of the residual blocks."""
    embedding_type: Literal["positional", "fourier"] = "positional"
    """Noise embedding (SongUNet only)."""
    channel_mult_noise: int = Field(1, ge=1, le=16)
    """Noise embedding width multiplier (SongUNet only; at most 16)."""
    encoder_type: Literal["standard", "skip", "residual"] = "standard"
    """Encoder architecture (SongUNet only)."""
    decoder_type: Literal["standard", "skip"] = "standard"
    """Decoder architecture (SongUNet only)."""
    resample_filter: list[int] = Field(default_factory=lambda: [1, 1], min_length=1, max_length=16)
    """Up/down-sampling filter taps (SongUNet only; at most 16)."""

    def to_kwargs(self) -> dict[str, Any]:
        """kwargs for `build_precond(..., model_type=..., **kwargs)`; SongUNet-only keys dropped for DhariwalUNet."""
        kw = self.model_dump()
        if self.model_type == "DhariwalUNet":
            for k in ("embedding_type", "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter"):
                kw.pop(k)
        return kw


class TeacherTrainParams(_Section):
    """Train an EDM teacher on the prepared data (EDM loss, Karras et al. 2022 Table 1; `EDMTrainer` reads it)."""

    _path: ClassVar[str] = "teacher.train"

    precond: Literal["EDMPrecond", "VPPrecond", "VEPrecond"] = "EDMPrecond"
    """Preconditioning wrapper (the teacher stage trains EDMPrecond only: the CTM student copies it)."""
    model: TeacherModelParams = Field(default_factory=TeacherModelParams)
    """The inner UNet."""
    steps: int = Field(1200, ge=1, le=MAX_STEPS)
    """Optimizer steps (at most 10,000,000)."""
    batch: int = Field(64, ge=1, le=MAX_BATCH)
    """Global batch per step (all ranks; at most 65,536)."""
    microbatch: int | None = Field(None, ge=1, le=MAX_BATCH)
    """Gradient-accumulation chunk per rank; null = the whole per-rank batch at once."""
    lr: float = Field(1e-3, gt=0.0)
    """Learning rate (EDM train.py: 1e-3)."""
    lr_warmup_steps: int = Field(100, ge=0, le=MAX_STEPS)
    """Linear ramp lr·min(1, (step+1)/lr_warmup_steps); 0 = off."""
    optimizer: Literal["adam", "radam"] = "adam"
    """Adam (EDM train.py) or RAdam; betas (0.9, 0.999), eps 1e-8, no weight decay."""
    grad_clip_norm: float = Field(0.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 = off."""
    ema_halflife_kimg: float = Field(500.0, gt=0.0)
    """Half-life of the teacher's EMA in thousands of training images (EDM training_loop.py: 500 for every
    dataset; docs/edm.md#a6-teacher-ema). The EMA weights become the teacher."""
    ema_rampup_ratio: float | None = Field(0.05, gt=0.0)
    """EMA ramp-up: the half-life is at most this fraction of the images seen so far (EDM: 0.05); null = off (a
    plain half-life, which keeps the random initial weights for a short run)."""
    P_mean: float = -1.2
    """Mean of ln σ in the EDM loss, ln σ ~ N(P_mean, P_std²)."""
    P_std: float = Field(1.2, gt=0.0)
    """Standard deviation of ln σ in the EDM loss."""
    sigma_data: float = Field(0.5, gt=0.0)
    """Data standard deviation σ_d of the preconditioning and the loss weight."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast on CUDA, fp32 elsewhere."""
    channels_last: bool = False
    """channels_last memory format for 4-d images."""
    compile: bool = False
    """torch.compile the network in place."""
    checkpoint_every: int = Field(0, ge=0)
    """Steps between checkpoints when `Trainer.train` gets a checkpoint path; 0 = only at the end (the stage
    keeps none: a run is minutes long)."""
    log_every: int = Field(100, ge=1)
    """Steps between metrics callbacks (MLflow loss curve)."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the initial weights, the data order and every keyed random stream."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.microbatch is not None:
            _require(
                self.batch % self.microbatch == 0,
                "teacher.train.microbatch",
                f"must divide teacher.train.batch ({self.batch}), got {self.microbatch} (fix: pick a divisor or null)",
            )
        return self


class TeacherParams(_Section):
    """`teacher` stage: `train` (offline default), a released EDM name, or an https/s3/file URI + sha256."""

    _path: ClassVar[str] = "teacher"

    source: str = "train"
    """`train`, a released EDM network name (e.g. edm-cifar10-32x32-uncond-vp) or an https://, s3://, file:// URI."""
    sha256: str | None = None
    """Required for anything but `train`: 64 hex digits, or `record` (fetch once, print the digest to pin)."""
    cache_dir: str = ".cache/teacher"
    """Content-addressed download cache (relative = repo root)."""
    train: TeacherTrainParams = Field(default_factory=TeacherTrainParams)
    """How to train the teacher when source is `train`."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        src = self.source
        scheme = urllib.parse.urlparse(src).scheme.lower() if "://" in src else ""
        if scheme:
            _require(
                scheme in URI_SCHEMES,
                "teacher.source",
                f"expected 'train', a release name or an https://, s3:// or file:// URI, got {_fmt(src)}",
            )
        elif src != "train":
            _require(
                not (src.startswith((".", "~")) or "/" in src.removeprefix("baseline/")),
                "teacher.source",
                f"local paths must be file:// URIs, got {_fmt(src)} (fix: teacher.source: file:///abs/path/teacher.pkl)",
            )
            name = src[:-4] if src.endswith(".pkl") else src
            _require(
                name in EDM_RELEASES,
                "teacher.source",
                f"unknown release name {_fmt(src)} (expected 'train', a URI or one of: "
                f"{', '.join(sorted(EDM_RELEASES))})",
            )
        if src != "train":
            _require(
                self.sha256 is not None,
                "teacher.sha256",
                f"required when teacher.source is {_fmt(src)}, got null (fix: pin the 64-hex digest, or set "
                "sha256: record to fetch once and print it)",
            )
        if self.sha256 is not None:
            _require(
                self.sha256 == "record" or bool(SHA256_RE.match(self.sha256)),
                "teacher.sha256",
                f"expected 64 hex digits or 'record', got {_fmt(self.sha256)}",
            )
        return self


# timm's release files of the projected discriminator's feature networks (timm 0.4.12 default_cfg urls; the 8 hex
# digits in each name are the start of its sha256, torch.hub's convention). No pins are published: record them.
DEIT_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth"
EFFICIENTNET_LITE0_WEIGHTS_URL = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/tf_efficientnet_lite0-0aa007d2.pth"
# distill keys the GAN phase may not change (docs/gan.md#what-carries-over): the run's identity, the optimizer and
# EMA state it carries, the student's σ range and its start (init_from).
GAN_FIXED_KEYS = (
    "gan",
    "init_from",
    "seed",
    "steps",
    "mode",
    "optimizer",
    "eval_emas",
    "sigma_min",
    "sigma_max",
    "sigma_data",
)


class FeatureNetParams(_Section):
    """One pretrained feature network of the projected discriminator, fetched by pipelines.support.fetch, pinned."""

    source: str
    """https:// | s3:// | file:// URI or a local path (timm state dict: .pth loaded weights-only, or .safetensors)."""
    sha256: str | None = None
    """64 hex digits, or `record` (fetch once, print the digest to pin); required for `discriminator: projected`."""


class GanParams(_Section):
    """CTM's GAN phase (docs/gan.md): a second phase after distill.steps of CTM+DSM; off by default."""

    _path: ClassVar[str] = "distill.gan"

    enabled: bool = False
    """Run the GAN phase: `steps` more steps after distill.steps of CTM+DSM, from that run's final state
    (docs/gan.md). In the library, a CTMTrainer whose config has it on alternates G and D steps from its start."""
    steps: int = Field(100, ge=1, le=MAX_STEPS)
    """GAN-phase steps, G and D steps together as officially (the run ends at distill.steps + steps)."""
    weight: float = Field(1.0, ge=0.0)
    """Weight w_D of the adaptive-weighted GAN generator term (official discriminator_weight)."""
    d_lr: float = Field(2e-3, gt=0.0)
    """Discriminator RAdam learning rate."""
    g_learning_period: int = Field(2, ge=2)
    """Steps with step % period == 0 update the student, the others the discriminator."""
    discriminator: Literal["scratch", "projected"] = "scratch"
    """`projected` (official: frozen DeiT-B + EfficientNet-lite0 features, fetched) or `scratch` (offline)."""
    scratch_channels: int = Field(64, ge=1, le=1024)
    """Width of the scratch discriminator's first layer (doubling per halving, at most 512)."""
    changes: dict[str, Any] = Field(default_factory=dict)
    """distill keys with other values in the GAN phase, dotted for nested ones (official CIFAR-10: batch 528,
    microbatch 11; ImageNet-64: K 20, lr 8e-6, batch 4224); not gan, seed, steps, mode, optimizer, eval_emas, σ's."""
    deit: FeatureNetParams = Field(default_factory=lambda: FeatureNetParams(source=DEIT_WEIGHTS_URL))
    """deit_base_distilled_patch16_224 weights (projected)."""
    efficientnet: FeatureNetParams = Field(
        default_factory=lambda: FeatureNetParams(source=EFFICIENTNET_LITE0_WEIGHTS_URL)
    )
    """tf_efficientnet_lite0 weights (projected)."""
    cache_dir: str = ".cache/gan"
    """Content-addressed download cache of the feature networks."""


# LPIPS as official CTM computes it (piq 0.7.0, docs/ctm.md#811-lpips-is-piq-070): torchvision's VGG16 release and
# the LPIPS linear weights piq 0.7.0 downloads (piq perceptual.py LPIPS._weights_url). Neither publishes a sha256
# (torchvision's name carries its first 8 hex digits): pin them with `record` once (docs/presets.md#lpips-weights).
VGG16_WEIGHTS_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LINEAR_URL = (
    "https://github.com/photosynthesis-team/photosynthesis.metrics/releases/download/v0.4.0/lpips_weights.pt"
)


class LpipsParams(_Section):
    """The two weight files of `distance: lpips`, fetched by pipelines.support.fetch with sha256 pins."""

    _path: ClassVar[str] = "distill.lpips"

    vgg16_source: str = VGG16_WEIGHTS_URL
    """torchvision vgg16 state dict: https:// | s3:// | file:// URI or a local path (.pth or .safetensors)."""
    vgg16_sha256: str | None = None
    """64 hex digits, or `record` (fetch once, print the digest to pin); required for `distance: lpips`."""
    linear_source: str = LPIPS_LINEAR_URL
    """LPIPS linear-layer weights (piq's list of 5 tensors, or `lin{l}.model.1.weight` / `weights.{l}` keys)."""
    linear_sha256: str | None = None
    """64 hex digits, or `record`; required for `distance: lpips`."""
    cache_dir: str = ".cache/lpips"
    """Content-addressed download cache (relative = repo root)."""


class OfficialCheckpointParams(_Section):
    """A released CTM student file (sony/ctm ImageNet-64 or ctm-cifar10 layout), fetched with a sha256 pin
    (docs/official.md)."""

    _path: ClassVar[str] = "official"

    uri: str | None = None
    """null = not used; else the official .pt: https:// | s3:// | file:// URI or a local path."""
    sha256: str | None = None
    """Required with `uri`: 64 hex digits, or `record` (fetch once, print the digest to pin)."""
    preset: Literal["sony-ctm-imagenet64", "ctm-cifar10"] = "sony-ctm-imagenet64"
    """Layout of the file: sony/ctm's ImageNet-64 ADM student or Kim-Dongjun/ctm-cifar10's SongUNet student."""
    flags: dict[str, int | float | str] = Field(default_factory=dict, max_length=32)
    """Official constructor flags over the preset's release values (e.g. ctm-cifar10 `label_dim: 10`)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        _check_pinned(self.uri, self.sha256, f"{self._path}.uri", f"{self._path}.sha256")
        return self


class InitFromParams(OfficialCheckpointParams):
    """Continue training from a released CTM student instead of the teacher's weights
    (docs/official.md#5-continuing-training-from-a-released-checkpoint). `uri: null` = start from the teacher."""

    _path: ClassVar[str] = "distill.init_from"

    preset: Literal["sony-ctm-imagenet64", "ctm-cifar10"] = "ctm-cifar10"
    """Layout of the file (the same two as evaluate.student_source)."""
    cache_dir: str = ".cache/official"
    """Content-addressed download cache of the file (relative to the repository root)."""


class DistillParams(_Section):
    """`distill` stage and `CTMTrainer`: the CTM + DSM recipe (docs/ctm.md; CIFAR-10 defaults, digits sizes)."""

    _path: ClassVar[str] = "distill"

    mode: Literal["ctm", "cm"] = "ctm"
    """`ctm` (any jump t → s) or `cm` (s = σ_min, no DSM; ablation)."""
    N: int = Field(12, ge=2, le=MAX_NFE)
    """Grid points t_0 = sigma_max ... t_{N-1} = sigma_min (official CIFAR-10: 18; at most 10,000)."""
    K: int = Field(6, ge=1, le=MAX_NFE)
    """Max teacher Heun steps per iteration, P(k) ∝ k on {1..K} (official CIFAR-10: 17)."""
    sigma_min: float = Field(0.002, gt=0.0)
    """Smallest noise level; jumps to data end here."""
    sigma_max: float = Field(80.0, gt=0.0)
    """Largest noise level."""
    rho: float = Field(7.0, gt=0.0)
    """Karras grid exponent."""
    sigma_data: float = Field(0.5, gt=0.0)
    """Data standard deviation σ_d."""
    ctm_weight: float = Field(1.0, ge=0.0)
    """Weight of the CTM term (official consistency_weight)."""
    dsm_weight: float = Field(1.0, ge=0.0)
    """Weight of the DSM term, times its adaptive λ_DSM (official denoising_weight)."""
    P_mean: float = -1.2
    """Mean of ln σ for the DSM half-lognormal noise levels."""
    P_std: float = Field(1.2, gt=0.0)
    """Standard deviation of ln σ for the DSM half-lognormal noise levels."""
    diffusion_mult: float = Field(0.7, ge=0.0, le=1.0)
    """DSM Karras half: v ~ U[0, diffusion_mult] on the grid."""
    distance: Literal["l2", "pseudo_huber", "lpips"] = "l2"
    """Distance in the CTM term; lpips (official) needs the pinned weight files of `lpips`."""
    lpips: LpipsParams = Field(default_factory=LpipsParams)
    """VGG16 + LPIPS linear weights for `distance: lpips` (docs/presets.md#lpips-weights)."""
    random_flip: bool = False
    """Mirror each training image left-right with p = 0.5, keyed by (seed, step, index) (official: on; off for
    data that is not mirror-symmetric, e.g. digits; docs/presets.md#random-flips)."""
    lr: float = Field(1e-3, gt=0.0)
    """Learning rate, constant after the warm-up (official: 4e-4, for runs of 50k+ steps; the presets set it)."""
    optimizer: Literal["radam", "adam"] = "radam"
    """RAdam (official CTM) or Adam; betas (0.9, 0.999), eps 1e-8, no weight decay."""
    lr_warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    """Linear ramp lr·min(1, (step+1)/lr_warmup_steps); 0 = off (official)."""
    grad_clip_norm: float = Field(0.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 = off (official)."""
    target_ema: float = Field(0.99, ge=0.0, lt=1.0)
    """Rate of the target network θ⁻ (official start_ema 0.999 is for 50k-step runs)."""
    eval_emas: list[float] = Field(default_factory=lambda: [0.99, 0.999], min_length=1, max_length=16)
    """Rates of the evaluation EMAs saved with the student (official CIFAR-10: [0.999, 0.9999]; at most 16: each
    is a copy of the weights)."""
    batch: int = Field(32, ge=1, le=MAX_BATCH)
    """Global batch per step (all workers; at most 65,536); divisible by ray.num_workers × microbatch."""
    microbatch: int = Field(16, ge=1, le=MAX_BATCH)
    """Gradient-accumulation chunk per rank; the adaptive weights are per microbatch."""
    stream_window_shards: int = Field(32, ge=1, le=100_000)
    """Train shards per shuffle window of the streaming reader: an epoch permutes the shards, then the rows within
    each window of this many; a worker keeps this many decoded shards (docs/data_streaming.md#design)."""
    steps: int = Field(300, ge=1, le=MAX_STEPS)
    """Optimizer steps (at most 10,000,000)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast on CUDA, fp32 elsewhere."""
    channels_last: bool = False
    """channels_last memory format for 4-d images."""
    compile: bool = False
    """torch.compile the student and the target network in place."""
    gan: GanParams = Field(default_factory=GanParams)
    """The GAN phase."""
    init_from: InitFromParams = Field(default_factory=InitFromParams)
    """A released CTM student to continue training from (null uri: the student starts from the teacher)."""
    checkpoint_every: int = Field(100, ge=1)
    """Steps between checkpoints (Ray Train reports; the resume points)."""
    log_every: int = Field(25, ge=1)
    """Steps between metrics callbacks."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the student's fresh weights, the data order and every keyed random stream."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        _require(
            self.sigma_min < self.sigma_max,
            "distill.sigma_min",
            f"must be < distill.sigma_max ({self.sigma_max}), got {self.sigma_min} (fix: lower sigma_min or raise "
            "sigma_max)",
        )
        _require(
            self.K < self.N,
            "distill.K",
            f"must be < distill.N ({self.N}), got {self.K} (fix: set distill.K <= {self.N - 1} or raise distill.N)",
        )
        _require(
            self.batch % self.microbatch == 0,
            "distill.microbatch",
            f"must divide distill.batch ({self.batch}), got {self.microbatch} (fix: pick a divisor of {self.batch})",
        )
        for i, r in enumerate(self.eval_emas):
            _require(0.0 < r < 1.0, f"distill.eval_emas[{i}]", f"must be in (0, 1), got {r}")
        _require(
            len(set(self.eval_emas)) == len(self.eval_emas),
            "distill.eval_emas",
            f"rates must be distinct, got {_fmt(self.eval_emas)}",
        )
        for name in ("lr", "sigma_min", "sigma_max", "rho", "sigma_data", "dsm_weight", "target_ema"):
            v = getattr(self, name)
            _require(math.isfinite(v), f"distill.{name}", f"must be finite, got {v}")
        if self.distance == "lpips":
            _check_lpips(self.lpips)
        _require(
            not (self.gan.enabled and self.mode == "cm"),
            "distill.gan.enabled",
            "the GAN phase is a CTM feature, got true with distill.mode 'cm' (fix: set mode: ctm or disable gan)",
        )
        if self.gan.enabled:
            _check_gan_phase(self)
        _require(
            self.checkpoint_every <= self.steps,
            "distill.checkpoint_every",
            f"must be <= distill.steps ({self.steps}), got {self.checkpoint_every}",
        )
        return self


class SpaceParam(_Section):
    """One search dimension as data: loguniform/uniform (low, high), randint (low ≤ x < high), choice (values)."""

    type: Literal["loguniform", "uniform", "randint", "choice"]
    """Distribution of the dimension."""
    low: float | None = None
    """Lower bound (loguniform, uniform, randint)."""
    high: float | None = None
    """Upper bound (loguniform, uniform; exclusive for randint)."""
    values: list[Any] | None = Field(None, max_length=256)
    """Candidates (choice; at most 256 scalars: numbers, strings, booleans)."""


class SchedulerParams(_Section):
    """Trial scheduler of the search."""

    _path: ClassVar[str] = "tune.scheduler"

    type: Literal["asha", "fifo"] = "asha"
    """ASHA stops bad trials early; fifo runs every trial to the end."""
    grace_period: int = Field(1, ge=1)
    """Reports (one per tune.report_every steps) before ASHA may stop a trial."""
    reduction_factor: int = Field(2, ge=2)
    """ASHA keeps 1/reduction_factor of the trials at each rung."""
    max_t: int = Field(4, ge=1)
    """Reports per trial at most."""


class TuneParams(_Section):
    """`tune` stage: Ray Tune over `distill` keys; writes the chosen distill overrides (none when disabled)."""

    _path: ClassVar[str] = "tune"

    enabled: bool = False
    """Run the search (off by default: the 10-minute offline run has no room for trials on 2 cores)."""
    num_samples: int = Field(4, ge=1, le=10_000)
    """Trials (at most 10,000)."""
    max_concurrent_trials: int = Field(1, ge=1, le=1024)
    """Trials at once at most (also capped by what the cluster holds; at most 1024)."""
    steps: int = Field(200, ge=1, le=MAX_STEPS)
    """Distill steps per trial (at most 10,000,000)."""
    report_every: int = Field(50, ge=1)
    """Steps between trial reports (one Tune training_iteration = one ASHA time unit)."""
    scheduler: SchedulerParams = Field(default_factory=SchedulerParams)
    """The trial scheduler."""
    search_alg: Literal["optuna", "hyperopt"] = "optuna"
    """The searcher proposing values of `space`."""
    metric: str = "fd_nfe1"
    """Trial score: fd_nfe1 (classifier Fréchet distance of 1-step samples, needs labelled data) or train/<name>."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    space: dict[str, SpaceParam] = Field(
        max_length=64,
        default_factory=lambda: {
            "lr": SpaceParam(type="loguniform", low=1e-4, high=1e-3),
            "target_ema": SpaceParam(type="choice", values=[0.99, 0.999]),
            "K": SpaceParam(type="choice", values=[4, 6, 8]),
            "dsm_weight": SpaceParam(type="uniform", low=0.5, high=1.0),
        },
    )
    """Search space; keys are distill keys (dotted for nested ones, e.g. gan.weight); at most 64 dimensions."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the searcher."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        s = self.scheduler
        _require(
            s.grace_period <= s.max_t,
            "tune.scheduler.grace_period",
            f"must be <= tune.scheduler.max_t ({s.max_t}), got {s.grace_period}",
        )
        _require(
            self.report_every <= self.steps,
            "tune.report_every",
            f"must be <= tune.steps ({self.steps}), got {self.report_every}",
        )
        reports = self.steps // self.report_every
        _require(
            s.max_t <= reports,
            "tune.scheduler.max_t",
            f"must be <= tune.steps // tune.report_every ({reports} reports per trial), got {s.max_t}",
        )
        distill_keys = set(DistillParams.model_fields)
        for name, spec in self.space.items():
            key = f"tune.space.{name}"
            _require(
                name.split(".")[0] in distill_keys,
                key,
                f"not a distill key (allowed: {', '.join(sorted(distill_keys))}; fix: use a distill.<key> name)",
            )
            if spec.type == "choice":
                _require(bool(spec.values), f"{key}.values", f"choice needs a non-empty list, got {_fmt(spec.values)}")
                for j, v in enumerate(spec.values):
                    _require(
                        v is None or isinstance(v, (bool, int, float, str)),
                        f"{key}.values[{j}]",
                        f"expected a number, string or boolean, got {_fmt(v)} (fix: one scalar per candidate)",
                    )
                    _require(
                        not isinstance(v, float) or math.isfinite(v), f"{key}.values[{j}]", f"must be finite, got {v}"
                    )
                _require(spec.low is None and spec.high is None, key, "choice takes only 'values', got low/high too")
                continue
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
        return self

    def candidates(self, name: str) -> list[Any]:
        """The values of `space[name]` every trial value lies between (choices, or the two end points)."""
        spec = self.space[name]
        if spec.type == "choice":
            return list(spec.values)
        if spec.type == "randint":
            return [int(spec.low), int(spec.high) - 1]
        return [spec.low, spec.high]


class ClassifierParams(_Section):
    """Feature net for the Fréchet distance on non-CIFAR data: a small classifier trained on the prepared data."""

    _path: ClassVar[str] = "evaluate.classifier"

    steps: int = Field(300, ge=1, le=MAX_STEPS)
    """Optimizer steps (at most 10,000,000)."""
    batch: int = Field(128, ge=1, le=MAX_BATCH)
    """Images per step (at most 65,536)."""
    lr: float = Field(1e-3, gt=0.0)
    """Learning rate."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the weights and the data order."""


class InceptionParams(_Section):
    """FID Inception-v3 weights (`evaluate.features: inception`), fetched by pipelines.support.fetch, pinned."""

    _path: ClassVar[str] = "evaluate.inception"

    source: str = FID_WEIGHTS_URL
    """https:// | s3:// | file:// URI or a local path (.pth state_dict / .safetensors)."""
    sha256: str | None = FID_WEIGHTS_SHA256
    """64 hex digits, or `record` (fetch once, print the digest to pin)."""
    batch: int = Field(64, ge=1, le=MAX_BATCH)
    """Images per Inception forward (at most 65,536)."""


class ReferenceParams(_Section):
    """Reference statistics: `data` = computed from the prepared images and cached, or an npz URI (mu, sigma)."""

    _path: ClassVar[str] = "evaluate.reference"

    source: str = "data"
    """`data` (computed from the prepared images, cached by data hash + weights sha256 + preprocessing) or the
    URI / path of an npz with mu, sigma (EDM's cifar10-32x32.npz)."""
    sha256: str | None = None
    """Required for an npz source: 64 hex digits or `record`."""
    splits: list[Literal["train", "heldout"]] = Field(default_factory=lambda: ["train", "heldout"], min_length=1)
    """Prepared splits the `data` reference uses (both = every source image)."""


# The 64x64 noisy ADM classifier of guided-diffusion (classifier-rejection sampling, docs/official.md). No sha256 of
# it is published: fetch once with `sha256: record` and pin the printed digest.
ADM_CLASSIFIER_64_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/64x64_classifier.pt"


def _check_pinned(uri: str | None, sha256: str | None, uri_key: str, sha256_key: str) -> None:
    """A fetched file needs its sha256 (64 hex digits) or `record`."""
    if uri is None:
        return
    _require(
        sha256 is not None,
        sha256_key,
        f"required with {uri_key} {_fmt(uri)}, got null (fix: pin the file's 64-hex sha256, or `record` to fetch "
        "once and print it)",
    )
    _require(
        sha256 == "record" or bool(SHA256_RE.match(sha256)),
        sha256_key,
        f"expected 64 hex digits or 'record', got {_fmt(sha256)}",
    )


class StudentSourceParams(OfficialCheckpointParams):
    """A released CTM student scored instead of the distill stage's
    (docs/official.md#4-evaluating-a-released-checkpoint). `uri: null` = the distill stage's student."""

    _path: ClassVar[str] = "evaluate.student_source"


class RejectionParams(_Section):
    """Classifier-rejection sampling at NFE 1 as sony/ctm classifier_rejection.py does it
    (docs/official.md#3-classifier-rejection-sampling)."""

    _path: ClassVar[str] = "evaluate.rejection"

    enabled: bool = False
    """true: also score `fd_nfe1_rejection` (in metrics.json too): the NFE-1 samples kept by the ADM classifier out
    of (1 + ratio)·N (needs class labels and the pinned classifier; docs/official.md#34-in-the-evaluate-stage)."""
    ratio: float = Field(0.5, ge=0.0, le=10.0)
    """Oversampling r: (1 + r)·N one-step samples, the best N/classes per class kept (official default 0.5)."""
    sigma: float = Field(0.002, gt=0.0, le=80.0)
    """Noise level the classifier scores the samples at (official: 0.002, mapped to its VP cosine time)."""
    classifier_uri: str = ADM_CLASSIFIER_64_URL
    """The ADM noisy classifier's state dict (guided-diffusion EncoderUNetModel layout)."""
    classifier_sha256: str | None = None
    """Required when enabled: 64 hex digits or `record`."""
    classifier_flags: dict[str, int | str] = Field(default_factory=dict, max_length=16)
    """Classifier constructor flags over the release values (image_size, classifier_width, classifier_depth,
    classifier_attention_resolutions, num_classes)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.enabled or self.classifier_sha256 is not None:  # enabled: the file is fetched, so it needs its pin
            _check_pinned(
                self.classifier_uri,
                self.classifier_sha256,
                "evaluate.rejection.classifier_uri",
                "evaluate.rejection.classifier_sha256",
            )
        return self


class EvaluateParams(_Section):
    """`evaluate` stage: student at each NFE × gamma, teacher Heun at `teacher_nfe`, Fréchet distance."""

    _path: ClassVar[str] = "evaluate"

    nfe: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1, max_length=32)
    """Student steps (the quality-vs-NFE curve; at most 32 values, each at most 10,000)."""
    gammas: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0], min_length=1, max_length=32)
    """γ of the sampler: 0 = deterministic jumps, 1 = CM multistep (at most 32 values)."""
    teacher_nfe: int = Field(35, ge=1, le=MAX_NFE)
    """Teacher Heun NFE = 2·steps − 1 (35 ↔ 18 steps; at most 10,000)."""
    teacher_euler_nfe: int = Field(1, ge=1, le=MAX_NFE)
    """Teacher Euler baseline NFE (at most 10,000)."""
    num_samples: int = Field(1000, ge=2, le=MAX_SAMPLES)
    """Images drawn per method, cut into num_samples // set_size seed sets; null = the protocol's: 1000 with the
    classifier, 50000 with inception (at most 1,000,000)."""
    set_size: int | None = Field(None, ge=2, le=MAX_SAMPLES)
    """Images per seed set: every FD (headline mean and its std) is measured on sets of this size; null = the
    held-out split's size with the classifier (the data floor's size: like with like), num_samples with inception
    (one set, the paper protocol)."""
    batch: int = Field(250, ge=1, le=MAX_BATCH)
    """Images per sampling batch (at most 65,536)."""
    seed_start: int = Field(0, ge=0, le=SEED_MAX)
    """Image i uses seed seed_start + i (EDM generate.py style)."""
    grid_size: int = Field(8, ge=1, le=64)
    """PNG grids are grid_size × grid_size (at most 64)."""
    ema: float | None = None
    """Which distill.eval_emas weights to evaluate (null = online weights)."""
    features: Literal["classifier", "inception"] = "classifier"
    """Feature space of the Fréchet distance: the small classifier (labelled data) or FID's Inception-v3."""
    num_bootstrap: int = Field(200, ge=0, le=100_000)
    """Bootstrap replicates per method (2048-d at 50k images: seconds each, use ~20; at most 100,000)."""
    inception: InceptionParams = Field(default_factory=InceptionParams)
    """FID Inception weights."""
    reference: ReferenceParams = Field(default_factory=ReferenceParams)
    """Reference statistics."""
    cache_dir: str = ".cache/fid"
    """Fetched weights / npz and computed reference statistics."""
    classifier: ClassifierParams = Field(default_factory=ClassifierParams)
    """The feature classifier."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the bootstrap."""
    student_source: StudentSourceParams = Field(default_factory=StudentSourceParams)
    """A released CTM checkpoint to score instead of the distill stage's student (also used by `likelihood`)."""
    rejection: RejectionParams = Field(default_factory=RejectionParams)
    """Classifier-rejection sampling (ImageNet-64 protocol of the paper's 1.92)."""

    @model_validator(mode="before")
    @classmethod
    def _protocol_num_samples(cls, data: Any) -> Any:
        """`num_samples: null` (or absent) = the feature space's protocol: 50,000 images for the Inception FID (EDM
        fid.py `--num 50000`, the number papers report), 1,000 for the digits classifier's FD."""
        if isinstance(data, dict) and data.get("num_samples") is None:
            features = "inception" if data.get("features") == "inception" else "classifier"
            data = {**data, "num_samples": PROTOCOL_NUM_SAMPLES[features]}
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        for i, n in enumerate(self.nfe):
            _require(n >= 1, f"evaluate.nfe[{i}]", f"must be an integer >= 1, got {n}")
            _require(n <= MAX_NFE, f"evaluate.nfe[{i}]", f"must be <= {MAX_NFE}, got {_fmt(n)}")
        _require(len(set(self.nfe)) == len(self.nfe), "evaluate.nfe", f"values must be distinct, got {self.nfe}")
        for i, g in enumerate(self.gammas):
            _require(
                0.0 <= g <= 1.0, f"evaluate.gammas[{i}]", f"must be in [0, 1], got {g} (0 = deterministic, 1 = CM)"
            )
        _require(
            self.teacher_nfe % 2 == 1,
            "evaluate.teacher_nfe",
            f"must be odd (Heun NFE = 2·steps − 1), got {self.teacher_nfe} (fix: e.g. 35 for 18 steps)",
        )
        _require(
            self.set_size is None or self.set_size <= self.num_samples,
            "evaluate.set_size",
            f"must be <= evaluate.num_samples ({self.num_samples}), got {self.set_size}",
        )
        _check_evaluate_fid(self)
        return self


class LikelihoodParams(_Section):
    """`likelihood` stage: bits/dim of held-out images, exact PF-ODE likelihood."""

    _path: ClassVar[str] = "likelihood"

    enabled: bool = True
    """false: metrics.json with complete: true and no bpd keys."""
    num_samples: int = Field(64, ge=1, le=MAX_SAMPLES)
    """The first num_samples held-out images (at most 1,000,000)."""
    divergence: Literal["exact", "hutchinson"] = "hutchinson"
    """Divergence of the ODE drift: exact or Hutchinson's estimator."""
    num_probes: int = Field(1, ge=1, le=1024)
    """Hutchinson probes per evaluation (at most 1024)."""
    rtol: float = Field(1e-4, gt=0.0)
    """ODE solver relative tolerance."""
    atol: float = Field(1e-4, gt=0.0)
    """ODE solver absolute tolerance."""
    dequantize: Literal["uniform", "none"] = "uniform"
    """Uniform dequantisation noise, or none."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the dequantisation noise, then the Hutchinson probes."""


class RegisterParams(_Section):
    """`register` stage: pyfunc model, version, `@champion` only if better by more than the noise margin."""

    _path: ClassVar[str] = "register"

    model_name: str = Field("ctm-digits", min_length=1)
    """Registered model name."""
    metric: str = "fd_nfe1"
    """Key in artifacts/eval/metrics.json."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    noise_z: float = Field(2.0, ge=0.0)
    """Promote only if better by > noise_z · σ of the difference (measured FD noise of both evaluations)."""
    min_improvement: float = Field(0.0, ge=0.0, lt=1.0)
    """... and by more than this fraction of the champion's value."""
    champion_alias: str = "champion"
    """Alias of the best version."""
    challenger_alias: str = "challenger"
    """Alias of a version that did not beat the champion."""


class RayParams(_Section):
    """Where Ray runs. `address: null` = start a local cluster with `num_cpus` logical CPUs."""

    _path: ClassVar[str] = "ray"

    address: str | None = None
    """null = local cluster (env RAY_ADDRESS wins if set); ray://host:10001, host:6379 or http://host:8265 (submit)."""
    num_workers: int = Field(2, ge=1, le=4096)
    """Ray Train workers (data-parallel ranks; at most 4096)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs per worker (and torch threads, rounded down)."""
    num_cpus: int = Field(4, ge=1, le=65_536)
    """Logical CPUs of the local cluster; > workers' CPUs so Ray Data never starves (at most 65,536)."""
    object_store_mb: int = Field(200, ge=75, le=16_777_216)
    """Object store size of the local cluster (MiB; at most 16 TiB)."""
    storage_path: str = "ray_results"
    """Train/Tune storage: local (relative = repo root) or s3://bucket/prefix."""
    max_failures: int = Field(1, ge=-1)
    """Restarts after a failure (FailureConfig); -1 = infinite."""
    dashboard_port: int = Field(8276, ge=1024, le=65535)
    """Dashboard port of the local cluster (the State API releases placement groups)."""
    temp_dir: str = "/tmp/ray_ctm"
    """Temp dir of the local cluster; short: unix socket paths are limited to 107 bytes."""
    submit: bool = False
    """true: stages run `ray job submit` against `address` and block."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.address is None and "RAY_ADDRESS" not in os.environ:
            need = self.num_workers * self.cpus_per_worker
            _require(
                self.num_cpus > need,
                "ray.num_cpus",
                f"must be > ray.num_workers × ray.cpus_per_worker ({need:g}) so Ray Data keeps a CPU, got "
                f"{self.num_cpus} (fix: raise ray.num_cpus; logical CPUs may exceed physical cores)",
            )
        _require(
            not self.submit or bool(self.address or os.environ.get("RAY_ADDRESS")),
            "ray.submit",
            "true needs a cluster, got ray.address null and no RAY_ADDRESS (fix: set ray.address to the "
            "dashboard URL, e.g. http://head:8265)",
        )
        if self.address:
            is_http = self.address.startswith(("http://", "https://"))
            if self.submit:
                _require(
                    is_http,
                    "ray.address",
                    f"ray.submit needs the dashboard URL http://host:8265, got {_fmt(self.address)}",
                )
            else:
                _require(
                    not is_http,
                    "ray.address",
                    f"{_fmt(self.address)} is a job-submission URL, which ray.init cannot join (fix: set ray.submit: "
                    "true, or use ray://host:10001 / host:6379)",
                )
        _require(
            len(self.temp_dir) <= 60,
            "ray.temp_dir",
            f"must be a short path (<= 60 chars, unix socket limit 107), got {len(self.temp_dir)} chars",
        )
        return self


class MlflowParams(_Section):
    """Tracking server and experiment."""

    _path: ClassVar[str] = "mlflow"

    tracking_uri: str | None = None
    """null = sqlite:////<repo>/mlflow.db; env MLFLOW_TRACKING_URI wins."""
    experiment_name: str = Field("ctm-digits", min_length=1)
    """MLflow experiment of every stage's run."""


# `register` shadows BaseModel.register (ABCMeta) on the class only, and instances return the section: the warning
# pydantic gives when the class is made is silenced there, not process-wide.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Params(_Section):
        """The whole params.yaml: one section per DVC stage plus `ray` and `mlflow`."""

        data: DataParams = Field(default_factory=DataParams)
        """`prepare` stage."""
        teacher: TeacherParams = Field(default_factory=TeacherParams)
        """`teacher` stage."""
        distill: DistillParams = Field(default_factory=DistillParams)
        """`distill` stage."""
        tune: TuneParams = Field(default_factory=TuneParams)
        """`tune` stage."""
        evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
        """`evaluate` stage."""
        likelihood: LikelihoodParams = Field(default_factory=LikelihoodParams)
        """`likelihood` stage."""
        register: RegisterParams = Field(default_factory=RegisterParams)
        """`register` stage."""
        ray: RayParams = Field(default_factory=RayParams)
        """Ray cluster."""
        mlflow: MlflowParams = Field(default_factory=MlflowParams)
        """MLflow tracking."""

        _repo_root: Path = PrivateAttr(default_factory=Path.cwd)

        @model_validator(mode="after")
        def _check(self) -> Self:
            """Relations between sections."""
            d = self.distill
            check_batch_split(d, self.ray.num_workers)
            ev = self.evaluate
            if ev.ema is not None:
                _require(
                    ev.ema in d.eval_emas,
                    "evaluate.ema",
                    f"must be one of distill.eval_emas {_fmt(d.eval_emas)} or null, got {ev.ema}",
                )
            if self.tune.enabled:  # every end point / choice of the space must give a valid distill section
                for name in self.tune.space:
                    for value in self.tune.candidates(name):
                        try:
                            check_batch_split(with_changes(d, {name: value}), self.ray.num_workers)
                        except ParamsError as e:
                            raise ParamsError(f"tune.space.{name}", f"value {_fmt(value)} makes {e}") from None
            return self

        @property
        def repo_root(self) -> Path:
            """Directory of the params file (relative paths in params resolve against it)."""
            return self._repo_root

        def section(self, name: str) -> dict[str, Any]:
            """Plain JSON-able dict of one section (what `params_hash` and MLflow params see)."""
            return getattr(self, name).model_dump(mode="json")


# --- relations used outside the schema --------------------------------------------------------------------------------
def _check_gan_phase(d: DistillParams) -> None:
    """distill.gan with enabled: fixed keys untouched, the phase-2 section valid, pins present (docs/gan.md)."""
    g = d.gan
    for key in g.changes:
        _require(
            key.split(".")[0] not in GAN_FIXED_KEYS,
            f"distill.gan.changes.{key}",
            f"the GAN phase carries this from the CTM+DSM phase, got a change to {_fmt(g.changes[key])} (fix: remove "
            f"it; fixed keys: {', '.join(GAN_FIXED_KEYS)})",
        )
    _require(
        d.steps + g.steps <= MAX_STEPS,
        "distill.gan.steps",
        f"distill.steps + gan.steps must be <= {MAX_STEPS}, got {d.steps} + {g.steps}",
    )
    if g.discriminator == "projected":
        for name in ("deit", "efficientnet"):
            f = getattr(g, name)
            _check_file_source(f"distill.gan.{name}.source", f.source)
            _require(
                f.sha256 is not None and (f.sha256 == "record" or bool(SHA256_RE.fullmatch(f.sha256))),
                f"distill.gan.{name}.sha256",
                f"the projected discriminator needs pinned feature networks: expected 64 hex digits or 'record', got "
                f"{_fmt(f.sha256)} (fix: set it, or use discriminator: scratch offline)",
            )
    if g.changes:
        try:
            gan_phases(d)  # the phase-2 section validates like params.yaml
        except ParamsError as e:  # name the change that broke it: distill.K -> distill.gan.changes.K
            key = e.key.replace("distill.", "distill.gan.changes.", 1) if e.key.startswith("distill.") else e.key
            raise ParamsError(key, f"in the GAN phase: {e.problem}") from None


def gan_phases(d: DistillParams) -> tuple[DistillParams, DistillParams | None]:
    """The distill section as the pipeline's two phases (docs/gan.md#the-two-phases): (CTM+DSM, GAN or None).

    Phase 1 is `d` with the GAN section at its defaults (off), so its run is the one a GAN-less distill section
    names; phase 2 is `d` with `gan.changes` applied, running to distill.steps + gan.steps.
    """
    phase1 = d.model_copy(update={"gan": GanParams()})
    if not d.gan.enabled:
        return phase1, None
    base = d.model_copy(update={"gan": d.gan.model_copy(update={"changes": {}})})
    return phase1, with_changes(base, {**d.gan.changes, "steps": d.steps + d.gan.steps})


def _check_lpips(lp: LpipsParams) -> None:
    """`distance: lpips` needs both weight files with a sha256 pin (or `record`) before any work starts."""
    for name in ("vgg16", "linear"):
        _check_file_source(f"distill.lpips.{name}_source", getattr(lp, f"{name}_source"))
        sha = getattr(lp, f"{name}_sha256")
        _require(
            sha is not None and (sha == "record" or bool(SHA256_RE.match(sha))),
            f"distill.lpips.{name}_sha256",
            f"distill.distance 'lpips' needs its pinned weight files: expected 64 hex digits or 'record', got "
            f"{_fmt(sha)} (fix: set it, sha256: record fetches once and prints the digest; or use distance: l2)",
        )


def check_batch_split(d: DistillParams, num_workers: int) -> None:
    """`distill.batch` must split into `num_workers` ranks of whole microbatches."""
    per = num_workers * d.microbatch
    _require(
        d.batch % per == 0,
        "distill.batch",
        f"must be divisible by ray.num_workers × distill.microbatch ({num_workers} × {d.microbatch} = {per}), "
        f"got {d.batch} (fix: set distill.batch to a multiple of {per})",
    )


def _check_file_source(key: str, value: str) -> None:
    """An https:// / s3:// / file:// URI or a local path (what the fetcher accepts besides release names)."""
    _require(bool(value.strip()), key, "must be an https://, s3:// or file:// URI or a local path, got ''")
    if "://" in value:
        scheme = urllib.parse.urlparse(value).scheme.lower()
        _require(
            scheme in URI_SCHEMES, key, f"expected an https://, s3:// or file:// URI or a local path, got {_fmt(value)}"
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
            f"expected 64 hex digits or 'record', got {_fmt(inc.sha256)}",
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
            f"statistics), got {_fmt(ref.sha256)}",
        )
        return
    _check_file_source("evaluate.reference.source", ref.source)
    _require(
        ev.features == "inception",
        "evaluate.reference.source",
        f"a reference file ({_fmt(ref.source)}) needs evaluate.features: inception, got {_fmt(ev.features)} (the "
        "classifier's reference is always computed from the data: set reference.source: data)",
    )
    _require(
        ref.sha256 is not None,
        "evaluate.reference.sha256",
        f"required when evaluate.reference.source is {_fmt(ref.source)}, got null (fix: pin the file's 64-hex "
        "sha256, or set sha256: record to fetch once and print it)",
    )
    _require(
        ref.sha256 == "record" or bool(SHA256_RE.match(ref.sha256)),
        "evaluate.reference.sha256",
        f"expected 64 hex digits or 'record', got {_fmt(ref.sha256)}",
    )


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


def _from_validation_error(err: ValidationError, prefix: tuple = ()) -> ParamsError:
    e = err.errors()[0]
    typ, inp, ctx = e["type"], e.get("input"), e.get("ctx") or {}
    if typ == "value_error" and isinstance(ctx.get("error"), ParamsError):  # a section's own check
        return ctx["error"]
    loc = prefix + tuple(e["loc"])
    # Drop pydantic's union branch tags, e.g. ('x', 'float') / ('x', 'none').
    loc = tuple(p for p in loc if p not in ("float", "int", "str", "none", "bool", "list[float]", "list[any]"))
    key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
    if typ == "extra_forbidden":
        owner = _model_at(loc)
        allowed = sorted(owner.model_fields) if owner is not None else []
        if len(allowed) <= 16:
            return ParamsError(key, f"unknown key (allowed here: {', '.join(allowed)}; fix: remove or rename it)")
        # Large sections (distill: 30+ keys): the closest names, so the message stays one readable line.
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return ParamsError(
            key,
            f"unknown key ({hint}{len(allowed)} keys are allowed in {where}: see ctm_core/config.py or "
            f"`python -m pipelines.config --show {loc[0]}`; fix: remove or rename it)",
        )
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


# --- loading and overrides --------------------------------------------------------------------------------------------
def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ParamsError(dotted, f"cannot set below {_fmt(p)}, which is {_fmt(nxt)} not a mapping")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def merge_overrides(base: dict, overrides: Mapping[str, Any]) -> dict:
    """`base` (a plain nested dict) with overrides applied: keys dotted (`'distill.K': 8`) or nested mappings
    (`{'distill': {'K': 8}}`); a `tune.space.<name>` mapping replaces that entry whole."""
    out = copy.deepcopy(base)

    def walk(prefix: str, node: Mapping) -> None:
        for k, v in node.items():
            dotted = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v and not (dotted.startswith("tune.space") and dotted.count(".") >= 2):
                walk(dotted, v)
            else:
                _set_dotted(out, dotted, v)

    walk("", overrides)
    return out


S = TypeVar("S", bound=_Section)


def with_changes(section: S, changes: Mapping[str, Any]) -> S:
    """`section` with `changes` applied (keys are its field names, dotted for nested ones: `{'gan.weight': 0.5}`),
    validated like params.yaml (a Tune trial is the distill section with the trial's values). Raises ParamsError."""
    raw = merge_overrides(section.model_dump(), changes)
    try:
        return type(section).model_validate(raw)
    except ValidationError as e:
        raise _from_validation_error(e, tuple(p for p in section._path.split(".") if p)) from None


def load_config(path: str | os.PathLike[str] = "params.yaml", overrides: Mapping[str, Any] | None = None) -> Params:
    """Read and validate `path` (+ overrides); relative paths in it resolve against its folder (`repo_root`).

    Raises `ParamsError` (one line naming the key). Machine checks are `pipelines.support.params.load_params`'s.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError("params", f"file {str(path)!r} not found (fix: run from the repo root or pass --params)")
    raw = read_yaml(path, "params")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError("params", f"expected a mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = merge_overrides(raw, overrides)
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise _from_validation_error(e) from None
    params._repo_root = path.resolve().parent
    return params


def params_hash(section: Any) -> str:
    """Stable sha256 (hex) of canonical JSON (sorted keys, no whitespace) of a section dict or pydantic model."""
    if isinstance(section, BaseModel):
        section = section.model_dump(mode="json")
    blob = json.dumps(section, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
