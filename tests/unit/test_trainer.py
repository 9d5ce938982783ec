"""Trainer, checkpoints, EMA, config validation and the EDM teacher loss."""

from __future__ import annotations

import pytest
import torch

import ctm_core.training.trainer as trainer_mod
from ctm_core.config import DistillParams, ParamsError, TeacherTrainParams, with_changes
from ctm_core.diffusion.gaussian import GaussianData
from ctm_core.nets.toy import ToyCTMStudent, ToyEDMDenoiser
from ctm_core.training.edm_training import EDMTrainer, edm_loss, edm_sigmas
from ctm_core.training.ema import EMABank, frozen_copy, update_ema_
from ctm_core.training.loop import Trainer
from ctm_core.training.trainer import CTMTrainer, TensorDataSource, atomic_torch_save, load_checkpoint_file

DIM = 3


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def small_cfg(**changes) -> DistillParams:
    """The distill section of a small run: the trainer reads the params.yaml names."""
    base = dict(N=10, K=6, lr=1e-3, lr_warmup_steps=3, target_ema=0.9, eval_emas=[0.9, 0.99], batch=16, microbatch=8)
    return DistillParams(**{**base, "seed": 5, **changes})


def make_ctm_trainer(cfg=None, trainer_cls=CTMTrainer, **kwargs) -> CTMTrainer:
    torch.manual_seed(0)
    teacher = ToyEDMDenoiser((DIM,), hidden=16, depth=1, emb_channels=8)
    student = ToyCTMStudent.from_teacher(teacher, dropout=0.2)  # dropout: exercises the carried global RNG
    data = torch.randn(40, DIM, generator=torch.Generator().manual_seed(1)) * 0.5
    cfg = cfg or small_cfg()
    source = TensorDataSource(data, batch_size=cfg.batch, seed=cfg.seed)
    return trainer_cls(cfg, student, teacher, source, progress=False, **kwargs)


def assert_state_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# ------------------------------------------------------------------------------------------------- resume / save


def test_resume_is_bitwise_identical(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ref = make_ctm_trainer()
    ref.train(8)

    first = make_ctm_trainer()
    first.train(4, checkpoint_path=ckpt)
    del first
    resumed = make_ctm_trainer()
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 4
    resumed.train(4)
    assert_state_equal(ref.state_dict(), resumed.state_dict())
    # and the run really moved: weights differ from the initial ones
    fresh = make_ctm_trainer()
    assert not torch.equal(fresh.model.model.out.weight, ref.model.model.out.weight)


def test_trainer_leaves_global_rng_alone_and_is_seeded():
    tr = make_ctm_trainer()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    tr.train(2)
    assert torch.equal(state, torch.get_rng_state())
    other_seed = make_ctm_trainer(small_cfg(seed=6))
    other_seed.train(2)
    same_seed = make_ctm_trainer()
    same_seed.train(2)
    assert_state_equal(tr.state_dict()["model"], same_seed.state_dict()["model"])
    assert not torch.equal(tr.model.model.out.weight, other_seed.model.model.out.weight)


def test_checkpoint_loads_with_weights_only_and_has_everything(tmp_path):
    tr = make_ctm_trainer()
    tr.train(2)
    path = tmp_path / "c.pt"
    tr.save_checkpoint(path)
    state = torch.load(path, weights_only=True)
    for key in ("model", "target", "emas", "optimizer", "discriminator", "rng", "data", "step", "config"):
        assert key in state
    assert state["step"] == 2 and state["data"] == {"epoch": 0, "index": 32}
    assert DistillParams.model_validate(state["config"]) == tr.config  # the section itself, as plain data
    assert state["rng"]["seed"] == 5  # all randomness is keyed by (seed, step, microbatch)
    with pytest.raises(ValueError, match="kind"):
        tr.load_state_dict(dict(state, kind="edm"))
    other = make_ctm_trainer(small_cfg(K=5))  # a loss-defining field differs: refused, one line
    with pytest.raises(ValueError, match=r"^checkpoint config: the loss is defined differently \(K 6 -> 5;") as info:
        other.load_state_dict(state)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="seed"):
        make_ctm_trainer(small_cfg(seed=6)).load_state_dict(state)
    # Optimizer, EMA and batch settings may change on a resume (e.g. a later phase with another lr).
    later = make_ctm_trainer(small_cfg(lr=2e-4, batch=8, microbatch=4))
    later.load_state_dict(state)
    assert later.step == 2 and later.current_lr() == pytest.approx(2e-4)


