"""Tests for ctm_core/io/edm_pickle.py: EDM snapshots read without executing anything (docs/edm.md#a23-pickle-risks,
docs/edm.md#a24-safe-loader).

Hostile pickles are written here with the real ``pickle`` module. Where a file must reference EDM's
``torch_utils.persistence._reconstruct_persistent_obj``, a fake module is put in ``sys.modules`` only while
writing (``_fake_torch_utils``) and removed afterwards: the reader must not need it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import pickle
import pickletools
import re
import shlex
import struct
import sys
import types

import numpy as np
import pytest
import torch

from ctm_core.io.edm_pickle import EDMSnapshot, UnsafeCheckpointError, read_edm_snapshot

FIXTURES = ["tiny-uncond-vp", "tiny-cond-ve", "tiny-cond-adm"]
# Released preset with the same architecture family, for the key grammar check (docs/edm.md#a16-state-dict-keys).
SAME_FAMILY = {
    "tiny-uncond-vp": "cifar10-32x32-uncond-vp",
    "tiny-cond-ve": "cifar10-32x32-cond-ve",
    "tiny-cond-adm": "imagenet-64x64-cond-adm",
}
EDM_GLOBALS = {
    "torch_utils.persistence._reconstruct_persistent_obj",
    "collections.OrderedDict",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_tensor_v2",
    "torch.storage._load_from_bytes",
    "torch.nn.modules.container.ModuleDict",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
}
PLACEHOLDER_SRC = "# module source of training/networks.py (test stand-in)\n"


@pytest.fixture
def edm_fixture(shared_file):
    """name -> (../shared/fixtures/edm/<name>.pkl, the metadata of its reference outputs); skips when absent."""

    def load(name: str) -> tuple[pathlib.Path, dict]:
        pkl = shared_file("fixtures", "edm", f"{name}.pkl")
        meta = json.loads(str(np.load(shared_file("fixtures", "edm", f"{name}.ref.npz"))["meta_json"]))
        return pkl, meta

    return load


def _assert_edm_not_imported() -> None:
    leaked = [m for m in sys.modules if m.split(".")[0] in ("torch_utils", "dnnlib")]
    assert not leaked, f"reader imported EDM modules: {leaked}"


# ------------------------------------------------------------------------------------------------------------
# Writing EDM-like pickles (test side only).


def _reconstruct_persistent_obj(meta):  # pragma: no cover - only ever referenced by name in written pickles
    raise AssertionError("the fake torch_utils.persistence must never be called")


@contextlib.contextmanager
def _fake_torch_utils():
    """Make ``torch_utils.persistence._reconstruct_persistent_obj`` resolvable for ``pickle.dump`` only."""
    assert "torch_utils" not in sys.modules
    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")
    fn = types.FunctionType(_reconstruct_persistent_obj.__code__, {}, "_reconstruct_persistent_obj")
    fn.__module__ = "torch_utils.persistence"
    fn.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = fn
    pkg.persistence = mod
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = pkg, mod
    try:
        yield fn
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]


class _Persistent:
    """Pickles like an EDM persistent-class instance: REDUCE of _reconstruct_persistent_obj(meta)."""

    reconstruct = None  # set inside _fake_torch_utils()

    def __init__(self, class_name, state, src=PLACEHOLDER_SRC, version=6):
        self.meta = dict(type="class", version=version, module_src=src, class_name=class_name, state=state)

    def __reduce__(self):
        return (_Persistent.reconstruct, (self.meta,))


def _module_state(params=None, buffers=None, modules=None, non_persistent=(), **attrs):
    return dict(
        training=False,
        _parameters=dict(params or {}),
        _buffers=dict(buffers or {}),
        _non_persistent_buffers_set=set(non_persistent),
        _modules=dict(modules or {}),
        **attrs,
    )


def _module_dict(children: dict) -> torch.nn.ModuleDict:
    md = torch.nn.ModuleDict()
    md.__dict__["_modules"].update(children)  # bypass the nn.Module type check: children are _Persistent
    return md


def _tiny_snapshot(ema_src=PLACEHOLDER_SRC, weight=None, init_kwargs=None, version=6) -> dict:
    """A snapshot dict with EDM's layout: EDMPrecond -> SongUNet -> ModuleDict 'enc' -> Conv2d."""
    w = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(2, 3), requires_grad=False)
    conv = _Persistent(
        "Conv2d",
        _module_state(
            params={"weight": w if weight is None else weight, "bias": None},
            buffers={"resample_filter": torch.ones(1, 1, 2, 2), "scratch": torch.zeros(3)},
            non_persistent=("scratch",),
        ),
        version=version,
    )
    unet = _Persistent(
        "SongUNet",
        _module_state(
            params={"map_layer0_bias": torch.nn.Parameter(torch.full((4,), 0.5), requires_grad=False)},
            modules={"enc": _module_dict({"32x32_conv": conv}), "map_augment": None},
            skip_scale=np.sqrt(np.float64(0.5)),
        ),
    )
    kwargs = dict(model_type="SongUNet", channel_mult=(1, 2), dropout=np.float64(0.13), img_resolution=32)
    ema = _Persistent(
        "EDMPrecond",
        _module_state(
            modules={"model": unet},
            sigma_data=0.5,
            _init_args=(),
            _init_kwargs=kwargs if init_kwargs is None else init_kwargs,
        ),
        src=ema_src,
        version=version,
    )
    loss_fn = _Persistent("EDMLoss", _module_state(_init_args=(), _init_kwargs={}))
    return dict(ema=ema, loss_fn=loss_fn, augment_pipe=None, dataset_kwargs={"resolution": 32})


