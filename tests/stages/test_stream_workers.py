"""The streaming reader in the distill workers' code path (docs/data_streaming.md): two gloo ranks make the update one
process makes and read only the shards of their microbatches; a resume is exact; S3 streams; changed shards stop it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctm_core.data.prepared import load_card
from ctm_core.errors import InputError
from ctm_core.io.teacher_format import load_edm_checkpoint, save_teacher
from ctm_core.nets.precond import EDMPrecond
from ctm_core.nets.student import CTMStudent
from ctm_core.training.trainer import CTMTrainer
from pipelines.prepare import prepare_dataset
from pipelines.support.params import load_params
from pipelines.support.ray_train import _train_stream

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
SETTINGS = {  # 8 images a step in 4 microbatches of 2; windows of 4 shards of 64 rows
    "distill.batch": 8,
    "distill.microbatch": 2,
    "distill.K": 3,
    "distill.N": 6,
    "distill.random_flip": True,
    "distill.stream_window_shards": 4,
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    prepare_dataset("sklearn-digits", None, root / "data", heldout_fraction=0.1, seed=0, shard_size=64, progress=False)
    torch.manual_seed(0)
    teacher = EDMPrecond(
        img_resolution=8,
        img_channels=1,
        label_dim=0,
        model_type="SongUNet",
        model_channels=8,
        channel_mult=[1],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # EDM zero-inits the output conv: give the teacher a non-trivial function
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_teacher("EDMPrecond", teacher.init_kwargs, teacher.state_dict(), root / "teacher")
    return root


def _trainer(root: Path, *, rank=0, world=1, data_uri=None, loads=None, **kw) -> CTMTrainer:
    cfg = load_params(ROOT / "params.yaml", overrides=SETTINGS, check_env=False).distill
    config = {"card": load_card(root / "data"), "data_dir": str(root / "data"), "data_uri": data_uri}
    data = _train_stream(config, cfg)
    if loads is not None:
        data.on_load = loads.append
    teacher = load_edm_checkpoint(root / "teacher")
    torch.manual_seed(0)
    student = CTMStudent.from_teacher(teacher, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
    return CTMTrainer(cfg, student, teacher, data, rank=rank, world_size=world, progress=False, **kw)


def _rank(rank: int, root: str, port: int | str, out: str) -> None:
    """One gloo rank of the two: the distill workers' data source, gradient and metric sync."""
    import torch.distributed as dist

    from ctm_core.training.grad_sync import BucketedAllReduce
    from pipelines.support.ray_train import _all_reduce_metrics

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loads: list[int] = []
        sync = BucketedAllReduce(bucket_mib=0.01, first_bucket_mib=0.002)  # several buckets even for this small net
        tr = _trainer(Path(root), rank=rank, world=2, loads=loads, grad_sync=sync, metric_sync=_all_reduce_metrics)
        positions = []
        for _ in range(STEPS):
            positions.append(tr.data.position)
            last = tr.train_step()
        if rank == 0:
            torch.save(tr.model.state_dict(), f"{out}/weights.pt")
        meta = {
            "loads": loads,
            "positions": positions,
            "loss": float(last["loss"]),
            "syncs": sync.calls,
            "overlapped": sync.overlapped,
        }
        Path(f"{out}/rank{rank}.json").write_text(json.dumps(meta))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(inputs, tmp_path_factory):
    """Two fresh interpreters, as Ray starts its workers (not multiprocessing.spawn, whose children inherit this
    test session's sys.path and whatever earlier tests put on it)."""
    out = tmp_path_factory.mktemp("ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from tests.stages.test_stream_workers import _rank; _rank(int(sys.argv[1]), *sys.argv[2:])"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(r), str(inputs), str(port), str(out)], cwd=ROOT, env=env)
        for r in range(2)
    ]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], f"rank exit codes {codes}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return torch.load(out / "weights.pt", weights_only=True), ranks