def test_interrupted_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    tr = make_ctm_trainer()
    tr.train(2, checkpoint_path=path)
    good = path.read_bytes()
    tr.train(1)

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(100)  # a partial file ...
        raise OSError("disk full (simulated)")  # ... and a crash

    monkeypatch.setattr(trainer_mod.torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        tr.save_checkpoint(path)
    monkeypatch.setattr(trainer_mod.torch, "save", real_save)
    assert path.read_bytes() == good
    assert load_checkpoint_file(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"], "the temp file must be cleaned up"


def test_atomic_save_replaces(tmp_path):
    path = tmp_path / "x.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)
    atomic_torch_save({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    with pytest.raises(ValueError, match="format"):
        load_checkpoint_file(path)


# ------------------------------------------------------------------------------------------------- loop semantics


def test_one_k_per_iteration_shared_by_microbatches(monkeypatch):
    seen = []
    real = trainer_mod.ctm_dsm_backward

    def spy(*args, **kwargs):
        seen.append(args[4])  # k
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "ctm_dsm_backward", spy)
    tr = make_ctm_trainer()
    ks = []
    for _ in range(6):
        seen.clear()
        metrics = tr.train_step()
        assert len(seen) == 2 and seen[0] == seen[1]  # 16 / 8 = 2 microbatches, same k
        assert metrics["k"].item() == seen[0]
        ks.append(seen[0])
    assert len(set(ks)) > 1


def test_lr_warmup_target_and_ema_updates():
    tr = make_ctm_trainer()
    assert abs(tr.current_lr() - 1e-3 / 3) < 1e-12  # linear warm-up over 3 steps
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    target_before = {k: v.clone() for k, v in tr.target.state_dict().items()}
    m = tr.train_step()
    assert abs(m["lr"].item() - 1e-3 / 3) < 1e-9
    after = tr.model.state_dict()
    for name, t_old in target_before.items():
        expected = t_old + (1 - 0.9) * (after[name] - t_old)  # θ⁻ ← μθ⁻ + (1−μ)θ with θ the updated weights
        torch.testing.assert_close(tr.target.state_dict()[name], expected, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in tr.target.parameters())
    assert tr.target.training  # the target stays in train mode (docs/ctm.md#28-ema-and-optimiser)


def test_update_ema_and_bank():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema = frozen_copy(a)
    old = [p.clone() for p in ema.parameters()]
    update_ema_(ema, b, 0.75)
    for e, o, p in zip(ema.parameters(), old, b.parameters()):
        torch.testing.assert_close(e, 0.75 * o + 0.25 * p)
    with pytest.raises(ValueError, match="rate"):
        update_ema_(ema, b, 1.0)
    bank = EMABank(a, (0.5, 0.9))
    bank.update(b)
    torch.testing.assert_close(bank[0.5].weight, 0.5 * a.weight + 0.5 * b.weight)
    torch.testing.assert_close(bank[0.9].weight, 0.9 * a.weight + 0.1 * b.weight)


def test_data_source_position_and_epochs():
    data = torch.arange(10.0)[:, None]
    src = TensorDataSource(data, batch_size=4, seed=3)
    seen = torch.cat([src.next_batch()[0] for _ in range(5)])  # 20 samples = 2 epochs
    assert src.position == (2, 0)
    assert sorted(seen[:10, 0].tolist()) == list(range(10)) and sorted(seen[10:, 0].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])  # a new permutation per epoch
    src2 = TensorDataSource(data, batch_size=4, seed=3)
    src2.next_batch()
    state = src2.state_dict()
    x_next = src2.next_batch()[0]
    src3 = TensorDataSource(data, batch_size=4, seed=3)
    src3.load_state_dict(state)
    assert torch.equal(src3.next_batch()[0], x_next)
    other_rank = TensorDataSource(data, batch_size=4, seed=3, rank=1)
    assert not torch.equal(other_rank.next_batch()[0], TensorDataSource(data, batch_size=4, seed=3).next_batch()[0])


# ------------------------------------------------------------------------------------------------- EDM teacher


def test_edm_loss_closed_form_and_trainer_resume(tmp_path):
    # With the exact Gaussian denoiser, E_n[loss] = λ(σ)·tr(Σ − Σ(Σ+σ²)⁻¹Σ)/d = λ(σ)·mean(σ²λ_i/(λ_i+σ²)).
    data = GaussianData(torch.zeros(2), torch.diag(torch.tensor([0.2, 0.05])))
    x0 = data.sample(20000, torch.Generator().manual_seed(0))
    loss = edm_loss(data.denoiser, x0, torch.Generator().manual_seed(1), sigma_data=0.5)
    sigma = edm_sigmas(20000, torch.Generator().manual_seed(1), dtype=torch.float64)
    lam_i = data.lam
    s2 = sigma[:, None] ** 2
    expected = (sigma**2 + 0.25) / (sigma * 0.5) ** 2 * (s2 * lam_i / (lam_i + s2)).mean(1)
    assert abs(loss.mean().item() / expected.mean().item() - 1) < 0.03
    assert abs(sigma.log().mean().item() + 1.2) < 0.03 and abs(sigma.log().std().item() - 1.2) < 0.03

    def make():
        torch.manual_seed(0)
        cfg = TeacherTrainParams(batch=16, lr_warmup_steps=0, ema_halflife_kimg=0.1, log_every=2)
        net = ToyEDMDenoiser((2,), hidden=16, depth=1, emb_channels=8)
        return EDMTrainer(cfg, net, TensorDataSource(x0[:64].float(), batch_size=16, seed=0), progress=False)

    ref = make()
    losses = []
    ref.metrics_callback = lambda step, m: losses.append(m["loss_edm"])
    ref.train(6)
    assert len(losses) == 3 and all(v > 0 for v in losses)
    a = make()
    a.train(3, checkpoint_path=tmp_path / "edm.pt")
    b = make()
    b.load_checkpoint(tmp_path / "edm.pt")
    b.train(3)
    assert_state_equal(ref.state_dict(), b.state_dict())
    assert isinstance(ref.optimizer, torch.optim.Adam)


def test_metrics_callback_and_radam():
    got = []
    tr = make_ctm_trainer(small_cfg(log_every=2), metrics_callback=lambda s, m: got.append((s, m)))
    tr.train(4)
    assert [s for s, _ in got] == [2, 4]
    assert {"loss", "loss_ctm", "loss_dsm", "lambda_dsm", "lr", "k"} <= set(got[0][1])
    assert all(isinstance(v, float) for v in got[0][1].values())
    assert isinstance(tr.optimizer, torch.optim.RAdam)


# ------------------------------------------------------------------------------------------------- config validation


def test_optimizer_and_batch_follow_the_config():
    """RAdam for distillation and Adam for the teacher (betas (0.9, 0.999), eps 1e-8, no decay: the official
    settings); `batch` is the global batch, each rank draws batch // world_size."""
    tr = make_ctm_trainer()
    assert isinstance(tr.optimizer, torch.optim.RAdam)
    group = tr.optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.0)
    assert isinstance(make_ctm_trainer(small_cfg(optimizer="adam")).optimizer, torch.optim.Adam)
    teacher = EDMTrainer(TeacherTrainParams(), ToyEDMDenoiser((DIM,)), None, progress=False)
    assert isinstance(teacher.optimizer, torch.optim.Adam) and teacher.microbatch == 64  # null = whole batch
    # one EMA slot whose rate follows EDM's half-life schedule: a copy at the first update (ramp-up from 0 images)
    assert teacher.emas.rates == (EDMTrainer.EMA_KEY,) and teacher.ema_beta() == 0.0
    two = CTMTrainer(small_cfg(), ToyCTMStudent((DIM,)), None, None, rank=1, world_size=2, progress=False)
    assert (two.batch_per_rank, list(two.my_microbatches())) == (8, [1])
    with pytest.raises(ValueError, match=r"^batch: expected a multiple of world_size × microbatch \(4 × 8 = 32\)"):
        CTMTrainer(small_cfg(), ToyCTMStudent((DIM,)), None, None, rank=0, world_size=4)


@pytest.mark.parametrize(
    "key,value,error_key",
    [
        ("sigma_min", 80.0, "sigma_min"),
        ("sigma_min", -1.0, "sigma_min"),
        ("sigma_max", 0.001, "sigma_min"),  # sigma_min < sigma_max, reported at sigma_min
        ("K", 18, "K"),
        ("K", 0, "K"),
        ("N", 1, "N"),
        ("rho", 0, "rho"),
        ("distance", "l1", "distance"),
        ("mode", "ct", "mode"),
        ("dsm_weight", -0.5, "dsm_weight"),
        ("ctm_weight", -0.5, "ctm_weight"),
        ("diffusion_mult", 1.5, "diffusion_mult"),
        ("P_std", 0.0, "P_std"),
        ("lr", -1e-4, "lr"),
        ("lr", 0.0, "lr"),
        ("optimizer", "sgd", "optimizer"),
        ("lr_warmup_steps", -1, "lr_warmup_steps"),
        ("grad_clip_norm", -1.0, "grad_clip_norm"),
        ("target_ema", 1.0, "target_ema"),
        ("target_ema", -0.1, "target_ema"),
        ("eval_emas", [0.999, 1.0], "eval_emas[1]"),
        ("microbatch", 10, "microbatch"),
        ("batch", 0, "batch"),
        ("precision", "fp16", "precision"),
        ("seed", -1, "seed"),
        ("compile", "yes", "compile"),
        ("steps", 1.5, "steps"),
        ("gan.g_learning_period", 1, "gan.g_learning_period"),
        ("lambda_dsm", 1.0, "lambda_dsm"),  # unknown key
    ],
)
def test_invalid_values_name_the_key(key, value, error_key):
    with pytest.raises(ParamsError) as info:
        with_changes(small_cfg(), {key: value})
    assert info.value.key == f"distill.{error_key}", str(info.value)
    assert "\n" not in str(info.value)


def test_edm_config_and_trainer_type_checks():
    with pytest.raises(ParamsError, match=r"^teacher\.train\.P_std: must be > 0"):
        with_changes(TeacherTrainParams(), {"P_std": -1})
    with pytest.raises(ValueError, match="lpips"):
        make_ctm_trainer(small_cfg(distance="lpips"))
    with pytest.raises(TypeError, match="DistillParams"):
        CTMTrainer(TeacherTrainParams(), ToyCTMStudent((2,)), None, None)
    with pytest.raises(TypeError, match="TeacherTrainParams"):
        EDMTrainer(small_cfg(), ToyEDMDenoiser((2,)), None)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMTrainer(TeacherTrainParams(sigma_data=1.0), ToyEDMDenoiser((2,)), None)


# ------------------------------------------------------------------------------------------------- real networks


def test_edm_then_ctm_with_real_precond_and_student(tmp_path):
    """EDMPrecond teacher trained a step, exported via teacher_format, reloaded, distilled into a CTMStudent."""
    from ctm_core.io.teacher_format import load_edm_checkpoint
    from ctm_core.nets.precond import EDMPrecond
    from ctm_core.nets.student import CTMStudent
    from ctm_core.training.edm_training import export_teacher

    torch.manual_seed(0)
    arch = dict(
        model_type="SongUNet", model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0
    )
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    edm_cfg = TeacherTrainParams(batch=4, microbatch=2, ema_halflife_kimg=0.1)
    edm = EDMTrainer(edm_cfg, EDMPrecond(8, 1, **arch), TensorDataSource(images, batch_size=4, seed=0), progress=False)
    edm.train(2)
    export_teacher(edm.ema_model(), tmp_path / "teacher")
    teacher = load_edm_checkpoint(tmp_path / "teacher")
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 5.0])
    torch.testing.assert_close(teacher(x, sigma), edm.ema_model().eval()(x, sigma))

    student = CTMStudent.from_teacher(teacher)
    cfg = DistillParams(N=6, K=3, batch=4, microbatch=2)
    ctm = CTMTrainer(cfg, student, teacher, TensorDataSource(images, batch_size=4, seed=0), progress=False)
    before = ctm.model.last_layer_weight().detach().clone()
    metrics = ctm.train_step()
    assert all(bool(torch.isfinite(v).all()) for v in metrics.values())
    assert not torch.equal(before, ctm.model.last_layer_weight())
    assert all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------------------------------- GAN phase


