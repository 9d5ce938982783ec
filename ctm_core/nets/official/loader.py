"""Load the CTM authors' released student checkpoints (docs/official.md#2-loading-a-checkpoint).

``load_official_ctm(path, preset, **flags)`` returns a ``CTMStudent`` (``G``, ``g``, ``gamma_sampler``-ready) for

- ``'sony-ctm-imagenet64'``: the sony/ctm ImageNet-64 ``ema_0.999_*.pt`` (ADM ``UNetModel`` with ``time_embed_s``;
  250·ln t / 250·ln s time inputs) as ``ADMStudent`` around ``ADMUNet``, keys without prefix;
- ``'ctm-cifar10'``: the Kim-Dongjun/ctm-cifar10 checkpoints (EDM SongUNet DDPM++ with ``map_layer*_s`` /
  ``affine_s``; ln(t)/4 time inputs), keys ``model.*``: exactly ``CTMStudent(model_type='SongUNet')``.

Both use g = c_skip(t)·x_t + c_out(t)·F and G = (s/t)·x_t + (1 − s/t)·g with σ_data = 0.5 (docs/ctm.md#11-the-jump-g).
``flags`` override the official constructor flags under the names the official scripts use. The files are bare
``torch.save`` state dicts (tensors viewing shared flat storages): they are read with ``weights_only=True``; anything
else (pickled code, wrapper dicts, non-tensors) is refused in one line, as is a state dict that does not fit the
preset and flags (the first mismatching key and both shapes).

Shape legend: ``B`` batch, ``C`` channels, ``H``/``W`` spatial, ``L`` classes.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch
from torch import nn

from ctm_core.errors import InputError
from ctm_core.io.edm_pickle import UnsafeCheckpointError, input_name, read_source_bytes
from ctm_core.io.hashing import sha256_bytes
from ctm_core.nets.official.adm import ADMUNet
from ctm_core.nets.student import CTMStudent
from ctm_core.nets.utils import check_positive

__all__ = [
    "OFFICIAL_PRESETS",
    "ADMStudent",
    "build_official_ctm",
    "check_fits",
    "check_official_ctm",
    "load_official_ctm",
    "parse_int_list",
    "read_official_state_dict",
    "resolve_flags",
]

# preset -> its official constructor flags and their release values (docs/official.md#21-presets-and-flags).
OFFICIAL_PRESETS: dict[str, dict[str, Any]] = {
    "sony-ctm-imagenet64": dict(
        image_size=64,
        num_channels=192,
        num_res_blocks=3,
        channel_mult="1,2,3,4",
        attention_resolutions="32,16,8",
        num_heads=4,
        num_head_channels=64,
        num_classes=1000,
        dropout=0.0,
    ),
    "ctm-cifar10": dict(image_size=32, model_channels=128, num_blocks=4, label_dim=0, dropout=0.13),
}
_SIGMA = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)  # both codebases (docs/ctm.md#0-notation-and-time-grid)
MAX_MESSAGE_CHARS = 600


def parse_int_list(name: str, value: Any) -> list[int]:
    """'1,2,3,4' or [1, 2, 3, 4] -> [1, 2, 3, 4] (the official scripts pass comma-separated strings)."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        out = [int(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected comma-separated integers like '1,2,3,4' or a list, got {value!r}") from None
    if not out or any(v < 1 for v in out):
        raise ValueError(f"{name}: expected positive integers, got {value!r}")
    return out


