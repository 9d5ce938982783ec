"""Read NVIDIA EDM snapshot pickles without executing anything stored in them.

An EDM snapshot (``network-snapshot-*.pkl``, and the released ``edm-*.pkl`` files) is
``pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))`` where every network is a
"persistent class" instance: it unpickles through ``torch_utils.persistence._reconstruct_persistent_obj(meta)``
with ``meta = dict(type='class', version=6, module_src=<source of the defining .py file>, class_name=...,
state=<instance __dict__>)``, and EDM's own loader ``exec``s ``module_src`` (docs/edm.md#a22-embedded-source,
docs/edm.md#a23-pickle-risks; NVlabs/edm torch_utils/persistence.py:123-131, 185-233). Every tensor storage goes through
``torch.storage._load_from_bytes``, which in torch calls ``torch.load(weights_only=False)``
(docs/edm.md#a22-embedded-source).

This module never does either. ``_SafeEDMUnpickler.find_class`` is an allow-list (docs/edm.md#a24-safe-loader):

=========================================================  =====================================================
global                                                     mapped to
=========================================================  =====================================================
``torch_utils.persistence._reconstruct_persistent_obj``    ``_PersistentStub`` (source kept as a string, hashed)
``torch.nn.modules.container.ModuleDict``                  ``_ModuleDictStub`` (inert, stores its state)
``collections.OrderedDict``                                itself
``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``  checked wrappers around torch's (no hooks allowed)
``/ _rebuild_parameter_with_state``
``torch.storage._load_from_bytes``                         ``torch.load(BytesIO(b), weights_only=True)``
``numpy[._]core.multiarray.scalar``, ``numpy.dtype``        numeric-only versions (bool/int/uint/float/complex)
``_codecs.encode``                                         latin-1 only (how protocol-2 pickles store bytes)
anything else                                              ``UnsafeCheckpointError`` naming ``module.name``
=========================================================  =====================================================

``persistent_load`` always refuses. The stub tree is then walked into a flat ``state_dict`` with the same key
order as ``nn.Module.state_dict()`` (parameters, persistent buffers, then children).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import pickle
import warnings
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = ["UnsafeCheckpointError", "EDMSnapshot", "read_edm_snapshot"]

PERSISTENCE_VERSION = 6  # NVlabs/edm torch_utils/persistence.py: assert meta.version == 6
_META_KEYS = {"type", "version", "module_src", "class_name", "state"}
_NUMERIC_DTYPE_KINDS = "biufc"  # bool, int, uint, float, complex: no object ('O') or void ('V') dtypes


class UnsafeCheckpointError(ValueError):
    """A checkpoint references something outside the allow-list, or a value that must be a tensor is not."""


@dataclasses.dataclass
class EDMSnapshot:
    """What ``read_edm_snapshot`` recovers from an EDM snapshot pickle (nothing in it was executed).

    Attributes:
        class_name: class of ``ema`` (e.g. ``'EDMPrecond'``).
        init_kwargs: the constructor kwargs of ``ema`` (``_init_kwargs``), plain JSON-able python.
        state_dict: flat ``{dotted key: tensor}`` as ``ema.state_dict()`` would give, CPU tensors, no grad.
        file_sha256: sha256 of the whole file.
        source_sha256: sha256 of the embedded module source, per persistent class name. Should two instances of
            one class carry different sources, the extra ones are recorded as ``'<class>#2'``, ``'<class>#3'``...
        top_level_keys: keys of the pickled dict (EDM: ema, loss_fn, augment_pipe, dataset_kwargs).
        globals_seen: every global the pickle referenced, as ``module.name``, in first-seen order.
        module_sources: embedded source text by its sha256 (for review only; never executed or imported).
    """

    class_name: str
    init_kwargs: dict
    state_dict: dict[str, torch.Tensor]
    file_sha256: str
    source_sha256: dict[str, str]
    top_level_keys: list[str]
    globals_seen: list[str]
    module_sources: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)


# ------------------------------------------------------------------------------------------------------------
# Inert stand-ins for the objects a snapshot describes.
#
# A pickle can apply BUILD to any object it holds, including the globals ``find_class`` hands out; with a
# ``(None, slotstate)`` state that is ``setattr(obj, k, v)``. So the classes handed out use ``_FrozenClass`` and
# the functions are wrapped in ``_FrozenCallable``: neither accepts attribute writes, and a file cannot change
# the allow-list's behaviour for later loads in the same process.


class _FrozenClass(type):
    def __setattr__(cls, name: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"the pickle tried to set attribute {name!r} on allow-listed class {cls.__name__}")

    def __delattr__(cls, name: str) -> None:
        raise UnsafeCheckpointError(f"the pickle tried to delete attribute {name!r} of class {cls.__name__}")


class _FrozenCallable:
    """An allow-listed function, callable but with no attributes a pickle could overwrite."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:  # pickle REDUCE passes positional arguments only
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"the pickle tried to set attribute {name!r} on allow-listed {self._fn.__name__}")

    def __reduce__(self):
        raise TypeError("allow-list entries are not picklable")


