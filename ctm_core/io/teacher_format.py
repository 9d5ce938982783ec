"""The project's own teacher format (no pickle) and the one entry point that loads any teacher checkpoint.

A teacher folder is an artifact of kind ``"teacher"`` (``ctm_core.io.artifact``):

* ``teacher.safetensors``: the weights (flat ``state_dict`` of the precond module, keys ``model.*``); its header
  metadata holds the JSON config under ``"ctm_core_config"``, so the file alone is enough to rebuild the net;
* ``config.json``: the same config, for people and tools (format version, ``class_name``, ``init_kwargs``,
  ``precond``, sha256 of the source pickle and of its embedded module sources, ``weights_sha256``), plus the
  artifact's ``files`` record (sha256 of the weights file).

``weights_sha256`` hashes the tensors themselves (sorted keys; key, dtype, shape, raw little-endian bytes), not the
file, so it can sit inside the file it describes and survives re-serialisation. ``load_edm_checkpoint`` sniffs
the format: an EDM snapshot pickle (read by ``ctm_core.io.edm_pickle``, nothing executed), a ``.safetensors`` file
(8-byte little-endian header length, then ``{``), or a teacher folder.

A checkpoint's ``init_kwargs`` size the network, and a file could name a network of any size next to a few bytes of
tensors. So the network is first built on the meta device (shapes only, no memory), its parameter count capped by
the number of tensors present, and its keys and shapes compared with the tensors before real parameters exist.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import reprlib
import struct
import threading
from typing import Any, BinaryIO

import torch

from ctm_core.errors import InputError
from ctm_core.io.artifact import (
    CONFIG_FILE,
    load_safetensors,
    read_artifact,
    safetensors_metadata,
    weights_sha256,
    write_artifact,
)
from ctm_core.io.edm_pickle import input_name, plain_init_kwargs, read_edm_snapshot, read_source_bytes

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KIND",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "METADATA_KEY",
    "weights_sha256",
    "save_teacher",
    "read_teacher",
    "convert_edm_pickle",
    "check_architecture",
    "load_edm_checkpoint",
]

FORMAT_NAME = "ctm_core.teacher"
FORMAT_VERSION = 1
KIND = "teacher"
WEIGHTS_FILE = "teacher.safetensors"
METADATA_KEY = "ctm_core_config"

Source = str | os.PathLike | BinaryIO | bytes


def _check_json(name: str, value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError, RecursionError) as e:
        raise InputError(f"{name}: expected JSON-serialisable values, got {reprlib.repr(value)} ({e})") from None


def _make_config(class_name, init_kwargs, state_dict, source_file_sha256, source_sha256) -> dict:
    if not isinstance(class_name, str) or not class_name:
        raise InputError(f"class_name: expected a non-empty str, got {class_name!r}")
    if not isinstance(init_kwargs, dict):
        raise InputError(f"init_kwargs: expected a dict, got {type(init_kwargs).__name__}")
    if not isinstance(state_dict, dict) or not state_dict:
        raise InputError("state_dict: expected a non-empty dict of tensors")
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputError(f"state_dict[{key!r}]: expected a str key and a torch.Tensor, got {type(value).__name__}")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "class_name": class_name,
        "precond": class_name,  # preconditioning wrapper (EDMPrecond / VPPrecond / VEPrecond), ctm_core.nets.precond
        "model_type": init_kwargs.get("model_type"),
        "init_kwargs": _check_json("init_kwargs", init_kwargs),
        "source_file_sha256": source_file_sha256,
        "source_sha256": _check_json("source_sha256", dict(source_sha256 or {})),
        "weights_sha256": weights_sha256(state_dict),
        "num_tensors": len(state_dict),
        "num_elements": int(sum(t.numel() for t in state_dict.values())),
    }


def save_teacher(
    class_name: str,
    init_kwargs: dict,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    source_file_sha256: str | None = None,
    source_sha256: dict[str, str] | None = None,
) -> dict:
    """Write ``out_dir/teacher.safetensors`` and ``out_dir/config.json`` atomically; returns the config dict.

    Args:
        class_name: precond class (``'EDMPrecond'``, ...), as ``ctm_core.nets.precond.build_precond`` takes it.
        init_kwargs: its constructor kwargs (JSON-able).
        state_dict: flat ``{key: tensor}`` of the precond module (CPU copies are written).
        out_dir: folder to create (or update; other files in it are kept).
        source_file_sha256: sha256 of the pickle the weights came from, if any.
        source_sha256: sha256 of its embedded module sources per class, if any.

    The returned config is the one embedded in the weights file (``config.json`` adds the ``files`` record).
    Writes are atomic (``ctm_core.io.artifact.write_artifact``); on any error nothing is left behind.
    """
    config = _make_config(class_name, init_kwargs, state_dict, source_file_sha256, source_sha256)
    written = write_artifact(out_dir, {WEIGHTS_FILE: state_dict}, config, kind=KIND, embed_key=METADATA_KEY)
    written.pop("files")
    return written


def _legacy_files(config: dict) -> dict:
    """Digests a teacher ``config.json`` written before the artifact format records: the tensors' hash only."""
    return {WEIGHTS_FILE: {"sha256": None, "weights_sha256": config.get("weights_sha256")}}