def resolve_flags(preset: str, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The preset's official flags with ``flags`` applied; unknown names and presets are refused."""
    if preset not in OFFICIAL_PRESETS:
        raise ValueError(f"preset must be one of {sorted(OFFICIAL_PRESETS)}, got {preset!r}")
    defaults = OFFICIAL_PRESETS[preset]
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise ValueError(f"unknown flags for preset {preset!r}: {unknown}; expected a subset of {sorted(defaults)}")
    return {**defaults, **dict(flags)}


class ADMStudent(CTMStudent):
    """The sony/ctm ImageNet-64 student: ``CTMStudent``'s g and G around ``ADMUNet``
    (docs/official.md#11-imagenet-64-student).

    ``state_dict()`` keys are the checkpoint's keys with the prefix ``model.``. fp32 only (``use_fp16`` False): the
    official GPU sampler runs the torso in fp16, which this class does not emulate.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        **adm_kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        check_positive("sigma_min", sigma_min)
        check_positive("sigma_data", sigma_data)
        if not sigma_max > sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min={sigma_min}, got {sigma_max!r}")
        self.init_kwargs = dict(
            img_resolution=int(img_resolution),
            img_channels=int(img_channels),
            label_dim=int(label_dim),
            sigma_min=float(sigma_min),
            sigma_max=float(sigma_max),
            sigma_data=float(sigma_data),
            model_type="ADMUNet",
            **copy.deepcopy(adm_kwargs),
        )
        self.img_resolution, self.img_channels, self.label_dim = int(img_resolution), int(img_channels), int(label_dim)
        self.use_fp16 = False
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        self.model = ADMUNet(img_resolution, img_channels, img_channels, label_dim, **adm_kwargs)


def build_official_ctm(preset: str, **flags: Any) -> CTMStudent:
    """A freshly initialised student of ``preset`` with the official flags overridden by ``flags`` (as
    ``load_official_ctm`` builds it before loading). Its ``official`` attribute records preset and flags."""
    f = resolve_flags(preset, flags)
    if preset == "sony-ctm-imagenet64":
        image_size = int(f["image_size"])
        attention_ds = [image_size // r for r in parse_int_list("attention_resolutions", f["attention_resolutions"])]
        student: CTMStudent = ADMStudent(
            image_size,
            3,
            int(f["num_classes"]),
            model_channels=int(f["num_channels"]),
            channel_mult=parse_int_list("channel_mult", f["channel_mult"]),
            num_res_blocks=int(f["num_res_blocks"]),
            attention_ds=attention_ds,
            num_heads=int(f["num_heads"]),
            num_head_channels=int(f["num_head_channels"]),
            dropout=float(f["dropout"]),
            **_SIGMA,
        )
    else:
        # The SongUNet defaults of ctm-cifar10's networks.py, which create_model_and_diffusion leaves in place
        # (shared fixture README: channel_mult [2,2,2], attention at 16, dropout 0.13, DDPM++ [1,1] filter).
        student = CTMStudent(
            int(f["image_size"]),
            3,
            int(f["label_dim"]),
            model_type="SongUNet",
            model_channels=int(f["model_channels"]),
            num_blocks=int(f["num_blocks"]),
            channel_mult=[2, 2, 2],
            channel_mult_emb=4,
            attn_resolutions=[16],
            dropout=float(f["dropout"]),
            embedding_type="positional",
            channel_mult_noise=1,
            encoder_type="standard",
            decoder_type="standard",
            resample_filter=[1, 1],
            **_SIGMA,
        )
    student.official = {"preset": preset, "flags": f}
    return student


def _official_net(student: CTMStudent, preset: str) -> nn.Module:
    """The module whose state dict the checkpoint holds: the bare ADM UNet (no prefix) or the whole CIFAR student
    (EDMPrecond_CTM's ``model.`` prefix)."""
    return student.model if preset == "sony-ctm-imagenet64" else student


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def read_official_state_dict(
    source: str | os.PathLike | BinaryIO | bytes, *, name: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, file sha256) of an official checkpoint, read with ``torch.load(weights_only=True)``.

    Raises ``UnsafeCheckpointError`` when the file needs anything but tensors and containers to unpickle (pickled
    code, as the EDM loader refuses it) and ``InputError`` for a file that is not a torch checkpoint, a wrapper dict,
    non-string keys or non-floating tensors; each message is one line starting with the input's name.
    """
    data, default_name = read_source_bytes(source)
    name = name or default_name
    digest = sha256_bytes(data)
    if data[:2] != b"PK" and data[:1] != b"\x80":  # torch.save writes a zip (or, legacy, a pickle)
        raise InputError(
            f"{name}: not a readable torch checkpoint: expected a zip or pickle, got first bytes {data[:8]!r} "
            "(truncated or not a .pt file; download it again)"
        )
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; the line naming what was refused is the one worth one line.
        reason = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), str(e).strip()[:200])
        raise UnsafeCheckpointError(
            _one_line(
                f"{name}: refusing to load: the file needs more than tensors to unpickle ({reason.split('. ')[0]}); "
                "official CTM checkpoints are bare state dicts; do not open this file with pickle or "
                "torch.load(weights_only=False)"
            )
        ) from None
    except Exception as e:  # noqa: BLE001 - not a zip/legacy torch file, truncated, ...: a refusal of the input
        raise InputError(
            _one_line(f"{name}: not a readable torch checkpoint ({type(e).__name__}: {e}); download it again")
        ) from None
    if not isinstance(obj, Mapping):
        raise InputError(f"{name}: expected a state dict (a dict of tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        nested = [k for k in bad if isinstance(obj[k], Mapping)]
        hint = f" (a wrapper dict? its dict entries: {nested[:5]}; pass the bare state dict)" if nested else ""
        raise InputError(
            _one_line(f"{name}: expected a bare state dict of str -> tensor, got non-tensor entries {bad[:5]}{hint}")
        )
    not_float = [k for k, v in obj.items() if not v.is_floating_point()]
    if not_float:
        raise InputError(f"{name}: expected floating-point tensors, got {obj[not_float[0]].dtype} at {not_float[0]}")
    return dict(obj), digest


def check_fits(net: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ``InputError`` naming the first key (in the network's order) whose shape differs or that is missing,
    else the first checkpoint key the network does not have."""
    expected = net.state_dict()
    for key, t in expected.items():
        if key not in state_dict:
            raise InputError(_one_line(f"{what}: the checkpoint has no key {key} (model {list(t.shape)})"))
        if tuple(state_dict[key].shape) != tuple(t.shape):
            raise InputError(
                _one_line(
                    f"{what}: first mismatching key {key}: checkpoint {list(state_dict[key].shape)}, "
                    f"model {list(t.shape)}"
                )
            )
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise InputError(
            _one_line(f"{what}: checkpoint key {extra[0]} {list(state_dict[extra[0]].shape)} is not in the model")
        )


def load_official_ctm(
    path: str | os.PathLike | BinaryIO | bytes, preset: str, *, device: torch.device | str = "cpu", **flags: Any
) -> CTMStudent:
    """Load an official CTM student checkpoint as a ``CTMStudent`` in eval mode.

    Args:
        path: the ``.pt`` file (or its bytes / a binary file object).
        preset: ``'sony-ctm-imagenet64'`` or ``'ctm-cifar10'`` (``OFFICIAL_PRESETS``).
        device: where the returned student lives.
        **flags: official constructor flags overriding the preset's release values: ImageNet ``image_size``,
            ``num_channels``, ``num_res_blocks``, ``channel_mult`` ("1,2,3,4"), ``attention_resolutions``
            ("32,16,8"), ``num_heads``, ``num_head_channels``, ``num_classes`` (0 = unconditional), ``dropout``;
            CIFAR ``image_size``, ``model_channels``, ``num_blocks``, ``label_dim`` (0 = unconditional), ``dropout``.

    Returns:
        the student: ``G(x_t, t, s, class_labels=None)`` and ``g(...)`` with one-hot (B, L) labels; ``official``
        holds ``preset``, the resolved ``flags`` and the file's ``sha256``.

    Raises:
        ValueError: unknown preset or flag. UnsafeCheckpointError / InputError: see ``read_official_state_dict``;
        InputError: the checkpoint does not fit the preset and flags (the first mismatching key and both shapes).
    """
    state_dict, digest, student = _read_and_check(path, preset, flags)
    student = student.to_empty(device=device)
    # strict: every parameter and buffer of the network is in the state dict, so nothing stays uninitialised.
    _official_net(student, preset).load_state_dict(state_dict, strict=True)
    student.official["sha256"] = digest
    return student.eval().requires_grad_(False)


def check_official_ctm(path: str | os.PathLike | BinaryIO | bytes, preset: str, **flags: Any) -> str:
    """Everything ``load_official_ctm`` checks (readable, plain tensors, fits preset and flags) without building the
    network; returns the file's sha256. Raises as ``load_official_ctm``."""
    return _read_and_check(path, preset, flags)[1]


def _read_and_check(path, preset: str, flags: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str, CTMStudent]:
    """(state dict, sha256, the student on the meta device) once the state dict is known to fit it."""
    resolve_flags(preset, flags)  # unknown names fail before the file is read
    state_dict, digest = read_official_state_dict(path)
    name = input_name(path if isinstance(path, str | os.PathLike) else getattr(path, "name", "<bytes>"))
    what = f"{name}: does not fit preset {preset!r}" + (f" with flags {dict(flags)}" if flags else "")
    what += " (fix: pass the flags the checkpoint was built with)"
    # Shapes first, on the meta device (no memory, no init work; the first meta build in a process imports torch's
    # compiler stack, a few seconds), so a wrong file or flag fails before a 300M-parameter network is initialised.
    with torch.device("meta"):
        student = build_official_ctm(preset, **flags)
    check_fits(_official_net(student, preset), state_dict, what)
    return state_dict, digest, student
