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

A file cannot make the reader do more work than its own size warrants: every tensor must be dense with standard
(C-contiguous) strides and lie inside its storage (checked before torch builds it), tensors may not alias one
another, the module graph must be a tree (each module object visited once), ``_init_kwargs`` must be a small
config (bounded count and depth, no shared lists) and nesting is capped. Every refusal is one line naming the file:
``UnsafeCheckpointError`` (something outside the allow-list) or ``ctm_core.errors.InputError`` (anything else).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import math
import os
import pickle
import reprlib
import warnings
from typing import Any, BinaryIO

import numpy as np
import torch

from ctm_core.errors import InputError

__all__ = [
    "UnsafeCheckpointError",
    "EDMSnapshot",
    "read_edm_snapshot",
    "plain_init_kwargs",
    "input_name",
    "read_source_bytes",
]

PERSISTENCE_VERSION = 6  # NVlabs/edm torch_utils/persistence.py: assert meta.version == 6
_META_KEYS = {"type", "version", "module_src", "class_name", "state"}
_NUMERIC_DTYPE_KINDS = "biufc"  # bool, int, uint, float, complex: no object ('O') or void ('V') dtypes

# Bounds on what a file may ask of the reader. EDM's networks nest modules about 5 deep and their _init_kwargs hold
# ~20 scalars and short lists; these limits are far above that and far below what costs memory or time.
MAX_MODULE_DEPTH = 64
MAX_KWARGS_VALUES = 10_000  # values in _init_kwargs, counted as walked (a shared list counts at every use)
MAX_KWARGS_DEPTH = 16
MAX_KWARGS_STR = 4096  # characters of one string value
MAX_KWARGS_INT = 2**63  # |int| bound: kwargs are sizes and flags, and JSON readers stop at 64 bits
MAX_MESSAGE_CHARS = 600  # an error message quotes at most this much


class UnsafeCheckpointError(InputError):
    """A checkpoint references something outside the allow-list, or a value that must be a tensor is not."""


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlong = 3, 80, 80, 40
_repr.maxdict = _repr.maxlist = _repr.maxtuple = _repr.maxset = 6


def _short(value: Any) -> str:
    """A bounded repr for messages: a file's values may be huge or nested thousands deep."""
    try:
        return _repr.repr(value)
    except Exception:  # a repr that fails (e.g. an int over the 4300-digit str limit)
        return f"<{type(value).__name__}>"


def input_name(name: Any) -> str:
    """How a message names an input: one line (control characters escaped), at most 200 characters."""
    text = repr(str(name))[1:-1]
    return text if len(text) <= 200 else text[:95] + "..." + text[-95:]


def _path(where: str) -> str:
    """A dotted path for messages, at most 160 characters (a file can nest names deeply)."""
    return where if len(where) <= 160 else where[:80] + "..." + where[-77:]


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


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
        # source_sha256 is computed here from the text, and nothing in the file can set it afterwards: BUILD on
        # this object calls __setstate__ (refused) and attribute writes are refused.
        object.__setattr__(self, "class_name", class_name)
        object.__setattr__(self, "module_src", module_src)
        object.__setattr__(self, "source_sha256", hashlib.sha256(module_src.encode("utf-8")).hexdigest())
        object.__setattr__(self, "state", state)

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"the pickle tried to set attribute {name!r} of persistent {self.class_name}")

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(
            f"persistent {self.class_name}: expected no BUILD after _reconstruct_persistent_obj, got state "
            f"{_short(state)} (an edited file trying to overwrite the recorded class, source or its sha256)"
        )

    def __repr__(self) -> str:
        return f"<persistent {self.class_name} (source sha256 {self.source_sha256[:12]}...), not executed>"


class _ModuleDictStub(metaclass=_FrozenClass):
    """Stand-in for ``torch.nn.ModuleDict`` (pickled by class reference: NEWOBJ + BUILD)."""

    class_name = "ModuleDict"

    def __new__(cls, *args: Any):
        if args:
            raise UnsafeCheckpointError(
                f"torch.nn.modules.container.ModuleDict: expected no NEWOBJ args, got {_short(args)}"
            )
        obj = object.__new__(cls)
        obj.state = None
        return obj

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafeCheckpointError(f"ModuleDict state: expected a dict, got {type(state).__name__}")
        if self.state is not None:
            raise UnsafeCheckpointError("ModuleDict state: expected one BUILD, got a second one overwriting the first")
        self.state = state

    def __repr__(self) -> str:
        return "<ModuleDict stub>"