class _PersistentStub:
    """What ``_reconstruct_persistent_obj(meta)`` becomes: the class name, source text and state, nothing run."""

    __slots__ = ("class_name", "module_src", "source_sha256", "state")

    def __init__(self, class_name: str, module_src: str, state: dict):
        self.class_name = class_name
        self.module_src = module_src
        self.source_sha256 = hashlib.sha256(module_src.encode("utf-8")).hexdigest()
        self.state = state

    def __repr__(self) -> str:
        return f"<persistent {self.class_name} (source sha256 {self.source_sha256[:12]}...), not executed>"


class _ModuleDictStub(metaclass=_FrozenClass):
    """Stand-in for ``torch.nn.ModuleDict`` (pickled by class reference: NEWOBJ + BUILD)."""

    class_name = "ModuleDict"

    def __new__(cls, *args: Any):
        if args:
            raise UnsafeCheckpointError(f"torch.nn.modules.container.ModuleDict: expected no NEWOBJ args, got {args!r}")
        obj = object.__new__(cls)
        obj.state = None
        return obj

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafeCheckpointError(f"ModuleDict state: expected a dict, got {type(state).__name__}")
        self.state = state

    def __repr__(self) -> str:
        return "<ModuleDict stub>"


def _reconstruct_persistent_obj(meta: Any) -> _PersistentStub:
    """Safe replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: validates and stores."""
    if not isinstance(meta, dict):
        raise ValueError(f"persistent object: expected a meta dict, got {type(meta).__name__}")
    if set(meta) != _META_KEYS:
        raise ValueError(f"persistent object: expected meta keys {sorted(_META_KEYS)}, got {sorted(meta)}")
    if meta["type"] != "class":
        raise ValueError(f"persistent object: expected meta type 'class', got {meta['type']!r}")
    if meta["version"] != PERSISTENCE_VERSION:
        raise ValueError(
            f"persistent object {meta.get('class_name')!r}: expected torch_utils.persistence version "
            f"{PERSISTENCE_VERSION}, got {meta['version']!r}; this reader only knows EDM's format (NVlabs/edm)"
        )
    if not isinstance(meta["class_name"], str) or not isinstance(meta["module_src"], str):
        raise ValueError("persistent object: expected str class_name and module_src")
    if not isinstance(meta["state"], dict):
        raise ValueError(f"persistent object {meta['class_name']!r}: expected a dict state, got {type(meta['state'])}")
    return _PersistentStub(meta["class_name"], meta["module_src"], meta["state"])


# ------------------------------------------------------------------------------------------------------------
# Checked versions of the torch / numpy rebuild functions.


