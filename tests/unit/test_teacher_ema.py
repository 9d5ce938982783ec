"""The EDM teacher's EMA: half-life in images with ramp-up (docs/edm.md#a6-teacher-ema), closed-form values and the
trainer's per-step use of them."""

from __future__ import annotations

import math

import pytest
import torch

from ctm_core.config import TeacherTrainParams
from ctm_core.nets.toy import ToyEDMDenoiser
from ctm_core.training.edm_training import EDMTrainer
from ctm_core.training.ema import edm_ema_beta
from ctm_core.training.loop import TensorDataSource


@pytest.mark.parametrize(
    ("cur_nimg", "batch", "halflife_kimg", "rampup", "expected"),
    [
        (0, 64, 500.0, 0.05, 0.0),  # the first update copies the trained weights
        (6400, 64, 500.0, 0.05, 0.5**0.2),  # step 100: h = min(500 000, 320) = 320 images -> 0.5^(64/320)
        (76_736, 64, 500.0, 0.05, 0.5 ** (64 / 3836.8)),  # last step of 1 200: h = 3 836.8 images
        (20_000_000, 512, 500.0, 0.05, 0.5 ** (512 / 500_000)),  # past the ramp-up: h = 500 kimg (EDM CIFAR-10)
        (0, 64, 500.0, None, 0.5 ** (64 / 500_000)),  # no ramp-up: the plain half-life from the start
        (1000, 10, 0.01, None, 0.5),  # h = 10 images = batch: one half per step
    ],
)
def test_edm_ema_beta_closed_form(cur_nimg, batch, halflife_kimg, rampup, expected):
    assert edm_ema_beta(cur_nimg, batch, halflife_kimg, rampup) == pytest.approx(expected, rel=1e-12, abs=0.0)


def test_rampup_beta_depends_on_steps_not_batch():
    """During the ramp-up β after n steps is 0.5^(1/(0.05·n)) for every batch size."""
    for batch in (8, 64, 512):
        assert edm_ema_beta(200 * batch, batch, 1e9, 0.05) == pytest.approx(0.5 ** (1 / 10), rel=1e-12)


@pytest.mark.parametrize("bad", [dict(batch=0), dict(cur_nimg=-1), dict(halflife_kimg=0.0), dict(rampup_ratio=0.0)])
def test_edm_ema_beta_rejects_bad_arguments(bad):
    args = dict(cur_nimg=0, batch=4, halflife_kimg=1.0, rampup_ratio=0.05) | bad
    with pytest.raises(ValueError, match="edm_ema_beta"):
        edm_ema_beta(**args)


def test_config_rejects_nonpositive_halflife():
    with pytest.raises(ValueError, match="ema_halflife_kimg"):
        TeacherTrainParams(ema_halflife_kimg=0)


def test_trainer_ema_follows_the_schedule():
    """Replay the online weights after each step through θ_ema ← β_k·θ_ema + (1 − β_k)·θ_k with the closed-form β_k
    (cur_nimg = k·batch): the trainer's EMA must match; after the first step it equals the online weights. Steps 1-4
    are in the ramp-up (h = 0.5·k·8 < 20 images), steps 5-7 at the full half-life of 20 images."""
    torch.manual_seed(0)
    batch, steps = 8, 8
    cfg = TeacherTrainParams(batch=batch, lr_warmup_steps=0, lr=1e-2, ema_halflife_kimg=0.02, ema_rampup_ratio=0.5)
    net = ToyEDMDenoiser((2,), hidden=8, depth=1, emb_channels=4)
    data = TensorDataSource(torch.randn(32, 2, generator=torch.Generator().manual_seed(1)), batch_size=batch, seed=0)
    trainer = EDMTrainer(cfg, net, data, progress=False)
    expected = None
    for k in range(steps):
        trainer.train_step()
        online = [p.detach().clone().double() for p in trainer.model.parameters()]
        h = min(20.0, 0.5 * k * batch)  # half-life in images: 0.02 kimg, ramp-up 0.5·cur_nimg
        beta = 0.5 ** (batch / max(h, 1e-8))
        expected = online if expected is None else [beta * e + (1 - beta) * o for e, o in zip(expected, online)]
        got = [p.detach().double() for p in trainer.ema_model().parameters()]
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        if k == 0:
            assert all(torch.equal(g.float(), o.float()) for g, o in zip(got, online))
    assert math.isclose(beta, 0.5 ** (batch / 20.0))  # the last steps ran at the full half-life
