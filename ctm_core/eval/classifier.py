"""A small CNN classifier whose penultimate layer is the feature space for Fréchet distances on small datasets.

The FID Inception-v3 (``ctm_core.eval.inception``) is meaningless on 8×8 grey digits, so for the offline default
(``sklearn.datasets.load_digits``: 1,797 images, 8×8, levels 0..16) and other small prepared datasets the
project trains this classifier once on the training split and reports the "Fréchet classifier distance":
``ctm_core.eval.metrics.frechet_distance`` on ``SmallClassifier.features``. Its numbers are comparable only between
runs that use the same classifier file (pin its sha256), never with published FIDs.

Pixel convention (pipelines/prepare.py): images are stored as integer levels ``0..L-1``; the network sees
``level / (L − 1) · 2 − 1`` ∈ [-1, 1], the same range as the diffusion models' samples.

Shape legend: images ``(B, C, H, W)``; features ``(B, feature_dim)``; logits ``(B, num_classes)``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctm_core.data.prepared import levels_to_unit
from ctm_core.errors import InputError

__all__ = [
    "SmallClassifier",
    "classifier_features",
    "load_classifier",
    "save_classifier",
    "train_classifier",
]

KIND = "classifier"
WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "config.json"


class SmallClassifier(nn.Module):
    """Conv stack → flatten → Linear(feature_dim) → SiLU (= ``features``) → Linear(num_classes).

    Convs (3×3, SiLU): ``C → width``, then stride-2 convs doubling the width once, until the spatial size is ≤ 4,
    and one more 3×3 conv. For 8×8 digits with width 32: 8×8×32 → 4×4×64 → 4×4×64 → 1024 → 64 features → 10.

    ``generator=None`` builds a meta-device skeleton (for loading); with a generator the weights are drawn from it
    (He-uniform convs/linears, zero biases), never from the global RNG.
    """

    def __init__(
        self,
        img_channels: int,
        img_resolution: int,
        num_classes: int,
        width: int = 32,
        feature_dim: int = 64,
        num_levels: int = 256,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, v in (
            ("img_channels", img_channels),
            ("img_resolution", img_resolution),
            ("num_classes", num_classes),
            ("width", width),
            ("feature_dim", feature_dim),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SmallClassifier: {name} must be a positive int, got {v!r}")
        if num_classes < 2 or not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(
                f"SmallClassifier: need num_classes >= 2 and num_levels >= 2, got {num_classes}, {num_levels}"
            )
        self.init_kwargs: dict[str, Any] = dict(
            img_channels=img_channels,
            img_resolution=img_resolution,
            num_classes=num_classes,
            width=width,
            feature_dim=feature_dim,
            num_levels=num_levels,
        )
        self.num_levels = num_levels
        with torch.device("meta"):
            layers: list[nn.Module] = [nn.Conv2d(img_channels, width, 3, padding=1)]
            ch, res = width, img_resolution
            while res > 4:
                out_ch = min(2 * ch, 2 * width)
                layers.append(nn.Conv2d(ch, out_ch, 3, stride=2, padding=1))
                ch, res = out_ch, math.ceil(res / 2)
            layers.append(nn.Conv2d(ch, ch, 3, padding=1))
            self.convs = nn.ModuleList(layers)
            self.fc_features = nn.Linear(ch * res * res, feature_dim)
            self.fc_out = nn.Linear(feature_dim, num_classes)
        if generator is not None:
            self.to_empty(device="cpu")
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, (nn.Conv2d, nn.Linear)):
                        fan_in = m.weight[0].numel()
                        bound = math.sqrt(6.0 / fan_in)  # He-uniform for SiLU/ReLU nets
                        m.weight.copy_((torch.rand(m.weight.shape, generator=generator) * 2 - 1) * bound)
                        m.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) float in [-1, 1] → penultimate features (B, feature_dim)."""
        for conv in self.convs:
            x = F.silu(conv(x))
        return F.silu(self.fc_features(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) float in [-1, 1] → logits (B, num_classes)."""
        return self.fc_out(self.features(x))


def _check_images_labels(images: Any, labels: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels).to(torch.int64)
    if images.ndim != 4:
        raise ValueError(f"{where}: images must be (N, C, H, W), got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{where}: labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
    return images, labels


@torch.no_grad()
def _accuracy(model: SmallClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum())
    return correct / max(len(x), 1)


def train_classifier(
    images_uint8: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    num_levels: int,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    generator: torch.Generator,
    width: int = 32,
    feature_dim: int = 64,
    num_classes: int | None = None,
    heldout_images: torch.Tensor | np.ndarray | None = None,
    heldout_labels: torch.Tensor | np.ndarray | None = None,
) -> tuple[SmallClassifier, float | None]:
    """Train ``SmallClassifier`` with Adam and cross-entropy; deterministic given ``generator`` (init and shuffling).

    images_uint8: (N, C, H, W) integer levels 0..num_levels-1; labels: (N,) ints in 0..num_classes-1
    (``num_classes`` defaults to ``max(label) + 1``). Returns the eval-mode model and its accuracy on
    ``heldout_images``/``heldout_labels`` (None when not given). Cosine learning-rate decay to 0 over all steps.
    """
    if not isinstance(generator, torch.Generator):
        raise ValueError("train_classifier: generator must be a seeded torch.Generator")
    images, labels_t = _check_images_labels(images_uint8, labels, "train_classifier")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"train_classifier: {name} must be an int >= 1, got {v!r}")
    if not lr > 0:
        raise ValueError(f"train_classifier: lr must be > 0, got {lr!r}")
    num_classes = int(labels_t.max()) + 1 if num_classes is None else num_classes
    if int(labels_t.min()) < 0 or int(labels_t.max()) >= num_classes:
        raise ValueError(f"train_classifier: labels must lie in [0, {num_classes - 1}]")
    x = torch.as_tensor(levels_to_unit(images, num_levels))
    _, C, H, W = x.shape
    if H != W:
        raise ValueError(f"train_classifier: square images expected, got {H}x{W}")
    model = SmallClassifier(
        C, H, num_classes, width=width, feature_dim=feature_dim, num_levels=num_levels, generator=generator
    )
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(x)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / total_steps)))
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), labels_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    accuracy = None
    if heldout_images is not None or heldout_labels is not None:
        if heldout_images is None or heldout_labels is None:
            raise ValueError("train_classifier: pass both heldout_images and heldout_labels, or neither")
        hx, hy = _check_images_labels(heldout_images, heldout_labels, "train_classifier(heldout)")
        accuracy = _accuracy(model, torch.as_tensor(levels_to_unit(hx, num_levels)), hy)
    return model, accuracy


@torch.no_grad()
def classifier_features(
    model: SmallClassifier, images_levels: torch.Tensor | np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """Penultimate features of integer-level images (B, C, H, W) (mapped with the model's ``num_levels``).

    Returns (N, feature_dim) float64, ready for ``ctm_core.eval.metrics.feature_statistics``. Generated samples in
    [-1, 1] should first be quantised like the data (``ctm_core.eval.metrics.images_to_levels(x, model.num_levels)``).
    """
    x = torch.as_tensor(levels_to_unit(images_levels, model.num_levels))
    if x.ndim != 4:
        raise ValueError(f"classifier_features: images must be (N, C, H, W), got {tuple(x.shape)}")
    model.eval()
    out = [model.features(x[i : i + batch_size]).to(torch.float64) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.init_kwargs["feature_dim"]))


def save_classifier(model: SmallClassifier, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None) -> str:
    """Write the classifier as an artifact of kind ``"classifier"``: ``classifier.safetensors`` (weights; the JSON
    config also in its metadata) and ``config.json`` (``ctm_core.io.artifact``), atomically.

    ``meta`` (JSON-able: dataset hash, held-out accuracy, seed, ...) is stored alongside the constructor kwargs.
    Returns the sha256 of the safetensors file (what runs pin).
    """
    from ctm_core.io.artifact import save_artifact

    config = {"class_name": "SmallClassifier", "init_kwargs": model.init_kwargs}
    return save_artifact(
        out_dir, model.state_dict(), config, kind=KIND, weights_file=WEIGHTS_NAME, meta=meta or {}, embed_key="config"
    )


def _legacy_files(config: dict[str, Any]) -> dict[str, dict[str, str | None]]:
    """A classifier ``config.json`` written before the artifact format records no digest (runs pin the file's)."""
    return {WEIGHTS_NAME: {"sha256": None, "weights_sha256": None}}


def load_classifier(path: str | os.PathLike, expected_sha256: str | None = None) -> SmallClassifier:
    """Load a classifier from a folder written by ``save_classifier`` or its ``.safetensors`` file (no pickle).

    A folder is read as an artifact (digests in ``config.json`` verified); a lone file takes its config from the
    safetensors metadata. The file's sha256 is also checked against ``expected_sha256`` when given. Returns an
    eval-mode model with ``meta`` and ``file_sha256`` attributes.
    """
    from ctm_core.io.artifact import load_safetensors, read_artifact, safetensors_metadata
    from ctm_core.io.hashing import sha256_bytes

    path = pathlib.Path(path)
    if path.is_dir():
        art = read_artifact(path, KIND, files=[WEIGHTS_NAME], legacy=_legacy_files)
        config, tensors, digest = art.config, art.tensors[WEIGHTS_NAME], art.sha256[WEIGHTS_NAME]
    else:
        data = path.read_bytes()
        digest = sha256_bytes(data)
        metadata = safetensors_metadata(data, str(path))
        if "config" not in metadata:
            raise InputError(
                f"{path}: expected a 'config' metadata entry, got none (fix: write it with save_classifier)"
            )
        config, tensors = json.loads(metadata["config"]), None
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise InputError(
            f"load_classifier: sha256 of {path} is {digest}, expected {expected_sha256} (fix: train it again)"
        )
    if config.get("class_name") != "SmallClassifier":
        raise InputError(f"load_classifier: expected class_name 'SmallClassifier', got {config.get('class_name')!r}")
    if tensors is None:
        tensors = load_safetensors(data, str(path))
    model = SmallClassifier(**config["init_kwargs"])
    model.load_state_dict(tensors, strict=True, assign=True)
    model.meta = config.get("meta", {})
    model.file_sha256 = digest
    return model.eval().requires_grad_(False)
