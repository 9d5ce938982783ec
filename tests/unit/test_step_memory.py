"""The training step's memory: frozen-weight convolutions keep no input, and benchmarks/step_memory_cpu.py at a tiny
size (each arrangement less memory than the previous, all the same update)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ctm_core.nets.layers as layers

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "step_memory_cpu.py"


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _saved_bytes(fn, *args) -> tuple[torch.Tensor, int]:
    """(output, bytes of the tensors autograd saves while running fn(*args))."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, total


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding=1),
        dict(stride=2, padding=1, groups=4),
        dict(stride=2, padding=0, groups=4, transposed=True),
    ],
)
def test_frozen_weight_conv_same_values_no_saved_input(kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    groups = kwargs.get("groups", 1)
    shape = (4, 4 // groups, 3, 3) if not kwargs.get("transposed") else (4, 1, 2, 2)
    w = torch.randn(*shape, generator=g)  # frozen: requires_grad=False
    b = torch.randn(4, generator=g)
    for bias in (None, b):
        y_new, saved_new = _saved_bytes(lambda x: layers._conv(x, w, bias, **kwargs), x)
        fn = F.conv_transpose2d if kwargs.get("transposed") else F.conv2d
        plain = {k: v for k, v in kwargs.items() if k != "transposed"}
        y_ref, saved_ref = _saved_bytes(lambda x: fn(x, w, bias, **plain), x)
        assert torch.equal(y_new, y_ref)
        grad = torch.randn(y_ref.shape, generator=g)
        (gx_new,) = torch.autograd.grad(y_new, x, grad)
        (gx_ref,) = torch.autograd.grad(y_ref, x, grad)
        assert torch.equal(gx_new, gx_ref)
        assert saved_new == w.numel() * 4 and saved_ref >= saved_new + x.numel() * 4


def test_conv_with_trained_weight_is_the_plain_conv():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    y = layers._conv(x, w, padding=1)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"


def test_step_memory_benchmark_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("step_memory_cpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "mem.json"
    rc = mod.main(["--channels", "16", "--resolution", "16", "--batch", "4", "--threads", "1", "--json", str(out)])
    assert rc == 0
    import json

    res = json.loads(out.read_text())
    assert all(res["same_update"].values()), res["same_update"]
    mib = [res["arrangements"][name]["peak_mib_per_img"] for name in mod.ARRANGEMENTS]
    assert all(m > 0 for m in mib)
    assert mib[1] < mib[0] and mib[2] < mib[1] and mib[3] < mib[2], mib
    assert layers._conv is mod._REAL_CONV  # the benchmark restores the convolution it swaps
