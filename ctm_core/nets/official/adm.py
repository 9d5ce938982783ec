"""ADM networks (Dhariwal & Nichol 2021) in the key layout of the CTM authors' checkpoints.

- ``ADMUNet``: the sony/ctm ImageNet-64 student, ``UNetModel(training_mode='ctm')``: keys ``time_embed.*``,
  ``time_embed_s.*``, ``label_emb.weight``, ``input_blocks.N.M.*``, ``middle_block.{0,1,2}.*``,
  ``output_blocks.N.M.*``, ``out.{0,2}.*`` (docs/official.md#11-imagenet-64-student).
- ``EncoderUNet``: the 64x64 noisy classifier of guided-diffusion / sony/ctm ``EncoderUNetModel`` with attention
  pooling, used by classifier-rejection sampling (docs/official.md#3-classifier-rejection-sampling).

The maths is ADM's, written here from the facts in docs/official.md with this project's layers (``Linear``,
``Conv2d``, ``GroupNorm``, ``attention_weights`` of ``ctm_core.nets.layers``). The same maths in EDM's key layout is
``ctm_core.nets.networks.DhariwalUNet``; it cannot load these files because ADM normalises with 32 groups at every
width, splits q/k/v in another order and names every tensor differently.

Shape legend: ``B`` batch, ``C`` channels, ``H``/``W`` spatial, ``N`` = H·W, ``E`` embedding width, ``L`` classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ctm_core.nets.layers import Conv2d, GroupNorm, Linear, attention_weights
from ctm_core.nets.utils import check_in, check_positive

__all__ = ["ADMUNet", "EncoderUNet", "QKV_ORDERS", "timestep_embedding"]

# How a (B, 3·C, N) qkv tensor splits into heads (docs/official.md#13-attention-layouts):
# "three_heads" = (three, heads, d): sony/ctm's UNet and every AttentionPool2d;
# "heads_three" = (heads, three, d): guided-diffusion's legacy AttentionBlock (the classifier's).
QKV_ORDERS = ("three_heads", "heads_three")

# torch-default-like init (kaiming_uniform with sqrt(1/3)); ADM zero-initialises the output convolutions.
_INIT = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
_INIT_ZERO = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM's sinusoidal embedding [cos(t·f_i), sin(t·f_i)], f_i = exp(−ln(max_period)·i/(dim/2)), i < dim/2.

    timesteps: (B,) -> (B, dim) float32 (sony/ctm cm/nn.py timestep_embedding; docs/official.md#11-imagenet-64-student).
    The frequencies are formed with exp as ADM does: with inputs like 250·ln t ≈ −1554 a different rounding of
    the frequencies (EDM's ``PositionalEmbedding`` uses a power) moves the phases by ~1e-4.
    """
    if dim % 2:
        raise ValueError(f"timestep_embedding: dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.to(torch.float32)[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(channels: int) -> GroupNorm:
    """ADM's GroupNorm32: always 32 groups (not EDM's min(32, C/4)), eps 1e-5."""
    return GroupNorm(channels, num_groups=32, min_channels_per_group=1, eps=1e-5)


class _Conv1x1(nn.Module):
    """A 1x1 convolution stored as ADM stores it: weight (out, in, 1) for conv_nd(1, ...) (``dims=1``) or
    (out, in, 1, 1) for conv_nd(2, ...) (``dims=2``). forward: x (B, in, N) -> (B, out, N)."""

    def __init__(self, in_channels: int, out_channels: int, dims: int, zero: bool = False) -> None:
        super().__init__()
        check_in("dims", dims, {1, 2})
        conv = Conv2d(in_channels, out_channels, kernel=1, **(_INIT_ZERO if zero else _INIT))
        shape = (out_channels, in_channels) + (1,) * dims
        self.weight = nn.Parameter(conv.weight.detach().reshape(shape))
        self.bias = nn.Parameter(conv.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(self.weight.shape[0], self.weight.shape[1], 1).to(x.dtype)
        return F.conv1d(x, w, self.bias.to(x.dtype))


def _qkv_attention(qkv: torch.Tensor, num_heads: int, order: str) -> torch.Tensor:
    """softmax(qᵀk/√d)·v per head. qkv: (B, 3·C, N) in ``order`` (QKV_ORDERS) -> (B, C, N)."""
    B, width, N = qkv.shape
    d = width // (3 * num_heads)
    if order == "three_heads":
        q, k, v = qkv.reshape(B, 3, num_heads * d, N).unbind(1)  # each (B, H·d, N)
        q, k, v = (a.reshape(B * num_heads, d, N) for a in (q, k, v))
    else:
        q, k, v = qkv.reshape(B * num_heads, 3, d, N).unbind(1)  # each (B·H, d, N)
    w = attention_weights(q, k)  # (B·H, N_q, N_k)
    a = torch.einsum("nqk,nck->ncq", w, v)  # (B·H, d, N)
    return a.reshape(B, num_heads * d, N)


def _num_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels == -1:
        return num_heads
    if channels % num_head_channels:
        raise ValueError(f"attention: channels {channels} must be divisible by num_head_channels {num_head_channels}")
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """ADM self-attention with a residual: x + proj_out(attention(qkv(norm(x)))). Keys: ``norm``, ``qkv``,
    ``proj_out``. x: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, num_heads: int, order: str, dims: int) -> None:
        super().__init__()
        check_in("qkv order", order, set(QKV_ORDERS))
        self.num_heads = num_heads
        self.order = order
        self.norm = _norm(channels)
        self.qkv = _Conv1x1(channels, 3 * channels, dims)
        self.proj_out = _Conv1x1(channels, channels, dims, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.qkv(self.norm(x).reshape(B, C, H * W))  # (B, 3C, N)
        h = self.proj_out(_qkv_attention(h, self.num_heads, self.order))  # (B, C, N)
        return x + h.reshape(B, C, H, W)


class ResBlock(nn.Module):
    """ADM residual block with scale-shift norm (and CTM's ``emb_layers_s`` when ``s_branch``).

    h = in_layers(x) (GroupNorm, SiLU, [2x nearest up | 2x2 average down], 3x3 conv);
    (scale, shift) = emb_layers(emb) [+ emb_layers_s(emb_s)]; h = out_layers(norm(h)·(1 + scale) + shift);
    returns skip_connection(x) + h (docs/official.md#11-imagenet-64-student).
    x: (B, C_in, H, W), emb/emb_s: (B, E) -> (B, C_out, H', W').
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float,
        *,
        up: bool = False,
        down: bool = False,
        s_branch: bool = False,
    ) -> None:
        super().__init__()
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, **_INIT))
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, 2 * out_channels, **_INIT))
        if s_branch:
            self.emb_layers_s = nn.Sequential(nn.SiLU(), Linear(emb_channels, 2 * out_channels, **_INIT))
        else:
            self.emb_layers_s = None
        self.out_layers = nn.Sequential(
            _norm(out_channels), nn.SiLU(), nn.Dropout(p=dropout), Conv2d(out_channels, out_channels, 3, **_INIT_ZERO)
        )
        self.skip_connection = None if out_channels == channels else Conv2d(channels, out_channels, 1, **_INIT)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, emb_s: torch.Tensor | None = None) -> torch.Tensor:
        if (emb_s is None) != (self.emb_layers_s is None):
            raise ValueError(
                f"ResBlock: emb_s must be given iff the block has emb_layers_s, got emb_s "
                f"{'None' if emb_s is None else tuple(emb_s.shape)}"
            )
        h = self.in_layers[2](self._resample(self.in_layers[1](self.in_layers[0](x))))
        x = self._resample(x)
        params = self.emb_layers(emb)  # (B, 2·C_out)
        if emb_s is not None:
            params = params + self.emb_layers_s(emb_s)
        scale, shift = params[:, :, None, None].to(h.dtype).chunk(2, dim=1)  # (B, C_out, 1, 1) each
        h = self.out_layers[0](h) * (1 + scale) + shift
        for layer in self.out_layers[1:]:
            h = layer(h)
        return (x if self.skip_connection is None else self.skip_connection(x)) + h


