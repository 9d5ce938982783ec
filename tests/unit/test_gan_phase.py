"""The two-phase recipe in the trainer: CTM+DSM, then the GAN phase continued from its state (docs/gan.md)."""

from __future__ import annotations

import threading

import pytest
import torch

from ctm_core.config import DistillParams, ParamsError, gan_phases, with_changes
from ctm_core.gan.objective import build_discriminator, make_d_optimizer
from ctm_core.nets.toy import ToyCTMStudent, ToyEDMDenoiser
from ctm_core.training.trainer import CTMTrainer, TensorDataSource
from tests.unit.test_trainer import assert_state_equal

SHAPE = (3, 8, 8)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def section(**gan) -> DistillParams:
    """A distill section with the GAN phase on: 4 CTM+DSM steps at K 5, then 4 GAN steps at K 3, batch 8."""
    gan = {"enabled": True, "steps": 4, "scratch_channels": 8, "changes": {"K": 3, "batch": 8, "lr": 5e-4}, **gan}
    return DistillParams(
        N=8, K=5, batch=4, microbatch=2, steps=4, target_ema=0.9, eval_emas=[0.9], seed=3, gan=gan, checkpoint_every=2
    )


def make(cfg: DistillParams, *, rank: int = 0, world: int = 1, **kw) -> CTMTrainer:
    torch.manual_seed(0)
    teacher = ToyEDMDenoiser(SHAPE, hidden=16, depth=1, emb_channels=8)
    student = ToyCTMStudent.from_teacher(teacher)
    images = torch.rand(24, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    data = TensorDataSource(images, batch_size=cfg.batch // world, seed=cfg.seed)
    d = d_opt = None
    if cfg.gan.enabled:
        d = build_discriminator(
            "scratch", img_resolution=8, channels=8, max_channels=16, generator=torch.Generator().manual_seed(2)
        )
        d_opt = make_d_optimizer(d, lr=cfg.gan.d_lr)
    return CTMTrainer(
        cfg,
        student,
        teacher,
        data,
        discriminator=d,
        d_optimizer=d_opt,
        rank=rank,
        world_size=world,
        progress=False,
        **kw,
    )


def test_phases_of_the_section():
    d = section()
    phase1, phase2 = gan_phases(d)
    assert not phase1.gan.enabled and phase1.K == 5 and phase1.steps == 4 and phase1.batch == 4
    assert phase1 == gan_phases(with_changes(d, {"gan.d_lr": 1e-3}))[0], "phase 1 does not depend on gan settings"
    assert phase2.gan.enabled and (phase2.K, phase2.batch, phase2.lr, phase2.steps) == (3, 8, 5e-4, 8)
    assert gan_phases(with_changes(d, {"gan.enabled": False}))[1] is None


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"seed": 1}, "distill.gan.changes.seed"),
        ({"eval_emas": [0.5]}, "distill.gan.changes.eval_emas"),
        ({"K": 8}, "distill.gan.changes.K"),  # an invalid phase-2 section (K < N = 8) names the change
    ],
)
def test_fixed_keys_and_cm_mode_refused(changes, key):
    with pytest.raises(ParamsError) as info:
        with_changes(section(), {"gan.changes": changes})
    assert info.value.key == key
    with pytest.raises(ParamsError, match="GAN phase is a CTM feature"):
        with_changes(section(), {"mode": "cm"})


