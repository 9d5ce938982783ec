"""The FID Inception-v3 (pool3, 2048-d) in the TensorFlow-ported variant used by pytorch-fid.

Architecture facts (layer names, shapes, pooling) are taken from pytorch/vision torchvision/models/inception.py
(``Inception3``, ``InceptionA``-``InceptionE``, ``BasicConv2d``) and the FID patches of mseitzer/pytorch-fid
src/pytorch_fid/inception.py (``fid_inception_v3``, ``FIDInceptionA``, ``FIDInceptionC``, ``FIDInceptionE_1``,
``FIDInceptionE_2``); the code is written here rather than imported, because both libraries need torchvision
(pytorch-fid builds its network from torchvision's ``Inception3`` blocks; torch-fidelity's package ``__init__``
imports torchvision), and torchvision does not import beside this project's CPU torch 2.13 wheel (it is not in the
project venv); ``tests/unit/test_inception.py`` pins the layout against the torchvision / pytorch-fid facts instead.

What makes the FID variant differ from torchvision's ImageNet Inception-v3 (pytorch-fid ``fid_inception_v3``):
    * 1008 output classes and no auxiliary classifier (``num_classes=1008, aux_logits=False``);
    * the 3×3 average pools inside Mixed_5b-5d (A blocks), Mixed_6b-6e (C blocks) and Mixed_7b (first E block)
      exclude the zero padding from the average (``count_include_pad=False``), as TensorFlow does;
    * Mixed_7c (second E block) uses a 3×3 **max** pool in its pool branch;
    * weights ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's ``FID_WEIGHTS_URL``), a port of TF's
      ``inception-2015-12-05.tgz``; ``state_dict`` names are torchvision's (``Conv2d_1a_3x3.conv.weight``,
      ``Mixed_5b.branch1x1.bn.running_var``, ..., ``fc.weight``) so the file loads strictly by name.

Input handling follows the TensorFlow graph of the original FID code (TTUR ``fid.py``), as torch-fidelity
reproduces it bit-exactly (torch_fidelity/feature_extractor_inceptionv3.py ``forward``, and
interpolate_compat_tensorflow.py): uint8 (or float in [0, 255]) NCHW images are resized to 299×299 with
TensorFlow 1.x ``resize_bilinear(align_corners=False)`` semantics (``resize_bilinear_tf1``: output pixel i samples
the input at i·in/out, no half-pixel offset; tensorflow core/kernels/image_resizer_state.h, resize_bilinear_op.cc)
and normalised by ``(x − 128)/128``. 1-channel images are repeated to 3 channels as EDM fid.py:66-67 does.
pytorch-fid instead uses ``F.interpolate(mode="bilinear", align_corners=False)`` and ``2·x/255 − 1``, which moves FID
by ~0.1 % (pytorch-fid README); NVIDIA's detector (EDM's ``inception-2015-12-05.pkl``) mimics the TF graph too.
tests/unit/test_inception_reference.py checks this module against torch-fidelity's on random weights.

Parameter count: 23,850,960 (all weights incl. fc; BN running stats are buffers). Derivation: torchvision's
inception_v3 has 27,161,264 parameters (torchvision weights table, ``num_params``) including the auxiliary
classifier (conv0 1×1 768→128 + BN: 98,560; conv1 5×5 128→768 + BN: 2,459,136; fc 768→1000: 769,000; total
3,326,696) and a 1000-way fc; removing AuxLogits and widening fc to 1008 classes (+8·2049 = 16,392) gives
27,161,264 − 3,326,696 + 16,392 = 23,850,960. Without fc (the pool3 trunk) it is 21,785,568.

Weights are never downloaded here: fetch the file through the project's fetcher (pin its sha256) and call
``FIDInception.from_file(path, expected_sha256=...)``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "FIDInception",
    "NUM_FEATURES",
    "count_parameters",
    "extract_features",
    "resize_bilinear_tf1",
]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid inception.py:13 (FID_WEIGHTS_URL)
NUM_FEATURES = 2048  # pool3
NUM_CLASSES = 1008  # pytorch-fid fid_inception_v3: _inception_v3(num_classes=1008, aux_logits=False)
EXPECTED_NUM_PARAMETERS = 23_850_960  # see the module docstring


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm(eps=1e-3) → ReLU (torchvision ``BasicConv2d``). Keys: conv.weight, bn.*."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool3x3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 'SAME' average pool ignores the padded zeros (pytorch-fid FIDInceptionA/C/E_1 patches).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35×35 block (Mixed_5b/5c/5d): 1x1 | 1x1→5x5 | 1x1→3x3→3x3 | TF avg pool→1x1. Out: 224 + pool_features."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_tf_avg_pool3x3(x))
        return torch.cat([a, b, c, d], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35→17 (Mixed_6a): 3x3/2 | 1x1→3x3→3x3/2 | max pool 3/2. Out: 384 + 96 + in_channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)


class InceptionC(nn.Module):
    """17×17 block (Mixed_6b-6e) with factorised 1×7/7×1 convs and a TF avg pool branch. Out: 768."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        c = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(c))))
        d = self.branch_pool(_tf_avg_pool3x3(x))
        return torch.cat([a, b, c, d], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17→8 (Mixed_7a): 1x1→3x3/2 | 1x1→1x7→7x1→3x3/2 | max pool 3/2. Out: 320 + 192 + in."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)


class InceptionE(nn.Module):
    """8×8 block (Mixed_7b with ``pool="avg"`` TF avg pool, Mixed_7c with ``pool="max"``). Out: 2048."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE: pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], dim=1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], dim=1)
        if self.pool == "avg":
            p = _tf_avg_pool3x3(x)
        else:
            # pytorch-fid FIDInceptionE_2: the TF graph max-pools here (likely a bug in that graph, kept for FID).
            p = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        d = self.branch_pool(p)
        return torch.cat([a, b, c, d], dim=1)


class FIDInception(nn.Module):
    """FID Inception-v3 returning pool3 features ``(N, 2048)`` float32 from images ``(N, C, H, W)``, C ∈ {1, 3}.

    ``FIDInception()`` builds the modules on the **meta** device (no memory, no RNG use): a skeleton for key lists and
    for ``from_file``. ``FIDInception(random_init=True, generator=g)`` materialises random weights on the CPU from
    the injected generator (He-normal convs, identity BatchNorm), for tests of the whole path. Real weights:
    ``FIDInception.from_file(path, expected_sha256=...)``. The model is returned in eval mode either way.
    """

    def __init__(self, random_init: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        with torch.device("meta"):
            # Stem (torchvision Inception3.__init__; shapes after each op for a 299×299 input in comments)
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)  # (N, 32, 149, 149)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)  # (N, 32, 147, 147)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)  # (N, 64, 147, 147) → max pool → 73×73
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)  # (N, 80, 73, 73)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)  # (N, 192, 71, 71) → max pool → 35×35
            self.Mixed_5b = InceptionA(192, pool_features=32)  # (N, 256, 35, 35)
            self.Mixed_5c = InceptionA(256, pool_features=64)  # (N, 288, 35, 35)
            self.Mixed_5d = InceptionA(288, pool_features=64)  # (N, 288, 35, 35)
            self.Mixed_6a = InceptionB(288)  # (N, 768, 17, 17)
            self.Mixed_6b = InceptionC(768, channels_7x7=128)
            self.Mixed_6c = InceptionC(768, channels_7x7=160)
            self.Mixed_6d = InceptionC(768, channels_7x7=160)
            self.Mixed_6e = InceptionC(768, channels_7x7=192)  # (N, 768, 17, 17)
            self.Mixed_7a = InceptionD(768)  # (N, 1280, 8, 8)
            self.Mixed_7b = InceptionE(1280, pool="avg")  # (N, 2048, 8, 8)
            self.Mixed_7c = InceptionE(2048, pool="max")  # (N, 2048, 8, 8) → global avg pool → pool3
            self.fc = nn.Linear(NUM_FEATURES, NUM_CLASSES)  # logits; unused for FID, kept so the file loads strictly
        if random_init:
            if generator is None:
                raise ValueError("FIDInception(random_init=True) needs generator= (a seeded torch.Generator)")
            self.to_empty(device="cpu")
            self._random_init(generator)
        self.eval()
        self.requires_grad_(False)

    @torch.no_grad()
    def _random_init(self, generator: torch.Generator) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.num_batches_tracked.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.01)
                m.bias.zero_()

    @classmethod
    def from_file(cls, path: str | os.PathLike, expected_sha256: str | None = None) -> FIDInception:
        """Load weights (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or a ``.safetensors`` copy) strictly.

        The file's sha256 is checked before parsing when ``expected_sha256`` is given. ``.pth``/``.pt`` files are read
        with ``torch.load(weights_only=True)`` (no arbitrary unpickling); ``.safetensors`` with safetensors. A missing
        ``*.num_batches_tracked`` (unused in eval mode) is filled with 0 by BatchNorm's loader; any other missing or
        unexpected key, or a shape mismatch, raises.
        """
        path = pathlib.Path(path)
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise ValueError(f"FIDInception.from_file: sha256 of {path} is {digest}, expected {expected_sha256}")
        if path.suffix == ".safetensors":
            import safetensors.torch

            state_dict = safetensors.torch.load(data)
        else:
            state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict):
            raise ValueError(f"FIDInception.from_file: {path} does not hold a state_dict (got {type(state_dict)})")
        model = cls()
        model.load_state_dict(state_dict, strict=True, assign=True)
        for name, t in model.state_dict().items():
            if t.is_meta:
                raise ValueError(f"FIDInception.from_file: {path} left {name!r} uninitialised")
        model.float().eval().requires_grad_(False)
        model.file_sha256 = digest
        return model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, C, H, W) uint8, or float in [0, 255]; C ∈ {1, 3}. Returns pool3 features (N, 2048) float32."""
        x = _preprocess(images)  # (N, 3, 299, 299) in [-1, 1)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # adaptive avg pool to 1×1 → (N, 2048)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """fc on pool3 features: (N, 2048) → (N, 1008) (for Inception Score style uses; not used by FID)."""
        return self.fc(features)


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1.x ``tf.image.resize_bilinear(x, size, align_corners=False)`` (legacy, no half-pixel centres).

    x: (N, C, H, W) float; returns (N, C, size[0], size[1]) in x's dtype. Output row i samples the input at
    y = i · H / size[0] (tensorflow core/kernels/image_resizer_state.h: scale = in/out; resize_bilinear_op.cc:
    top = floor(y), bottom = min(top + 1, H − 1), lerp by y − top), likewise for columns. This differs from
    ``F.interpolate(align_corners=False)``, which samples at (i + ½)·H/out − ½.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"resize_bilinear_tf1: expected a float (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")

    def axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # TF computes the scale in float32 (CalculateResizeScale returns float): keep that rounding.
        scale = torch.tensor(n_in / n_out, dtype=torch.float32).to(x.dtype)
        pos = torch.arange(n_out, dtype=x.dtype, device=x.device) * scale  # (n_out,)
        lo = pos.floor().to(torch.int64).clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, pos - lo.to(x.dtype)

    top, bottom, wy = axis(x.shape[2], size[0])
    left, right, wx = axis(x.shape[3], size[1])
    # Horizontal lerps first, then vertical, in TF's order (resize_bilinear_op.cc compute_lerp).
    x_top = x[:, :, top][..., left] + (x[:, :, top][..., right] - x[:, :, top][..., left]) * wx
    x_bot = x[:, :, bottom][..., left] + (x[:, :, bottom][..., right] - x[:, :, bottom][..., left]) * wx
    return x_top + (x_bot - x_top) * wy[:, None]  # (N, C, out_h, out_w)


