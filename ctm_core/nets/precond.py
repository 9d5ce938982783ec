"""Preconditioning wrappers D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)).

Karras et al. (2022), Table 1 and Eq. (7); clean-room from ``docs/edm.md#a12-preconditioning``
(NVlabs/edm training/networks.py: VPPrecond 468-520, VEPrecond 527-565, EDMPrecond 631-671).

* EDM: c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
  c_in = 1 / sqrt(sigma_data^2 + sigma^2), c_noise = ln(sigma) / 4.
* VP: c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) sigma^-1(sigma) with
  sigma^-1(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d.
* VE: c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2).

Precision (networks.py:655-668): x and sigma go to float32, the inner net runs in float16 only when
``use_fp16 and not force_fp32`` on CUDA, and D is formed in float32.
"""

from __future__ import annotations

import inspect
import json

import torch
from torch import nn

from ctm_core.nets.networks import DhariwalUNet, SongUNet

__all__ = ["EDMPrecond", "VPPrecond", "VEPrecond", "build_precond", "MODEL_TYPES", "PRECOND_CLASSES"]

# The one model-name -> class maps: inner UNets (teachers and CTMStudent) and preconditioning wrappers.
MODEL_TYPES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def _record_init_kwargs(kwargs: dict) -> dict:
    """Deep-copy the constructor kwargs through JSON (tuples become lists); reject non-JSON values."""
    try:
        return json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as err:
        raise ValueError(f"init kwargs must be JSON-serialisable, got {kwargs!r} ({err})") from err


def _build_model(model_type: str, **kwargs) -> nn.Module:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
    return MODEL_TYPES[model_type](**kwargs)


def edm_coefficients(sigma: torch.Tensor, sigma_data: float):
    """EDM's scalings (Karras et al. 2022, Table 1; networks.py:660-663): (c_skip, c_out, c_in, c_noise), each
    shaped like ``sigma``. Shared by ``EDMPrecond`` and the CTM student (which applies them at t)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def prepare_class_labels(class_labels: torch.Tensor | None, label_dim: int, device) -> torch.Tensor | None:
    """EDM's label convention (networks.py:655-657): None if unconditional, zeros (1, L) if not given, else
    float32 (B, L)."""
    if label_dim == 0:
        return None
    if class_labels is None:
        return torch.zeros([1, label_dim], device=device)
    return class_labels.to(torch.float32).reshape(-1, label_dim)


class _Precond(nn.Module):
    """Shared input handling (networks.py:655-658) and F -> D assembly; subclasses give the coefficients.

    ``init_kwargs`` records the constructor arguments exactly as passed (positional ones by name, in call order,
    defaults not filled in), like EDM's ``persistence`` ``_init_kwargs`` (persistence.py:105-109), so
    ``build_precond(type(net).__name__, net.init_kwargs)`` rebuilds the same network.
    """

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        if args or kwargs:  # copy/pickle call __new__ without arguments
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs).arguments
            passed = {k: v for k, v in bound.items() if k not in ("self", "model_kwargs")}
            passed.update(bound.get("model_kwargs", {}))
            object.__setattr__(obj, "_passed_kwargs", passed)
        return obj

    def _init_common(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool) -> None:
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16

    def coefficients(
        self, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        **model_kwargs,
    ) -> torch.Tensor:
        """D(x; sigma). x: (B, C, H, W); sigma: (B,), (B, 1, 1, 1), 0-dim or float; class_labels: (B, L) or None
        (zeros (1, L) when None and label_dim > 0). ``model_kwargs`` (e.g. ``augment_labels``) go to the inner net.
        Returns float32 (B, C, H, W).
        """
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        class_labels = prepare_class_labels(class_labels, self.label_dim, x.device)  # (B, L), (1, L) or None
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype, f"inner net returned {F_x.dtype}, expected {dtype}"
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Identity for EDM/VP/VE (networks.py:519-520, 564-565, 670-671)."""
        return torch.as_tensor(sigma)


class EDMPrecond(_Precond):
    """Karras et al. (2022) preconditioning, Table 1 "Ours" (NVlabs/edm training/networks.py:631-671)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0,
        sigma_max: float = float("inf"),
        sigma_data: float = 0.5,
        model_type: str = "DhariwalUNet",
        **model_kwargs,
    ) -> None:
        super().__init__()
        self._init_common(img_resolution, img_channels, label_dim, use_fp16)
        self.init_kwargs = _record_init_kwargs(self.__dict__.pop("_passed_kwargs"))
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _build_model(
            model_type,
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )

    def coefficients(self, sigma: torch.Tensor):
        return edm_coefficients(sigma, self.sigma_data)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning, Table 1 "VP" (NVlabs/edm training/networks.py:468-520).

    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1); sigma_min = sigma(epsilon_t), sigma_max = sigma(1).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
        model_type: str = "SongUNet",
        **model_kwargs,
    ) -> None:
        super().__init__()
        self._init_common(img_resolution, img_channels, label_dim, use_fp16)
        self.init_kwargs = _record_init_kwargs(self.__dict__.pop("_passed_kwargs"))
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self.model = _build_model(
            model_type,
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t**2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: torch.Tensor):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(_Precond):
    """Variance-exploding preconditioning, Table 1 "VE" (NVlabs/edm training/networks.py:527-565)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.02,
        sigma_max: float = 100,
        model_type: str = "SongUNet",
        **model_kwargs,
    ) -> None:
        super().__init__()
        self._init_common(img_resolution, img_channels, label_dim, use_fp16)
        self.init_kwargs = _record_init_kwargs(self.__dict__.pop("_passed_kwargs"))
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = _build_model(
            model_type,
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )

    def coefficients(self, sigma: torch.Tensor):
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


PRECOND_CLASSES: dict[str, type[_Precond]] = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond}


def _named_params(fn) -> list[str]:
    return [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"
    ]


def build_precond(class_name: str, init_kwargs: dict) -> nn.Module:
    """Build ``EDMPrecond``/``VPPrecond``/``VEPrecond`` from a class name and its constructor kwargs.

    ``class_name`` may carry EDM's module path (``training.networks.EDMPrecond``). Raises ``ValueError`` naming an
    unknown class, ``model_type`` or kwarg (with the accepted names), or a missing required kwarg.
    """
    short = class_name.rsplit(".", 1)[-1]
    if short not in PRECOND_CLASSES:
        raise ValueError(f"class_name must be one of {sorted(PRECOND_CLASSES)}, got {class_name!r}")
    cls = PRECOND_CLASSES[short]
    kwargs = dict(init_kwargs)
    model_type = kwargs.get("model_type", inspect.signature(cls.__init__).parameters["model_type"].default)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
    precond_names = _named_params(cls.__init__)
    # The precond sets these inner-net kwargs itself.
    model_names = [
        n
        for n in _named_params(MODEL_TYPES[model_type].__init__)
        if n not in ("img_resolution", "in_channels", "out_channels", "label_dim")
    ]
    allowed = precond_names + model_names
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise ValueError(
            f"unknown init kwargs for {short}(model_type={model_type!r}): got {unknown}, expected a subset of {allowed}"
        )
    missing = [n for n in ("img_resolution", "img_channels") if n not in kwargs]
    if missing:
        raise ValueError(f"missing required init kwargs for {short}: {missing}, got {sorted(kwargs)}")
    return cls(**kwargs)
