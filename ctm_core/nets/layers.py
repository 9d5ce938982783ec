"""EDM-compatible building blocks: Linear, Conv2d (with FIR resampling), GroupNorm, attention, UNetBlock,
noise embeddings.

Clean-room reimplementation from the facts in ``docs/edm.md#a11-building-blocks``, ``docs/edm.md#a13-porting-traps``
(Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022). Parameter and buffer
names, shapes and registration order match ``NVlabs/edm training/networks.py`` so that an EDM ``ema`` state_dict loads
with ``strict=True``. The CTM extension (Kim et al., ICLR 2024) is the optional ``affine_s`` of :class:`UNetBlock`.

Shape legend: ``B`` batch, ``C`` channels, ``H``/``W`` spatial size, ``E`` embedding width.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ctm_core.nets.utils import check_in

__all__ = [
    "weight_init",
    "Linear",
    "Conv2d",
    "GroupNorm",
    "attention_weights",
    "UNetBlock",
    "PositionalEmbedding",
    "FourierEmbedding",
]

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random initial weights (NVlabs/edm training/networks.py:19-24).

    ``xavier_uniform``: U(-a, a), a = sqrt(6 / (fan_in + fan_out)); ``xavier_normal``: N(0, 2 / (fan_in + fan_out));
    ``kaiming_uniform``: U(-a, a), a = sqrt(3 / fan_in); ``kaiming_normal``: N(0, 1 / fan_in).
    Uses torch's default generator, like ``torch.nn`` layer construction (seed it, or fork it, around
    construction if the fresh values matter); inference weights are always loaded over these.
    """
    check_in("mode", mode, INIT_MODES)
    shape = list(shape)
    if mode == "xavier_uniform":
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    return np.sqrt(1 / fan_in) * torch.randn(*shape)