class _Sequence(nn.ModuleList):
    """ADM's TimestepEmbedSequential: runs its layers in order, passing the embeddings to the ResBlocks."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, emb_s: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb, emb_s) if isinstance(layer, ResBlock) else layer(x)
        return x


def _check_common(img_resolution: int, model_channels: int, channel_mult: Sequence[int], num_res_blocks: int) -> None:
    check_positive("img_resolution", img_resolution)
    check_positive("model_channels", model_channels)
    check_positive("num_res_blocks", num_res_blocks)
    if len(channel_mult) < 1 or any(int(m) < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {list(channel_mult)!r}")
    if img_resolution % 2 ** (len(channel_mult) - 1):
        raise ValueError(
            f"img_resolution must be divisible by 2^(len(channel_mult)-1) = {2 ** (len(channel_mult) - 1)}, "
            f"got {img_resolution}"
        )


def _encoder(
    net: nn.Module,
    in_channels: int,
    model_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attention_ds: Sequence[int],
    heads: tuple[int, int],
    dropout: float,
    s_branch: bool,
    order: str,
    dims: int,
) -> tuple[list[int], int, int]:
    """Builds ``net.time_embed``, ``net.input_blocks`` and ``net.middle_block`` (shared by the UNet and the
    classifier). Returns (channels of each input block, final channels, final downsampling factor)."""
    E = 4 * model_channels
    num_heads, num_head_channels = heads

    def attn(ch: int) -> AttentionBlock:
        return AttentionBlock(ch, _num_heads(ch, num_heads, num_head_channels), order, dims)

    net.time_embed = nn.Sequential(Linear(model_channels, E, **_INIT), nn.SiLU(), Linear(E, E, **_INIT))
    ch = int(channel_mult[0]) * model_channels
    net.input_blocks = nn.ModuleList([_Sequence([Conv2d(in_channels, ch, 3, **_INIT)])])
    chans, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, E, int(mult) * model_channels, dropout, s_branch=s_branch)]
            ch = int(mult) * model_channels
            if ds in attention_ds:
                layers.append(attn(ch))
            net.input_blocks.append(_Sequence(layers))
            chans.append(ch)
        if level != len(channel_mult) - 1:
            net.input_blocks.append(_Sequence([ResBlock(ch, E, ch, dropout, down=True, s_branch=s_branch)]))
            chans.append(ch)
            ds *= 2
    net.middle_block = _Sequence(
        [ResBlock(ch, E, ch, dropout, s_branch=s_branch), attn(ch), ResBlock(ch, E, ch, dropout, s_branch=s_branch)]
    )
    return chans, ch, ds


class ADMUNet(nn.Module):
    """The sony/ctm ImageNet-64 CTM student network (ADM ``UNetModel`` with the s-branch), sony/ctm key layout.

    Built as ``create_model`` builds it with ``use_scale_shift_norm`` and ``resblock_updown`` (the release flags):
    attention where the downsampling factor is in ``attention_ds``; heads = C / ``num_head_channels`` (or
    ``num_heads`` when that is −1); q/k/v split as (three, heads, d).

    forward(x: (B, C_in, H, W), noise_labels: (B,) = c_noise(t) = ln(t)/4, class_labels: (B, L) one-hot or None,
    augment_labels: unused (must be None), noise_labels_s: (B,) = ln(s)/4) -> F_x: (B, C_out, H, W).
    The time inputs are the CTMStudent convention ln(t)/4; the network turns them into sony/ctm's 250·ln t as
    1000·(ln(t)/4), which rounds exactly like 250·ln t in float32 (division by 4 is exact).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_res_blocks: int = 3,
        attention_ds: Sequence[int] = (2, 4, 8),
        num_heads: int = 4,
        num_head_channels: int = 64,
        dropout: float = 0.0,
    ) -> None:
        _check_common(img_resolution, model_channels, channel_mult, num_res_blocks)
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.model_channels = model_channels
        heads = (num_heads, num_head_channels)
        args = (model_channels, channel_mult, num_res_blocks, attention_ds, heads, dropout, True, "three_heads", 2)
        chans, ch, ds = _encoder(self, in_channels, *args)
        E = 4 * model_channels
        # Registration order of UNetModel: time_embed, time_embed_s, label_emb, input_blocks, middle, output, out.
        self.time_embed_s = nn.Sequential(Linear(model_channels, E, **_INIT), nn.SiLU(), Linear(E, E, **_INIT))
        self.label_emb = nn.Embedding(label_dim, E) if label_dim else None
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                cin = ch + chans.pop()
                layers: list[nn.Module] = [ResBlock(cin, E, int(mult) * model_channels, dropout, s_branch=True)]
                ch = int(mult) * model_channels
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, _num_heads(ch, num_heads, num_head_channels), "three_heads", 2))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, E, ch, dropout, up=True, s_branch=True))
                    ds //= 2
                self.output_blocks.append(_Sequence(layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), Conv2d(ch, out_channels, 3, **_INIT_ZERO))
        self._reorder()

    def _reorder(self) -> None:
        """Register the children in UNetModel's order so ``state_dict()`` lists keys as the checkpoints do."""
        names = ["time_embed", "time_embed_s", "label_emb", "input_blocks", "middle_block", "output_blocks", "out"]
        self._modules = {name: self._modules[name] for name in names if name in self._modules}

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
        noise_labels_s: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if augment_labels is not None or noise_labels_s is None:
            raise ValueError("ADMUNet: expected noise_labels_s (the CTM s input) and no augment_labels")
        emb = self.time_embed(timestep_embedding(1000 * noise_labels, self.model_channels))  # (B, E), 250·ln t
        emb_s = self.time_embed_s(timestep_embedding(1000 * noise_labels_s, self.model_channels))  # (B, E)
        if self.label_emb is not None:
            if class_labels is None:
                raise ValueError(f"class_labels must be given for label_dim={self.label_dim}, got None")
            emb = emb + class_labels.to(emb.dtype) @ self.label_emb.weight  # one-hot (B, L) @ (L, E): the lookup
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, emb_s)
            hs.append(h)
        h = self.middle_block(h, emb, emb_s)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, emb_s)
        return self.out(h)

    def last_layer_weight(self) -> nn.Parameter:
        """``output_blocks[-1][0].out_layers[3].weight``, the official adaptive-weight layer
        (docs/ctm.md#14-imagenet-64-student)."""
        return self.output_blocks[-1][0].out_layers[3].weight


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling of the classifier head: the spatial mean is prepended as a query token, a learnt
    positional embedding added, one multi-head attention ((three, heads, d) split), the mean token's output
    projected. Keys ``positional_embedding`` (C, N+1), ``qkv_proj``, ``c_proj``. x: (B, C, H, W) -> (B, out)."""

    def __init__(self, spatial: int, channels: int, num_head_channels: int, out_channels: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial**2 + 1) / channels**0.5)
        self.qkv_proj = _Conv1x1(channels, 3 * channels, 1)
        self.c_proj = _Conv1x1(channels, out_channels, 1)
        self.num_heads = channels // num_head_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        x = x.reshape(B, C, -1)  # (B, C, N)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)  # (B, C, N+1)
        x = _qkv_attention(self.qkv_proj(x), self.num_heads, "three_heads")
        return self.c_proj(x)[:, :, 0]


class EncoderUNet(nn.Module):
    """ADM's noisy classifier (guided-diffusion ``EncoderUNetModel``, ``pool='attention'``), its key layout:
    ``time_embed.*``, ``input_blocks.*``, ``middle_block.*``, ``out.2.{positional_embedding,qkv_proj,c_proj}``.

    sony/ctm ``create_classifier`` builds it for 64x64 with width 128, depth 4 (``classifier_defaults``),
    channel_mult (1,2,3,4), attention at 32/16/8, 64 channels per head, scale-shift norm, res-block resampling, legacy
    (heads, three, d) attention split and 1-D 1x1 convolutions (docs/official.md#3-classifier-rejection-sampling).
    forward(x: (B, C_in, H, W), timesteps: (B,)) -> logits (B, num_classes).
    """

    def __init__(
        self,
        img_resolution: int = 64,
        in_channels: int = 3,
        num_classes: int = 1000,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_res_blocks: int = 4,
        attention_ds: Sequence[int] = (2, 4, 8),
        num_head_channels: int = 64,
    ) -> None:
        _check_common(img_resolution, model_channels, channel_mult, num_res_blocks)
        super().__init__()
        self.img_resolution = img_resolution
        self.model_channels = model_channels
        self.num_classes = num_classes
        heads = (1, num_head_channels)
        args = (model_channels, channel_mult, num_res_blocks, attention_ds, heads, 0.0, False, "heads_three", 1)
        _, ch, ds = _encoder(self, in_channels, *args)
        self.out = nn.Sequential(
            _norm(ch), nn.SiLU(), AttentionPool2d(img_resolution // ds, ch, num_head_channels, num_classes)
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.img_resolution or x.shape[-2] != self.img_resolution:
            raise ValueError(
                f"EncoderUNet: expected {self.img_resolution}x{self.img_resolution} images (the pooling's positional "
                f"embedding is sized for them), got {tuple(x.shape)}"
            )
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))  # (B, E)
        h = x
        for block in self.input_blocks:
            h = block(h, emb, None)
        return self.out(self.middle_block(h, emb, None))  # (B, num_classes)