def _embedded_config(metadata: dict[str, str], name: str) -> dict:
    """The config stored in a teacher weights file's safetensors metadata, format- and type-checked."""
    if METADATA_KEY not in metadata:
        raise InputError(
            f"{name}: safetensors file without '{METADATA_KEY}' metadata: not written by "
            "ctm_core.io.teacher_format.save_teacher, so the architecture is unknown"
        )
    fix = "(fix: convert the original checkpoint again)"
    try:
        config = json.loads(metadata[METADATA_KEY])
    except (TypeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else type(e).__name__
        raise InputError(
            f"{name}: metadata '{METADATA_KEY}': expected a JSON object, got unreadable text ({reason}) {fix}"
        ) from None
    if not isinstance(config, dict):
        raise InputError(
            f"{name}: metadata '{METADATA_KEY}': expected a JSON object, got {type(config).__name__} {fix}"
        )
    if config.get("format") != FORMAT_NAME or config.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{name}: expected format {FORMAT_NAME!r} version {FORMAT_VERSION}, got "
            f"{str(config.get('format'))[:80]!r} version {str(config.get('format_version'))[:20]!r}"
        )
    class_name, init_kwargs = config.get("class_name"), config.get("init_kwargs")
    if not isinstance(class_name, str) or not class_name or len(class_name) > 200:
        raise InputError(
            f"{name}: metadata '{METADATA_KEY}': expected a class_name str, got {type(class_name).__name__} {fix}"
        )
    if not isinstance(init_kwargs, dict):
        raise InputError(
            f"{name}: metadata '{METADATA_KEY}': expected an init_kwargs object, got {type(init_kwargs).__name__} {fix}"
        )
    try:
        plain_init_kwargs(init_kwargs, "init_kwargs")  # the same bounds as a pickle's _init_kwargs
    except InputError as e:
        raise InputError(f"{name}: metadata '{METADATA_KEY}': {e}") from None
    return config


def read_teacher(source: Source, *, name: str | None = None) -> tuple[str, dict, dict[str, torch.Tensor], dict]:
    """Read a teacher in the project format: a folder, a ``.safetensors`` path, or a binary file object / bytes.

    ``name`` (optional) is how messages name bytes or a file object.

    Returns:
        ``(class_name, init_kwargs, state_dict, config)``; ``config`` is the one embedded in the weights file.

    Raises:
        InputError: missing/corrupt files, no ``ctm_core_config`` metadata or one that is not a config, unknown
            format version, a ``config.json`` that disagrees with the weights file, or weights whose sha256
            differs from the record.
    """
    if isinstance(source, str | os.PathLike) and pathlib.Path(source).is_dir():
        folder = pathlib.Path(source)
        if not (folder / WEIGHTS_FILE).is_file():
            raise InputError(
                f"{folder}: expected a teacher folder with {WEIGHTS_FILE}; convert the checkpoint with "
                "ctm_core.io.teacher_format.convert_edm_pickle(src, out_dir)"
            )
        if (folder / CONFIG_FILE).is_file():
            art = read_artifact(folder, KIND, files=[WEIGHTS_FILE], legacy=_legacy_files)
            name = str(folder / WEIGHTS_FILE)
            config = _embedded_config(art.metadata[WEIGHTS_FILE], name)
            if art.config != config:
                raise InputError(
                    f"{name}: {CONFIG_FILE} next to it disagrees with the config stored in the weights file "
                    "(partial or edited copy); re-run convert_edm_pickle into a fresh folder"
                )
            state_dict = art.tensors[WEIGHTS_FILE]
            if art.files[WEIGHTS_FILE].get("weights_sha256") != config.get("weights_sha256"):
                _check_weights(state_dict, config, name)
            return config["class_name"], config["init_kwargs"], state_dict, config
        source = folder / WEIGHTS_FILE
    data, default_name = read_source_bytes(source)
    name = default_name if name is None else input_name(name)
    if data[:1] == b"\x80":
        raise InputError(
            f"{name}: this is a pickle (EDM snapshot?), not a teacher in the project format; load it "
            "with load_edm_checkpoint(src) or convert it with convert_edm_pickle(src, out_dir)"
        )
    config = _embedded_config(safetensors_metadata(data, name), name)
    state_dict = load_safetensors(data, name)
    _check_weights(state_dict, config, name)
    return config["class_name"], config["init_kwargs"], state_dict, config