def _check_no_hooks(what: str, backward_hooks: Any) -> None:
    if not isinstance(backward_hooks, dict) or len(backward_hooks) != 0:
        raise UnsafeCheckpointError(f"{what}: expected empty backward_hooks, got {backward_hooks!r}")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise UnsafeCheckpointError(
            f"torch._utils._rebuild_tensor_v2: expected a tensor storage, got {type(storage).__name__}"
        )
    _check_no_hooks("torch._utils._rebuild_tensor_v2", backward_hooks)
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, size, stride, False, collections.OrderedDict(), metadata
    )


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if type(data) is not torch.Tensor:
        raise UnsafeCheckpointError(f"torch._utils._rebuild_parameter: expected a tensor, got {type(data).__name__}")
    _check_no_hooks("torch._utils._rebuild_parameter", backward_hooks)
    return torch.nn.Parameter(data, requires_grad=False)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    if state:
        raise UnsafeCheckpointError(
            f"torch._utils._rebuild_parameter_with_state: expected no extra parameter state, got {state!r}"
        )
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _load_storage_from_bytes(b: Any):
    """Replacement for ``torch.storage._load_from_bytes``: the blob is a legacy ``torch.save`` of one storage."""
    if not isinstance(b, bytes | bytearray):
        raise UnsafeCheckpointError(f"torch.storage._load_from_bytes: expected bytes, got {type(b).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation notices
            storage = torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"torch.storage._load_from_bytes: a tensor storage blob was refused by torch.load(weights_only=True): {e}"
        ) from e
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise UnsafeCheckpointError(
            f"torch.storage._load_from_bytes: expected the blob to hold a storage, got {type(storage).__name__}"
        )
    return storage


class _NumericDtype(metaclass=_FrozenClass):
    """Stand-in for ``numpy.dtype(obj, align, copy)`` + BUILD: accepts numeric dtypes only."""

    dtype: np.dtype | None = None

    def __init__(self, obj: Any, align: Any = False, copy: Any = False):
        try:
            dtype = np.dtype(obj) if isinstance(obj, str) else None
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in _NUMERIC_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype:
            raise UnsafeCheckpointError(f"numpy.dtype: only numeric dtypes are allowed, got {obj!r}")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
            raise UnsafeCheckpointError(f"numpy.dtype state: expected a version 3/4 tuple, got {state!r}")
        byteorder, subarray, names, fields = state[1:5]
        if subarray is not None or names is not None or fields is not None:
            raise UnsafeCheckpointError(f"numpy.dtype state: only plain numeric dtypes are allowed, got {state!r}")
        if byteorder not in ("<", ">", "|", "="):
            raise UnsafeCheckpointError(f"numpy.dtype state: expected a byte order in '<>|=', got {byteorder!r}")
        if byteorder in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(byteorder)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Replacement for ``numpy.core.multiarray.scalar``: numeric scalars from raw bytes only."""
    if not isinstance(dtype, _NumericDtype) or dtype.dtype is None:
        raise UnsafeCheckpointError(f"numpy scalar: expected a numeric dtype, got {type(dtype).__name__}")
    if not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise UnsafeCheckpointError(f"numpy scalar {dtype.dtype}: expected {dtype.dtype.itemsize} raw bytes")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


def _codecs_encode(obj: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: ``encode(str, 'latin1')`` only."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode: only str with latin1 encoding is allowed, got {encoding!r}")
    return obj.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _FrozenCallable(_reconstruct_persistent_obj),
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictStub,
    ("collections", "OrderedDict"): collections.OrderedDict,  # a C type: attributes are read-only
    ("torch._utils", "_rebuild_tensor_v2"): _FrozenCallable(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _FrozenCallable(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _FrozenCallable(_rebuild_parameter_with_state),
    ("torch.storage", "_load_from_bytes"): _FrozenCallable(_load_storage_from_bytes),
    ("numpy.core.multiarray", "scalar"): _FrozenCallable(_numpy_scalar),  # files written with numpy 1.x
    ("numpy._core.multiarray", "scalar"): _FrozenCallable(_numpy_scalar),  # numpy 2.x
    ("numpy", "dtype"): _NumericDtype,
    ("_codecs", "encode"): _FrozenCallable(_codecs_encode),
}


class _SafeEDMUnpickler(pickle.Unpickler):
    """Allow-list unpickler (docs/edm.md#a24-safe-loader). Records every global it is asked for."""

    def __init__(self, file: BinaryIO):
        super().__init__(file)
        self.globals_seen: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if qualname not in self.globals_seen:
            self.globals_seen.append(qualname)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"global {qualname} is not allowed in an EDM snapshot (allow-list in ctm_core/io/edm_pickle.py); "
                "refusing to load. Do not open this file with pickle.load; if it is a genuine EDM release that "
                "uses a new global, review it before adding it to the allow-list."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"persistent id {pid!r} is not allowed in an EDM snapshot; refusing to load")