def make_gan_trainer():
    from ctm_core.gan.objective import build_discriminator, make_d_optimizer

    torch.manual_seed(0)
    teacher = ToyEDMDenoiser((3, 8, 8), hidden=16, depth=1, emb_channels=8)
    student = ToyCTMStudent.from_teacher(teacher)
    d = build_discriminator(
        "scratch",
        img_resolution=8,
        img_channels=3,
        channels=8,
        max_channels=16,
        generator=torch.Generator().manual_seed(2),
    )
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    cfg = DistillParams(N=8, K=3, gan={"enabled": True}, batch=4, microbatch=2)
    return CTMTrainer(
        cfg,
        student,
        teacher,
        TensorDataSource(images, batch_size=4, seed=0),
        discriminator=d,
        d_optimizer=make_d_optimizer(d, lr=cfg.gan.d_lr),
        progress=False,
    )


def test_gan_phase_alternates_g_and_d_steps(tmp_path):
    tr = make_gan_trainer()
    snap = lambda m: {k: v.clone() for k, v in m.state_dict().items()}  # noqa: E731
    g0, t0, d0, e0 = snap(tr.model), snap(tr.target), snap(tr.discriminator), snap(tr.emas[0.999])
    m = tr.train_step()  # step 0: G step (CTM + DSM + λ_GAN·g_loss), EMA/target updated
    assert 0.01 <= m["lambda_gan"].item() <= 10 and "loss_gan_g" in m
    g1, t1, d1, e1 = snap(tr.model), snap(tr.target), snap(tr.discriminator), snap(tr.emas[0.999])
    assert any(not torch.equal(g0[k], g1[k]) for k in g0)
    assert any(not torch.equal(t0[k], t1[k]) for k in t0) and any(not torch.equal(e0[k], e1[k]) for k in e0)
    d_params = {n for n, _ in tr.discriminator.named_parameters()}
    assert all(torch.equal(d0[k], d1[k]) for k in d_params), "G step must not update D"
    m = tr.train_step()  # step 1: D step only
    assert set(m) == {"loss_gan_d", "k"}
    g2, t2, d2, e2 = snap(tr.model), snap(tr.target), snap(tr.discriminator), snap(tr.emas[0.999])
    assert all(torch.equal(g1[k], g2[k]) for k in g1) and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert all(torch.equal(e1[k], e2[k]) for k in e1), "EMAs update only after G steps"
    assert any(not torch.equal(d1[k], d2[k]) for k in d_params)
    assert tr.step == 2

    # resume with the discriminator slot is bitwise identical too
    ref = make_gan_trainer()
    ref.train(4)
    a = make_gan_trainer()
    a.train(2, checkpoint_path=tmp_path / "gan.pt")
    b = make_gan_trainer()
    b.load_checkpoint(tmp_path / "gan.pt")
    b.train(2)
    assert_state_equal(ref.state_dict(), b.state_dict())
    with pytest.raises(ValueError, match="discriminator"):
        CTMTrainer(ref.config, ToyCTMStudent((3, 8, 8)), ref.teacher, ref.data)


