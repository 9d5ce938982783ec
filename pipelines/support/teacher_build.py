"""How the teacher stage gets its teacher: check the plan, train an EDM denoiser, or fetch and convert a release.

`plan()` resolves and checks everything first (one line on failure); `train_teacher()` trains on the prepared
train split with `ctm_core.training.edm_training.EDMTrainer` on the `teacher.train` section (its EMA weights become
the teacher); `fetch_teacher()` fetches `teacher.source` (sha256-verified, cached) and converts it with the allow-list
unpickler. Both write the teacher folder all-or-nothing (`staged_dir`) and check that it loads back.
"""

from __future__ import annotations

import math
import os
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctm_core.config import Params, ParamsError, params_hash
from pipelines.support.io_utils import atomic_write_json, sha256_file, staged_dir
from pipelines.support.params import resolve_path

if TYPE_CHECKING:
    from ctm_core.data.card import DatasetCard

__all__ = ["SOURCE_FILE", "TRAIN_META_FILE", "TeacherError", "fetch_teacher", "plan", "train_teacher"]

SOURCE_FILE = "source.json"
TRAIN_META_FILE = "train_meta.json"


class TeacherError(RuntimeError):
    """The stage cannot produce a teacher; the message is one line naming the problem and the fix."""


# --- what the stage will do (shared by --dry-run and the checks before any work) --------------------------------------
def _source_kind(source: str) -> str:
    """'train', 'release' or the URI scheme ('https', 's3', 'file')."""
    if source == "train":
        return "train"
    if "://" in source:
        return urllib.parse.urlparse(source).scheme.lower()
    return "release"


