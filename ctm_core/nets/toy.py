"""Small MLP networks with EDM scalings for low-dimensional or tiny-image data (tests, benchmarks).

``ToyEDMDenoiser`` follows EDM's preconditioning (Karras et al. 2022, Table 1, "EDM" column):

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)),
    c_skip = σ_d²/(σ²+σ_d²), c_out = σ·σ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ln(σ)/4.

``ToyCTMStudent`` is the CTM student of Kim et al. (ICLR 2024) eq. (5)-(6) on the same MLP with an s-branch:
an own embedding MLP for c_noise(s) whose output is added to the t embedding (the MLP analogue of the
``map_layer*_s`` + ``affine_s`` branch, docs/ctm.md#12-cifar-10-student):

    g_θ(x_t, t, s) = c_skip(t)·x_t + c_out(t)·F_θ(c_in(t)·x_t, c_noise(t), c_noise(s)),
    G_θ(x_t, t, s) = (s/t)·x_t + (1 − s/t)·g_θ(x_t, t, s).

Both expose the protocols used by the losses/samplers: ``D(x, sigma, class_labels=None)``, and
``G``/``g``/``last_layer_weight()`` with ``sigma_min``, ``sigma_max``, ``sigma_data``.
Shapes: x (B, *sample_shape), e.g. (B, D) or (B, C, H, W); sigma, t, s scalars or (B,).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ctm_core.nets.utils import append_dims, check_positive

__all__ = ["ToyMLP", "ToyEDMDenoiser", "ToyCTMStudent"]


class FourierFeatures(nn.Module):
    """Fixed sinusoidal embedding of a scalar (transformer-style frequencies, as EDM's PositionalEmbedding)."""

    def __init__(self, num_channels: int, max_positions: float = 10000.0):
        super().__init__()
        half = num_channels // 2
        freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, num_channels)
        arg = c.to(torch.float32)[:, None] * self.freqs[None, :] * 100.0  # scale: c_noise is O(1)
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class ToyMLP(nn.Module):
    """Residual MLP F(x, c_noise_t[, c_noise_s], labels) with FiLM-free additive time conditioning.

    Keys: ``map_layer0/1`` (t embedding), ``map_layer0_s/1_s`` (s embedding, only with ``s_branch``),
    ``map_label`` (when ``label_dim``), ``inp``, ``blocks.i.{norm,fc1,affine,fc2}``, ``out_norm``, ``out``.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        emb_channels: int = 128,
        label_dim: int = 0,
        dropout: float = 0.0,
        s_branch: bool = False,
    ):
        super().__init__()
        self.dim, self.label_dim, self.s_branch = dim, label_dim, s_branch
        self.fourier = FourierFeatures(emb_channels)
        self.map_layer0 = nn.Linear(emb_channels, hidden)
        self.map_layer1 = nn.Linear(hidden, hidden)
        if s_branch:
            self.map_layer0_s = nn.Linear(emb_channels, hidden)
            self.map_layer1_s = nn.Linear(hidden, hidden)
        if label_dim:
            self.map_label = nn.Linear(label_dim, hidden, bias=False)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.norm = nn.LayerNorm(hidden)
            blk.fc1 = nn.Linear(hidden, hidden)
            blk.affine = nn.Linear(hidden, hidden)
            blk.fc2 = nn.Linear(hidden, hidden)
            self.blocks.append(blk)
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.bias)
        nn.init.normal_(self.out.weight, std=1e-3)  # small but non-zero: the adaptive weight needs ∇_W ≠ 0

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        c_noise_s: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, dim); c_noise, c_noise_s: (B,); class_labels: (B, label_dim) one-hot -> F_x (B, dim)."""
        act = nn.functional.silu
        emb = self.map_layer1(act(self.map_layer0(self.fourier(c_noise))))
        if self.label_dim and class_labels is not None:
            emb = emb + self.map_label(class_labels.to(emb.dtype))
        if self.s_branch:
            if c_noise_s is None:
                raise ValueError("ToyMLP with s_branch=True needs c_noise_s (the s time), got None")
            emb = emb + self.map_layer1_s(act(self.map_layer0_s(self.fourier(c_noise_s))))
        emb = act(emb)
        h = self.inp(x)
        for blk in self.blocks:
            r = act(blk.fc1(act(blk.norm(h))) + blk.affine(emb))
            h = h + blk.fc2(self.dropout(r))
        return self.out(act(self.out_norm(h)))

    def last_layer_weight(self) -> nn.Parameter:
        return self.out.weight