# ------------------------------------------------------------------------------------------------- data parallel


def test_two_ranks_make_the_same_update_as_one_process():
    """world_size=2 (threads + a summing grad_sync) == world_size=1 with the same global batch."""
    import threading

    def make(rank=0, world=1, **kw):
        torch.manual_seed(0)
        teacher = ToyEDMDenoiser((DIM,), hidden=16, depth=1, emb_channels=8)
        student = ToyCTMStudent.from_teacher(teacher)  # no dropout: the threads share the global RNG
        data = torch.randn(40, DIM, generator=torch.Generator().manual_seed(1)) * 0.5
        cfg = small_cfg()  # the global batch: 16 on one process, 8 per rank on two
        return CTMTrainer(
            cfg,
            student,
            teacher,
            TensorDataSource(data, batch_size=16 // world, seed=5),
            rank=rank,
            world_size=world,
            progress=False,
            **kw,
        )

    single = make()
    for _ in range(3):
        single.train_step()

    barrier = threading.Barrier(2)
    grads: dict[int, list[torch.Tensor]] = {}
    metrics: dict[int, dict] = {}

    def grad_sync_for(rank):
        def sync(params):
            grads[rank] = [p.grad.clone() for p in params]
            barrier.wait()
            for p, g_other in zip(params, grads[1 - rank]):
                p.grad += g_other
            barrier.wait()

        return sync

    def metric_sync_for(rank):
        def sync(m):
            metrics[rank] = {k: v.clone() for k, v in m.items()}
            barrier.wait()
            out = {k: v + metrics[1 - rank][k] for k, v in m.items()}
            barrier.wait()
            return out

        return sync

    ranks = [make(r, 2, grad_sync=grad_sync_for(r), metric_sync=metric_sync_for(r)) for r in range(2)]
    assert list(ranks[0].my_microbatches()) == [0] and list(ranks[1].my_microbatches()) == [1]
    results = {}

    def run(r):
        results[r] = [ranks[r].train_step() for _ in range(3)]

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(2):
        for name, p in single.model.named_parameters():
            torch.testing.assert_close(dict(ranks[r].model.named_parameters())[name], p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][-1]["loss"], results[1][-1]["loss"])