# ------------------------------------------------------------------------------------------------------------
# Walking the stub tree.


def _module_state(node: Any, path: str) -> dict:
    if isinstance(node, _PersistentStub):
        return node.state
    if isinstance(node, _ModuleDictStub):
        if node.state is None:
            raise ValueError(f"module {path or '<root>'}: ModuleDict without state")
        return node.state
    raise UnsafeCheckpointError(
        f"module {path or '<root>'}: expected a persistent EDM module or a ModuleDict, got {type(node).__name__}"
    )


def _collect_state_dict(node: Any, prefix: str, out: dict[str, torch.Tensor], parents: tuple[int, ...] = ()) -> None:
    """Flatten like ``nn.Module.state_dict``: own parameters, persistent buffers, then children (recursively)."""
    if id(node) in parents:
        raise ValueError(f"module {prefix.rstrip('.')}: the module tree contains a cycle")
    parents = (*parents, id(node))
    state = _module_state(node, prefix.rstrip("."))
    for field in ("_parameters", "_buffers", "_modules"):
        if not isinstance(state.get(field), dict):
            raise ValueError(f"module {prefix.rstrip('.') or '<root>'}: state has no dict {field!r}")
    non_persistent = state.get("_non_persistent_buffers_set", set())
    if not isinstance(non_persistent, set):
        raise ValueError(f"module {prefix.rstrip('.') or '<root>'}: _non_persistent_buffers_set is not a set")
    items = list(state["_parameters"].items())
    items += [(k, v) for k, v in state["_buffers"].items() if k not in non_persistent]
    for name, value in items:
        key = prefix + str(name)
        if value is None:
            continue
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise UnsafeCheckpointError(f"state_dict key {key!r}: expected a torch.Tensor, got {type(value).__name__}")
        if value.device.type != "cpu":
            raise ValueError(f"state_dict key {key!r}: expected a CPU tensor, got device {value.device}")
        if key in out:
            raise ValueError(f"state_dict key {key!r} appears twice")
        out[key] = value.detach()  # a fresh plain tensor sharing storage: no hooks, no python attributes
    for name, child in state["_modules"].items():
        if child is not None:
            _collect_state_dict(child, f"{prefix}{name}.", out, parents)


def _plain(value: Any, where: str) -> Any:
    """Convert init kwargs to plain JSON-able python (numpy scalars -> int/float/bool, tuples -> lists)."""
    if isinstance(value, np.number | np.bool_):  # before float: np.float64 subclasses float
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"{where}: expected str keys, got {list(value)!r}")
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise UnsafeCheckpointError(f"{where}: expected a plain python value, got {type(value).__name__}")