def _check_weights(state_dict: dict[str, torch.Tensor], config: dict, name: str) -> None:
    recorded = config.get("weights_sha256")
    if recorded is not None:
        actual = weights_sha256(state_dict)
        if actual != recorded:
            raise InputError(
                f"{name}: weights sha256 mismatch: recorded {recorded}, got {actual}; the file was "
                "modified or corrupted, convert the original checkpoint again"
            )


def convert_edm_pickle(src: Source, out_dir: str | os.PathLike) -> dict:
    """Convert an EDM snapshot pickle (read safely, nothing executed) into a teacher folder; returns the config.

    ``source_file_sha256`` and ``source_sha256`` are the reader's own digests of the bytes and embedded sources.
    """
    snap = read_edm_snapshot(src)
    return save_teacher(
        snap.class_name,
        snap.init_kwargs,
        snap.state_dict,
        out_dir,
        source_file_sha256=snap.file_sha256,
        source_sha256=snap.source_sha256,
    )


def _sniff(data: bytes) -> str:
    if data[:1] == b"\x80":
        return "pickle"
    if len(data) >= 9 and data[8:9] == b"{" and struct.unpack("<Q", data[:8])[0] <= len(data) - 8:
        return "safetensors"
    return "unknown"


class _TooManyParameters(Exception):
    pass


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Broadcast shape of ``a`` and ``b`` (plain python: ``torch.broadcast_shapes`` imports sympy)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    if any(x != y and x != 1 and y != 1 for x, y in zip(a, b)):
        raise ValueError(f"shapes {a} and {b} do not broadcast")
    return tuple(y if x == 1 else x for x, y in zip(a, b))


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


_SHAPE_BINARY = {
    torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div,
    torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__sub__, torch.Tensor.__rsub__,
    torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__truediv__,
}  # fmt: skip
_SHAPE_FACTORIES = {torch.rand, torch.randn, torch.zeros, torch.ones, torch.empty}


class _ShapesOnly(torch.overrides.TorchFunctionMode):
    """Shape-only results for what network constructors compute on meta tensors (weight init arithmetic).

    torch runs these on the meta device through Python reference kernels whose first use imports sympy and costs
    seconds and ~70 MiB; the shapes and dtypes they would give are computed here directly. Anything else falls
    through to torch unchanged, so this only saves time.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SHAPE_BINARY and len(args) == 2 and not kwargs:
            a, b = args
            dtype = torch.result_type(a, b)
            if func in (torch.Tensor.div, torch.Tensor.__truediv__) and not dtype.is_floating_point:
                dtype = torch.get_default_dtype()  # true division of integers
            return torch.empty(_broadcast(_shape(a), _shape(b)), dtype=dtype, device="meta")
        if func is torch.outer and len(args) == 2 and not kwargs:
            a, b = args
            return torch.empty((a.numel(), b.numel()), dtype=torch.result_type(a, b), device="meta")
        if func in (torch.Tensor.sum, torch.Tensor.square) and len(args) == 1 and not kwargs:
            if args[0].is_floating_point():
                shape = () if func is torch.Tensor.sum else args[0].shape
                return torch.empty(shape, dtype=args[0].dtype, device="meta")
        if func in _SHAPE_FACTORIES and args and set(kwargs) <= {"dtype"} and all(type(n) is int for n in args):
            return torch.empty(*args, dtype=kwargs.get("dtype"), device="meta")
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=16)
def _meta_shapes(class_name: str, kwargs_json: str, max_parameters: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(key, shape)`` of ``build_precond(class_name, init_kwargs).state_dict()``, built on the meta device.

    No parameter memory is allocated and torch's random generator is not advanced. The build stops once it has
    registered more than ``max_parameters`` parameters (a file must hold a tensor for every one). Cached: the same
    architecture is built for real right after, and often loaded again.
    """
    from ctm_core.nets.precond import build_precond  # networks are only needed here

    owner, count = threading.get_ident(), [0]

    def hook(module, name, param):
        if threading.get_ident() == owner:
            count[0] += 1
            if count[0] > max_parameters:
                raise _TooManyParameters

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        with torch.device("meta"), _ShapesOnly():
            net = build_precond(class_name, json.loads(kwargs_json))
    finally:
        handle.remove()
    return tuple((k, tuple(v.shape)) for k, v in net.state_dict().items())


