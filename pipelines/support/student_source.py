"""Released CTM networks for the scoring stages: the student named by `evaluate.student_source` and the ADM
classifier of `evaluate.rejection`, fetched with a sha256 pin (pipelines.support.fetch) and checked before any
sampling (docs/official.md#4-evaluating-a-released-checkpoint).

`resolve_student_source` runs inside `stage_common.check_inputs`: it fetches (or finds in the cache) the pinned file,
checks that it is a plain state dict fitting the preset, flags and the prepared data, and returns an
`OfficialVariant`. That object is the `variant` the stages pass on (a str, so fd_details.json records
`official:<preset>@sha256:<digest>`), and `stage_common.load_scored_networks` loads the student from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ctm_core.config import Params
from ctm_core.data.card import DatasetCard
from ctm_core.errors import InputError
from pipelines.support.io_utils import one_line
from pipelines.support.params import resolve_path

__all__ = [
    "OfficialVariant",
    "check_registrable",
    "check_rejection",
    "fetch_pinned",
    "load_official_student",
    "load_rejection_classifier",
    "rejection_samples",
    "resolve_student_source",
]


class OfficialVariant(str):
    """`official:<preset>@sha256:<digest>`, carrying the verified local `path`, the `preset` and its `flags`."""

    path: Path
    preset: str
    flags: dict[str, Any]
    sha256: str

    def __new__(cls, path: Path, preset: str, flags: dict[str, Any], sha256: str) -> OfficialVariant:
        obj = super().__new__(cls, f"official:{preset}@sha256:{sha256}")
        obj.path, obj.preset, obj.flags, obj.sha256 = Path(path), preset, dict(flags), sha256
        return obj


def fetch_pinned(
    uri: str, sha256: str | None, params: Params, key: str, progress: bool, cache: str | None = None
) -> tuple[Path, str]:
    """(local path, verified sha256) of a pinned file in `cache` (default `<evaluate.cache_dir>/official`; relative
    to the repository root); InputError naming `key`."""
    from pipelines.support.fetch import FetchError, fetch, recorded_sha256

    if cache is None:
        cache = str(Path(params.evaluate.cache_dir) / "official")
    cache = Path(resolve_path(cache, params.repo_root))
    try:
        path = fetch(resolve_path(uri, params.repo_root), cache, sha256=sha256, progress=progress)
        return path, recorded_sha256(path)
    except (FetchError, ValueError, OSError) as e:
        raise InputError(f"{key}: {one_line(e, limit=600)}") from None


def resolve_student_source(params: Params, card: DatasetCard, *, progress: bool = False) -> OfficialVariant:
    """Fetch and check `evaluate.student_source` (uri set); raises InputError (one line) before any work."""
    from ctm_core.nets.official.loader import check_official_ctm, resolve_flags

    src = params.evaluate.student_source
    path, digest = fetch_pinned(src.uri, src.sha256, params, "evaluate.student_source.uri", progress)
    try:
        flags = resolve_flags(src.preset, src.flags)
        if check_official_ctm(path, src.preset, **src.flags) != digest:
            raise InputError(f"{path.name}: changed in the cache after its sha256 {digest} was verified")
    except ValueError as e:  # InputError / UnsafeCheckpointError are ValueErrors too
        raise InputError(f"evaluate.student_source: {one_line(e, limit=900)}") from None
    label_dim = int(flags["num_classes"] if src.preset == "sony-ctm-imagenet64" else flags["label_dim"])
    if card.image.channels != 3:
        raise InputError(
            f"evaluate.student_source: the official students make 3-channel images, the prepared data has "
            f"{card.image.channels} channel(s) (fix: prepare RGB data)"
        )
    if label_dim and label_dim != card.labels.label_dim:
        raise InputError(
            f"evaluate.student_source: the student has {label_dim} classes (flags {src.flags}), the prepared data "
            f"{card.labels.label_dim} (fix: set the class-count flag or prepare the matching data)"
        )
    return OfficialVariant(path, src.preset, src.flags, digest)


def load_official_student(variant: OfficialVariant, device):
    """The student of a resolved `OfficialVariant` on `device` (eval mode, no gradients)."""
    from ctm_core.nets.official.loader import load_official_ctm

    student = load_official_ctm(variant.path, variant.preset, device=device, **variant.flags)
    if student.official["sha256"] != variant.sha256:
        raise InputError(f"{variant.path.name}: changed after its sha256 {variant.sha256} was verified")
    return student


def load_rejection_classifier(params: Params, device, *, progress: bool = False):
    """The ADM noisy classifier of `evaluate.rejection` (fetched, pinned) on `device`, eval mode."""
    from ctm_core.eval.rejection import load_adm_classifier

    rj = params.evaluate.rejection
    path, digest = fetch_pinned(rj.classifier_uri, rj.classifier_sha256, params, "evaluate.rejection", progress)
    try:
        classifier = load_adm_classifier(path, **rj.classifier_flags)
    except ValueError as e:
        raise InputError(f"evaluate.rejection.classifier_uri: {one_line(e, limit=900)}") from None
    if classifier.official["sha256"] != digest:
        raise InputError(f"{path.name}: changed after its sha256 {digest} was verified")
    return classifier.to(device)


def check_rejection(params: Params, card: DatasetCard, device, *, progress: bool = False):
    """Before any output of the evaluate stage: the pinned classifier of `evaluate.rejection` (enabled), fetched,
    loaded and checked against the prepared data (class-labelled, its class count, its image size). InputError."""
    classifier = load_rejection_classifier(params, device, progress=progress)
    K, size = card.labels.label_dim, card.image.shape[-1]
    got = (int(classifier.official["flags"]["num_classes"]), int(classifier.official["flags"]["image_size"]))
    if K < 2 or got != (K, size):
        raise InputError(
            f"evaluate.rejection: the classifier scores {got[0]} classes at {got[1]}x{got[1]}, the prepared data has "
            f"{K} classes at {size}x{size} (fix: set evaluate.rejection.classifier_flags or enabled: false; "
            "rejection needs class-labelled data)"
        )
    return classifier


def rejection_samples(
    params: Params,
    student,
    *,
    img_shape: tuple[int, int, int],
    device,
    classifier=None,
    num_out: int | None = None,
    progress: bool = False,
):
    """`evaluate.rejection` for the evaluate stage (docs/official.md#34-in-the-evaluate-stage): the N = `num_out`
    (default `evaluate.num_samples`) samples kept out of a pool drawn from seeds `seed_start + i`,
    i < N·(1 + ratio), with the pinned classifier (`classifier`: already loaded by `check_rejection`).

    Returns (samples (N, C, H, W) float64, not clamped; details for fd_details.json)."""
    from ctm_core.eval.rejection import pool_size, rejection_sample

    ev, rj = params.evaluate, params.evaluate.rejection
    if classifier is None:
        classifier = load_rejection_classifier(params, device, progress=progress)
    N = ev.num_samples if num_out is None else int(num_out)
    P = pool_size(N, rj.ratio)
    seeds = list(range(ev.seed_start, ev.seed_start + P))
    x, _, keep = rejection_sample(
        student, classifier, seeds, num_out=N, ratio=rj.ratio, sigma=rj.sigma, img_shape=img_shape,
        batch=ev.batch, device=device,
    )  # fmt: skip
    details = {
        "pool": P,
        "pool_seeds": [seeds[0], seeds[-1]],
        "kept_distinct": len(set(keep.tolist())),
        "ratio": rj.ratio,
        "sigma": rj.sigma,
        "classifier_sha256": classifier.official["sha256"],
    }
    return x, details


def check_registrable(eval_dir: str | os.PathLike[str], error: type[Exception] = InputError) -> None:
    """The register stage's refusal (docs/official.md#4-evaluating-a-released-checkpoint): an evaluation whose
    recorded student (fd_details.json `student.variant`) is a released checkpoint (`official:...`) scored that file,
    not `--student`, so its numbers must not be registered with it. Raises `error` (the register stage passes its
    RegisterError) in one line; an evaluation without a readable fd_details.json is left to the metrics checks."""
    path = Path(eval_dir) / "fd_details.json"
    try:
        student = json.loads(path.read_text(encoding="utf-8")).get("student") or {}
    except (OSError, ValueError, AttributeError):
        return
    variant = student.get("variant") if isinstance(student, dict) else None
    if isinstance(variant, str) and variant.startswith("official:"):
        raise error(
            f"--eval {eval_dir}: {path.name} says the evaluation scored the released checkpoint {variant} "
            "(evaluate.student_source), not --student: its numbers are not the student's (fix: set "
            "evaluate.student_source.uri: null and re-run the evaluate stage before registering, or run only "
            "`dvc repro evaluate` to score a released checkpoint)"
        )
