"""distill.random_flip: each image of the global batch mirrored with p = 1/2 by a draw keyed by (seed, step, index),
so a resumed run is bitwise the uninterrupted one and every rank trains on the same flipped global batch."""

from __future__ import annotations

import pytest
import torch

from ctm_core.config import DistillParams, load_config
from ctm_core.nets.toy import ToyCTMStudent, ToyEDMDenoiser
from ctm_core.training.loop import derive_seed, random_hflip
from ctm_core.training.trainer import CTMTrainer, TensorDataSource

SHAPE = (1, 4, 4)  # (C, H, W): small images, so a left-right mirror is a real change


def cfg(**changes) -> DistillParams:
    base = dict(N=10, K=4, lr=1e-3, target_ema=0.9, eval_emas=[0.9], batch=8, microbatch=4, seed=3, random_flip=True)
    return DistillParams(**{**base, **changes})


def make(c: DistillParams, *, rank: int = 0, world: int = 1) -> CTMTrainer:
    torch.manual_seed(0)
    teacher = ToyEDMDenoiser(SHAPE, hidden=16, depth=1, emb_channels=8)
    student = ToyCTMStudent.from_teacher(teacher)
    data = torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(1))
    source = TensorDataSource(data, batch_size=c.batch // world, seed=c.seed)
    return CTMTrainer(c, student, teacher, source, rank=rank, world_size=world, progress=False)


def test_random_hflip_mirrors_exactly_the_drawn_images():
    x = torch.arange(2 * 8 * 1 * 2 * 3, dtype=torch.float32).reshape(16, 1, 2, 3)
    out = random_hflip(x, torch.Generator().manual_seed(7))
    draws = torch.rand(16, generator=torch.Generator().manual_seed(7))
    for b in range(16):
        expected = x[b].flip(-1) if draws[b] < 0.5 else x[b]
        assert torch.equal(out[b], expected), b
    assert 0 < int((draws < 0.5).sum()) < 16  # both cases occur
    # Image b's flip depends on the key and b only, not on the batch after it.
    assert torch.equal(random_hflip(x[:5], torch.Generator().manual_seed(7)), out[:5])


def test_flip_key_is_seed_step_and_index():
    tr = make(cfg())
    x, _ = tr._global_batch()
    tr.step = 4
    got = tr.augment_batch(x)
    draws = torch.rand(8, generator=torch.Generator().manual_seed(derive_seed(3, 0, "flip", 4)))
    assert torch.equal(got, torch.where((draws < 0.5).view(-1, 1, 1, 1), x.flip(-1), x))
    tr.step = 5
    assert not torch.equal(tr.augment_batch(x), got)  # another step, other draws
    assert torch.equal(make(cfg(random_flip=False)).augment_batch(x), x)  # off: untouched


def test_every_rank_flips_the_global_batch_like_one_process():
    single = make(cfg())
    ranks = [make(cfg(), rank=r, world=2) for r in range(2)]
    for step in range(3):
        x1 = single.augment_batch(single._global_batch()[0])
        for tr in ranks:
            assert torch.equal(tr.augment_batch(tr._global_batch()[0]), x1), step
        for tr in (single, *ranks):
            tr.step += 1


def test_resume_with_flips_is_bitwise_and_flips_change_training(tmp_path):
    ckpt = tmp_path / "c.pt"
    ref = make(cfg())
    ref.train(6)
    first = make(cfg())
    first.train(3, checkpoint_path=ckpt)
    resumed = make(cfg())
    resumed.load_checkpoint(ckpt)
    resumed.train(3)
    for k, v in ref.state_dict()["model"].items():
        assert torch.equal(v, resumed.state_dict()["model"][k]), k
    unflipped = make(cfg(random_flip=False))
    unflipped.train(6)
    assert any(not torch.equal(v, unflipped.model.state_dict()[k]) for k, v in ref.model.state_dict().items())


@pytest.mark.parametrize("name", ["params.yaml"])
def test_digits_default_keeps_flips_off(name):
    from pathlib import Path

    assert load_config(Path(__file__).resolve().parents[2] / name).distill.random_flip is False