def _times(value, name: str, batch: int, device, dtype) -> torch.Tensor:
    v = torch.as_tensor(value, device=device).to(dtype).reshape(-1)
    if v.numel() == 1:
        v = v.expand(batch)
    if v.numel() != batch:
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(v.shape)}")
    return v


class _ToyBase(nn.Module):
    """The toy MLP with EDM preconditioning; subclasses say whether it has the CTM s-branch (`s_branch`)."""

    s_branch: bool = False

    def __init__(
        self,
        sample_shape,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        label_dim: int = 0,
        hidden: int = 256,
        depth: int = 4,
        emb_channels: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_positive("sigma_min", sigma_min)
        check_positive("sigma_data", sigma_data)
        if not sigma_max > sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min={sigma_min}, got {sigma_max!r}")
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        self.label_dim = int(label_dim)
        self.init_kwargs = dict(
            sample_shape=list(self.sample_shape),
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            sigma_data=self.sigma_data,
            label_dim=self.label_dim,
            hidden=hidden,
            depth=depth,
            emb_channels=emb_channels,
            dropout=dropout,
        )
        self.model = ToyMLP(
            math.prod(self.sample_shape), hidden, depth, emb_channels, label_dim, dropout, self.s_branch
        )

    def _denoise(self, x, t, s, class_labels):
        """c_skip(t)·x + c_out(t)·F(c_in(t)·x, ln t/4[, ln s/4]) in float32."""
        B = x.shape[0]
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"x must have shape (B, {self.sample_shape}), got {tuple(x.shape)}")
        xf = x.to(torch.float32)
        t = _times(t, "sigma", B, x.device, torch.float32)
        sd = self.sigma_data
        t_ = append_dims(t, x.ndim)
        c_skip = sd**2 / (t_**2 + sd**2)
        c_out = t_ * sd / (t_**2 + sd**2).sqrt()
        c_in = 1 / (t_**2 + sd**2).sqrt()
        c_noise_s = None if s is None else _times(s, "s", B, x.device, torch.float32).log() / 4
        if class_labels is not None:
            class_labels = class_labels.to(torch.float32).reshape(B, self.label_dim)
        F_x = self.model((c_in * xf).reshape(B, -1), t.log() / 4, class_labels, c_noise_s).reshape(xf.shape)
        return c_skip * xf + c_out * F_x

    def last_layer_weight(self) -> nn.Parameter:
        return self.model.last_layer_weight()


class ToyEDMDenoiser(_ToyBase):
    """EDM-preconditioned MLP denoiser D(x; σ) (the toy teacher)."""

    s_branch = False

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self._denoise(x, sigma, None, class_labels)


class ToyCTMStudent(_ToyBase):
    """CTM student G_θ(x_t, t, s) on the toy MLP (s-branch added to the t embedding)."""

    s_branch = True

    def g(self, x_t: torch.Tensor, t, s, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """s-conditioned denoiser g_θ(x_t, t, s): (B, *sample_shape) float32."""
        return self._denoise(x_t, t, s, class_labels)

    def G(self, x_t: torch.Tensor, t, s, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """G_θ(x_t, t, s) = (s/t)·x_t + (1 − s/t)·g_θ(x_t, t, s); G(x, t, t) == x exactly."""
        g = self.g(x_t, t, s, class_labels)
        out_dtype = torch.promote_types(x_t.dtype, torch.float32)
        B = x_t.shape[0]
        t = _times(t, "t", B, x_t.device, out_dtype)
        s = _times(s, "s", B, x_t.device, out_dtype)
        ratio = append_dims(s / t, x_t.ndim)
        return ratio * x_t.to(out_dtype) + (1 - ratio) * g.to(out_dtype)

    def forward(self, x_t, t, s, class_labels=None):
        return self.G(x_t, t, s, class_labels)

    @classmethod
    def from_teacher(cls, teacher: ToyEDMDenoiser, **overrides) -> ToyCTMStudent:
        """Same architecture as the toy teacher; copies every teacher weight, the s-branch keeps its fresh init."""
        kwargs = dict(teacher.init_kwargs)
        kwargs.update(overrides)
        shape = kwargs.pop("sample_shape")
        student = cls(shape, **kwargs)
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        bad = [k for k in missing if "_s." not in k]
        if bad or unexpected:
            raise ValueError(f"from_teacher: teacher/student keys differ: missing {bad}, unexpected {unexpected}")
        return student