def test_gan_phase_with_projected_discriminator_random_features():
    """The official discriminator kind (frozen feature networks + random projections; random weights here, tiny
    widths for CPU) runs G and D steps inside the trainer: D heads learn, frozen backbones stay fixed."""
    from ctm_core.gan.discriminator import OFFICIAL_BACKBONES, ProjectedDiscriminator
    from ctm_core.gan.objective import make_d_optimizer

    deit, effnet = OFFICIAL_BACKBONES
    tiny = {
        deit: dict(
            embed_dim=16, depth=4, num_heads=2, mlp_ratio=2.0, hooks=(0, 1, 2, 3), readout_features=(8, 8, 16, 16)
        ),
        effnet: dict(width_multiplier=0.25),
    }
    torch.manual_seed(0)
    teacher = ToyEDMDenoiser((3, 8, 8), hidden=16, depth=1, emb_channels=8)
    student = ToyCTMStudent.from_teacher(teacher)
    d = ProjectedDiscriminator(
        random_init=True, generator=torch.Generator().manual_seed(4), backbone_kwargs=tiny, cout=4, ndf=8, resize_to=64
    )
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    cfg = DistillParams(N=8, K=3, gan={"enabled": True}, batch=4, microbatch=4)
    tr = CTMTrainer(
        cfg,
        student,
        teacher,
        TensorDataSource(images, batch_size=4, seed=0),
        discriminator=d,
        d_optimizer=make_d_optimizer(d, lr=cfg.gan.d_lr),
        progress=False,
    )
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    frozen = {n for n, p in d.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    before = {k: v.clone() for k, v in d.state_dict().items()}
    g_metrics = tr.train_step()
    d_metrics = tr.train_step()
    assert torch.isfinite(g_metrics["loss_gan_g"]) and torch.isfinite(d_metrics["loss_gan_d"])
    after = d.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in trainable if k in after)
    assert all(torch.equal(before[k], after[k]) for k in frozen)


