"""Evaluation methods: which samplers the evaluate stage scores, and drawing their samples from per-image seeds.

A method is one way of producing images (the student's γ-sampler at an NFE, the student's own Heun sampler, the
teacher's Heun and 1-step Euler baselines); every image i comes from its own seed (EDM generate.py semantics), so
the same seeds give the same images whatever the batch size. See docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ctm_core.data.card import DatasetCard
from ctm_core.diffusion.samplers import euler_step
from ctm_core.diffusion.schedules import karras_sigmas

__all__ = [
    "REJECTION_KEY",
    "STUDENT_HEUN_NFES",
    "Method",
    "euler_sampler",
    "plan_methods",
    "sample_method",
    "across_classes",
    "seed_sets",
    "student_nfes",
    "train_feature_classifier",
]

STUDENT_HEUN_NFES = (3, 7)  # the student's own score sampler (Heun with g(x, σ, σ)): 2 and 4 Heun steps
REJECTION_KEY = "fd_nfe1_rejection"  # evaluate.rejection: NFE-1 samples kept by a classifier (docs/official.md#3)


# --- samplers ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def euler_sampler(
    denoiser: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    num_steps: int = 1,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """Deterministic Euler on the PF-ODE dx/dσ = (x − D(x; σ))/σ (Karras et al. 2022, eq. 4 / Algorithm 1 without
    the Heun correction) over the Karras grid of `num_steps` points plus t_N = 0; NFE = num_steps. Each step is
    `ctm_core.diffusion.samplers.euler_step`, the step the Heun samplers and the teacher solver share.

    num_steps = 1 is the single step from sigma_max to 0: x_0 = D(x_T; sigma_max) (the "1-step teacher" baseline).
    latents: (B, C, H, W) standard normal; returns (B, C, H, W) float64 (not clamped).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")
    sigma_min = max(sigma_min, float(getattr(denoiser, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(denoiser, "sigma_max", math.inf)))
    if num_steps == 1:
        t_steps = torch.tensor([sigma_max], dtype=torch.float64, device=latents.device)
    else:
        t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho).to(latents.device)
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # (N+1,)
    x = latents.to(torch.float64) * t_steps[0]

    def denoise(x_: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoiser(x_, t, class_labels).to(torch.float64)

    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x = euler_step(denoise, x, t_cur, t_next)
    return x


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of producing samples. kind: 'gamma' | 'student_heun' | 'teacher_heun' | 'teacher_euler' |
    'rejection' (the pool and the classifier make it a whole-set draw: `ctm_core.eval.rejection.rejection_sample`,
    not `sample_method`)."""

    key: str  # metrics key, e.g. fd_nfe2_gamma0.5
    kind: str
    nfe: int
    gamma: float | None = None
    label: str = ""

    @property
    def grid_name(self) -> str:
        return self.key.removeprefix("fd_")


def student_nfes(params) -> list[int]:
    """Student NFEs: evaluate.nfe plus 1 (fd_nfe1 is the number tune and register read)."""
    return sorted(set(params.evaluate.nfe) | {1})


def plan_methods(params) -> list[Method]:
    """Every method the stage samples (module doc), in order; NFE-1 gamma variants are one method (identical)."""
    ev = params.evaluate
    gammas = sorted(set(ev.gammas) | {0.0, 1.0})
    methods = []
    for n in student_nfes(params):
        for g in gammas if n > 1 else [0.0]:
            methods.append(Method(f"fd_nfe{n}_gamma{g:g}", "gamma", n, g, f"CTM γ={g:g}, {n} NFE"))
    if ev.rejection.enabled:
        methods.append(Method(REJECTION_KEY, "rejection", 1, 0.0, "CTM 1 NFE, classifier rejection"))
    for n in STUDENT_HEUN_NFES:
        methods.append(Method(f"fd_student_heun{n}", "student_heun", n, None, f"student g Heun, {n} NFE"))
    methods.append(
        Method(
            f"fd_teacher_heun{ev.teacher_nfe}",
            "teacher_heun",
            ev.teacher_nfe,
            None,
            f"teacher Heun, {ev.teacher_nfe} NFE",
        )
    )
    methods.append(
        Method(
            f"fd_teacher_euler{ev.teacher_euler_nfe}",
            "teacher_euler",
            ev.teacher_euler_nfe,
            None,
            f"teacher Euler, {ev.teacher_euler_nfe} NFE",
        )
    )
    return methods


@torch.no_grad()
def _sample_batch(
    method: Method,
    student,
    teacher,
    seeds: Sequence[int],
    img_shape: tuple[int, int, int],
    label_dim: int,
    device: torch.device,
) -> torch.Tensor:
    from ctm_core.diffusion.samplers import StackedRandomGenerator, edm_sampler, gamma_sampler, student_heun_sampler

    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), *img_shape])  # (B, C, H, W)
    labels = None
    if label_dim:  # EDM generate.py: one-hot labels from the same per-seed streams
        labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, [len(seeds)])]
    if method.kind == "gamma":
        return gamma_sampler(
            student,
            latents,
            labels,
            nfe=method.nfe,
            gamma=method.gamma,
            sigma_min=student.sigma_min,
            sigma_max=student.sigma_max,
            randn_like=rnd.randn_like,
        )
    if method.kind == "student_heun" and method.nfe > 1:
        return student_heun_sampler(
            student,
            latents,
            labels,
            num_steps=(method.nfe + 1) // 2,
            sigma_min=student.sigma_min,
            sigma_max=student.sigma_max,
            randn_like=rnd.randn_like,
        )
    if method.kind == "teacher_heun" and method.nfe > 1:
        return edm_sampler(teacher, latents, labels, randn_like=rnd.randn_like, num_steps=(method.nfe + 1) // 2)
    if method.kind in ("student_heun", "teacher_heun", "teacher_euler"):  # Heun with 1 step is 1 Euler step
        if method.kind == "student_heun":
            from ctm_core.diffusion.samplers import student_as_denoiser

            return euler_sampler(student_as_denoiser(student), latents, labels, num_steps=method.nfe)
        return euler_sampler(teacher, latents, labels, num_steps=method.nfe)
    raise ValueError(f"method.kind: expected gamma/student_heun/teacher_heun/teacher_euler, got {method.kind!r}")


def sample_method(
    method: Method,
    student,
    teacher,
    *,
    seeds: Sequence[int],
    batch: int,
    img_shape: tuple[int, int, int],
    label_dim: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Samples (N, C, H, W) float64, not clamped, for `seeds` (one image per seed), in chunks of `batch`."""
    if method.kind == "rejection":
        raise ValueError(
            f"{method.key}: rejection samples are selected from a pool by a classifier, not drawn per seed "
            "(use ctm_core.eval.rejection.rejection_sample)"
        )
    device = torch.device(device)
    out = []
    chunks = range(0, len(seeds), batch)
    for i in tqdm(chunks, desc=method.label or method.key, unit="batch", disable=not progress, leave=False):
        out.append(
            _sample_batch(method, student, teacher, list(seeds[i : i + batch]), img_shape, label_dim, device).cpu()
        )
    return torch.cat(out)


def seed_sets(num_samples: int, set_size: int) -> list[slice]:
    """K = num_samples // set_size contiguous disjoint seed sets of exactly `set_size` images each (the images
    past K·set_size are not drawn). Every FD of a method is measured on these sets (docs/evaluation.md#seed-sets)."""
    if set_size < 2 or num_samples < set_size:
        raise ValueError(
            f"seed_sets: expected 2 <= set_size <= num_samples, got set_size {set_size}, num_samples {num_samples}"
        )
    return [slice(k * set_size, (k + 1) * set_size) for k in range(num_samples // set_size)]


def across_classes(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` images taken round-robin over the classes (first image of each class in label order, then
    the second, ...), so a sample grid shows every class; labels (N,) ints, -1 = unlabelled. Unlabelled data gets
    `count` evenly spaced indices instead. Returns (min(count, N),) int64."""
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0 or count < 1:
        return np.zeros(0, dtype=np.int64)
    if (labels < 0).any():
        return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]  # each in data order
    order = [idx[r] for r in range(max(map(len, per_class))) for idx in per_class if r < len(idx)]
    return np.asarray(order[:count], dtype=np.int64)


def train_feature_classifier(params, card: DatasetCard, data: Path, out: Path, progress: bool):
    """Train the FD feature classifier on the prepared `data` (params.evaluate.classifier), save it under `out`.

    Returns (model, info for fd_details.json, (train images, held-out images) as (N, C, H, W) uint8 levels)."""
    from ctm_core.data.prepared import load_prepared
    from ctm_core.eval.classifier import save_classifier, train_classifier

    cp = params.evaluate.classifier
    x_train, y_train = load_prepared(data, "train")
    x_held, y_held = load_prepared(data, "heldout")
    num_levels = card.image.num_levels
    steps_per_epoch = math.ceil(len(x_train) / cp.batch)
    epochs = max(1, math.ceil(cp.steps / steps_per_epoch))
    t0 = time.perf_counter()
    with tqdm(total=1, desc=f"feature classifier ({epochs} epochs)", disable=not progress, leave=False) as bar:
        has_held = len(y_held) > 0 and bool((y_held >= 0).all())
        model, acc = train_classifier(
            x_train,
            y_train,
            num_levels,
            epochs=epochs,
            batch_size=cp.batch,
            lr=cp.lr,
            generator=torch.Generator().manual_seed(cp.seed),
            num_classes=card.labels.label_dim or None,
            heldout_images=x_held if has_held else None,
            heldout_labels=y_held if has_held else None,
        )
        bar.update()
    info = {
        "epochs": epochs,
        "steps": epochs * steps_per_epoch,
        "heldout_accuracy": acc,
        "train_seconds": time.perf_counter() - t0,
        "data_sha256": card.source.sha256,
    }
    info["sha256"] = save_classifier(model, out / "classifier", meta={**info, "params": cp.model_dump()})
    return model, info, (x_train, x_held)
