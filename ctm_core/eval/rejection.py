"""Classifier-rejection sampling as sony/ctm's classifier_rejection.py does it
(docs/official.md#3-classifier-rejection-sampling).

The paper's ImageNet-64 FID 1.92 (2.06 without) comes from this two-pass procedure on one-step (NFE 1) samples:

1. Draw P = (1 + r)·N labelled samples (N = 50,000, r = ``rejection_ratio`` = 0.5), saved as uint8 images
   ``clamp((x + 1)·127.5, 0, 255)`` (truncation), and read back as x̃ = u8 / 127.5 − 1.
2. Score each with ADM's 64x64 noisy classifier at σ = 0.002: σ (VE) is mapped to the VP-SDE time
   τ = (−β₀ + √(β₀² + 2(β₁ − β₀)·ln(1 + σ²))) / (β₁ − β₀) (β₀ = 0.1, β₁ = 20), the input scaled by the VP mean
   α(τ) = exp(−τ²(β₁ − β₀)/4 − τβ₀/2), and, for 64x64 images, τ turned into the cosine-schedule time
   t_cos = (1 + s)·(2/π)·arccos(√f₀·α(τ)) − s (s = 0.008, f₀ = cos²(s/(1 + s)·π/2)), which the classifier receives
   as its timestep (in [0, 1], not multiplied by 1000). The score is log softmax(logits)[y].
3. Per class k: among the first ⌊(1 + r)·N/K⌋ samples of class k (in sample order), keep the N/K with the highest
   score (ties keep sample order). If fewer than N were kept, append whole sample files from the last one backwards
   (duplicates possible) and cut to N. The official script then shuffles, which no Fréchet distance sees.

Shape legend: ``P`` pool size, ``N`` kept samples, ``K`` classes, ``C``/``H``/``W`` image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.nn import functional as F

from ctm_core.nets.official.adm import EncoderUNet
from ctm_core.nets.official.loader import check_fits, parse_int_list, read_official_state_dict

__all__ = [
    "CLASSIFIER_FLAGS",
    "build_adm_classifier",
    "classifier_log_probs",
    "load_adm_classifier",
    "pool_size",
    "rejection_sample",
    "select_rejection",
    "to_official_uint8",
    "vp_classifier_time",
]

BETA_MIN, BETA_MAX, COSINE_S = 0.1, 20.0, 0.008  # classifier_rejection.py vpsde defaults

# sony/ctm cm/script_util.py classifier_defaults + create_classifier (num_classes = out_channels = 1000 there).
CLASSIFIER_FLAGS: dict[str, Any] = dict(
    image_size=64,
    classifier_width=128,
    classifier_depth=4,
    classifier_attention_resolutions="32,16,8",
    num_classes=1000,
    channel_mult="",  # not an official flag: "" = create_classifier's choice for image_size (64: 1,2,3,4)
)
_CHANNEL_MULT = {64: [1, 2, 3, 4], 128: [1, 1, 2, 3, 4], 256: [1, 1, 2, 2, 4, 4]}


def build_adm_classifier(**flags: Any) -> EncoderUNet:
    """``EncoderUNet`` as sony/ctm ``create_classifier`` builds it, ``flags`` over ``CLASSIFIER_FLAGS``."""
    unknown = sorted(set(flags) - set(CLASSIFIER_FLAGS))
    if unknown:
        raise ValueError(f"unknown classifier flags {unknown}; expected a subset of {sorted(CLASSIFIER_FLAGS)}")
    f = {**CLASSIFIER_FLAGS, **flags}
    size = int(f["image_size"])
    if f["channel_mult"]:
        mult = parse_int_list("channel_mult", f["channel_mult"])
    elif size in _CHANNEL_MULT:
        mult = _CHANNEL_MULT[size]
    else:
        raise ValueError(f"image_size: expected one of {sorted(_CHANNEL_MULT)} (or give channel_mult), got {size}")
    attention = parse_int_list("classifier_attention_resolutions", f["classifier_attention_resolutions"])
    net = EncoderUNet(
        img_resolution=size,
        in_channels=3,
        num_classes=int(f["num_classes"]),
        model_channels=int(f["classifier_width"]),
        channel_mult=mult,
        num_res_blocks=int(f["classifier_depth"]),
        attention_ds=[size // r for r in attention],
        num_head_channels=64,
    )
    net.official = {"flags": f, "cosine_time": size == 64}  # classifier_rejection.py: cos_t_classifier=(size == 64)
    return net


def load_adm_classifier(path: str | os.PathLike | BinaryIO | bytes, **flags: Any) -> EncoderUNet:
    """The ADM noisy classifier from its state dict (guided-diffusion ``64x64_classifier.pt`` layout), eval mode.
    Refuses pickled code and mismatched shapes in one line, as ``load_official_ctm`` does."""
    state_dict, digest = read_official_state_dict(path)
    with torch.device("meta"):
        net = build_adm_classifier(**flags)
    check_fits(net, state_dict, f"classifier does not fit flags {flags}")
    official = net.official
    net = net.to_empty(device="cpu")
    net.load_state_dict(state_dict, strict=True)
    net.official = {**official, "sha256": digest}
    return net.eval().requires_grad_(False)


def vp_classifier_time(sigma: torch.Tensor, cosine_time: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(VP mean α, classifier timestep) for VE noise levels σ (B,): step 2 of the module docstring. float64."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    d = BETA_MAX - BETA_MIN
    tau = (-BETA_MIN + torch.sqrt(BETA_MIN**2 + 2 * d * torch.log1p(sigma**2))) / d
    alpha = torch.exp(-0.25 * tau**2 * d - 0.5 * tau * BETA_MIN)
    if not cosine_time:
        return alpha, tau
    f0 = math.cos(COSINE_S / (1 + COSINE_S) * math.pi / 2) ** 2
    t_cos = (1 + COSINE_S) * 2 / math.pi * torch.arccos(math.sqrt(f0) * alpha) - COSINE_S
    return alpha, t_cos


def to_official_uint8(x: torch.Tensor) -> torch.Tensor:
    """The official saved image: clamp((x + 1)·127.5, 0, 255) truncated to uint8. x: (B, C, H, W) -> uint8."""
    return ((x.to(torch.float32) + 1) * 127.5).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def classifier_log_probs(
    classifier: EncoderUNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    sigma: float = 0.002,
    batch: int = 256,
) -> torch.Tensor:
    """log p(y | x̃) of every image under the classifier at noise level ``sigma`` (steps 1-2 of the module doc).

    images: (P, C, H, W) uint8 official images; labels: (P,) int class indices. Returns (P,) float32 on the CPU.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images: expected (P, C, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if labels.numel() != images.shape[0]:
        raise ValueError(f"labels: expected {images.shape[0]} labels, got {labels.numel()}")
    device = next(classifier.parameters()).device
    alpha, t = vp_classifier_time(torch.tensor([sigma]), classifier.official.get("cosine_time", True))
    out = []
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch].to(device, torch.float32) / 127.5 - 1  # the official re-read of the npz
        logits = classifier(float(alpha) * x, torch.full((x.shape[0],), float(t), device=device))  # (b, K)
        y = labels[i : i + batch].to(device)
        out.append(F.log_softmax(logits.float(), dim=-1).gather(1, y[:, None])[:, 0].cpu())
    return torch.cat(out)