def _dump(obj, path: pathlib.Path) -> pathlib.Path:
    with _fake_torch_utils() as fn:
        _Persistent.reconstruct = fn
        try:
            path.write_bytes(pickle.dumps(obj, protocol=4))
        finally:
            _Persistent.reconstruct = None
    return path


class _System:
    """REDUCE to os.system: the classic pickle payload."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _touch_command(marker: pathlib.Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


# ------------------------------------------------------------------------------------------------------------
# Fixtures (real EDM layout, written by NVlabs/edm's own code).


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_reads_consistently(shared_file, edm_fixture, name):
    pkl, meta = edm_fixture(name)
    snap = read_edm_snapshot(pkl)
    assert isinstance(snap, EDMSnapshot)
    assert snap.class_name == meta["net_class"] == "EDMPrecond"
    assert snap.init_kwargs == meta["init_kwargs"]
    assert json.loads(json.dumps(snap.init_kwargs)) == snap.init_kwargs  # plain JSON-able python
    assert snap.file_sha256 == meta["pkl_sha256"]
    assert snap.top_level_keys == ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"]
    assert set(snap.globals_seen) == EDM_GLOBALS
    assert len(snap.globals_seen) == len(set(snap.globals_seen))
    # one embedded source (networks.py) for every network class, one for the loss; all 64-hex digests
    assert {"EDMPrecond", meta["model_class"], "UNetBlock", "Conv2d", "EDMLoss"} <= set(snap.source_sha256)
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in snap.source_sha256.values())
    assert snap.source_sha256["EDMPrecond"] == snap.source_sha256[meta["model_class"]]
    assert set(snap.module_sources) == set(snap.source_sha256.values())

    sd = snap.state_dict
    assert len(sd) > 0 and all(k.startswith("model.") for k in sd)
    for key, t in sd.items():
        assert type(t) is torch.Tensor and t.dtype == torch.float32 and not t.requires_grad, key
        assert torch.isfinite(t).all(), key
    kw = meta["init_kwargs"]
    emb = kw["model_channels"] * 4  # channel_mult_emb = 4 (docs/edm.md#a11-building-blocks)
    assert sd["model.map_layer0.bias"].shape == (emb,)
    assert sd["model.map_layer1.weight"].shape == (emb, emb)
    assert ("model.map_label.weight" in sd) == (kw["label_dim"] > 0)
    if "augment_dim" in kw:
        assert sd["model.map_augment.weight"].shape[1] == kw["augment_dim"]
    assert ("model.map_noise.freqs" in sd) == (kw.get("embedding_type") == "fourier")
    # same key grammar as the released preset of the family, once resolutions and block numbers are abstracted
    norm = lambda k: re.sub(r"block\d+", "block#", re.sub(r"\d+x\d+", "RxR", k))
    tsv = shared_file("docs", "edm_keys", f"{SAME_FAMILY[name]}.tsv").read_text().splitlines()
    released = {norm(line.split("\t")[0]) for line in tsv if line and not line.startswith("#")}
    assert {norm(k) for k in sd} <= released
    _assert_edm_not_imported()


def test_reads_file_object_and_bytes_identically(edm_fixture):
    pkl, _ = edm_fixture("tiny-cond-adm")
    a = read_edm_snapshot(pkl)
    with open(pkl, "rb") as f:
        b = read_edm_snapshot(f)
    c = read_edm_snapshot(io.BytesIO(pkl.read_bytes()))
    assert list(a.state_dict) == list(b.state_dict) == list(c.state_dict)
    assert all(torch.equal(a.state_dict[k], c.state_dict[k]) for k in a.state_dict)
    assert a.file_sha256 == b.file_sha256 == c.file_sha256


def test_planted_torch_utils_is_never_resolved(edm_fixture, tmp_path):
    """A booby-trapped torch_utils in sys.modules is ignored: globals come from the allow-list only."""
    pkl, _ = edm_fixture("tiny-uncond-vp")
    marker = tmp_path / "trap-ran"

    def trap(meta):
        marker.write_text("ran")

    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = trap
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = pkg, mod
    try:
        snap = read_edm_snapshot(pkl)
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]
    assert len(snap.state_dict) > 0
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------------
# Pickles written here: the walk, kwargs conversion, structure errors.


def test_written_snapshot_walk_and_kwargs(tmp_path):
    snap = read_edm_snapshot(_dump(_tiny_snapshot(), tmp_path / "ok.pkl"))
    # nn.Module.state_dict order: own params, persistent buffers, children; None and non-persistent skipped
    assert list(snap.state_dict) == [
        "model.map_layer0_bias",
        "model.enc.32x32_conv.weight",
        "model.enc.32x32_conv.resample_filter",
    ]
    assert torch.equal(snap.state_dict["model.enc.32x32_conv.weight"], torch.arange(6.0).reshape(2, 3))
    assert snap.init_kwargs == {"model_type": "SongUNet", "channel_mult": [1, 2], "dropout": 0.13, "img_resolution": 32}
    assert type(snap.init_kwargs["dropout"]) is float
    assert snap.source_sha256["EDMPrecond"] == snap.source_sha256["Conv2d"] == snap.source_sha256["EDMLoss"]
    _assert_edm_not_imported()


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "first byte"),
        (b"hello world", "first byte"),
        (b"PK\x03\x04 not a pickle", "zip"),
        (pickle.dumps([1, 2, 3]), "expected a pickled dict"),
        (pickle.dumps({"net": 1}), "key 'ema'"),
        (pickle.dumps({"ema": {"weight": 1}}), "torch_utils.persistence object"),
        (b"\x80\x02Pfoo\n.", "persistent id"),
    ],
)
def test_structure_errors(payload, message):
    with pytest.raises(ValueError, match=message):
        read_edm_snapshot(io.BytesIO(payload))


def test_persistent_id_is_unsafe():
    with pytest.raises(UnsafeCheckpointError, match="persistent id 'foo'"):
        read_edm_snapshot(b"\x80\x02Pfoo\n.")


def test_wrong_persistence_version(tmp_path):
    path = _dump(_tiny_snapshot(version=5), tmp_path / "v5.pkl")
    with pytest.raises(ValueError, match="version 6, got 5"):
        read_edm_snapshot(path)


def test_module_cycle_refused(tmp_path):
    snap = _tiny_snapshot()
    md = snap["ema"].meta["state"]["_modules"]["model"].meta["state"]["_modules"]["enc"]
    md.__dict__["_modules"]["loop"] = md  # ModuleDict pickles by NEWOBJ + BUILD, so the cycle survives pickling
    with pytest.raises(ValueError, match="cycle"):
        read_edm_snapshot(_dump(snap, tmp_path / "cycle.pkl"))


def test_numpy_object_dtype_refused():
    with pytest.raises(UnsafeCheckpointError, match="only numeric dtypes"):
        read_edm_snapshot(pickle.dumps({"ema": np.dtype(object)}, protocol=4))


def test_truncated_file(edm_fixture, tmp_path):
    data = edm_fixture("tiny-cond-ve")[0].read_bytes()
    for n in (2, 1000, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError, match="truncated or corrupt") as info:
            read_edm_snapshot(data[:n])
        assert not isinstance(info.value, UnsafeCheckpointError)


# ------------------------------------------------------------------------------------------------------------
# Hostile pickles.


def test_hostile_reduce_os_system(tmp_path):
    marker = tmp_path / "pwned-a"
    # the payload is live: plain pickle would run it
    pickle.loads(pickle.dumps(_System(_touch_command(marker))))
    assert marker.exists()
    marker.unlink()

    for i, obj in enumerate(
        [
            {"ema": _System(_touch_command(marker))},
            _tiny_snapshot(init_kwargs={"model_type": _System(_touch_command(marker))}),
        ]
    ):
        path = _dump(obj, tmp_path / f"evil-a{i}.pkl")
        with pytest.raises(UnsafeCheckpointError, match=r"global (os|posix)\.system is not allowed"):
            read_edm_snapshot(path)
        assert not marker.exists()
    _assert_edm_not_imported()


def test_hostile_embedded_source_is_not_executed(tmp_path):
    marker = tmp_path / "pwned-b"
    evil_src = PLACEHOLDER_SRC + f"open({str(marker)!r}, 'w').write('pwned')\n"
    path = _dump(_tiny_snapshot(ema_src=evil_src), tmp_path / "evil-b.pkl")
    snap = read_edm_snapshot(path)
    assert not marker.exists()
    assert snap.class_name == "EDMPrecond" and len(snap.state_dict) == 3
    assert snap.source_sha256["EDMPrecond"] != snap.source_sha256["SongUNet"]
    assert snap.source_sha256["SongUNet"] == snap.source_sha256["Conv2d"] == snap.source_sha256["EDMLoss"]
    assert snap.module_sources[snap.source_sha256["EDMPrecond"]] == evil_src  # kept as text for review
    _assert_edm_not_imported()
    exec(compile(evil_src, "<payload>", "exec"), {})  # the payload is live: EDM's loader would have run this
    assert marker.exists()


@pytest.mark.parametrize(
    "replacement, message",
    [
        ({"not": "a tensor"}, r"state_dict key 'model\.enc\.32x32_conv\.weight': expected a torch\.Tensor, got dict"),
        ("a string", r"state_dict key 'model\.enc\.32x32_conv\.weight': expected a torch\.Tensor, got str"),
        (np.float32(1.0), r"state_dict key 'model\.enc\.32x32_conv\.weight': expected a torch\.Tensor"),
        (eval, r"global builtins\.eval is not allowed"),
        (os.system, r"global (os|posix)\.system is not allowed"),
    ],
)
def test_hostile_tensor_replaced(tmp_path, replacement, message):
    path = _dump(_tiny_snapshot(weight=replacement), tmp_path / "evil-c.pkl")
    with pytest.raises(UnsafeCheckpointError, match=message):
        read_edm_snapshot(path)


class _EvilStorage:
    """Pickles like a storage (torch.storage._load_from_bytes(blob)) whose blob is a malicious legacy torch.save."""

    def __init__(self, blob: bytes):
        self.blob = blob

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.blob,))


class _EvilTensor:
    """Pickles like a tensor: torch._utils._rebuild_tensor_v2(<evil storage>, 0, (1,), (1,), False, {})."""

    def __init__(self, blob: bytes):
        self.storage = _EvilStorage(blob)

    def __reduce__(self):
        import collections

        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, (1,), (1,), False, collections.OrderedDict()))


def test_hostile_storage_blob(tmp_path):
    marker = tmp_path / "pwned-d"
    # legacy torch.save layout: magic number, protocol version, sys info, then the (here malicious) object pickle
    header = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (0x1950A86A20F9469CFC6C, 1001, dict(protocol_version=1001, little_endian=True))
    )
    blob = header + pickle.dumps(_System(_touch_command(marker)), protocol=2)
    path = _dump(_tiny_snapshot(weight=_EvilTensor(blob)), tmp_path / "evil-d.pkl")
    with pytest.raises(UnsafeCheckpointError, match=r"refused by torch\.load\(weights_only=True\)"):
        read_edm_snapshot(path)
    assert not marker.exists()
    # the payload is live: torch's own _load_from_bytes (weights_only=False) would run it
    pickle.loads(blob[len(header) :])
    assert marker.exists()


def _build_on_global(module: str, name: str, attr: str) -> bytes:
    """Opcodes: GLOBAL module.name; BUILD with state (None, {attr: 1}) = setattr(global, attr, 1)."""
    key = attr.encode()
    return (
        b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"N}X" + struct.pack("<I", len(key)) + key + b"K\x01\x85s\x86b."
    )


@pytest.mark.parametrize(
    "module, name, attr",
    [
        ("torch._utils", "_rebuild_parameter", "__defaults__"),
        ("torch.storage", "_load_from_bytes", "__call__"),
        ("numpy", "dtype", "__setstate__"),
        ("torch.nn.modules.container", "ModuleDict", "__new__"),
    ],
)
def test_hostile_build_cannot_patch_the_allow_list(edm_fixture, module, name, attr):
    """BUILD on an allow-listed global must not change how later files are read."""
    from ctm_core.io import edm_pickle

    target = edm_pickle._ALLOWED_GLOBALS[(module, name)]
    before = getattr(target, attr, None)
    payload = _build_on_global(module, name, attr)
    pickletools.dis(payload, out=io.StringIO())  # well-formed opcodes
    # classes with __setstate__ get it called unbound (TypeError -> "malformed"); the others refuse the setattr
    with pytest.raises(ValueError, match=f"tried to set attribute {attr!r}|malformed.*__setstate__"):
        read_edm_snapshot(payload)
    assert getattr(target, attr, None) is before or getattr(target, attr, None) == before
    snap = read_edm_snapshot(edm_fixture("tiny-cond-adm")[0])  # still reads normally
    assert len(snap.state_dict) > 0


def test_loader_never_imports_edm_packages(edm_fixture):
    for name in FIXTURES:
        read_edm_snapshot(edm_fixture(name)[0])
    _assert_edm_not_imported()