# ------------------------------------------------------------------------------------------------- staged backward


class OneBackwardTrainer(CTMTrainer):
    """The reference step: one backward of ``ctm_dsm_loss``'s summed total per microbatch, λ_DSM from
    ``autograd.grad(..., retain_graph=True)`` on both terms (the loop's default ``microbatch_backward``)."""

    def microbatch_backward(self, *args, **kwargs):
        return Trainer.microbatch_backward(self, *args, **kwargs)


def _plain_conv(x, w, b=None, *, stride=1, padding=0, groups=1, transposed=False):
    fn = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
    return fn(x, w, b, stride=stride, padding=padding, groups=groups)


def _assert_same_run(make_ref, make_new, steps):
    ref, new = make_ref(), make_new()
    for _ in range(steps):
        m_ref, m_new = ref.train_step(), new.train_step()
        assert set(m_ref) == set(m_new)
        for name in m_ref:
            assert torch.equal(m_ref[name], m_new[name]), name
    # every parameter, the EMA target, the evaluation EMAs and the optimizer state: bitwise
    assert_state_equal(ref.state_dict(), new.state_dict())


@pytest.mark.parametrize("checkpoint_inner", [True, False])
@pytest.mark.parametrize(
    "changes",
    [
        {},  # b/B = 1/2: ‖∇_W L_CTM‖ read at W during the CTM backward
        {"batch": 24, "microbatch": 8},  # b/B = 1/3: its own pass
        {"ctm_weight": 0.7, "dsm_weight": 0.3},
        {"distance": "pseudo_huber", "batch": 24, "microbatch": 8, "ctm_weight": 1.3},
        {"mode": "cm"},
        {"dsm_weight": 0.0},
    ],
)
def test_staged_backward_makes_the_one_backward_update(changes, checkpoint_inner):
    """CTM backpropagated and freed before the DSM graph exists == one backward of the summed loss, bitwise."""
    cfg = small_cfg(**changes)
    _assert_same_run(
        lambda: make_ctm_trainer(cfg, trainer_cls=OneBackwardTrainer),
        lambda: make_ctm_trainer(cfg, checkpoint_inner_jump=checkpoint_inner),
        steps=4,
    )