def _reconstruct_persistent_obj(meta: Any) -> _PersistentStub:
    """Safe replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: validates and stores."""
    if not isinstance(meta, dict):
        raise ValueError(f"persistent object: expected a meta dict, got {type(meta).__name__}")
    if set(meta) != _META_KEYS:
        raise ValueError(f"persistent object: expected meta keys {sorted(_META_KEYS)}, got {_short(list(meta))}")
    if meta["type"] != "class":
        raise ValueError(f"persistent object: expected meta type 'class', got {_short(meta['type'])}")
    if meta["version"] != PERSISTENCE_VERSION:
        raise ValueError(
            f"persistent object {_short(meta.get('class_name'))}: expected torch_utils.persistence version "
            f"{PERSISTENCE_VERSION}, got {_short(meta['version'])}; this reader only knows EDM's format (NVlabs/edm)"
        )
    if not isinstance(meta["class_name"], str) or not isinstance(meta["module_src"], str):
        raise ValueError("persistent object: expected str class_name and module_src")
    if not isinstance(meta["state"], dict):
        raise ValueError(
            f"persistent object {_short(meta['class_name'])}: expected a dict state, got {type(meta['state']).__name__}"
        )
    return _PersistentStub(meta["class_name"], meta["module_src"], meta["state"])


# ------------------------------------------------------------------------------------------------------------
# Checked versions of the torch / numpy rebuild functions.


def _check_no_hooks(what: str, backward_hooks: Any) -> None:
    if not isinstance(backward_hooks, dict) or len(backward_hooks) != 0:
        raise UnsafeCheckpointError(f"{what}: expected empty backward_hooks, got {_short(backward_hooks)}")


