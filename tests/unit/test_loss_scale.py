"""The fp16 dynamic loss scale (ctm_core/training/loss_scale.py, docs/presets.md#mixed-precision): exact undoing of
a power-of-two scale, the official growth/backoff, skipped steps on overflow, bitwise resume, automatic on fp16."""

from __future__ import annotations

import pytest
import torch

from ctm_core.config import DistillParams
from ctm_core.nets.toy import ToyCTMStudent, ToyEDMDenoiser
from ctm_core.training.loss_scale import INITIAL_LOG2_SCALE, DynamicLossScale
from ctm_core.training.trainer import CTMTrainer, TensorDataSource


def make(loss_scale=None, device="cpu", use_fp16=False) -> CTMTrainer:
    c = DistillParams(N=8, K=3, lr=1e-3, target_ema=0.9, eval_emas=[0.9], batch=8, microbatch=4, seed=2)
    torch.manual_seed(0)
    teacher = ToyEDMDenoiser((1, 4, 4), hidden=16, depth=1, emb_channels=8)
    student = ToyCTMStudent.from_teacher(teacher)
    if use_fp16:
        student.use_fp16 = True
    data = torch.randn(24, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    return CTMTrainer(
        c, student, teacher, TensorDataSource(data, batch_size=8, seed=2), device=device, loss_scale=loss_scale,
        progress=False,
    )  # fmt: skip


def _weights(tr: CTMTrainer) -> dict[str, torch.Tensor]:
    return {**tr.model.state_dict(), **{f"target.{k}": v for k, v in tr.target.state_dict().items()}}


def test_official_growth_backoff_and_power_of_two_scale():
    ls = DynamicLossScale()
    assert ls.log2_scale == INITIAL_LOG2_SCALE == 20.0 and ls.scale == 2.0**20
    for _ in range(999):
        ls.update(True)
    assert ls.log2_scale == pytest.approx(20.999) and ls.scale == 2.0**20  # floor: still 2^20
    ls.update(True)
    ls.update(True)
    assert ls.scale == 2.0**21
    ls.update(False)
    assert ls.log2_scale == pytest.approx(20.001) and ls.scale == 2.0**20


def test_scaled_fp32_training_is_bitwise_the_unscaled_one():
    plain, scaled = make(), make(DynamicLossScale())
    for _ in range(3):
        plain.train_step()
        m = scaled.train_step()
    assert float(m["log2_loss_scale"]) == pytest.approx(20.003)
    for k, v in _weights(plain).items():
        assert torch.equal(v, _weights(scaled)[k]), k


def test_overflow_skips_the_step_and_halves_the_scale():
    tr = make(DynamicLossScale(200.0))  # 2^200 overflows fp32: every gradient becomes inf
    before = {k: v.clone() for k, v in _weights(tr).items()}
    emas = {k: v.clone() for k, v in tr.emas.state_dict().items()}
    tr.train_step()
    assert tr.step == 1 and tr.loss_scale.log2_scale == 199.0
    assert all(torch.equal(v, before[k]) for k, v in _weights(tr).items())  # no update, target untouched
    assert all(torch.equal(v, emas[k]) for k, v in tr.emas.state_dict().items())
    assert not tr.optimizer.state  # the optimizer never stepped
    assert all(p.grad is None for p in tr.model.parameters())


def test_resume_carries_the_scale_bitwise(tmp_path):
    ref = make(DynamicLossScale(130.5))  # 2^130, 2^129, 2^128 overflow (skipped), then steps at 2^127
    ref.train(5)
    first = make(DynamicLossScale(130.5))
    first.train(2, checkpoint_path=tmp_path / "c.pt")
    resumed = make(DynamicLossScale())
    resumed.load_checkpoint(tmp_path / "c.pt")
    assert resumed.loss_scale.log2_scale == first.loss_scale.log2_scale
    resumed.train(3)
    assert resumed.loss_scale.log2_scale == ref.loss_scale.log2_scale
    for k, v in _weights(ref).items():
        assert torch.equal(v, _weights(resumed)[k]), k


def test_automatic_only_for_fp16_on_cuda():
    assert make().loss_scale is None
    assert make(use_fp16=True).loss_scale is None  # fp16 activations apply on CUDA only
    if torch.cuda.is_available():
        tr = make(device="cuda", use_fp16=True)
        assert isinstance(tr.loss_scale, DynamicLossScale) and tr.loss_scale.log2_scale == 20.0
        tr.train(2)
        assert all(torch.isfinite(p).all() for p in tr.model.parameters())
