"""Building blocks shared by both CV-VAE variants.

Tensors are ``[B, C, T, H, W]`` throughout. Padding is done explicitly (not by the convolution)
because the official code pads time and space differently, and differently per variant:

* encoder 3-D convolutions are *causal*: the first frame is repeated ``2p`` times in front,
  nothing is added at the end; space is zero-padded (SD) or replicate-padded (SD3);
* decoder 3-D convolutions pad time symmetrically: zeros (SD) or replicate (SD3);
* the second convolution of every ResNet block is a 2-D 3x3 convolution run on every frame
  (``half_3d`` in the official code), always zero-padded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CVVAEConfig


def pad_video(x: torch.Tensor, space: tuple[int, int, int, int], time: tuple[int, int],
              space_mode: str) -> torch.Tensor:
    """Pad W, H by ``space`` = (left, right, top, bottom) with ``space_mode`` (``constant`` = 0 or
    ``replicate``) and T by ``time`` = (front, back), always replicating the edge frame."""
    if space_mode == "replicate":
        return F.pad(x, (*space, *time), mode="replicate")
    x = F.pad(x, (*space, 0, 0))
    if time != (0, 0):
        x = F.pad(x, (0, 0, 0, 0, *time), mode="replicate")
    return x


def group_norm(channels: int, cfg: CVVAEConfig) -> nn.GroupNorm:
    # Applied to 5-D tensors, so statistics pool over (C/groups, T, H, W): every frame of the
    # clip influences every other frame's normalisation, exactly as in the official models.
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=True)


class CausalConv3d(nn.Conv3d):
    """Encoder convolution: causal in time (first frame replicated in front), same size in space."""

    def __init__(self, cin: int, cout: int, kernel_size: int, cfg: CVVAEConfig):
        super().__init__(cin, cout, kernel_size, padding=0)
        self.space_mode = cfg.spatial_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kernel_size[-1] // 2
        if p:
            x = pad_video(x, (p, p, p, p), (2 * p, 0), self.space_mode)
        return super().forward(x)


def decoder_conv3d(cin: int, cout: int, kernel_size: int, cfg: CVVAEConfig) -> nn.Conv3d:
    """Decoder convolution: symmetric padding in time and space (zeros for SD, replicate for SD3)."""
    mode = "zeros" if cfg.spatial_padding == "constant" else "replicate"
    return nn.Conv3d(cin, cout, kernel_size, padding=kernel_size // 2, padding_mode=mode)


class FrameConv2d(nn.Conv2d):
    """A 2-D 3x3 convolution applied to every frame. The weight keeps the official 2-D shape
    ``[out, in, 3, 3]``; it runs as a ``1x3x3`` 3-D convolution, which avoids reshaping the video
    into a batch of frames and back."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.weight.unsqueeze(2), self.bias, padding=(0, 1, 1))


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 (3-D) -> norm2 -> SiLU -> conv2 (2-D per frame), plus a 1x1x1
    projection of the input when the channel count changes."""

    def __init__(self, cin: int, cout: int, causal: bool, cfg: CVVAEConfig):
        super().__init__()
        self.norm1 = group_norm(cin, cfg)
        self.conv1 = CausalConv3d(cin, cout, 3, cfg) if causal else decoder_conv3d(cin, cout, 3, cfg)
        self.norm2 = group_norm(cout, cfg)
        self.conv2 = FrameConv2d(cout, cout)
        self.nin_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3x3 convolution, halving H and W, and T too when ``time`` is set
    (T -> floor((T - 1) / 2) + 1). Time is padded causally by two frames in front."""

    def __init__(self, channels: int, time: bool, cfg: CVVAEConfig):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=(2 if time else 1, 2, 2))
        self.space_mode = cfg.spatial_padding
        # SD pads right/bottom only with zeros (as SD's image VAE does); SD3 replicates 1 each side.
        self.space_pad = (0, 1, 0, 1) if cfg.variant == "sd" else (1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_video(x, self.space_pad, (2, 0), self.space_mode))


class Upsample(nn.Module):
    """Nearest x2 in H and W, then a 3x3x3 convolution. When ``time`` is set the convolution
    emits two frames per input frame (channel block 0 = the earlier frame) and the first output
    frame is dropped, so T -> 2T - 1."""

    def __init__(self, channels: int, time: bool, cfg: CVVAEConfig):
        super().__init__()
        self.time_factor = 2 if time else 1
        self.conv = nn.Conv3d(channels, channels * self.time_factor, 3)
        self.space_mode = cfg.spatial_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        x = self.conv(pad_video(x, (1, 1, 1, 1), (1, 1), self.space_mode))
        if self.time_factor == 1:
            return x
        b, c2, t, h, w = x.shape
        x = x.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return x[:, :, 1:]


def _linear_1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    # The official SD variant stores attention projections as 1x1 Conv2d weights [C, C, 1, 1];
    # on token-major tensors they are plain linear maps.
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class SpatialAttention(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (head dim = C), with a
    per-frame GroupNorm in front and a residual connection.

    With ``temporal=True`` (SD decoder, the official ``MemoryEfficientAttnVideoBlock``) the
    projected spatial output is passed through LayerNorm and single-head attention *across time*
    at every position before the residual add: ``x + T(proj_out(S(x)))``; there is no residual
    between the spatial and the temporal part.
    """

    # Frames per SDPA call: bounds the attention workspace on long clips.
    frames_per_call = 8

    def __init__(self, channels: int, cfg: CVVAEConfig, temporal: bool = False):
        super().__init__()
        self.norm = group_norm(channels, cfg)
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

    def spatial(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] frames -> [N, H*W, C] attention output after proj_out."""
        n, c, h, w = frames.shape
        tokens = self.norm(frames).flatten(2).transpose(1, 2)
        q, k, v = (_linear_1x1(tokens, m).unsqueeze(1) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return _linear_1x1(out, self.proj_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        out = torch.cat([self.spatial(chunk) for chunk in frames.split(self.frames_per_call)])
        if self.temporal:
            seq = out.view(b, t, h * w, c).transpose(1, 2).reshape(b * h * w, t, c)
            seq = self.norm_t(seq)
            q, k, v = (m(seq).unsqueeze(1) for m in (self.q_t, self.k_t, self.v_t))
            seq = self.proj_out_t(F.scaled_dot_product_attention(q, k, v).squeeze(1))
            out = seq.view(b, h * w, t, c).permute(0, 3, 2, 1)
        else:
            out = out.view(b, t, h * w, c).permute(0, 3, 1, 2)
        return x + out.reshape(b, c, t, h, w)


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int, causal: bool, cfg: CVVAEConfig, temporal: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, causal, cfg)
        self.attn_1 = SpatialAttention(channels, cfg, temporal)
        self.block_2 = ResnetBlock(channels, channels, causal, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))