def _is_index(x: Any) -> bool:
    return type(x) is int and x >= 0


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` for dense tensors only, checked before torch sees the numbers.

    A tensor is a view ``(offset, size, stride)`` of its storage; a file could declare stride 0 (``expand``) and
    turn 4 stored bytes into gigabytes once copied. So the strides must be the C-contiguous ones of ``size`` and
    ``(offset + numel) * itemsize`` must fit in the storage's bytes.
    """
    what = "torch._utils._rebuild_tensor_v2"
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafeCheckpointError(f"{what}: expected a typed tensor storage, got {type(storage).__name__}")
    _check_no_hooks(what, backward_hooks)
    if metadata:
        raise UnsafeCheckpointError(f"{what}: expected no tensor metadata, got {_short(metadata)}")
    if not (
        _is_index(storage_offset)
        and isinstance(size, tuple | torch.Size)
        and isinstance(stride, tuple)
        and len(size) == len(stride) <= 32
        and all(map(_is_index, size))
        and all(map(_is_index, stride))
    ):
        raise ValueError(
            f"{what}: expected offset, size and stride of non-negative ints, got offset {_short(storage_offset)}, "
            f"size {_short(size)}, stride {_short(stride)}"
        )
    dense, step = [], 1
    for n in reversed(size):
        dense.append(step)
        step *= n
    dense.reverse()
    if any(n > 1 and s != d for n, s, d in zip(size, stride, dense)):
        raise ValueError(
            f"{what}: expected a dense tensor (C-contiguous strides {tuple(dense)} for size {tuple(size)}), got "
            f"strides {stride} (fix: save tensors with .contiguous(); a stride-0 or overlapping view stores a few "
            "bytes that expand to many)"
        )
    numel, itemsize = math.prod(size), storage.dtype.itemsize
    nbytes = storage._untyped_storage.nbytes()  # the bytes read from the blob (public accessors warn)
    if (storage_offset + numel) * itemsize > nbytes:
        raise ValueError(
            f"{what}: a tensor of size {tuple(size)} at offset {storage_offset} needs "
            f"{(storage_offset + numel) * itemsize} bytes, its storage holds {nbytes} (truncated or edited)"
        )
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, tuple(size), tuple(stride), False, collections.OrderedDict()
    )


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if type(data) is not torch.Tensor:
        raise UnsafeCheckpointError(f"torch._utils._rebuild_parameter: expected a tensor, got {type(data).__name__}")
    _check_no_hooks("torch._utils._rebuild_parameter", backward_hooks)
    return torch.nn.Parameter(data, requires_grad=False)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    if state:
        raise UnsafeCheckpointError(
            f"torch._utils._rebuild_parameter_with_state: expected no extra parameter state, got {_short(state)}"
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
            raise UnsafeCheckpointError(f"numpy.dtype: only numeric dtypes are allowed, got {_short(obj)}")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
            raise UnsafeCheckpointError(f"numpy.dtype state: expected a version 3/4 tuple, got {_short(state)}")
        byteorder, subarray, names, fields = state[1:5]
        if subarray is not None or names is not None or fields is not None:
            raise UnsafeCheckpointError(
                f"numpy.dtype state: only plain numeric dtypes are allowed, got {_short(state)}"
            )
        if byteorder not in ("<", ">", "|", "="):
            raise UnsafeCheckpointError(f"numpy.dtype state: expected a byte order in '<>|=', got {_short(byteorder)}")
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
        raise UnsafeCheckpointError(f"_codecs.encode: only str with latin1 encoding is allowed, got {_short(encoding)}")
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
        raise UnsafeCheckpointError(f"persistent id {_short(pid)} is not allowed in an EDM snapshot; refusing to load")


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


def _collect_state_dict(node: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Flatten like ``nn.Module.state_dict``: own parameters, persistent buffers, then children (depth first).

    Each module object is visited once: a child reachable by two paths (a DAG, which doubles the keys at every
    shared level) or a cycle is refused, as is nesting deeper than ``MAX_MODULE_DEPTH``.
    """
    seen: dict[int, str] = {}  # id(module) -> its path; the stubs stay alive in the tree, so ids are stable
    ancestors: set[int] = set()

    def visit(node: Any, prefix: str, depth: int) -> None:
        path = _path(prefix.rstrip(".") or "<root>")
        if id(node) in ancestors:
            raise ValueError(f"module {path}: the module tree contains a cycle (fix: only a tree of modules loads)")
        if id(node) in seen:
            raise ValueError(
                f"module {path}: expected a tree of modules, got a module shared with {seen[id(node)]} (a DAG "
                "multiplies the state_dict keys at every shared level; fix: only a tree of modules loads)"
            )
        if depth > MAX_MODULE_DEPTH:
            raise ValueError(f"module {path}: expected modules nested at most {MAX_MODULE_DEPTH} deep")
        seen[id(node)] = path
        state = _module_state(node, prefix.rstrip("."))
        for field in ("_parameters", "_buffers", "_modules"):
            if not isinstance(state.get(field), dict):
                raise ValueError(f"module {path}: state has no dict {field!r}")
        non_persistent = state.get("_non_persistent_buffers_set", set())
        if not isinstance(non_persistent, set):
            raise ValueError(f"module {path}: _non_persistent_buffers_set is not a set")
        items = list(state["_parameters"].items())
        items += [(k, v) for k, v in state["_buffers"].items() if k not in non_persistent]
        for name, value in items:
            if not isinstance(name, str):
                raise ValueError(f"module {path}: expected str parameter names, got {_short(name)}")
            key = prefix + name
            if value is None:
                continue
            if type(value) not in (torch.Tensor, torch.nn.Parameter):
                raise UnsafeCheckpointError(
                    f"state_dict key {_short(key)}: expected a torch.Tensor, got {type(value).__name__}"
                )
            if value.device.type != "cpu":
                raise ValueError(f"state_dict key {_short(key)}: expected a CPU tensor, got device {value.device}")
            if key in out:
                raise ValueError(f"state_dict key {_short(key)} appears twice")
            out[key] = value.detach()  # a fresh plain tensor sharing storage: no hooks, no python attributes
        ancestors.add(id(node))
        for name, child in state["_modules"].items():
            if not isinstance(name, str):
                raise ValueError(f"module {path}: expected str child names, got {_short(name)}")
            if child is not None:
                visit(child, f"{prefix}{name}.", depth + 1)
        ancestors.discard(id(node))

    visit(node, prefix, 0)


def _check_no_aliasing(state_dict: dict[str, torch.Tensor]) -> None:
    """The tensors' bytes must fit in their distinct storages' bytes: no two keys view the same stored bytes.

    Each tensor is dense and inside its storage (``_rebuild_tensor_v2``); without this, one stored megabyte
    referenced by a thousand keys would be written (and hashed) as a gigabyte.
    """
    storages: dict[int, int] = {}
    total = 0
    for t in state_dict.values():
        s = t.untyped_storage()
        storages[s.data_ptr() if s.nbytes() else -id(s)] = s.nbytes()
        total += t.numel() * t.element_size()
    stored = sum(storages.values())
    if total > stored:
        raise ValueError(
            f"expected each tensor to own its bytes, got {len(state_dict)} tensors of {total} bytes viewing "
            f"{len(storages)} storages of {stored} bytes (tensors alias one another; fix: save separate tensors)"
        )


def plain_init_kwargs(value: Any, where: str = "init_kwargs") -> Any:
    """Constructor kwargs as plain JSON-able python (numpy scalars -> int/float/bool, tuples -> lists), bounded.

    They are a small config (ints, floats, strs, short lists), so at most ``MAX_KWARGS_VALUES`` values (a list
    reused at several places counts at each), ``MAX_KWARGS_DEPTH`` levels, ``MAX_KWARGS_STR`` characters per
    string, integers below 2**63, and no list/dict object used twice (shared structure expands exponentially
    when copied). Raises ``InputError`` (a non-plain value: ``UnsafeCheckpointError``) naming the path.
    """
    budget = [MAX_KWARGS_VALUES]
    seen: dict[int, str] = {}

    def plain(value: Any, where: str, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise InputError(
                f"{_path(where)}: expected a small config of at most {MAX_KWARGS_VALUES} values, got more "
                "(fix: init kwargs are scalars and short lists)"
            )
        if depth > MAX_KWARGS_DEPTH:
            raise InputError(f"{_path(where)}: expected values nested at most {MAX_KWARGS_DEPTH} deep, got deeper")
        if isinstance(value, np.number | np.bool_):  # before float: np.float64 subclasses float
            value = value.item()
        if value is None or isinstance(value, bool | float):
            return value
        if isinstance(value, int):
            if abs(value) >= MAX_KWARGS_INT:
                raise InputError(f"{_path(where)}: expected an int below 2**63 in magnitude, got a larger one")
            return int(value)
        if isinstance(value, str):
            if len(value) > MAX_KWARGS_STR:
                raise InputError(
                    f"{_path(where)}: expected a str of at most {MAX_KWARGS_STR} characters, got {len(value)}"
                )
            return str(value)
        if isinstance(value, list | tuple | dict):
            if value and id(value) in seen:
                raise InputError(
                    f"{_path(where)}: expected plain values, got the same {type(value).__name__} object as at "
                    f"{_path(seen[id(value)])} (shared structure; fix: init kwargs are scalars and short lists)"
                )
            seen[id(value)] = where
            if isinstance(value, dict):
                if not all(isinstance(k, str) for k in value):
                    raise InputError(f"{_path(where)}: expected str keys, got {_short(list(value))}")
                return {k: plain(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
            return [plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        raise UnsafeCheckpointError(f"{_path(where)}: expected a plain python value, got {type(value).__name__}")

    return plain(value, where, 0)


def _walk_sources(root: Any) -> list[_PersistentStub]:
    """Every persistent stub reachable from ``root`` (through dicts, lists, tuples, sets and states), each once.

    Iterative, so a file nested thousands deep costs a loop, not Python's recursion limit.
    """
    out: list[_PersistentStub] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, _PersistentStub):
            out.append(node)
            stack.append(node.state)
        elif isinstance(node, _ModuleDictStub):
            stack.append(node.state)
        elif isinstance(node, dict):
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list | tuple | set | frozenset):
            stack.extend(reversed(list(node)))
    return out


def read_source_bytes(source: str | os.PathLike | BinaryIO | bytes) -> tuple[bytes, str]:
    """The bytes of a path, a binary file object or a bytes object, and a name for messages (one line, bounded)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), "<bytes>"
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return f.read(), input_name(source)
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, bytes):
            raise TypeError(f"source: expected a binary file object, got one whose read() returns {type(data)}")
        return data, input_name(getattr(source, "name", "<file object>"))
    raise TypeError(f"source: expected a path, bytes or a binary file object, got {type(source).__name__}")


def read_edm_snapshot(source: str | os.PathLike | BinaryIO | bytes, *, name: str | None = None) -> EDMSnapshot:
    """Read an EDM snapshot pickle safely: allow-listed globals only, embedded source hashed, never executed.

    Args:
        source: path to a ``.pkl`` file, a binary file object positioned at its start, or its bytes.
        name: how messages name the input (default: the path, the file object's name, or ``<bytes>``).

    Returns:
        ``EDMSnapshot`` of ``ema``: class name, init kwargs, flat state_dict (CPU, no grad), hashes. ``file_sha256``
        and ``source_sha256`` are computed here from the bytes; nothing in the file can set them.

    Raises:
        UnsafeCheckpointError: a global outside the allow-list, a persistent id, a refused storage blob, or a
            non-tensor where a parameter/buffer belongs (the message names the global or the key).
        InputError: not a pickle, truncated, no ``ema``, ``ema`` not a persistent EDM object, unknown persistence
            version, a non-dense or aliasing tensor, a module DAG, oversized init kwargs, nesting too deep.
        Both are ``ValueError``; each message is one line starting with the input's name.
    """
    data, default_name = read_source_bytes(source)
    name = input_name(name if name is not None else default_name)
    try:
        return _read_snapshot(data)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(_one_line(f"{name}: {e}")) from None
    except InputError as e:
        raise InputError(_one_line(f"{name}: {e}")) from None
    except ValueError as e:
        raise InputError(_one_line(f"{name}: {e}")) from None
    except RecursionError:
        raise InputError(
            f"{name}: malformed EDM snapshot: object tree nested too deeply (fix: use a genuine EDM snapshot)"
        ) from None
    except Exception as e:  # any other surprise from a file's structure is still a refusal of that file
        raise InputError(_one_line(f"{name}: malformed EDM snapshot: {type(e).__name__}: {e}")) from None


def _read_snapshot(data: bytes) -> EDMSnapshot:
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
    except (UnsafeCheckpointError, InputError):
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
    top_level_keys = [k if isinstance(k, str) else _short(k) for k in obj]
    if "ema" not in obj:
        raise ValueError(f"EDM snapshot: expected a key 'ema' (the network), got keys {_short(top_level_keys)}")
    ema = obj["ema"]
    if not isinstance(ema, _PersistentStub):
        raise ValueError(
            f"EDM snapshot: expected 'ema' to be a torch_utils.persistence object, got {type(ema).__name__}"
        )

    state_dict: dict[str, torch.Tensor] = {}
    _collect_state_dict(ema, "", state_dict)
    if not state_dict:
        raise ValueError(f"EDM snapshot: 'ema' ({_short(ema.class_name)}) holds no tensors")
    _check_no_aliasing(state_dict)

    init_args = ema.state.get("_init_args", ())
    if not isinstance(init_args, tuple | list) or len(init_args) != 0:
        raise ValueError(
            f"EDM snapshot: expected 'ema' built from keyword arguments only, got args {_short(init_args)}"
        )
    if not isinstance(ema.state.get("_init_kwargs"), dict):
        raise ValueError(f"EDM snapshot: 'ema' ({_short(ema.class_name)}) has no _init_kwargs dict")
    init_kwargs = plain_init_kwargs(ema.state["_init_kwargs"], "ema._init_kwargs")

    source_sha256: dict[str, str] = {}
    module_sources: dict[str, str] = {}
    for stub in _walk_sources(obj):
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
        globals_seen=list(unpickler.globals_seen),
        module_sources=module_sources,
    )