class Linear(nn.Module):
    """Fully connected layer, ``weight: (out, in)``, ``bias: (out,)`` (NVlabs/edm training/networks.py:29-43).

    forward: ``x @ W^T + b`` with the parameters cast to ``x.dtype``; x: (B, in) -> (B, out).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1,
        init_bias: float = 0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


class _FrozenWeightConv(torch.autograd.Function):
    """conv2d / conv_transpose2d with a weight that takes no gradient: saves the weight only, not the input.

    A plain convolution keeps its input for the weight gradient even when the weight is frozen (the EMA target,
    the fixed resampling filters). The input gradient is the same ``convolution_backward`` call with the same
    output mask (input only) as autograd's own, so values are identical. Under autocast the inputs are cast as
    autocast would cast them.
    """

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, groups, transposed):
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w, b = x.to(dtype), w.to(dtype), (None if b is None else b.to(dtype))
        with torch.autocast(x.device.type, enabled=False):
            if transposed:
                y = F.conv_transpose2d(x, w, b, stride=stride, padding=padding, groups=groups)
            else:
                y = F.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)
        ctx.save_for_backward(w)
        ctx.input_meta = (tuple(x.shape), x.stride(), x.dtype, x.device)
        ctx.args = (stride, padding, groups, transposed)
        return y

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        shape, strides, dtype, device = ctx.input_meta
        stride, padding, groups, transposed = ctx.args
        shell = torch.empty_strided(shape, strides, dtype=dtype, device=device)  # sizes/layout only, never read
        s2, p2 = [stride] * 2, [padding] * 2
        grad_x = torch.ops.aten.convolution_backward(
            grad, shell, w, None, s2, p2, [1, 1], transposed, [0, 0], groups, (True, False, False)
        )[0]
        return grad_x, None, None, None, None, None, None


def _conv(
    x, w, b=None, *, stride: int = 1, padding: int = 0, groups: int = 1, transposed: bool = False
) -> torch.Tensor:
    """F.conv2d / F.conv_transpose2d; when only the input needs a gradient, without keeping the input."""
    frozen = not w.requires_grad and (b is None or not b.requires_grad)
    if frozen and x.requires_grad and torch.is_grad_enabled():
        return _FrozenWeightConv.apply(x, w, b, stride, padding, groups, transposed)
    if transposed:
        return F.conv_transpose2d(x, w, b, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)


class Conv2d(nn.Module):
    """2-D convolution with optional 2x up/down FIR resampling (NVlabs/edm training/networks.py:48-90).

    ``kernel=0`` gives a weight-less resample-only layer. The buffer ``resample_filter`` =
    outer(f, f) / sum(f)^2, shaped (1, 1, k, k), exists only when ``up`` or ``down`` (otherwise it is ``None``
    and absent from the state_dict). x: (B, in, H, W) -> (B, out, H', W') with H' = 2H (up), H/2 (down) or H.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1,
        init_bias: float = 0,
    ) -> None:
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be True, got up=True, down=True")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (
            nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if kernel
            else None
        )
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()  # (1, 1, k, k)
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            # Fused up (networks.py:75-77, HEAD semantics); used by no released config.
            x = F.conv_transpose2d(
                x,
                (f * 4).tile([self.in_channels, 1, 1, 1]),
                groups=self.in_channels,
                stride=2,
                padding=max(f_pad - w_pad, 0),
            )
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            # Fused down (networks.py:78-80): conv with the combined padding, then the depthwise stride-2 filter.
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            # Resample first, then convolve (networks.py:82-87).
            if self.up:
                x = _conv(
                    x,
                    (f * 4).tile([self.in_channels, 1, 1, 1]),
                    groups=self.in_channels,
                    stride=2,
                    padding=f_pad,
                    transposed=True,
                )
            if self.down:
                x = _conv(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                if b is not None and x.device.type == "cuda":
                    # Bias inside the conv call on CUDA (one kernel, no fp32 promotion of a bf16 output); on CPU
                    # the fused bias rounds differently from the separate add, so the CPU keeps the add below.
                    return _conv(x, w, b, padding=w_pad)
                x = _conv(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with ``num_groups = min(num_groups, C // min_channels_per_group)``
    (NVlabs/edm training/networks.py:95-106). x: (B, C, H, W) -> same.
    """

    def __init__(
        self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1:
            raise ValueError(
                f"GroupNorm: num_channels must be >= min_channels_per_group={min_channels_per_group}, "
                f"got {num_channels}"
            )
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), eps=self.eps)


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax_k(q^T k / sqrt(C)) computed in float32, returned in ``q.dtype``.

    NVlabs/edm training/networks.py:113-126.
    q, k: (B*heads, C, N) -> w: (B*heads, N_q, N_k). Plain autograd gives the same gradient as EDM's custom op.
    """
    logits = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k / np.sqrt(k.shape[1])).to(torch.float32))
    return logits.softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """Residual block with optional up/down sampling and self-attention (NVlabs/edm training/networks.py:133-187).

    Submodules in registration order: ``norm0, conv0, affine, [affine_s], norm1, conv1, [skip], [norm2, qkv, proj]``.
    ``affine_s`` (CTM s-branch, docs/ctm.md#12-cifar-10-student, docs/ctm.md#14-imagenet-64-student) exists iff
    ``emb_channels_s`` is given; its output is added to ``affine``'s. forward: x (B, in, H, W), emb (B or 1, E), emb_s
    (B or 1, E_s) -> (B, out, H', W').
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0,
        skip_scale: float = 1,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
        emb_channels_s: int | None = None,
    ) -> None:
        super().__init__()
        init = dict(init) if init is not None else {}
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.emb_channels_s = emb_channels_s
        if not attention:
            self.num_heads = 0
        elif num_heads is not None:
            self.num_heads = num_heads
        else:
            self.num_heads = out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        affine_out = out_channels * (2 if adaptive_scale else 1)

        # networks.py:150-164
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(
            in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init
        )
        self.affine = Linear(emb_channels, affine_out, **init)
        if emb_channels_s is not None:
            self.affine_s = Linear(emb_channels_s, affine_out, **init)  # CTM s-branch (fresh init, not zero)
        else:
            self.affine_s = None
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init
            )

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            qkv_init = init_attn if init_attn is not None else init
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **qkv_init)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, emb_s: torch.Tensor | None = None) -> torch.Tensor:
        if (emb_s is None) != (self.affine_s is None):
            raise ValueError(
                f"UNetBlock: emb_s must be given iff the block has an s-branch (affine_s present: "
                f"{self.affine_s is not None}), got emb_s={'None' if emb_s is None else tuple(emb_s.shape)}"
            )
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb)
        if self.affine_s is not None:
            params = params + self.affine_s(emb_s)
        params = params[:, :, None, None].to(x.dtype)  # (B, affine_out, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)  # scale first (networks.py:172)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            B, C, H, W = x.shape
            # q/k/v interleaved per channel: qkv channel (head * C/heads + c) * 3 + {0, 1, 2} (networks.py:182).
            q, k, v = self.qkv(self.norm2(x)).reshape(B * self.num_heads, C // self.num_heads, 3, H * W).unbind(2)
            w = attention_weights(q, k)  # (B*heads, HW, HW)
            a = torch.einsum("nqk,nck->ncq", w, v)  # (B*heads, C/heads, HW)
            x = self.proj(a.reshape(B, C, H, W)) + x
            x = x * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding without parameters (NVlabs/edm training/networks.py:192-206).

    freqs_i = (1 / max_positions)^(i / (C/2 - endpoint)), i = 0..C/2-1; x: (B,) -> [cos(x f), sin(x f)]: (B, C).
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))  # (B, C/2)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features, buffer ``freqs ~ N(0, scale^2)`` of size C/2 (NVlabs/edm training/networks.py:211-220).

    x: (B,) -> [cos(2 pi f x), sin(2 pi f x)]: (B, C).
    """

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
