"""Hostile model files: EDM snapshot pickles and safetensors teachers built here from a few crafted bytes.

Each case shows what the input does to a plain implementation where that is safe to show, then that ours refuses
it with one line naming the file (``InputError`` or its subclass ``UnsafeCheckpointError``), writes nothing, and,
for "tiny file, huge cost" inputs, peaks within 2x the memory of converting/loading the legitimate tiny EDM
fixture (measured in a fresh subprocess: ``ru_maxrss`` after the operation minus before it).

Pickles that reference EDM's ``torch_utils.persistence._reconstruct_persistent_obj`` are written with a stand-in
module put in ``sys.modules`` only while dumping (the reader never needs it). Deep structures are written as raw
opcodes, since ``pickle.dumps`` itself would recurse.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import pickletools
import struct
import subprocess
import sys
import types

import pytest
import safetensors.torch
import torch

from ctm_core.errors import InputError
from ctm_core.io.artifact import CONFIG_FILE, read_artifact
from ctm_core.io.edm_pickle import (
    MAX_KWARGS_VALUES,
    MAX_MODULE_DEPTH,
    UnsafeCheckpointError,
    read_edm_snapshot,
)
from ctm_core.io.hashing import sha256_file
from ctm_core.io.teacher_format import (
    METADATA_KEY,
    WEIGHTS_FILE,
    convert_edm_pickle,
    load_edm_checkpoint,
    read_teacher,
    save_teacher,
)
from ctm_core.nets.presets import PRESETS

ROOT = pathlib.Path(__file__).resolve().parents[2]
SRC = "# module source of training/networks.py (test stand-in)\n"
DEEP = 100_000  # nesting far past Python's recursion limit


# ------------------------------------------------------------------------------------------------------------
# Writing EDM-like pickles (test side only).


def _reconstruct_persistent_obj(meta):  # pragma: no cover - only referenced by name in written pickles
    raise AssertionError("the stand-in torch_utils.persistence must never be called")


@contextlib.contextmanager
def _fake_torch_utils():
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    fn = types.FunctionType(_reconstruct_persistent_obj.__code__, {}, "_reconstruct_persistent_obj")
    fn.__module__, fn.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj, pkg.persistence = fn, mod
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = pkg, mod
    try:
        yield fn
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]


class _Persistent:
    """Pickles like an EDM persistent-class instance; ``build`` adds a BUILD opcode with that state after it."""

    reconstruct = None  # set while dumping

    def __init__(self, class_name, state, src=SRC, build=None):
        self.meta = dict(type="class", version=6, module_src=src, class_name=class_name, state=state)
        self.build = build

    def __reduce__(self):
        if self.build is None:
            return (_Persistent.reconstruct, (self.meta,))
        return (_Persistent.reconstruct, (self.meta,), self.build)


def _state(params=None, modules=None, **attrs) -> dict:
    return dict(
        training=False,
        _parameters=dict(params or {}),
        _buffers={},
        _non_persistent_buffers_set=set(),
        _modules=dict(modules or {}),
        **attrs,
    )


def _snapshot(params=None, modules=None, init_kwargs=None, build=None, ema_state=None, cls="EDMPrecond") -> dict:
    """EDM's layout, minimal: ema (``cls``) -> model (SongUNet) holding ``params`` and ``modules``."""
    if params is None and modules is None:
        params = {"bias": torch.zeros(4)}
    model = _Persistent("SongUNet", _state(params=params, modules=modules))
    kwargs = {"img_resolution": 8, "img_channels": 1} if init_kwargs is None else init_kwargs
    state = _state(modules={"model": model}, _init_args=(), _init_kwargs=kwargs, **(ema_state or {}))
    return {"ema": _Persistent(cls, state, build=build), "augment_pipe": None}


def _dump(obj, path: pathlib.Path) -> pathlib.Path:
    """Protocol 4 as EDM writes it, with the (optional) FRAME opcodes dropped so ``_splice`` can edit opcodes."""
    with _fake_torch_utils() as fn:
        _Persistent.reconstruct = fn
        try:
            data = pickle.dumps(obj, protocol=4)
        finally:
            _Persistent.reconstruct = None
    frames = [pos for op, _, pos in pickletools.genops(data) if op.name == "FRAME"]
    for pos in reversed(frames):
        data = data[:pos] + data[pos + 9 :]
    path.write_bytes(data)
    return path


