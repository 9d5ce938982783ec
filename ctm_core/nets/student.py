"""The CTM student: an EDM-preconditioned denoiser that is also conditioned on the target time s.

Kim et al., "Consistency Trajectory Models", ICLR 2024, eq. (5)-(6):

    g_θ(x_t, t, s) = c_skip(t)·x_t + c_out(t)·F_θ(c_in(t)·x_t, c_noise(t), c_noise(s))
    G_θ(x_t, t, s) = (s/t)·x_t + (1 − s/t)·g_θ(x_t, t, s)

with EDM's scalings (Karras et al. 2022, Table 1): c_skip = σ_d²/(t²+σ_d²), c_out = t·σ_d/√(t²+σ_d²),
c_in = 1/√(t²+σ_d²), c_noise(t) = ln(t)/4 and, for the s-branch, c_noise(s) = ln(s)/4
(Kim-Dongjun/ctm-cifar10 cm/networks.py:853-875; cm/karras_diffusion.py:305-341).

By construction G(x, t, t) = x exactly. The inner network is ``SongUNet``/``DhariwalUNet`` built with
``ctm_s_branch=True`` (an own s-mapping MLP and a per-block ``affine_s`` added to the t-affine).

Shapes: x_t (B, C, H, W); t, s scalars, 0-dim or (B,) tensors (broadcast to the batch).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ctm_core.nets.precond import MODEL_TYPES, edm_coefficients, prepare_class_labels
from ctm_core.nets.utils import append_dims, check_positive

# Parameter-name fragments that exist only in the student (the s-branch, docs/ctm.md#12-cifar-10-student,
# docs/ctm.md#14-imagenet-64-student).
S_BRANCH_MARKERS = ("map_layer0_s.", "map_layer1_s.", "affine_s.")


def is_s_branch_key(name: str) -> bool:
    """True for parameters of the student's s-branch (not present in an EDM teacher)."""
    return any(marker in name for marker in S_BRANCH_MARKERS)