def pool_size(num_out: int, ratio: float) -> int:
    """P = ⌊N·(1 + r)⌋ one-step samples are drawn for N kept ones (official: int(50000·(1 + r)))."""
    return int(num_out * (1.0 + ratio))


def select_rejection(
    log_probs: Sequence[float] | np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    num_classes: int,
    num_out: int,
    ratio: float,
    chunk: int,
) -> np.ndarray:
    """Indices (N,) into the pool of the kept samples (step 3 of the module docstring).

    log_probs, labels: (P,). Per class, N/K samples (``num_out // num_classes``) are kept out of the first
    ⌊(1 + r)·N/K⌋ of that class; a shortfall is topped up with whole chunks of ``chunk`` pool samples taken from
    the end of the pool (the official sample files), so indices may repeat, as in the official script.
    """
    scores = np.asarray(log_probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if scores.shape != y.shape:
        raise ValueError(f"log_probs and labels: expected equal lengths, got {scores.shape[0]} and {y.shape[0]}")
    per_class = num_out // num_classes
    if per_class < 1:
        raise ValueError(f"num_out: expected >= num_classes = {num_classes} (one kept sample per class), got {num_out}")
    candidates = int((1.0 + ratio) * per_class)
    kept: list[int] = []
    for k in range(num_classes):
        first = np.flatnonzero(y == k)[:candidates]  # the class's first samples, in pool order
        order = np.argsort(-scores[first], kind="stable")  # highest log p(y|x) first, ties in pool order
        kept.extend(first[order[:per_class]].tolist())
    kept.sort()
    P = len(y)
    bounds = list(range(0, P, chunk))
    n = 1
    while len(kept) < num_out and n <= len(bounds):
        start = bounds[-n]
        kept.extend(range(start, min(start + chunk, P)))
        n += 1
    if len(kept) < num_out:
        raise ValueError(f"the pool of {P} samples cannot give num_out = {num_out} (fix: raise the rejection ratio)")
    return np.asarray(kept[:num_out], dtype=np.int64)


@torch.no_grad()
def rejection_sample(
    student,
    classifier: EncoderUNet,
    seeds: Sequence[int],
    *,
    num_out: int,
    ratio: float = 0.5,
    sigma: float = 0.002,
    img_shape: tuple[int, int, int],
    batch: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Classifier-rejection sampling end to end: ``pool_size(num_out, ratio)`` one-step samples from ``seeds``
    (sample i from its own seed, its latents then its label drawn as in the evaluate stage, EDM generate.py), scored
    and selected as in the module docstring, sample files = chunks of ``batch``.

    Returns (kept samples (N, C, H, W) float64 not clamped, their labels (N,) int64, pool indices (N,)).
    """
    from ctm_core.diffusion.samplers import StackedRandomGenerator, gamma_sampler

    num_classes = int(student.label_dim)
    if num_classes < 2:
        raise ValueError(f"student: rejection needs a class-conditional student, got label_dim {num_classes}")
    P = pool_size(num_out, ratio)
    if len(seeds) < P:
        raise ValueError(f"seeds: expected at least {P} (= num_out·(1 + ratio)), got {len(seeds)}")
    xs, ys = [], []
    for i in range(0, P, batch):
        rnd = StackedRandomGenerator(device, list(seeds[i : min(i + batch, P)]))
        latents = rnd.randn([len(rnd), *img_shape])  # (b, C, H, W)
        y = rnd.randint(num_classes, [len(rnd)])  # (b,)
        labels = torch.eye(num_classes, device=device)[y]
        x = gamma_sampler(student, latents, labels, nfe=1, sigma_min=student.sigma_min, sigma_max=student.sigma_max)
        xs.append(x.cpu())
        ys.append(y.cpu())
    x, y = torch.cat(xs), torch.cat(ys)
    scores = classifier_log_probs(classifier, to_official_uint8(x), y, sigma=sigma, batch=batch)
    keep = select_rejection(scores, y, num_classes=num_classes, num_out=num_out, ratio=ratio, chunk=batch)
    return x[keep], y[keep], keep