def test_two_workers_stream_the_update_of_one_worker(inputs, two_ranks):
    weights, ranks = two_ranks
    one = _trainer(inputs)
    for _ in range(STEPS):
        last = one.train_step()
    for name, p in one.model.state_dict().items():
        torch.testing.assert_close(weights[name], p, rtol=1e-5, atol=1e-6, msg=name)
    init = _trainer(inputs).model.state_dict()
    assert sum(not torch.equal(init[k], v) for k, v in weights.items()) > len(init) // 2  # it trained
    assert ranks[0]["loss"] == pytest.approx(float(last["loss"]), rel=1e-5)
    assert ranks[0]["syncs"] == ranks[1]["syncs"] == STEPS  # one gradient sync per step, none per microbatch
    # buckets sent while the last backward still ran (the output layers' gradients are final first)
    assert ranks[0]["overlapped"] >= STEPS and ranks[1]["overlapped"] >= STEPS


def test_stream_worker_reads_only_the_shards_of_its_microbatches(inputs, two_ranks):
    _, ranks = two_ranks
    cfg = load_params(ROOT / "params.yaml", overrides=SETTINGS, check_env=False).distill
    stream = _train_stream({"card": load_card(inputs / "data"), "data_dir": str(inputs / "data")}, cfg)
    B, b = cfg.batch, cfg.microbatch
    for rank, got in enumerate(ranks):
        assert got["positions"] == [n * B for n in range(STEPS)]  # the position is the step's rows, not the rank's
        rows = torch.cat([torch.arange(i * b, (i + 1) * b) for i in range(rank, B // b, 2)])  # its microbatches
        need = []
        for n in range(STEPS):
            shard, _ = stream.locate(n * B + rows)
            need += [k for k in dict.fromkeys(sorted(shard.tolist())) if k not in need]
        # Each needed shard read once (the cache holds a window), no other shard, in the order first needed.
        assert got["loads"] == need, rank
        assert len(need) < len(stream.shards)
    assert ranks[0]["loads"] != ranks[1]["loads"]  # the ranks read different shards


def test_stream_worker_resumes_exactly(inputs, tmp_path):
    straight = _trainer(inputs)
    straight.train(num_steps=4)
    first = _trainer(inputs)
    first.train(num_steps=2, checkpoint_path=tmp_path / "ckpt.pt")
    resumed = _trainer(inputs)
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    assert resumed.data.position == 2 * resumed.config.batch
    resumed.train(num_steps=2)
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert resumed.data.position == straight.data.position == 4 * straight.config.batch


def test_stream_worker_reads_s3_without_downloading_the_split(inputs, s3):
    client, bucket = s3["client"], s3["bucket"]
    data = inputs / "data"
    files = [p for p in data.rglob("*") if p.is_file()]
    for p in files:
        client.upload_file(str(p), bucket, f"prep/{p.relative_to(data).as_posix()}")
    loads: list[int] = []
    remote = _trainer(inputs, data_uri=f"s3://{bucket}/prep", loads=loads).data
    local = _trainer(inputs).data
    rows = torch.tensor([1, 6, 7])
    for _ in range(3):
        xr, _ = remote.read_global_batch(8, rows)
        xl, _ = local.read_global_batch(8, rows)
        assert torch.equal(xr, xl)
    assert 0 < len(loads) < len(remote.shards)  # only the shards of these rows came from S3

    # An object changed on S3 after the prepare stage: the first read of it stops with the shard named.
    shard = remote.shards[0]
    body = client.get_object(Bucket=bucket, Key=f"prep/{shard.path}")["Body"].read()
    client.put_object(Bucket=bucket, Key=f"prep/{shard.path}", Body=body[:-9] + b"X" * 9)
    fresh = _trainer(inputs, data_uri=f"s3://{bucket}/prep").data
    want = fresh.locate(torch.arange(fresh.num_rows))[0]  # epoch 0
    at = int(torch.nonzero(want == 0)[0])
    with pytest.raises(InputError, match=rf"^s3://.*?{shard.path}: sha256 expected {shard.sha256} .*shards changed"):
        fresh.read_positions(torch.tensor([at]))


def test_stream_worker_refuses_a_changed_local_shard(inputs, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(inputs / "data", copy / "data")
    os.symlink(inputs / "teacher", copy / "teacher")
    tr = _trainer(copy)
    shard = tr.data.shards[int(tr.data.locate(torch.tensor([0]))[0])]
    path = copy / "data" / shard.path
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(InputError, match=rf"{shard.path}: sha256 expected {shard.sha256} \(card.json\), got [0-9a-f]+"):
        tr.train_step()
    assert tr.step == 0
