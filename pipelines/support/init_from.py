"""`distill.init_from`: continue training from a released CTM student instead of the teacher's weights
(docs/official.md#5-continuing-training-from-a-released-checkpoint).

The driver (`resolve_init_from`, before Ray starts) fetches the pinned file, loads it weights-only through
``ctm_core.load_official_ctm`` (refusing pickled code and tensors that do not fit the preset and flags), checks it
against the prepared data, the teacher and the distill section's σ range, and returns `InitStudent`: the preset, the
resolved flags, the sha256 and the weights. The workers build the same network (`initial_student`) and load those
weights, so every rank starts from the released student; the target θ⁻ and the EMAs start from it too (the trainer
copies the student at step 0, as it does for a student built from the teacher).

The student folder the stage writes records the network class (`ctm_core.io.student_format.build_student`): a
ctm-cifar10 file continues as the project's SongUNet `CTMStudent`, a sony/ctm ImageNet-64 file as `ADMStudent` (its
own 250·ln t conditioning), so evaluate, likelihood and register load it like any other student.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ctm_core.config import DistillParams, Params, with_changes
from ctm_core.data.card import DatasetCard
from ctm_core.errors import InputError
from pipelines.support.io_utils import one_line
from pipelines.support.student_source import fetch_pinned

__all__ = ["InitStudent", "initial_student", "resolve_init_from"]

# The σ range and σ_data both released students were trained with (docs/official.md#1-the-two-students).
OFFICIAL_SIGMAS = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}


@dataclass
class InitStudent:
    """A verified released student: what every Ray worker needs to rebuild it (shipped through the object store)."""

    preset: str
    flags: dict[str, Any]
    sha256: str
    state_dict: dict[str, torch.Tensor] = field(repr=False)


def resolve_init_from(params: Params, card: DatasetCard, teacher) -> tuple[Params, InitStudent | None]:
    """(`params` with `distill.init_from.sha256` pinned, the verified released student) when `distill.init_from.uri`
    is set, else (`params`, None). Raises InputError (one line, naming the key and the fix) before any training."""
    from ctm_core.nets.official.loader import load_official_ctm

    d, key = params.distill, "distill.init_from"
    src = d.init_from
    if src.uri is None:
        return params, None
    for name, want in OFFICIAL_SIGMAS.items():
        if getattr(d, name) != want:
            raise InputError(
                f"{key}: the released students use {name} {want}, distill.{name} is {getattr(d, name)} (fix: set "
                f"distill.{name}: {want} to continue a released student, or init_from.uri: null)"
            )
    path, digest = fetch_pinned(src.uri, src.sha256, params, f"{key}.uri", progress=False, cache=src.cache_dir)
    try:
        student = load_official_ctm(path, src.preset, **src.flags)
    except ValueError as e:  # InputError / UnsafeCheckpointError / unknown flags
        raise InputError(f"{key}: {one_line(e, limit=900)}") from None
    if student.official["sha256"] != digest:
        raise InputError(f"{path.name}: changed in the cache after its sha256 {digest} was verified")
    im = card.image
    got = (student.img_channels, student.img_resolution, student.label_dim)
    want = (im.channels, im.height, teacher.label_dim)
    if got != want:
        raise InputError(
            f"{key}: the released student makes {got[0]}-channel {got[1]}x{got[1]} images with {got[2]} classes, the "
            f"prepared data and the teacher need {want[0]} channels at {want[1]}x{want[1]} with {want[2]} classes "
            f"(flags {src.flags}; fix: set {key}.flags to the student's size and class count, or prepare matching "
            "data and teacher)"
        )
    pinned = params.model_copy(update={"distill": with_changes(d, {"init_from.sha256": digest})})
    pinned._repo_root = params.repo_root
    weights = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return pinned, InitStudent(src.preset, dict(student.official["flags"]), digest, weights)


def initial_student(teacher, d: DistillParams, init: InitStudent | None = None):
    """The student a distill run starts from: `init`'s released weights, or ``CTMStudent.from_teacher`` (the
    s-branch's fresh layers seeded from `d.seed`, so every rank and every restart builds the same network)."""
    from ctm_core.nets.official.loader import build_official_ctm
    from ctm_core.nets.student import CTMStudent
    from ctm_core.training.loop import derive_seed

    if init is not None:
        student = build_official_ctm(init.preset, **init.flags)
        student.load_state_dict(init.state_dict, strict=True)
        return student.train().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(d.seed, 0, "student_init"))
        return CTMStudent.from_teacher(teacher, sigma_min=d.sigma_min, sigma_max=d.sigma_max)