def _preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8/float [0, 255] (N, C, H, W) → float32 (N, 3, 299, 299) in [-1, 1): TF1 resize, then (x − 128)/128."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"FIDInception: expected a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"FIDInception: expected images (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.to(torch.float32)
    elif images.is_floating_point():
        x = images.to(torch.float32)
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 255):
            raise ValueError("FIDInception: float images must be finite and in [0, 255] (the uint8 range)")
        if x.numel() and x.max() <= 1.0:
            warnings.warn("FIDInception: float images all <= 1; expected the [0, 255] range, not [0, 1]", stacklevel=3)
    else:
        raise TypeError(f"FIDInception: expected uint8 or floating images, got {images.dtype}")
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)  # grayscale → RGB (EDM fid.py:66-67)
    if tuple(x.shape[2:]) != (299, 299):
        x = resize_bilinear_tf1(x, (299, 299))
    return (x - 128.0) / 128.0


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images_uint8: torch.Tensor | np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Run ``model`` (any images → (B, D) feature net, e.g. ``FIDInception``) over images in batches.

    images_uint8: (N, C, H, W) uint8 tensor or ndarray (kept on the CPU; each batch is moved to ``device``).
    The model is moved to ``device`` (in place, as ``nn.Module.to`` does) and put in eval mode.
    Returns features (N, D) float64 ndarray, in input order.
    """
    if isinstance(images_uint8, np.ndarray):
        images_uint8 = torch.from_numpy(images_uint8)
    if not isinstance(images_uint8, torch.Tensor) or images_uint8.ndim != 4:
        raise ValueError(f"extract_features: expected images (N, C, H, W), got {getattr(images_uint8, 'shape', None)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"extract_features: batch_size must be an int >= 1, got {batch_size!r}")
    model.to(device).eval()
    n = images_uint8.shape[0]
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="features", unit="batch")
    out: list[np.ndarray] = []
    for i in starts:
        batch = images_uint8[i : i + batch_size].to(device)
        feats = model(batch)
        if feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
            raise ValueError(f"extract_features: model returned shape {tuple(feats.shape)}, expected (B, D)")
        out.append(feats.detach().to("cpu", torch.float64).numpy())
    if not out:
        raise ValueError("extract_features: no images given (N = 0)")
    return np.concatenate(out, axis=0)
