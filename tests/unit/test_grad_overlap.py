"""The gradient sum overlapped with the last backward (ctm_core.training.grad_sync, final_grads): a parameter is
sent only once its gradient is final, so the overlapped step makes bitwise the update of the plain one; buckets
are launched during the backward, in order, each gradient once. Runs the real ``BucketedAllReduce`` on a one-rank
gloo group (the sum over one rank is the identity, so any gradient sent before it was final would change the
update); the two-rank sum is tests/stages/test_stream_workers.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ctm_core.config import DistillParams, TeacherTrainParams
from ctm_core.nets.precond import EDMPrecond
from ctm_core.nets.student import CTMStudent
from ctm_core.nets.toy import ToyEDMDenoiser
from ctm_core.training.edm_training import EDMTrainer
from ctm_core.training.grad_sync import BucketedAllReduce
from ctm_core.training.trainer import CTMTrainer, TensorDataSource
from tests.unit.test_trainer import assert_state_equal, make_ctm_trainer, small_cfg

TINY = dict(bucket_mib=0.002, first_bucket_mib=0.0005)  # many buckets even for the small nets here


@pytest.fixture
def one_rank():
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _same_update(make, steps=3):
    """``make(grad_sync)`` trainers with and without the overlapped sum: the same metrics and state, bitwise."""
    sync = BucketedAllReduce(**TINY)
    ref, new = make(None), make(sync)
    for _ in range(steps):
        m_ref, m_new = ref.train_step(), new.train_step()
        assert all(torch.equal(m_ref[k], m_new[k]) for k in m_ref)
    assert_state_equal(ref.state_dict(), new.state_dict())
    return sync


@pytest.mark.parametrize(
    "changes",
    [
        {},  # the staged CTM + DSM backward: the DSM pass reports
        {"batch": 24, "microbatch": 8},  # three microbatches: the earlier ones' sum is added in the hooks
        {"dsm_weight": 0.0},  # CTM only: the CTM pass reports
        {"mode": "cm"},
    ],
)
def test_overlapped_sum_keeps_the_staged_update_bitwise(one_rank, changes):
    sync = _same_update(lambda gs: make_ctm_trainer(small_cfg(**changes), grad_sync=gs))
    assert sync.calls == 3
    assert sync.overlapped >= 3  # at least one bucket a step left during the backward


def test_overlapped_sum_on_an_image_student_with_shared_parameters(one_rank):
    """SongUNet with labels: ``map_label`` is used by the t and the s embedding (re-summed after the passes, so
    reported last); dropout, attention and resampling as in the staged-backward test."""

    def make(gs):
        torch.manual_seed(0)
        teacher = EDMPrecond(
            8, 1, label_dim=3, model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], dropout=0.0,
        )  # fmt: skip
        with torch.no_grad():  # EDM zero-initialises the output convs: perturb so every gradient is non-zero
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn_like(p))
        student = CTMStudent.from_teacher(teacher.eval(), dropout=0.2)
        images = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
        labels = torch.nn.functional.one_hot(torch.arange(20) % 3, 3).float()
        cfg = DistillParams(N=10, K=4, target_ema=0.9, eval_emas=[0.9], batch=12, microbatch=4, seed=5)
        source = TensorDataSource(images, labels, batch_size=12, seed=5)
        return CTMTrainer(cfg, student, teacher, source, progress=False, grad_sync=gs)

    sync = _same_update(make, steps=2)
    assert sync.overlapped >= 2 * 4  # most of a real network's buckets leave during the backward


def test_overlapped_sum_in_the_one_backward_loop(one_rank):
    """The loop's default microbatch_backward (EDM teacher training, the GAN phase's G step)."""

    def make(gs):
        torch.manual_seed(0)
        cfg = TeacherTrainParams(batch=16, microbatch=8, lr_warmup_steps=0, ema_halflife_kimg=0.1)
        net = ToyEDMDenoiser((2,), hidden=16, depth=2, emb_channels=8)
        data = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
        return EDMTrainer(cfg, net, TensorDataSource(data, batch_size=16, seed=0), progress=False, grad_sync=gs)

    sync = _same_update(make)
    assert sync.overlapped >= 3


def test_buckets_reverse_order_small_first_bucket():
    sync = BucketedAllReduce(bucket_mib=3 * 4 * 100 / 2**20, first_bucket_mib=4 * 150 / 2**20)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 100, 100, 100, 50, 100)]
    layout = sync._plan(params)
    assert layout.buckets == [[5, 4], [3, 2, 1], [0]]  # 150 floats first, then up to 300 a bucket, outputs first
    assert sync._plan(params) is layout  # one layout per parameter list


def test_each_gradient_is_reported_once(one_rank):
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    for p in params:
        p.grad = torch.ones(3)
    sync = BucketedAllReduce(**TINY)
    ready = sync.start(params)
    ready(params[1])
    with pytest.raises(RuntimeError, match="reported twice"):
        ready(params[1])
    with pytest.raises(RuntimeError, match="not a parameter of the step"):
        ready(torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(RuntimeError, match="not the parameters given to start"):
        sync(params[::-1])
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="expected > 0"):
            BucketedAllReduce(bucket_mib=bad)