def _data_card(data_dir: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    if data_dir is None:
        return None
    from ctm_core.data.prepared import load_card

    try:
        return load_card(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise TeacherError(f"--data: {e}") from None


def plan(params: Params, data_dir: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Resolve and check everything the stage needs without doing any work; raises TeacherError / ParamsError."""
    t = params.teacher
    kind = _source_kind(t.source)
    info: dict[str, Any] = {"source": t.source, "kind": kind, "out": str(out_dir)}
    if kind == "train":
        tr = t.train
        if tr.precond != "EDMPrecond":
            # The EDM loss trains an EDM-preconditioned net, and CTMStudent.from_teacher needs EDMPrecond.
            raise ParamsError(
                "teacher.train.precond",
                f"training supports 'EDMPrecond' only (the CTM student "
                f"copies an EDMPrecond teacher), got {tr.precond!r} (fix: precond: EDMPrecond)",
            )
        if data_dir is None:
            raise TeacherError("--data: required when teacher.source is 'train' (the prepared dataset folder)")
        card = _data_card(data_dir)
        im = card.image
        if im.height != im.width:
            raise TeacherError(
                f"--data: EDM networks need square images, got {im.height}x{im.width} in "
                f"{data_dir} (fix: prepare square images)"
            )
        n_train = card.splits["train"].count
        if n_train < 1:
            raise TeacherError(f"--data: the train split of {data_dir} is empty (fix: lower data.heldout_fraction)")
        info.update(
            image={"channels": im.channels, "resolution": im.height, "num_levels": im.num_levels},
            train_images=n_train,
            train_config=tr.model_dump(mode="json"),
            init_kwargs=_init_kwargs(params, card),
        )
    else:
        if kind == "release":
            from pipelines.support.fetch import resolve_release

            try:
                info["uri"] = resolve_release(t.source)
            except ValueError as e:
                raise ParamsError("teacher.source", str(e)) from None
        else:
            info["uri"] = t.source
        info["sha256"] = t.sha256
        info["cache_dir"] = resolve_path(t.cache_dir, params.repo_root)
    return info


def _init_kwargs(params: Params, card: DatasetCard) -> dict[str, Any]:
    """EDMPrecond kwargs: image geometry from the dataset card, UNet from `teacher.train.model` (unconditional)."""
    im = card.image
    tr = params.teacher.train
    return {
        "img_resolution": im.height,
        "img_channels": im.channels,
        "label_dim": 0,  # unconditional teacher: params.yaml has no class-conditioning switch (yet)
        "sigma_data": float(tr.sigma_data),
        **tr.model.to_kwargs(),
    }


# --- source: train ----------------------------------------------------------------------------------------------------
def train_teacher(
    params: Params,
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    metrics_callback=None,
) -> dict[str, Any]:
    """Train the EDM teacher on `data_dir`'s train split and write the teacher folder `out_dir`; returns train_meta.

    Images (N, C, H, W) are mapped from the card's raw levels to [-1, 1] (`levels_to_unit`), as EDM trains on
    8-bit images mapped by x/127.5 − 1 (training_loop.py:128). `metrics_callback(step, {name: value})` sees the
    trainer's metrics every `teacher.train.log_every` steps.
    """
    import torch

    from ctm_core.data.prepared import levels_to_unit, load_prepared
    from ctm_core.nets.precond import build_precond
    from ctm_core.training.edm_training import EDMTrainer, export_teacher
    from ctm_core.training.loop import TensorDataSource

    tr = params.teacher.train
    card = _data_card(data_dir)
    images, _ = load_prepared(data_dir, "train")  # (N, C, H, W) uint8 levels
    x0 = torch.from_numpy(levels_to_unit(images, card.image.num_levels))  # (N, C, H, W) in [-1, 1]

    init_kwargs = _init_kwargs(params, card)
    with torch.random.fork_rng():  # seeded initial weights, the caller's global RNG untouched
        torch.manual_seed(tr.seed)
        net = build_precond(tr.precond, init_kwargs)
    data = TensorDataSource(x0, None, batch_size=tr.batch, seed=tr.seed)

    curve: list[tuple[int, float]] = []

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        curve.append((step, metrics["loss_edm"]))
        if metrics_callback is not None:
            metrics_callback(step, metrics)

    trainer = EDMTrainer(tr, net, data, metrics_callback=on_metrics, progress=progress)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    teacher = trainer.ema_model()
    losses = [v for _, v in curve]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise TeacherError(f"teacher training diverged: loss curve {losses[-5:]} (fix: lower teacher.train.lr)")

    meta = {
        "steps": int(trainer.step),
        "loss_final": losses[-1],
        "loss_curve": [[s, v] for s, v in curve],
        "ema_halflife_kimg": tr.ema_halflife_kimg,
        "ema_rampup_ratio": tr.ema_rampup_ratio,
        "train_seconds": round(seconds, 2),
        "train_images": int(x0.shape[0]),
        "data_card_sha256": sha256_file(Path(data_dir) / "card.json"),
        "data_shards_sha256": [s.sha256 for s in card.splits["train"].shards],
        "config": tr.model_dump(mode="json"),
        "params_hash": params_hash(params.section("teacher")),
    }
    with staged_dir(out_dir) as tmp:
        written = export_teacher(teacher, tmp)
        meta["weights_sha256"] = written["weights_sha256"]
        atomic_write_json(tmp / TRAIN_META_FILE, meta)
        atomic_write_json(
            tmp / SOURCE_FILE, {"kind": "train", "source": "train", "weights_sha256": written["weights_sha256"]}
        )
        _verify(tmp)
    return meta


# --- source: release name / URI ---------------------------------------------------------------------------------------
def fetch_teacher(
    params: Params,
    out_dir: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fetch `teacher.source` (sha256-verified, cached), convert it safely into `out_dir`; returns source.json.

    When `data_dir` holds a prepared dataset, the teacher's image geometry must match it (the student is trained
    on those images); a mismatch fails before `out_dir` changes.
    """
    from ctm_core.io.teacher_format import convert_edm_pickle, read_teacher, save_teacher
    from pipelines.support.fetch import fetch

    t = params.teacher
    info = plan(params, data_dir, out_dir)
    card = _data_card(data_dir) if data_dir is not None and (Path(data_dir) / "card.json").is_file() else None
    path = fetch(t.source, info["cache_dir"], sha256=t.sha256, progress=progress)
    file_sha256 = sha256_file(path)
    with staged_dir(out_dir) as tmp:
        with open(path, "rb") as f:
            is_pickle = f.read(1) == b"\x80"
        try:
            if is_pickle:
                config = convert_edm_pickle(path, tmp)
            else:  # a teacher.safetensors in the project format
                class_name, init_kwargs, state_dict, _ = read_teacher(path)
                config = save_teacher(class_name, init_kwargs, state_dict, tmp)
        except ValueError as e:  # UnsafeCheckpointError is a ValueError too
            raise TeacherError(f"teacher.source {t.source!r}: cannot convert {path.name}: {e}") from None
        net = _verify(tmp)
        if card is not None:
            want = (card.image.channels, card.image.height)
            got = (int(net.img_channels), int(net.img_resolution))
            if want != got:
                raise TeacherError(
                    f"teacher.source {t.source!r}: teacher images are {got[1]}x{got[1]}x{got[0]} but the prepared data "
                    f"in {data_dir} is {want[1]}x{want[1]}x{want[0]} (fix: prepare the matching dataset, data.source)"
                )
        record = {
            "kind": info["kind"],
            "source": t.source,
            "uri": info["uri"],
            "file_sha256": file_sha256,
            "sha256_pinned": t.sha256 != "record",
            "weights_sha256": config["weights_sha256"],
            "class_name": config["class_name"],
        }
        atomic_write_json(tmp / SOURCE_FILE, record)
    return record


def _verify(folder: Path):
    """The written folder must load through the one teacher entry point (strict keys and shapes)."""
    from ctm_core.io.teacher_format import load_edm_checkpoint

    try:
        return load_edm_checkpoint(folder)
    except ValueError as e:
        raise TeacherError(f"the written teacher does not load back: {e}") from None