def _splice(path: pathlib.Path, placeholder: str, opcodes: bytes) -> pathlib.Path:
    """Replace the SHORT_BINUNICODE opcode of the string ``placeholder`` by ``opcodes`` (which push one value)."""
    key = placeholder.encode()
    data = path.read_bytes()
    old = b"\x8c" + bytes([len(key)]) + key
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, opcodes))
    return path


def _nested_list_opcodes(depth: int) -> bytes:
    """[[[...]]] ``depth`` deep: push ``depth`` empty lists, then APPEND each into the one below."""
    return b"]" * depth + b"a" * (depth - 1)


def _refusal(fn, *args, error=InputError, match: str = "") -> str:
    """The one-line message of the ``error`` ``fn(*args)`` raises."""
    with pytest.raises(error, match=match) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 1200, msg
    return msg


def _listing(root: pathlib.Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _refused_convert(tmp_path: pathlib.Path, pkl: pathlib.Path, match: str, error=InputError) -> str:
    """convert_edm_pickle refuses ``pkl`` with one line naming it; nothing is written next to it or in out_dir."""
    before = _listing(tmp_path)
    msg = _refusal(convert_edm_pickle, pkl, tmp_path / "out", error=error, match=match)
    assert msg.startswith(str(pkl)), msg
    assert _listing(tmp_path) == before
    return msg


# ------------------------------------------------------------------------------------------------------------
# Peak memory: one interpreter imports torch once, then forks a child per measurement (ru_maxrss of the child
# after the operation minus before it), so every operation starts from the same state.

_MEASURE = r"""
import json, os, resource, sys
import torch
torch.set_num_threads(1)
from ctm_core.errors import InputError
from ctm_core.io.teacher_format import convert_edm_pickle, load_edm_checkpoint
import ctm_core.nets.precond
results = {}
for name, (op, src, out) in json.loads(sys.argv[1]).items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        # a regression must fail the test, not exhaust a shared machine: 2 GiB more address space at most
        vm_kib = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmSize:")).split()[1])
        resource.setrlimit(resource.RLIMIT_AS, ((vm_kib << 10) + (2 << 30),) * 2)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            convert_edm_pickle(src, out) if op == "convert" else load_edm_checkpoint(src)
            outcome = "ok"
        except InputError:
            outcome = "refused"
        except BaseException as e:
            outcome = f"{type(e).__name__}: {e}"[:300]
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        os.write(w, json.dumps({"peak_mib": peak_kib / 1024, "outcome": outcome}).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    results[name] = json.loads(data) if data else {"outcome": "crashed"}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def peaks(shared_file, tmp_path_factory) -> dict[str, dict]:
    """name -> {"peak_mib", "outcome", "out"} for each hostile file of this module and the legitimate fixture."""
    legit = shared_file("fixtures", "edm", "tiny-uncond-vp.pkl")
    root = tmp_path_factory.mktemp("peaks")
    hostile = {
        "expand": ("convert", _dump(_expand_snapshot(), root / "expand.pkl")),
        "dag": ("convert", _dump(_dag_snapshot(20), root / "dag.pkl")),
        "shared_kwargs": ("convert", _dump(_shared_kwargs_snapshot(), root / "shared.pkl")),
        "huge_net": ("load", _dump(_huge_net_snapshot(), root / "huge.pkl")),
    }
    jobs = {"legit_convert": ("convert", legit), "legit_load": ("load", legit), **hostile}
    jobs = {name: (op, str(src), str(root / f"out-{name}")) for name, (op, src) in jobs.items()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results["legit_convert"]["outcome"] == results["legit_load"]["outcome"] == "ok", results
    for name, result in results.items():
        result["op"], result["out"] = jobs[name][0], pathlib.Path(jobs[name][2])
    return results


def _assert_peak_within_2x(peaks: dict, name: str) -> None:
    """``name`` was refused, wrote nothing, and peaked within 2x of the same operation on the legitimate fixture."""
    result = peaks[name]
    legit = peaks[f"legit_{result['op']}"]
    assert result["outcome"] == "refused", result
    assert result["peak_mib"] <= 2 * legit["peak_mib"] + 4, (result, legit)  # 4 MiB: page-granularity noise
    assert not result["out"].exists()


# ------------------------------------------------------------------------------------------------------------
# 1. A tensor that views a few stored bytes as gigabytes (stride 0, lying sizes, aliasing keys).


def test_expanded_tensor_plain_pickle_keeps_the_view():
    """Plain pickle rebuilds ``zeros(1).expand(2**28)`` as a 1 GiB view of 4 stored bytes; copying it costs 1 GiB."""
    t = pickle.loads(pickle.dumps(torch.zeros(1).expand(2**28)))
    assert t.stride() == (0,) and t.untyped_storage().nbytes() == 4
    assert t.numel() * t.element_size() == 2**30  # what .contiguous() / safetensors / sha256 would allocate


def _expand_snapshot() -> dict:
    return _snapshot(params={"bias": torch.zeros(1).expand(2**28)})  # 4 stored bytes declared as 1 GiB


def test_expanded_tensor_refused_before_any_copy(tmp_path, peaks):
    pkl = _dump(_expand_snapshot(), tmp_path / "expand.pkl")
    assert pkl.stat().st_size < 1000
    msg = _refused_convert(tmp_path, pkl, r"expected a dense tensor \(C-contiguous strides \(1,\).*got strides \(0,\)")
    assert "fix:" in msg
    _assert_peak_within_2x(peaks, "expand")


class _RawTensor:
    """Pickles like a tensor with chosen (offset, size, stride) over the storage of ``base``."""

    def __init__(self, base: torch.Tensor, offset: int, size: tuple, stride: tuple):
        self.storage, self.args = base.untyped_storage(), (offset, size, stride)
        self.storage = torch.storage.TypedStorage(wrap_storage=self.storage, dtype=base.dtype, _internal=True)

    def __reduce__(self):
        import collections

        return (torch._utils._rebuild_tensor_v2, (self.storage, *self.args, False, collections.OrderedDict()))


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
@pytest.mark.parametrize(
    "offset, size, stride, match",
    [
        (0, (2**28,), (1,), r"needs 1073741824 bytes, its storage holds 16"),
        (3, (2,), (1,), r"at offset 3 needs 20 bytes, its storage holds 16"),
        (0, (4, 2**20), (1, 0), r"expected a dense tensor"),
        (0, (2, 2), (1, 2), r"expected a dense tensor"),  # transposed: not C order
        (-1, (2,), (1,), r"non-negative ints"),
        (0, (2,), (1, 1), r"non-negative ints"),
        (0, (2.0,), (1,), r"non-negative ints"),
    ],
)
def test_tensor_views_outside_standard_layout_refused(tmp_path, offset, size, stride, match):
    pkl = _dump(_snapshot(params={"w": _RawTensor(torch.zeros(4), offset, size, stride)}), tmp_path / "view.pkl")
    _refused_convert(tmp_path, pkl, match)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_keys_aliasing_one_storage_refused(tmp_path):
    """Many keys viewing one stored megabyte would be written (and hashed) once per key."""
    base = torch.zeros(2**18)
    view = _RawTensor(base, 0, (2**18,), (1,))  # one storage object: pickled once, referenced 64 times
    pkl = _dump(_snapshot(params={f"w{i}": view for i in range(64)}), tmp_path / "alias.pkl")
    assert pkl.stat().st_size < 2**20 + 10_000  # 1 MiB stored, 64 MiB if written per key
    _refused_convert(tmp_path, pkl, r"64 tensors of 67108864 bytes viewing 1 storages of 1048576 bytes")


# ------------------------------------------------------------------------------------------------------------
# 2. Modules that share children: a DAG doubles the keys at every level.


def _dag_snapshot(levels: int) -> dict:
    child = _Persistent("Conv2d", _state(params={"weight": torch.zeros(1)}))
    for _ in range(levels):
        child = _Persistent("UNetBlock", _state(modules={"a": child, "b": child}))
    return _snapshot(modules={"blocks": child})


def test_module_dag_plain_state_dict_multiplies_keys():
    """Plain torch walks a shared child once per path: 10 levels of one parameter give 2**10 keys."""
    child = torch.nn.Linear(1, 1, bias=False)
    for _ in range(10):
        parent = torch.nn.Module()
        parent.a = parent.b = child
        child = parent
    assert len(child.state_dict()) == 2**10


def test_module_dag_refused_each_module_visited_once(tmp_path, peaks):
    pkl = _dump(_dag_snapshot(20), tmp_path / "dag.pkl")  # 2**20 keys when expanded
    assert pkl.stat().st_size < 2500
    msg = _refused_convert(tmp_path, pkl, r"expected a tree of modules, got a module shared with")
    assert f"module model.blocks{'.a' * 19}.b: " in msg and f"shared with model.blocks{'.a' * 20} " in msg
    _assert_peak_within_2x(peaks, "dag")


def test_module_nesting_depth_capped(tmp_path):
    child = _Persistent("Conv2d", _state(params={"weight": torch.zeros(1)}))
    for _ in range(MAX_MODULE_DEPTH + 5):
        child = _Persistent("UNetBlock", _state(modules={"m": child}))
    pkl = _dump(_snapshot(modules={"deep": child}), tmp_path / "deep-modules.pkl")
    _refused_convert(tmp_path, pkl, rf"expected modules nested at most {MAX_MODULE_DEPTH} deep")


# ------------------------------------------------------------------------------------------------------------
# 3. _init_kwargs with shared lists (exponential when copied), huge or deep values.


def _shared_lists(levels: int, width: int = 2) -> list:
    """``levels`` lists, each holding ``width`` references to the one below: ``width**levels`` leaves."""
    value: list = [1]
    for _ in range(levels):
        value = [value] * width
    return value


def test_shared_kwargs_plain_copy_is_exponential():
    """A pickle stores each shared list once; any plain copy (JSON, a recursive walk) expands it."""
    value = _shared_lists(4, 10)
    assert len(pickle.dumps(value, protocol=4)) < 200
    assert json.dumps(value).count("1") == 10**4  # 10**9 for the 9 levels below


def _shared_kwargs_snapshot() -> dict:
    return _snapshot(init_kwargs={"img_resolution": 8, "img_channels": 1, "channel_mult": _shared_lists(9, 10)})


def test_shared_kwargs_refused(tmp_path, peaks):
    pkl = _dump(_shared_kwargs_snapshot(), tmp_path / "shared-kwargs.pkl")  # 10**9 leaves when copied
    assert pkl.stat().st_size < 1200
    _refused_convert(
        tmp_path,
        pkl,
        r"ema\._init_kwargs\.channel_mult(\[0\]){8}\[1\]: expected plain values, got the same list object as at "
        r"ema\._init_kwargs\.channel_mult(\[0\]){9} \(shared structure",
    )
    _assert_peak_within_2x(peaks, "shared_kwargs")


@pytest.mark.parametrize(
    "value, match",
    [
        (list(range(MAX_KWARGS_VALUES + 1)), rf"at most {MAX_KWARGS_VALUES} values"),
        ("x" * 100_000, r"str of at most 4096 characters, got 100000"),
        (2**80, r"int below 2\*\*63"),
        (torch.zeros(1), r"expected a plain python value, got Tensor"),
    ],
)
def test_oversized_kwargs_refused(tmp_path, value, match):
    kwargs = {"img_resolution": 8, "img_channels": 1, "extra": value}
    pkl = _dump(_snapshot(init_kwargs=kwargs), tmp_path / "big-kwargs.pkl")
    _refused_convert(tmp_path, pkl, match)


def test_deeply_nested_kwargs_refused_without_recursion_error(tmp_path):
    kwargs = {"img_resolution": 8, "img_channels": 1, "extra": "DEEP_PLACEHOLDER"}
    pkl = _splice(
        _dump(_snapshot(init_kwargs=kwargs), tmp_path / "deep.pkl"), "DEEP_PLACEHOLDER", _nested_list_opcodes(DEEP)
    )
    _refused_convert(tmp_path, pkl, r"ema\._init_kwargs\.extra.*nested at most 16 deep")


def test_empty_tuples_are_not_sharing(tmp_path):
    """``()`` is one object in CPython: repeated empty values are not 'shared structure'."""
    kwargs = {"img_resolution": 8, "img_channels": 1, "a": (), "b": (), "c": [[], []]}
    snap = read_edm_snapshot(_dump(_snapshot(init_kwargs=kwargs), tmp_path / "empty.pkl"))
    assert snap.init_kwargs["a"] == snap.init_kwargs["b"] == [] and snap.init_kwargs["c"] == [[], []]


# ------------------------------------------------------------------------------------------------------------
# 4. init_kwargs naming a huge network next to a few bytes of tensors.


def _huge_net_snapshot() -> dict:
    kwargs = {**PRESETS["edm-cifar10-32x32-uncond-vp"][1], "model_channels": 1024}
    return _snapshot(params={"map_layer0_bias": torch.zeros(4)}, init_kwargs=kwargs)


def test_huge_net_plain_build_would_allocate_gigabytes(tmp_path):
    """Counted on the meta device (nothing allocated): a plain build_precond would allocate 13 GiB of float32."""
    from ctm_core.io.teacher_format import _meta_shapes  # the skeleton the check compares against

    snap = read_edm_snapshot(_dump(_huge_net_snapshot(), tmp_path / "huge.pkl"))
    shapes = _meta_shapes(snap.class_name, json.dumps(snap.init_kwargs, sort_keys=True), 10**6)
    assert sum(math.prod(shape) for _, shape in shapes) * 4 > 12 * 2**30


def test_huge_net_refused_before_building(tmp_path, peaks):
    pkl = _dump(_huge_net_snapshot(), tmp_path / "huge.pkl")
    assert pkl.stat().st_size < 1200
    state = torch.get_rng_state()
    msg = _refusal(load_edm_checkpoint, pkl, match=r"has more parameters than the 1 tensors the file holds")
    assert msg.startswith(str(pkl))
    assert torch.equal(torch.get_rng_state(), state)  # the check does not advance the generator
    _assert_peak_within_2x(peaks, "huge_net")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"img_resolution": 8, "img_channels": 1, "model_type": "Evil"},
            r"init_kwargs do not build EDMPrecond\(\*\*init_kwargs\)",
        ),
        (
            {"img_resolution": 8, "img_channels": 1, "model_channels": -5},
            r"init_kwargs do not build EDMPrecond\(\*\*init_kwargs\)",
        ),
        ({"img_resolution": 8, "img_channels": 1, "num_blocks": 10**9}, r"more parameters than the 1 tensors"),
    ],
)
def test_bad_kwargs_refused_on_the_meta_device(tmp_path, kwargs, match):
    pkl = _dump(_snapshot(params={"w": torch.zeros(1)}, init_kwargs=kwargs), tmp_path / "bad.pkl")
    msg = _refusal(load_edm_checkpoint, pkl, match=match)
    assert msg.startswith(str(pkl))


def test_class_name_from_the_file_is_quoted_bounded(tmp_path):
    pkl = _dump(_snapshot(params={"w": torch.zeros(1)}, cls="Evil\n" * 100_000), tmp_path / "cls.pkl")
    msg = _refusal(load_edm_checkpoint, pkl, match=r"init_kwargs do not build Evil\\nEvil.*ValueError: class_name")
    assert len(msg) < 1200


def test_same_architecture_loads_after_the_meta_check(shared_file):
    """The meta-device check and the real build agree on the fixture, and the generator advances as before."""
    from ctm_core.nets.precond import build_precond

    pkl = shared_file("fixtures", "edm", "tiny-uncond-vp.pkl")
    snap = read_edm_snapshot(pkl)
    torch.manual_seed(3)
    build_precond(snap.class_name, snap.init_kwargs)
    after_plain_build = torch.get_rng_state()
    torch.manual_seed(3)
    net = load_edm_checkpoint(pkl)
    assert torch.equal(torch.get_rng_state(), after_plain_build)
    assert list(net.state_dict()) == list(snap.state_dict)


# ------------------------------------------------------------------------------------------------------------
# 5. Malformed safetensors headers, teacher configs and deeply nested pickles: the loader's own one line.


def _safetensors_with_header(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + payload


def _teacher_bytes(config_text) -> bytes:
    return safetensors.torch.save({"w": torch.zeros(1)}, metadata={METADATA_KEY: config_text})


_OK_FORMAT = {"format": "ctm_core.teacher", "format_version": 1}


def test_plain_json_readers_fail_with_tracebacks():
    """What the plain code did with such headers: a RecursionError, or an AttributeError on a non-object."""
    with pytest.raises(RecursionError):
        json.loads("[" * DEEP + "]" * DEEP)
    with pytest.raises(AttributeError):
        json.loads("[1, 2]").get("format")


@pytest.mark.parametrize(
    "data, match",
    [
        (_teacher_bytes("[1, 2]"), r"expected a JSON object, got list"),  # was AttributeError
        (_teacher_bytes("{not json"), r"expected a JSON object, got unreadable text"),  # was JSONDecodeError
        (_teacher_bytes(json.dumps(_OK_FORMAT)), r"expected a class_name str, got NoneType"),  # was KeyError
        (
            _teacher_bytes(json.dumps({**_OK_FORMAT, "class_name": "EDMPrecond", "init_kwargs": [1]})),
            r"expected an init_kwargs object, got list",
        ),
        (_teacher_bytes("[" * DEEP + "]" * DEEP), r"unreadable text \(nested too deeply\)"),  # was RecursionError
        (
            _teacher_bytes(json.dumps({**_OK_FORMAT, "class_name": "EDMPrecond", "init_kwargs": {"a": [0] * 20_000}})),
            r"metadata 'ctm_core_config': init_kwargs\.a\[\d+\]: expected a small config of at most 10000 values",
        ),
        (_safetensors_with_header(b'{"__metadata__": {"' + METADATA_KEY.encode() + b'": 5}}'), r"map str to str"),
        (_safetensors_with_header(b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}"), r"nested too deeply"),
        (_safetensors_with_header(b'{"__metadata__": [1]}'), r"map str to str"),
    ],
)
def test_malformed_safetensors_refused_in_one_line(tmp_path, data, match):
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(data)
    for fn in (read_teacher, load_edm_checkpoint):
        msg = _refusal(fn, path, match=match)
        assert msg.startswith(str(path)), msg
    _refusal(load_edm_checkpoint, io.BytesIO(data), match=match)


def test_malformed_teacher_folder_config_refused_in_one_line(shared_file, tmp_path):
    out = tmp_path / "teacher"
    convert_edm_pickle(shared_file("fixtures", "edm", "tiny-uncond-vp.pkl"), out)
    config = json.loads((out / CONFIG_FILE).read_text())
    for files in ({WEIGHTS_FILE: ["not", "a", "record"]}, {WEIGHTS_FILE: {"sha256": 5}}):  # was AttributeError
        (out / CONFIG_FILE).write_text(json.dumps({**config, "files": files}))
        for fn, args in ((read_artifact, (out, "teacher")), (load_edm_checkpoint, (out,))):
            msg = _refusal(fn, *args, match=r"files\['teacher\.safetensors'\]: expected \{'sha256'")
            assert msg.startswith(str(out / CONFIG_FILE))
    (out / CONFIG_FILE).write_text('{"files": ' + "[" * DEEP + "]" * DEEP + "}")  # was RecursionError
    _refusal(load_edm_checkpoint, out, match=r"config\.json: expected JSON, got unreadable text \(nested too deeply\)")


def test_deeply_nested_pickles_refused_in_one_line(tmp_path):
    """Structures nested far past the recursion limit are walked in loops or refused at a depth cap."""
    # beside 'ema' (walked for embedded sources): read, since it is not part of the network
    pkl = _dump({**_snapshot(), "augment_pipe": "DEEP_PLACEHOLDER"}, tmp_path / "deep-value.pkl")
    snap = read_edm_snapshot(_splice(pkl, "DEEP_PLACEHOLDER", _nested_list_opcodes(DEEP)))
    assert list(snap.state_dict) == ["model.bias"]
    # where a module belongs
    pkl = _dump(_snapshot(modules={"m": "DEEP_PLACEHOLDER"}), tmp_path / "deep-module.pkl")
    _refused_convert(
        tmp_path,
        _splice(pkl, "DEEP_PLACEHOLDER", _nested_list_opcodes(DEEP)),
        r"module model\.m: expected a persistent EDM module or a ModuleDict, got list",
        error=UnsafeCheckpointError,
    )
    # as a top-level value quoted in a refusal, and as bytes with no name
    data = b"\x80\x04}\x8c\x01k" + _nested_list_opcodes(DEEP) + b"s."
    msg = _refusal(read_edm_snapshot, data, match=r"expected a key 'ema' \(the network\), got keys \['k'\]")
    assert msg.startswith("<bytes>: ")
    # as NEWOBJ arguments of ModuleDict, quoted in the refusal
    data = b"\x80\x04ctorch.nn.modules.container\nModuleDict\n" + _nested_list_opcodes(DEEP) + b"\x85\x81."
    _refusal(read_edm_snapshot, data, error=UnsafeCheckpointError, match=r"expected no NEWOBJ args, got \(\[\[\[")


# ------------------------------------------------------------------------------------------------------------
# 6. The recorded sha256 values are computed from the bytes, never taken from the pickle.


class _Slots:
    __slots__ = ("source_sha256",)


def test_build_rewrites_a_plain_slots_object():
    """Plain pickle: BUILD with a (None, slotstate) state sets attributes, whatever the object computed itself."""
    obj = _Slots()
    obj.source_sha256 = "computed"
    data = pickle.dumps(obj, protocol=2)
    assert pickle.loads(data).source_sha256 == "computed"
    forged = data.replace(b"computed", b"0" * 8)
    assert pickle.loads(forged).source_sha256 == "00000000"


def test_fake_source_sha256_in_the_pickle_is_not_recorded(tmp_path):
    fake = "0" * 64
    real = hashlib.sha256(SRC.encode()).hexdigest()
    # a state field and kwargs named like the record: kept where they are, the record is computed
    pkl = _dump(
        _snapshot(
            init_kwargs={"img_resolution": 8, "img_channels": 1, "source_sha256": fake, "source_file_sha256": fake},
            ema_state={"source_sha256": fake, "source_file_sha256": fake},
        ),
        tmp_path / "fields.pkl",
    )
    config = convert_edm_pickle(pkl, tmp_path / "out")
    assert config["source_sha256"] == {"EDMPrecond": real, "SongUNet": real}
    assert config["source_file_sha256"] == sha256_file(pkl)
    on_disk = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert on_disk["source_sha256"]["EDMPrecond"] == real and on_disk["source_file_sha256"] == sha256_file(pkl)

    # BUILD on the persistent object overwriting the digest it computed: refused, nothing written
    pkl = _dump(_snapshot(build=(None, {"source_sha256": fake})), tmp_path / "build.pkl")
    _refused_convert(tmp_path, pkl, r"persistent EDMPrecond: expected no BUILD", error=UnsafeCheckpointError)
    pkl = _dump(_snapshot(build={"source_sha256": fake}), tmp_path / "build-dict.pkl")
    _refused_convert(tmp_path, pkl, r"persistent EDMPrecond: expected no BUILD", error=UnsafeCheckpointError)


def test_save_teacher_records_what_it_is_given(tmp_path):
    """The record comes from the reader's digests only: save_teacher stores the values passed to it."""
    config = save_teacher(
        "EDMPrecond", {"img_resolution": 8}, {"w": torch.zeros(1)}, tmp_path / "t", source_file_sha256="a" * 64
    )
    assert config["source_file_sha256"] == "a" * 64 and config["source_sha256"] == {}
