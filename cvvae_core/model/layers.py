"""Building blocks shared by both CV-VAE variants.

Tensors are ``[B, C, T, H, W]`` throughout. Every convolution pads the clip itself, because the
official code pads time and space differently, and differently per variant:

* encoder 3-D convolutions are *causal*: the first frame is repeated ``2p`` times in front,
  nothing is added at the end; space is zero-padded (SD) or replicate-padded (SD3);
* decoder 3-D convolutions pad time symmetrically: zeros (SD) or replicate (SD3);
* the second convolution of every ResNet block is a 2-D 3x3 convolution run on every frame
  (``half_3d`` in the official code), always zero-padded.

Each convolution states its padding once, as a :class:`ClipPadding`; the whole-clip forward
pads with all of it, and the streaming engine (:mod:`cvvae_core.tiling`) pads a piece only
where the piece reaches the clip's edge, so both compute the same function.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import CVVAEConfig

Amounts = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (before, after) for T, H, W

@dataclass(frozen=True)
class ClipPadding:
    """What a convolution adds around the clip: (before, after) frames, rows and columns, and how
    the time and the space borders are filled (``zeros`` or ``replicate``)."""

    amounts: Amounts = ((0, 0), (0, 0), (0, 0))
    time_fill: str = "zeros"
    space_fill: str = "zeros"

    def apply(self, x: torch.Tensor, amounts: Amounts | None = None) -> torch.Tensor:
        """``x`` padded by ``amounts`` (default: all of this padding) with this padding's fills."""
        amounts = self.amounts if amounts is None else amounts
        if not any(sum(amounts, ())):
            return x
        padded, interior = self.buffer(x, amounts)
        interior.copy_(x)
        return self.fill_border(padded, amounts)

    @staticmethod
    def buffer(x: torch.Tensor, amounts: Amounts) -> tuple[torch.Tensor, torch.Tensor]:
        """An empty padded tensor for ``x`` (same dtype, device and channel layout) and its interior,
        for a caller that writes the interior itself (the streaming engine normalises into it)."""
        (tf, tb), (top, bottom), (left, right) = amounts
        b, c, t, h, w = x.shape
        channels_last = c > 1 and x.stride(1) == 1
        padded = torch.empty((b, c, t + tf + tb, h + top + bottom, w + left + right), dtype=x.dtype, device=x.device,
                             memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
        return padded, padded[:, :, tf:tf + t, top:top + h, left:left + w]

    def fill_border(self, padded: torch.Tensor, amounts: Amounts) -> torch.Tensor:
        """Fill the border of ``padded`` around its interior: space first, then time, as the official
        code pads (a replicated frame includes its padded border)."""
        (tf, tb), (top, bottom), (left, right) = amounts
        t1, h1, w1 = (n - after for n, (_, after) in zip(padded.shape[2:], amounts))
        frames = padded[:, :, tf:t1]
        if self.space_fill == "zeros":
            for border in (frames[:, :, :, :top], frames[:, :, :, h1:], frames[..., :left], frames[..., w1:]):
                border.zero_()
        else:
            frames[:, :, :, :top, left:w1] = frames[:, :, :, top:top + 1, left:w1]
            frames[:, :, :, h1:, left:w1] = frames[:, :, :, h1 - 1:h1, left:w1]
            frames[..., :left] = frames[..., left:left + 1]
            frames[..., w1:] = frames[..., w1 - 1:w1]
        if self.time_fill == "zeros":
            padded[:, :, :tf].zero_()
            padded[:, :, t1:].zero_()
        else:
            padded[:, :, :tf] = padded[:, :, tf:tf + 1]
            padded[:, :, t1:] = padded[:, :, t1 - 1:t1]
        return padded


def _space_fill(cfg: CVVAEConfig) -> str:
    return "zeros" if cfg.spatial_padding == "constant" else "replicate"


class GroupNormSiLU(nn.GroupNorm):
    """A GroupNorm followed by SiLU (always paired in CV-VAE). Applied to 5-D tensors, so the
    statistics pool over (C/groups, T, H, W): every frame of the clip influences every other
    frame's normalisation, exactly as in the official models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


def group_norm_silu(channels: int, cfg: CVVAEConfig) -> GroupNormSiLU:
    return GroupNormSiLU(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=True)


class WindowConv3d(nn.Conv3d):
    """A 3-D convolution that pads the clip by its :class:`ClipPadding`, then convolves without
    padding. ``kernel3``/``stride3``/``conv_padded`` are what the streaming engine uses."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: ClipPadding = ClipPadding(),
                 stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__(cin, cout, kernel, stride=stride, padding=0)
        self.clip_padding = padding

    @property
    def kernel3(self) -> tuple[int, int, int]:
        return tuple(self.kernel_size)

    @property
    def stride3(self) -> tuple[int, int, int]:
        return tuple(self.stride)

    def conv_padded(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.weight, self.bias, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_padded(self.clip_padding.apply(x))


def causal_conv3d(cin: int, cout: int, kernel: int, cfg: CVVAEConfig) -> WindowConv3d:
    """Encoder convolution: causal in time (first frame replicated in front), same size in space."""
    p = kernel // 2
    return WindowConv3d(cin, cout, kernel, ClipPadding(((2 * p, 0), (p, p), (p, p)), "replicate", _space_fill(cfg)))


def decoder_conv3d(cin: int, cout: int, kernel: int, cfg: CVVAEConfig) -> WindowConv3d:
    """Decoder convolution: symmetric padding in time and space (zeros for SD, replicate for SD3)."""
    p, fill = kernel // 2, _space_fill(cfg)
    return WindowConv3d(cin, cout, kernel, ClipPadding(((p, p), (p, p), (p, p)), fill, fill))


def downsample_conv3d(channels: int, time: bool, cfg: CVVAEConfig) -> WindowConv3d:
    """Stride-2 3x3x3 convolution, halving H and W, and T too when ``time`` is set
    (T -> floor((T - 1) / 2) + 1). Time is padded causally by two frames in front; SD pads
    right/bottom only with zeros (as SD's image VAE does), SD3 replicates one pixel each side."""
    space = ((0, 1), (0, 1)) if cfg.variant == "sd" else ((1, 1), (1, 1))
    return WindowConv3d(channels, channels, 3, ClipPadding(((2, 0), *space), "replicate", _space_fill(cfg)),
                        stride=(2 if time else 1, 2, 2))


class FrameConv2d(nn.Conv2d):
    """A 2-D 3x3 convolution applied to every frame, zero-padded. The weight keeps the official 2-D
    shape ``[out, in, 3, 3]``; it runs as a ``1x3x3`` 3-D convolution, which avoids reshaping the
    video into a batch of frames and back."""

    clip_padding = ClipPadding(((0, 0), (1, 1), (1, 1)))
    kernel3 = (1, 3, 3)
    stride3 = (1, 1, 1)

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=0)

    def conv_padded(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.weight.unsqueeze(2), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_padded(self.clip_padding.apply(x))


class ResnetBlock(nn.Module):
    """norm1+SiLU -> conv1 (3-D) -> norm2+SiLU -> conv2 (2-D per frame), plus the input, through a
    1x1x1 projection when the channel count changes."""

    def __init__(self, cin: int, cout: int, causal: bool, cfg: CVVAEConfig):
        super().__init__()
        self.norm1 = group_norm_silu(cin, cfg)
        self.conv1 = (causal_conv3d if causal else decoder_conv3d)(cin, cout, 3, cfg)
        self.norm2 = group_norm_silu(cout, cfg)
        self.conv2 = FrameConv2d(cout, cout)
        self.nin_shortcut = WindowConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.norm2(self.conv1(self.norm1(x))))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class Upsample(nn.Module):
    """Nearest x2 in H and W, then a 3x3x3 convolution (time always replicate-padded). When ``time``
    is set the convolution emits two frames per input frame (channel block 0 = the earlier frame)
    and the first output frame is dropped, so T -> 2T - 1."""

    def __init__(self, channels: int, time: bool, cfg: CVVAEConfig):
        super().__init__()
        self.time_factor = 2 if time else 1
        self.conv = WindowConv3d(channels, channels * self.time_factor, 3,
                                 ClipPadding(((1, 1), (1, 1), (1, 1)), "replicate", _space_fill(cfg)))

    def unfold_time(self, y: torch.Tensor) -> torch.Tensor:
        """[B, 2C, T, H, W] convolution output -> [B, C, 2T, H, W] frames (nothing dropped)."""
        if self.time_factor == 1:
            return y
        b, c2, t, h, w = y.shape
        return y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unfold_time(self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")))
        return y[:, :, 1:] if self.time_factor == 2 else y


def _linear_1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    # The official SD variant stores attention projections as 1x1 Conv2d weights [C, C, 1, 1];
    # on token-major tensors they are plain linear maps.
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class SpaceTimeAttention(nn.Module):
    """The mid-block attention: single-head self-attention over the H*W positions of each frame
    (head dim = C), with a per-frame GroupNorm in front and a residual connection; in the SD
    decoder followed by attention across time.

    With ``temporal=True`` (SD decoder, the official ``MemoryEfficientAttnVideoBlock``) the
    projected spatial output is passed through LayerNorm and single-head attention *across time*
    at every position before the residual add: ``x + T(proj_out(S(x)))``; there is no residual
    between the spatial and the temporal part. ``S`` is frame-local and ``T`` position-local,
    which is how the streaming engine splits the block.
    """

    # Frames per SDPA call: bounds the attention workspace on long clips.
    frames_per_call = 8

    def __init__(self, channels: int, cfg: CVVAEConfig, temporal: bool = False):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=True)  # per frame
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        if temporal:
            self.norm_t = nn.LayerNorm(channels, eps=1e-5)
            self.q_t = nn.Linear(channels, channels)
            self.k_t = nn.Linear(channels, channels)
            self.v_t = nn.Linear(channels, channels)
            self.proj_out_t = nn.Linear(channels, channels)
        self.temporal = temporal

    def _spatial_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] frames -> [N, H*W, C] attention output after proj_out."""
        tokens = self.norm(frames).flatten(2).transpose(1, 2)
        q, k, v = (_linear_1x1(tokens, m).unsqueeze(1) for m in (self.q, self.k, self.v))
        return _linear_1x1(F.scaled_dot_product_attention(q, k, v).squeeze(1), self.proj_out)

    def spatial_part(self, x: torch.Tensor) -> torch.Tensor:
        """``S(x)``: attention within each frame, [B, C, T, H, W] -> [B, C, T, H, W]."""
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        out = torch.cat([self._spatial_tokens(chunk) for chunk in frames.split(self.frames_per_call)])
        return out.view(b, t, h * w, c).permute(0, 3, 1, 2).reshape(b, c, t, h, w)

    def temporal_part(self, s: torch.Tensor) -> torch.Tensor:
        """``T(s)``: attention across time at each position, [B, C, T, H, W] -> [B, C, T, H, W]."""
        b, c, t, h, w = s.shape
        seq = self.norm_t(s.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c))
        q, k, v = (m(seq).unsqueeze(1) for m in (self.q_t, self.k_t, self.v_t))
        seq = self.proj_out_t(F.scaled_dot_product_attention(q, k, v).squeeze(1))
        return seq.view(b, h, w, t, c).permute(0, 4, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spatial_part(x)
        return x + (self.temporal_part(s) if self.temporal else s)


def mid_block(channels: int, causal: bool, cfg: CVVAEConfig, temporal: bool) -> nn.Module:
    """ResNet block, attention, ResNet block at the lowest resolution (run in that order)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, causal, cfg)
    mid.attn_1 = SpaceTimeAttention(channels, cfg, temporal)
    mid.block_2 = ResnetBlock(channels, channels, causal, cfg)
    return mid