def check_architecture(class_name: str, init_kwargs: dict, state_dict: dict[str, torch.Tensor], name: str) -> None:
    """Refuse ``init_kwargs`` whose network does not match ``state_dict`` (keys and shapes), before building it.

    The comparison uses the meta-device skeleton (``_meta_shapes``), so kwargs that name a huge network next to a
    few small tensors cost neither memory nor a full build. Raises ``InputError`` naming ``name``.
    """
    kwargs_json = json.dumps(init_kwargs, sort_keys=True)
    shown = f"{input_name(class_name)}(**init_kwargs)"  # the class name comes from the file: bounded, one line
    try:
        expected = dict(_meta_shapes(class_name, kwargs_json, len(state_dict)))
    except _TooManyParameters:
        raise InputError(
            f"{name}: {shown} has more parameters than the {len(state_dict)} tensors the file "
            f"holds; check init_kwargs {kwargs_json[:300]} against the network that wrote the file"
        ) from None
    except Exception as e:  # unknown class or kwarg, a wrong type, an impossible size
        text = " ".join(str(e).split())[:300]
        raise InputError(
            f"{name}: init_kwargs do not build {shown}: {type(e).__name__}: {text} (fix: check init_kwargs "
            f"{kwargs_json[:300]} against the network that wrote the file)"
        ) from None
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        first_unexpected = [input_name(k)[:100] for k in unexpected[:10]]  # keys from the file: bounded
        raise InputError(
            f"{name}: checkpoint does not match {shown}: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all), unexpected keys {first_unexpected}"
            f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} in all); check init_kwargs "
            f"{kwargs_json[:300]} against the network that wrote the file"
        )
    wrong_shape = [
        f"{k}: expected {list(v)}, got {list(state_dict[k].shape)}"
        for k, v in expected.items()
        if v != tuple(state_dict[k].shape)
    ]
    if wrong_shape:
        raise InputError(f"{name}: {len(wrong_shape)} tensor shapes do not match {shown}: {wrong_shape[:5]}")


def load_edm_checkpoint(source: Source) -> torch.nn.Module:
    """Load a teacher: EDM snapshot pickle, ``.safetensors`` file, teacher folder, or a binary file object.

    Checks the architecture against the tensors on the meta device first (``check_architecture``), then builds
    ``ctm_core.nets.precond.build_precond(class_name, init_kwargs)``, loads the weights with ``strict=True``
    (every tensor must be consumed, every parameter/buffer filled) and returns it in eval mode without grads.
    """
    if isinstance(source, str | os.PathLike) and pathlib.Path(source).is_dir():
        class_name, init_kwargs, state_dict, _ = read_teacher(source)
        name = input_name(source)
    else:
        data, name = read_source_bytes(source)
        kind = _sniff(data)
        if kind == "pickle":
            snap = read_edm_snapshot(data, name=name)
            class_name, init_kwargs, state_dict = snap.class_name, snap.init_kwargs, snap.state_dict
        elif kind == "safetensors":
            class_name, init_kwargs, state_dict, _ = read_teacher(data, name=name)
        else:
            raise InputError(
                f"{name}: unknown checkpoint format (first bytes {data[:8]!r}); expected an EDM "
                f"snapshot pickle (.pkl), a {WEIGHTS_FILE} file, or a folder holding one"
            )
    check_architecture(class_name, init_kwargs, state_dict, name)

    from ctm_core.nets.precond import build_precond  # networks are only needed here

    net = build_precond(class_name, init_kwargs)
    net.load_state_dict(state_dict, strict=True)
    return net.eval().requires_grad_(False)
