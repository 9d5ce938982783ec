"""LPIPS distance as piq 0.7.0 computes it, used as the CTM distance d(., .) (docs/ctm.md#24-ctm-loss,
docs/ctm.md#811-lpips-is-piq-070).

Implements the Learned Perceptual Image Patch Similarity of Zhang et al. (2018), "The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric", in the exact variant that CTM trains with:
``piq.LPIPS(replace_pooling=True, reduction='none')`` (Kim-Dongjun/ctm-cifar10 cm/enc_dec_lib.py:14-16,
piq==0.7.0). What piq 0.7.0 does (photosynthesis-team/piq piq/perceptual.py, read for facts only):

- feature extractor: torchvision ``vgg16().features``, frozen (``ContentLoss.__init__``), every
  ``MaxPool2d`` replaced by ``AvgPool2d(kernel_size=2, stride=2, padding=0)`` (``ContentLoss.replace_pooling``);
- taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = ``features`` indices 3, 8, 15, 22, 29
  (``VGG16_LAYERS``, ``LPIPS.__init__``);
- input in [0, 1], normalised with ImageNet mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225)
  (``IMAGENET_MEAN``/``IMAGENET_STD``, ``ContentLoss.get_features``);
- every tapped feature unit-normalised along channels, ``f / (sqrt(sum_c f^2) + 1e-10)``
  (``EPS``, ``ContentLoss.normalize``);
- distance ``(f_x - f_y)^2`` (``MSELoss(reduction='none')``), times the learned linear weight of
  shape (1, C, 1, 1), spatial mean, concatenation over layers and channel sum (``ContentLoss.forward``): one value per
  sample with ``reduction='none'``. docs/ctm.md#24-ctm-loss cites these as perceptual.py:163-185, 327-372.

No weights are downloaded: ``LPIPS.from_files`` reads a torchvision VGG16 state dict and the LPIPS linear
weights from local files, ``LPIPS(random_init=True, generator=...)`` builds random weights for tests.

Shape legend: B batch, C channels, H/W spatial size. Images x: (B, 3, H, W).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LPIPS",
    "LPIPS_TAP_INDICES",
    "VGG16_CONV_INDICES",
    "VGG16_WIDTHS",
    "as_rgb",
    "ctm_lpips_distance",
    "load_state_file",
    "vgg16_widths",
]

# torchvision vgg16 ``features`` layout ("D" config): conv indices, 'M' pools at 4, 9, 16, 23, 30.
# piq perceptual.py VGG16_LAYERS maps conv1_1..conv5_3 to these indices.
VGG16_CONV_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# Output channels of the 13 convolutions conv1_1 ... conv5_3 of torchvision's vgg16 ("D" config); a max-pool follows
# conv1_2, conv2_2, conv3_3, conv4_3 and conv5_3 (features indices 4, 9, 16, 23, 30).
VGG16_WIDTHS: tuple[int, ...] = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_POOL_AFTER = (1, 3, 6, 9, 12)  # conv positions (0-based among the 13) followed by a pool; also the LPIPS taps
# relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (piq perceptual.py VGG16_LAYERS, LPIPS.__init__ lpips_layers).
LPIPS_TAP_INDICES: tuple[int, ...] = (3, 8, 15, 22, 29)
LPIPS_CHANNELS: tuple[int, ...] = tuple(VGG16_WIDTHS[j] for j in _POOL_AFTER)  # (64, 128, 256, 512, 512)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # piq perceptual.py IMAGENET_MEAN
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)  # piq perceptual.py IMAGENET_STD
EPS = 1e-10  # piq perceptual.py EPS, feature normalisation constant


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor] | list[torch.Tensor]:
    """Read tensors from a ``.safetensors`` file or a torch file loaded with ``weights_only=True``.

    Never unpickles arbitrary objects. Returns a dict name -> tensor, or a list of tensors for torch files
    that store a plain list (piq's ``lpips_weights.pt`` is such a list).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: expected an existing file, got {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{path}: expected a mapping of tensors, got non-tensor entries {bad[:5]}")
        return dict(obj)
    if isinstance(obj, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in obj):
        return list(obj)
    raise ValueError(f"{path}: expected a state dict or a list of tensors, got {type(obj).__name__}")


def _make_vgg16_features(widths: Sequence[int] = VGG16_WIDTHS) -> nn.Sequential:
    """torchvision ``vgg16().features``, every max-pool replaced by an average pool (piq ``replace_pooling``).

    ``widths``: output channels of the 13 convolutions (torchvision's are ``VGG16_WIDTHS``; tests use narrower
    copies of the same layout so that a stage run with LPIPS stays cheap on CPU)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for j, width in enumerate(widths):
        layers += [nn.Conv2d(in_channels, int(width), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
        in_channels = int(width)
        if j in _POOL_AFTER:
            layers.append(nn.AvgPool2d(kernel_size=2, stride=2, padding=0))
    return nn.Sequential(*layers)


def vgg16_widths(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The 13 convolution widths of a torchvision-layout VGG16 state dict (``features.N.weight`` or ``N.weight``).

    Checks the layout: 13 3×3 convolutions at ``VGG16_CONV_INDICES``, 3 input channels, each one's input width the
    previous one's output width. Raises ValueError naming the first key that does not fit."""
    if not isinstance(state, Mapping):
        raise ValueError(f"VGG16 weights: expected a state dict, got {type(state).__name__}")
    prefix = "features." if any(k.startswith("features.") for k in state) else ""
    widths, c_in = [], 3
    for i in VGG16_CONV_INDICES:
        key = f"{prefix}{i}.weight"
        if key not in state:
            raise ValueError(f"VGG16 weights: missing key {key!r} (expected torchvision vgg16 'features.*' names)")
        w = state[key]
        if w.ndim != 4 or tuple(w.shape[1:]) != (c_in, 3, 3):
            raise ValueError(f"VGG16 weights: {key} expected shape (C, {c_in}, 3, 3), got {tuple(w.shape)}")
        widths.append(int(w.shape[0]))
        c_in = int(w.shape[0])
    return tuple(widths)


def as_rgb(x: torch.Tensor) -> torch.Tensor:
    """Images for LPIPS: (B, 3, H, W) unchanged; grey (B, 1, H, W) repeated to 3 channels (VGG16 takes RGB, and a
    grey pixel is the RGB pixel with equal channels; docs/presets.md#lpips-weights). Other channel counts raise."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"LPIPS: expected images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class LPIPS(nn.Module):
    """piq 0.7.0 LPIPS with ``replace_pooling=True`` and ``reduction='none'`` (see the module docstring).

    Parameters (all frozen, ``requires_grad=False``):
      ``features.{0,2,5,...,28}.{weight,bias}``: VGG16 convolutions, same keys as torchvision's vgg16;
      ``weights.{0..4}``: LPIPS linear weights, shapes (1, C_l, 1, 1) for C_l in (64, 128, 256, 512, 512)
      (piq keeps them as the list ``self.weights``, perceptual.py ContentLoss.__init__).

    Args:
        random_init: must be True to build without files (tests); real weights come through ``from_files``.
        generator: torch.Generator for ``random_init`` (VGG: He-normal fan-out as torchvision's vgg init;
            linear weights: U[0, 1), non-negative like the trained ones).
    """

    def __init__(
        self,
        *,
        random_init: bool = False,
        generator: torch.Generator | None = None,
        widths: Sequence[int] = VGG16_WIDTHS,
    ) -> None:
        super().__init__()
        if not random_init:
            raise ValueError(
                "LPIPS: weights are never downloaded; use LPIPS.from_files(vgg_path, lpips_path) for the real "
                "weights or LPIPS(random_init=True, generator=...) for tests, got random_init=False"
            )
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"LPIPS(random_init=True) needs generator=torch.Generator(...), got {generator!r}")
        self._build(widths)
        self._random_init(generator)

    def _build(self, widths: Sequence[int] = VGG16_WIDTHS) -> None:
        """Create the (uninitialised) modules; weights are filled by ``_random_init`` or the loaders."""
        if len(widths) != len(VGG16_WIDTHS) or min(widths) < 1:
            raise ValueError(f"LPIPS widths: expected 13 positive conv widths, got {tuple(widths)}")
        with torch.device("meta"):
            self.features = _make_vgg16_features(widths)
            taps = [int(widths[j]) for j in _POOL_AFTER]
            self.weights = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in taps])
        self.to_empty(device="cpu")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def _random_init(self, generator: torch.Generator) -> None:
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                w = torch.randn(m.weight.shape, generator=generator, device=generator.device)
                m.weight.copy_(w * math.sqrt(2.0 / fan_out))
                m.bias.zero_()
        for w in self.weights:
            w.copy_(torch.rand(w.shape, generator=generator, device=generator.device))

    @classmethod
    def from_files(cls, vgg_path: str | os.PathLike, lpips_path: str | os.PathLike) -> LPIPS:
        """Load VGG16 + LPIPS linear weights from local files (``.safetensors`` or weights-only torch files).

        ``vgg_path``: a torchvision vgg16 state dict (``features.N.*`` keys; ``classifier.*`` ignored) or a
        features-only dict (``N.weight`` keys). ``lpips_path``: piq's ``lpips_weights.pt`` (a list of 5
        tensors), or a dict with keys ``weights.{0..4}`` (this module's names) or ``lin{l}.model.1.weight``
        (richzhang/PerceptualSimilarity v0.1 names). The convolution widths are read from the VGG file (torchvision's
        are ``VGG16_WIDTHS``; ``vgg16_widths`` checks the layout).
        """
        vgg = load_state_file(vgg_path)
        lpips = cls.__new__(cls)
        nn.Module.__init__(lpips)
        lpips._build(vgg16_widths(vgg))
        lpips.load_vgg16_state_dict(vgg)
        lpips.load_linear_weights(load_state_file(lpips_path))
        return lpips

    @torch.no_grad()
    def load_vgg16_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy the 13 VGG16 convolutions by name; raises ValueError naming missing keys or bad shapes."""
        if not isinstance(state, Mapping):
            raise ValueError(f"VGG16 weights: expected a state dict, got {type(state).__name__}")
        if not any(k.startswith("features.") for k in state):
            state = {f"features.{k}": v for k, v in state.items()}
        own = {k: v for k, v in self.state_dict().items() if k.startswith("features.")}
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"VGG16 weights: missing keys {missing} (expected torchvision vgg16 'features.*' names)")
        for k, v in own.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"VGG16 weights: {k} expected shape {tuple(v.shape)}, got {tuple(state[k].shape)}")
            v.copy_(state[k].to(v.dtype))

    @torch.no_grad()
    def load_linear_weights(self, weights: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> None:
        """Copy the five LPIPS linear weights, accepted as a list or a dict (see ``from_files``)."""
        if isinstance(weights, Mapping):
            if all(f"weights.{l}" in weights for l in range(5)):
                weights = [weights[f"weights.{l}"] for l in range(5)]
            elif all(f"lin{l}.model.1.weight" in weights for l in range(5)):
                weights = [weights[f"lin{l}.model.1.weight"] for l in range(5)]
            else:
                raise ValueError(
                    "LPIPS linear weights: expected keys weights.{0..4} or lin{0..4}.model.1.weight, "
                    f"got {sorted(weights)[:10]}"
                )
        if len(weights) != 5:
            raise ValueError(f"LPIPS linear weights: expected 5 tensors, got {len(weights)}")
        for l, (dst, src) in enumerate(zip(self.weights, weights)):
            src = torch.as_tensor(src)
            if src.numel() != dst.numel():
                raise ValueError(
                    f"LPIPS linear weight {l}: expected {dst.numel()} values, got shape {tuple(src.shape)}"
                )
            dst.copy_(src.reshape(dst.shape).to(dst.dtype))

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised VGG features at the five taps. x: (B, 3, H, W) in [0, 1] -> list of (B, C_l, H_l, W_l)."""
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # piq ContentLoss.get_features
        feats = []
        for i, module in enumerate(self.features):
            h = module(h)
            if i in LPIPS_TAP_INDICES:
                norm = torch.sqrt(torch.sum(h**2, dim=1, keepdim=True))  # piq ContentLoss.normalize
                feats.append(h / (norm + EPS))
            if i == LPIPS_TAP_INDICES[-1]:
                break  # pool5 (index 30) feeds no tap
        return feats

    def layer_distances(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer LPIPS terms, each (B,): mean_{h,w} sum_c w_c (f_x - f_y)^2 (piq ContentLoss.forward)."""
        fx, fy = self.layer_features(x), self.layer_features(y)
        return [((a - b) ** 2 * w).mean(dim=(2, 3)).sum(dim=1) for a, b, w in zip(fx, fy, self.weights)]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS(x, y) per sample. x, y: (B, 3, H, W) in [0, 1] (not clamped) -> (B,)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS: expected x, y of equal shape (B, 3, H, W), got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        return torch.stack(self.layer_distances(x, y), dim=0).sum(dim=0)


def ctm_lpips_distance(lpips: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CTM's LPIPS distance between images in [-1, 1] (docs/ctm.md#24-ctm-loss; ctm-cifar10
    cm/karras_diffusion.py:357-362).

    When H < 256 both images are resized bilinearly to 224 x 224 (``align_corners=False``), then mapped to
    [0, 1] with (x + 1) / 2 without clamping, then LPIPS per sample. x, y: (B, 3, H, W) -> (B,).
    Gradients flow to both inputs; wrap the target in ``torch.no_grad`` on the caller's side.
    """
    if x.shape != y.shape:
        raise ValueError(
            f"ctm_lpips_distance: x and y must have equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[-2] < 256:
        x = F.interpolate(x, size=224, mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=224, mode="bilinear", align_corners=False)
    return lpips((x + 1) / 2.0, (y + 1) / 2.0)
