"""DVC stage `teacher`: get the EDM teacher that the CTM student is distilled from, as a teacher folder.

`teacher.source` (params.yaml) picks the way:

    train        (the offline default) train an EDM denoiser on the prepared train split with the EDM loss
                 (Karras et al. 2022, §5 / Table 1) through `ctm_core.training.edm_training.EDMTrainer`; the EMA weights
                 (rate `teacher.train.ema_rate`) become the teacher. Progress bar from the trainer, params and the
                 loss curve go to one MLflow run (tagged by `pipelines.support.tracking`).
    <release>    a released EDM network name (e.g. `edm-cifar10-32x32-uncond-vp`, `pipelines.support.fetch.resolve_release`)
    https:// s3:// file://
                 a snapshot pickle (or a project `teacher.safetensors`) fetched into the content-addressed cache
                 with `teacher.sha256` verified (`record` = fetch once and print the digest to pin), then converted
                 with `ctm_core.io.teacher_format.convert_edm_pickle` (an allow-list unpickler: nothing is executed).

Output (`--out`, all-or-nothing: built in a temp folder next to it, checked with `load_edm_checkpoint`, renamed):
    teacher.safetensors, config.json   the project's teacher format (`ctm_core.io.teacher_format.save_teacher`)
    source.json                        how it was made: kind, URI / release, file sha256, weights sha256
    train_meta.json                    (train only) steps, final / mean loss, data hash, seconds, config

Exit codes: 0 done, 2 bad params / arguments (one line, before any work), 1 the work failed (one line).

Examples:
    python -m pipelines.teacher --params params.yaml --data data/prepared --out artifacts/teacher
    python -m pipelines.teacher --params params.yaml --data data/prepared --out artifacts/teacher --dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from pipelines.config import Params, ParamsError, load_params, params_hash, resolve_path, teacher_train_config
from pipelines.support.io_utils import atomic_write_json, json_dumps, read_json, sha256_file, staged_dir

__all__ = ["TeacherError", "main", "plan", "run", "train_teacher", "fetch_teacher"]

SOURCE_FILE = "source.json"
TRAIN_META_FILE = "train_meta.json"


class TeacherError(RuntimeError):
    """The stage cannot produce a teacher; the message is one line naming the problem and the fix."""


# --- what the stage will do (shared by --dry-run and the checks before any work) ---------------------------------------
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
        im = card["image"]
        if im["height"] != im["width"]:
            raise TeacherError(
                f"--data: EDM networks need square images, got {im['height']}x{im['width']} in "
                f"{data_dir} (fix: prepare square images)"
            )
        n_train = int(card["splits"]["train"]["count"])
        if n_train < 1:
            raise TeacherError(f"--data: the train split of {data_dir} is empty (fix: lower data.heldout_fraction)")
        info.update(
            image={"channels": im["channels"], "resolution": im["height"], "num_levels": im["num_levels"]},
            train_images=n_train,
            train_config=teacher_train_config(tr),
            init_kwargs=_init_kwargs(params, card),
        )
        _train_config(params)  # EDMTrainConfig's own validation (one line naming the key)
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


def _init_kwargs(params: Params, card: dict[str, Any]) -> dict[str, Any]:
    """EDMPrecond kwargs: image geometry from the dataset card, UNet from `teacher.train.model` (unconditional)."""
    im = card["image"]
    tr = params.teacher.train
    return {
        "img_resolution": int(im["height"]),
        "img_channels": int(im["channels"]),
        "label_dim": 0,  # unconditional teacher: params.yaml has no class-conditioning switch (yet)
        "sigma_data": float(tr.sigma_data),
        **tr.model.to_kwargs(),
    }


def _train_config(params: Params, *, progress: bool = True):
    from ctm_core.training.train_config import EDMTrainConfig

    raw = teacher_train_config(params.teacher.train)
    raw["run"]["progress"] = progress
    raw["run"]["checkpoint_every_steps"] = 0  # no resumable checkpoints: the run is minutes long
    try:
        return EDMTrainConfig.from_dict(raw)
    except ValueError as e:
        raise ParamsError("teacher.train", str(e)) from None


# --- source: train -----------------------------------------------------------------------------------------------------
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
    from ctm_core.training.trainer import TensorDataSource

    tr = params.teacher.train
    card = _data_card(data_dir)
    config = _train_config(params, progress=progress)
    images, _ = load_prepared(data_dir, "train")  # (N, C, H, W) uint8 levels
    x0 = torch.from_numpy(levels_to_unit(images, int(card["image"]["num_levels"])))  # (N, C, H, W) in [-1, 1]

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

    trainer = EDMTrainer(config, net, data, metrics_callback=on_metrics)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    teacher = trainer.ema_model(tr.ema_rate)
    losses = [v for _, v in curve]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise TeacherError(f"teacher training diverged: loss curve {losses[-5:]} (fix: lower teacher.train.lr)")

    meta = {
        "steps": int(trainer.step),
        "loss_final": losses[-1],
        "loss_curve": [[s, v] for s, v in curve],
        "ema_rate": tr.ema_rate,
        "train_seconds": round(seconds, 2),
        "train_images": int(x0.shape[0]),
        "data_card_sha256": sha256_file(Path(data_dir) / "card.json"),
        "data_shards_sha256": [s["sha256"] for s in card["splits"]["train"]["shards"]],
        "config": config.to_dict(),
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


# --- source: release name / URI ----------------------------------------------------------------------------------------
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
            want = (int(card["image"]["channels"]), int(card["image"]["height"]))
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


# --- stage -------------------------------------------------------------------------------------------------------------
def run(
    params: Params,
    data_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    track: bool = True,
) -> dict[str, Any]:
    """The stage: check, then train or fetch into `out_dir`, with one MLflow run when `track`; returns a summary."""
    info = plan(params, data_dir, out_dir)  # every check before any work
    kind = info["kind"]
    sections = ("data", "teacher") if kind == "train" else ("teacher",)
    ctx: Any = contextlib.nullcontext()
    if track:
        from pipelines.support.tracking import stage_run

        ctx = stage_run("teacher", params, sections, extra_tags={"ctm.teacher.source": params.teacher.source})
    with ctx as mlrun:
        mlflow = None
        if track:
            import mlflow

            from pipelines.support.tracking import flatten

            mlflow.log_params(flatten({s: params.section(s) for s in sections}))
        if kind == "train":
            cb = None
            if mlflow is not None:
                cb = lambda step, m: mlflow.log_metrics({f"teacher/{k}": float(v) for k, v in m.items()}, step=step)
            meta = train_teacher(params, data_dir, out_dir, progress=progress, metrics_callback=cb)
            summary = {
                "kind": kind,
                "steps": meta["steps"],
                "loss_final": meta["loss_final"],
                "train_seconds": meta["train_seconds"],
                "weights_sha256": meta["weights_sha256"],
            }
        else:
            record = fetch_teacher(params, out_dir, data_dir=data_dir, progress=progress)
            summary = {"kind": kind, "file_sha256": record["file_sha256"], "weights_sha256": record["weights_sha256"]}
        if mlflow is not None:
            mlflow.set_tags({"ctm.teacher.weights_sha256": summary["weights_sha256"]})
            if kind == "train":
                mlflow.log_metrics(
                    {"teacher/loss_final": summary["loss_final"], "teacher/train_seconds": summary["train_seconds"]}
                )
                mlflow.log_dict(read_json(Path(out_dir) / TRAIN_META_FILE), "teacher/train_meta.json")
            mlflow.log_dict(read_json(Path(out_dir) / "config.json"), "teacher/config.json")
            summary["mlflow_run_id"] = mlrun.info.run_id
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.teacher",
        description=__doc__.split("\n\n")[0],
        epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--params", default="params.yaml", help="params.yaml (section `teacher`)")
    ap.add_argument("--data", default=None, help="prepared dataset folder (required for teacher.source: train)")
    ap.add_argument("--out", required=True, help="teacher folder to write (replaced all-or-nothing)")
    ap.add_argument("--dry-run", action="store_true", help="check params and inputs, print the plan, write nothing")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        info = plan(params, args.data, args.out)
    except ParamsError as e:
        print(f"params error: {e}", file=sys.stderr)
        return 2
    except TeacherError as e:
        print(f"teacher: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json_dumps(info), end="")
        return 0
    from pipelines.support.fetch import FetchError

    try:
        summary = run(params, args.data, args.out, progress=not args.no_progress, track=not args.no_mlflow)
    except (TeacherError, FetchError, ValueError, FileNotFoundError) as e:
        print(f"teacher: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"teacher: {json_dumps(summary).strip()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