def test_continuation_carries_phase_one_and_resumes_bitwise(tmp_path):
    """Phase 2 starts from phase 1's weights, target θ⁻, EMAs, optimizer moments, step and data position, with a
    fresh discriminator and the changed K/batch/lr; an interrupted and resumed phase 2 equals an uninterrupted one."""
    phase1_cfg, phase2_cfg = gan_phases(section())
    p1 = make(phase1_cfg)
    p1.train(checkpoint_path=tmp_path / "p1.pt")
    end1 = p1.state_dict()
    assert end1["discriminator"] is None and end1["step"] == 4

    ref = make(phase2_cfg)
    fresh_d = {k: v.clone() for k, v in ref.discriminator.state_dict().items()}
    ref.continue_from(end1)
    assert ref.step == 4 and ref.data.position == p1.data.position
    assert_state_equal(end1["model"], ref.model.state_dict())
    assert_state_equal(end1["target"], ref.target.state_dict())
    assert_state_equal(end1["emas"], ref.emas.state_dict())
    assert_state_equal(end1["optimizer"]["state"], ref.optimizer.state_dict()["state"])
    assert_state_equal(fresh_d, ref.discriminator.state_dict())
    m = ref.train_step()  # step 4 (even): a G step with the GAN term, at the phase-2 K ≤ 3
    assert "lambda_gan" in m and 1 <= m["k"].item() <= 3 and m["lr"].item() == pytest.approx(5e-4)
    assert set(ref.train_step()) == {"loss_gan_d", "k"}  # step 5: D only
    ref.train()
    assert ref.step == 8

    a = make(phase2_cfg)
    a.continue_from(load(tmp_path / "p1.pt"))
    a.train(2, checkpoint_path=tmp_path / "p2.pt")
    b = make(phase2_cfg)
    b.load_checkpoint(tmp_path / "p2.pt")
    b.train()
    assert_state_equal(ref.state_dict(), b.state_dict())

    # The loss fields may differ in a continuation, not in a resume; a GAN checkpoint is not continued again.
    with pytest.raises(ValueError, match="loss is defined differently"):
        make(with_changes(phase2_cfg, {"K": 4})).load_checkpoint(tmp_path / "p2.pt")
    with pytest.raises(ValueError, match="without a discriminator"):
        make(phase2_cfg).continue_from(load(tmp_path / "p2.pt"))
    with pytest.raises(ValueError, match="continue_from"):
        make(phase2_cfg).load_checkpoint(tmp_path / "p1.pt")
    with pytest.raises(ValueError, match="seed"):
        make(with_changes(phase2_cfg, {"seed": 4})).continue_from(load(tmp_path / "p1.pt"))


def load(path):
    from ctm_core.training.loop import load_checkpoint_file

    return load_checkpoint_file(path)


def test_gan_phase_two_ranks_make_the_same_update_as_one_process():
    """W=2 (threads + summing syncs for G and D gradients) == W=1 through a G step and a D step of phase 2."""
    phase1_cfg, phase2_cfg = gan_phases(section())
    p1 = make(phase1_cfg)
    p1.train()
    end1 = p1.state_dict()
    single = make(phase2_cfg)
    single.continue_from(end1)
    for _ in range(3):
        single.train_step()

    barrier = threading.Barrier(2)
    box: dict[tuple[str, int], list[torch.Tensor] | dict] = {}

    def grad_sync_for(rank):
        def sync(params):
            box["g", rank] = [p.grad.clone() for p in params]
            barrier.wait()
            for p, other in zip(params, box["g", 1 - rank]):
                p.grad += other
            barrier.wait()

        return sync

    def metric_sync_for(rank):
        def sync(m):
            box["m", rank] = {k: v.clone() for k, v in m.items()}
            barrier.wait()
            out = {k: v + box["m", 1 - rank][k] for k, v in m.items()}
            barrier.wait()
            return out

        return sync

    ranks = [
        make(phase2_cfg, rank=r, world=2, grad_sync=grad_sync_for(r), metric_sync=metric_sync_for(r)) for r in (0, 1)
    ]
    for r in ranks:
        r.continue_from(end1 | {"data": end1["data"]})

    def run(r):
        for _ in range(3):
            ranks[r].train_step()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in ranks:
        for name, p in single.model.named_parameters():
            torch.testing.assert_close(dict(r.model.named_parameters())[name], p, rtol=1e-5, atol=1e-6)
        for name, p in single.discriminator.named_parameters():
            torch.testing.assert_close(dict(r.discriminator.named_parameters())[name], p, rtol=1e-5, atol=1e-6)