@pytest.mark.parametrize(
    "arch",
    [
        dict(model_type="SongUNet", model_channels=16, label_dim=3),
        dict(model_type="DhariwalUNet", model_channels=32, label_dim=0),
    ],
)
def test_staged_backward_on_image_networks(arch, monkeypatch):
    """EDM UNets with attention, up/down resampling, dropout and labels: the staged step with frozen-weight convs
    and the checkpointed inner jump == the one-backward step with plain convs, bitwise."""
    import ctm_core.nets.layers as layers
    from ctm_core.nets.precond import EDMPrecond
    from ctm_core.nets.student import CTMStudent

    def make(cls, **kwargs):
        torch.manual_seed(0)
        teacher = EDMPrecond(8, 1, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0, **arch)
        with torch.no_grad():  # EDM zero-initialises the output convs: perturb so every gradient is non-zero
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn_like(p))
        student = CTMStudent.from_teacher(teacher.eval(), dropout=0.2)
        images = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
        labels = None
        if arch["label_dim"]:
            labels = torch.nn.functional.one_hot(torch.arange(20) % arch["label_dim"], arch["label_dim"]).float()
        cfg = DistillParams(N=10, K=4, target_ema=0.9, eval_emas=[0.9], batch=12, microbatch=4, seed=5)
        source = TensorDataSource(images, labels, batch_size=12, seed=5)
        return cls(cfg, student, teacher, source, progress=False, **kwargs)

    real = layers._conv

    def make_ref():
        monkeypatch.setattr(layers, "_conv", _plain_conv)
        return make(OneBackwardTrainer)

    def make_new():
        monkeypatch.setattr(layers, "_conv", real)
        return make(CTMTrainer, checkpoint_inner_jump=True)

    ref, new = make_ref(), None
    m_ref = [ref.train_step() for _ in range(2)]
    new = make_new()
    m_new = [new.train_step() for _ in range(2)]
    for a, b in zip(m_ref, m_new):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert_state_equal(ref.state_dict(), new.state_dict())