class CTMStudent(nn.Module):
    """EDM-preconditioned CTM student ``G_θ(x_t, t, s)``.

    Args:
        img_resolution, img_channels, label_dim: image geometry and number of classes (0 = unconditional).
        use_fp16: run the UNet in fp16 on CUDA (preconditioning stays fp32, as in EDM).
        sigma_min, sigma_max: the σ range the student is trained on; jumps "to data" end at sigma_min.
        sigma_data: σ_d of the EDM scalings.
        model_type: ``'SongUNet'`` (DDPM++/NCSN++) or ``'DhariwalUNet'`` (ADM).
        **model_kwargs: passed to the UNet (e.g. ``model_channels``, ``channel_mult``, ``dropout``).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        model_type: str = "SongUNet",
        **model_kwargs,
    ):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
        check_positive("sigma_min", sigma_min)
        check_positive("sigma_data", sigma_data)
        if not sigma_max > sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min={sigma_min}, got {sigma_max!r}")
        model_kwargs = {k: v for k, v in model_kwargs.items() if k != "ctm_s_branch"}
        self.init_kwargs = dict(
            img_resolution=int(img_resolution),
            img_channels=int(img_channels),
            label_dim=int(label_dim),
            use_fp16=bool(use_fp16),
            sigma_min=float(sigma_min),
            sigma_max=float(sigma_max),
            sigma_data=float(sigma_data),
            model_type=model_type,
            **copy.deepcopy(model_kwargs),
        )
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.use_fp16 = bool(use_fp16)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.model = MODEL_TYPES[model_type](
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            ctm_s_branch=True,
            **model_kwargs,
        )

    # ----------------------------------------------------------------------------------------------
    def _batch_times(self, value, name: str, batch: int, device, check: bool = True) -> torch.Tensor:
        """Return ``value`` as a float32 (B,) tensor, validating that it is positive.

        On CUDA the positivity check is a device-side assert (no host synchronisation in the training step).
        """
        v = torch.as_tensor(value, device=device).to(torch.float32).reshape(-1)
        if v.numel() == 1:
            v = v.expand(batch)
        if v.numel() != batch:
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(v.shape)}")
        if not check:
            return v
        if v.device.type == "cuda":
            torch._assert_async((v > 0).all())  # a non-positive time fails at a later kernel launch
        elif not bool((v > 0).all()):
            raise ValueError(f"{name} must be > 0 (CTM jumps end at sigma_min, never 0), got min {v.min().item()}")
        return v

    def g(self, x_t: torch.Tensor, t, s, class_labels: torch.Tensor | None = None, force_fp32: bool = False):
        """The s-conditioned denoiser g_θ(x_t, t, s) (float32, shape of ``x_t``)."""
        if x_t.ndim != 4:
            raise ValueError(f"x_t must have shape (B, C, H, W), got {tuple(x_t.shape)}")
        B = x_t.shape[0]
        x = x_t.to(torch.float32)
        t = self._batch_times(t, "t", B, x.device)
        s = self._batch_times(s, "s", B, x.device)
        labels = prepare_class_labels(class_labels, self.label_dim, x.device)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32

        c_skip, c_out, c_in, _ = edm_coefficients(append_dims(t, 4), self.sigma_data)  # (B, 1, 1, 1) each
        c_noise_t = t.log() / 4  # (B,)
        c_noise_s = s.log() / 4  # (B,), the same convention for the target time

        F_x = self.model((c_in * x).to(dtype), c_noise_t, class_labels=labels, noise_labels_s=c_noise_s)
        assert F_x.dtype == dtype
        return c_skip * x + c_out * F_x.to(torch.float32)

    def G(self, x_t: torch.Tensor, t, s, class_labels: torch.Tensor | None = None, force_fp32: bool = False):
        """The CTM jump G_θ(x_t, t, s) = (s/t)·x_t + (1 − s/t)·g_θ(x_t, t, s).

        Computed in float32, or float64 when ``x_t`` is float64 (the skip term keeps the sampler's
        precision). G(x, t, t) == x exactly.
        """
        g = self.g(x_t, t, s, class_labels, force_fp32=force_fp32)
        out_dtype = torch.promote_types(x_t.dtype, torch.float32)
        B = x_t.shape[0]
        t = self._batch_times(t, "t", B, x_t.device, check=False).to(out_dtype)  # checked by g
        s = self._batch_times(s, "s", B, x_t.device, check=False).to(out_dtype)
        ratio = append_dims(s / t, 4)
        return ratio * x_t.to(out_dtype) + (1 - ratio) * g.to(out_dtype)

    def forward(self, x_t, t, s, class_labels=None):
        return self.G(x_t, t, s, class_labels)

    def last_layer_weight(self) -> nn.Parameter:
        """The weight the adaptive loss weights differentiate against (docs/ctm.md#25-dsm-loss)."""
        return self.model.last_layer_weight()

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher: nn.Module, *, sigma_min: float = 0.002, sigma_max: float = 80.0, **overrides):
        """Build a student with the teacher's architecture and copy every teacher weight by name.

        The teacher must be an EDM-preconditioned network (``EDMPrecond``: same c_noise = ln σ/4 as the
        student). The s-branch keeps its fresh (non-zero) init, as the official code does
        (Kim-Dongjun/ctm-cifar10 cm_train.py:104-114). The teacher's ``map_augment`` (augmentation
        conditioning, unused by CTM) is dropped: the student is built with ``augment_dim=0``.
        ``overrides`` replace architecture kwargs (e.g. ``dropout``).
        """
        kwargs = getattr(teacher, "init_kwargs", None)
        if kwargs is None or type(teacher).__name__ != "EDMPrecond":
            raise ValueError(
                f"from_teacher expects an EDMPrecond teacher (as load_edm_checkpoint returns), got "
                f"{type(teacher).__name__}; VP/VE-preconditioned baselines use a different c_noise"
            )
        kwargs = copy.deepcopy(dict(kwargs))
        for drop in ("sigma_min", "sigma_max", "sigma_data"):
            kwargs.pop(drop, None)
        kwargs["augment_dim"] = 0
        kwargs.update(overrides)
        student = cls(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=float(teacher.sigma_data), **kwargs)
        student.load_teacher_weights(teacher)
        return student

    @torch.no_grad()
    def load_teacher_weights(self, teacher: nn.Module) -> list[str]:
        """Copy the teacher's parameters/buffers into the student by name; return the copied names.

        Every student tensor outside the s-branch must be found in the teacher with the same shape,
        otherwise a ``ValueError`` names the first missing/mismatched keys.
        """
        src = teacher.state_dict()
        dst = self.state_dict()
        copied, missing = [], []
        for name, tensor in dst.items():
            if is_s_branch_key(name):
                continue
            if name not in src or src[name].shape != tensor.shape:
                got = tuple(src[name].shape) if name in src else "absent"
                missing.append(f"{name} (student {tuple(tensor.shape)}, teacher {got})")
                continue
            tensor.copy_(src[name])
            copied.append(name)
        if missing:
            raise ValueError(f"teacher does not match the student architecture: {missing[:5]}")
        return copied


def s_branch_parameters(student: CTMStudent) -> dict[str, torch.Tensor]:
    """The student's s-branch parameters by name (the ones not initialised from the teacher)."""
    return {k: v for k, v in student.named_parameters() if is_s_branch_key(k)}