def _walk_sources(node: Any, out: list[_PersistentStub], seen: set[int]) -> None:
    """Collect every persistent stub reachable from ``node`` (through dicts, lists, tuples, sets and states)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, _PersistentStub):
        out.append(node)
        _walk_sources(node.state, out, seen)
    elif isinstance(node, _ModuleDictStub):
        _walk_sources(node.state, out, seen)
    elif isinstance(node, dict):
        for v in node.values():
            _walk_sources(v, out, seen)
    elif isinstance(node, list | tuple | set | frozenset):
        for v in node:
            _walk_sources(v, out, seen)


def _read_bytes(source: str | os.PathLike | BinaryIO | bytes) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return f.read()
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, bytes):
            raise TypeError(f"source: expected a binary file object, got one whose read() returns {type(data)}")
        return data
    raise TypeError(f"source: expected a path, bytes or a binary file object, got {type(source).__name__}")


def read_edm_snapshot(source: str | os.PathLike | BinaryIO | bytes) -> EDMSnapshot:
    """Read an EDM snapshot pickle safely: allow-listed globals only, embedded source hashed, never executed.

    Args:
        source: path to a ``.pkl`` file, a binary file object positioned at its start, or its bytes.

    Returns:
        ``EDMSnapshot`` of ``ema``: class name, init kwargs, flat state_dict (CPU, no grad), hashes.

    Raises:
        UnsafeCheckpointError: a global outside the allow-list, a persistent id, a refused storage blob, or a
            non-tensor where a parameter/buffer belongs (the message names the global or the key).
        ValueError: not a pickle, truncated, no ``ema``, ``ema`` not a persistent EDM object, unknown
            persistence version.
    """
    data = _read_bytes(source)
    file_sha256 = hashlib.sha256(data).hexdigest()
    if data[:1] != b"\x80":
        hint = " (it looks like a zip, e.g. a torch.save .pt file)" if data[:2] == b"PK" else ""
        raise ValueError(
            f"not an EDM snapshot pickle: expected the pickle protocol opcode 0x80 as first byte, got "
            f"{data[:8]!r}{hint}"
        )
    unpickler = _SafeEDMUnpickler(io.BytesIO(data))
    try:
        obj = unpickler.load()
    except UnsafeCheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError) as e:
        raise ValueError(
            f"could not read the EDM snapshot pickle ({len(data)} bytes, sha256 {file_sha256}): "
            f"{type(e).__name__}: {e}; the file is truncated or corrupt, download it again"
        ) from e
    except ValueError:
        raise
    except Exception as e:  # e.g. BUILD on an object without __dict__, wrong argument counts in REDUCE
        raise ValueError(
            f"malformed EDM snapshot pickle ({len(data)} bytes, sha256 {file_sha256}): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"EDM snapshot: expected a pickled dict with key 'ema', got {type(obj).__name__}")
    top_level_keys = [str(k) for k in obj]
    if "ema" not in obj:
        raise ValueError(f"EDM snapshot: expected a key 'ema' (the network), got keys {top_level_keys}")
    ema = obj["ema"]
    if not isinstance(ema, _PersistentStub):
        raise ValueError(
            f"EDM snapshot: expected 'ema' to be a torch_utils.persistence object, got {type(ema).__name__}"
        )

    try:
        return _snapshot_from_tree(obj, ema, file_sha256, top_level_keys, unpickler.globals_seen)
    except RecursionError as e:
        raise ValueError("malformed EDM snapshot: object tree nested too deeply") from e


def _snapshot_from_tree(
    obj: dict, ema: _PersistentStub, file_sha256: str, top_level_keys: list[str], globals_seen: list[str]
) -> EDMSnapshot:
    state_dict: dict[str, torch.Tensor] = {}
    _collect_state_dict(ema, "", state_dict)
    if not state_dict:
        raise ValueError(f"EDM snapshot: 'ema' ({ema.class_name}) holds no tensors")

    init_args = ema.state.get("_init_args", ())
    if not isinstance(init_args, tuple | list) or len(init_args) != 0:
        raise ValueError(f"EDM snapshot: expected 'ema' built from keyword arguments only, got args {init_args!r}")
    if not isinstance(ema.state.get("_init_kwargs"), dict):
        raise ValueError(f"EDM snapshot: 'ema' ({ema.class_name}) has no _init_kwargs dict")
    init_kwargs = _plain(ema.state["_init_kwargs"], "ema._init_kwargs")

    stubs: list[_PersistentStub] = []
    _walk_sources(obj, stubs, set())
    source_sha256: dict[str, str] = {}
    module_sources: dict[str, str] = {}
    for stub in stubs:
        module_sources.setdefault(stub.source_sha256, stub.module_src)
        key, n = stub.class_name, 1
        while key in source_sha256 and source_sha256[key] != stub.source_sha256:
            n += 1
            key = f"{stub.class_name}#{n}"
        source_sha256[key] = stub.source_sha256

    return EDMSnapshot(
        class_name=ema.class_name,
        init_kwargs=init_kwargs,
        state_dict=state_dict,
        file_sha256=file_sha256,
        source_sha256=source_sha256,
        top_level_keys=top_level_keys,
        globals_seen=list(globals_seen),
        module_sources=module_sources,
    )
