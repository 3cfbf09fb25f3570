"""Input checks and the frame/size policy.

CV-VAE maps 1+4k frames to 1+k latents exactly; any other count is silently lossy in the
official code (T=8 encodes to 2 latents that decode to 5 frames). Here such input is an error
unless the caller picks ``pad`` (replicate the last frame / edge pixels; removed again after
decoding) or ``trim`` (drop trailing frames / edge pixels; reported).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ChannelMismatchError, FrameCountError, InputError
from ..spec import CVVAEConfig, cvvae_owner

POLICIES = ("error", "pad", "trim")


@dataclass(frozen=True)
class FrameAdjustment:
    """What ``pad``/``trim`` changed: frames and pixels added at the end (to drop after decoding)
    or removed from the end (lost)."""

    padded_frames: int = 0
    padded_height: int = 0
    padded_width: int = 0
    trimmed_frames: int = 0
    trimmed_height: int = 0
    trimmed_width: int = 0

    @property
    def changed(self) -> bool:
        return any(vars(self).values())


class FramedLatent(NamedTuple):
    """A latent together with the frame/size adjustment made before encoding."""

    latent: torch.Tensor
    adjustment: FrameAdjustment


def valid_frame_counts_near(frames: int, step: int) -> tuple[int, int]:
    """The valid counts 1 + step * k just below (or at) and above ``frames``."""
    below = 1 + max(0, (frames - 1) // step) * step
    return below, below + step


def _describe(name: str, t: torch.Tensor) -> str:
    return f"{name} of shape {list(t.shape)} and dtype {t.dtype}"


def _check_tensor(t: torch.Tensor, name: str, what: str):
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 5:
        hint = " For one image use x.unsqueeze(2) (T=1)." if t.dim() == 4 else ""
        raise InputError(f"expected a 5-D {name} {what}, got {_describe(name, t)}.{hint}")
    if not t.is_floating_point():
        raise InputError(f"{_describe(name, t)}: expected floating point. "
                         "Convert uint8 frames with x.float() / 127.5 - 1.")
    if not torch.isfinite(t).all():
        raise InputError(f"{name} contains NaN or Inf values; check the upstream node/step that produced it.")


def check_video(video: torch.Tensor, cfg: CVVAEConfig, policy: str = "error"):
    """Raise a clear error unless ``video`` is a [B, 3, 1+4k, H, W] float tensor in about [-1, 1]
    with H and W multiples of 8 (frame count and size are only checked for policy ``error``)."""
    _check_tensor(video, "video", "[B, 3, T, H, W] in [-1, 1]")
    b, c, t, h, w = video.shape
    if c != cfg.in_channels:
        raise InputError(f"video has {c} channels at dim 1, expected {cfg.in_channels} (RGB). "
                         "Layout must be [B, C, T, H, W]; for [B, T, H, W, C] frames use x.permute(0, 4, 1, 2, 3).")
    lo, hi = float(video.min()), float(video.max())
    if lo < -1.5 or hi > 1.5:
        raise InputError(f"video values span [{lo:.3g}, {hi:.3g}]; expected [-1, 1]. "
                         "Map 0..255 with x / 127.5 - 1 and 0..1 with x * 2 - 1.")
    if policy == "error":
        tc, sc = cfg.time_compression, cfg.spatial_compression
        if (t - 1) % tc:
            a, b2 = valid_frame_counts_near(t, tc)
            raise FrameCountError(f"{t} frames: CV-VAE needs 1+{tc}k frames; the nearest valid counts are "
                                  f"{a} and {b2}. Use CVVAE.encode_framed(video, frame_policy='pad' or 'trim'), or cut the clip.")
        if h % sc or w % sc:
            raise FrameCountError(f"frame size {h}x{w}: height and width must be multiples of {sc}. "
                                  "Use CVVAE.encode_framed(video, frame_policy='pad' or 'trim'), or resize.")


def check_latent(latent: torch.Tensor, cfg: CVVAEConfig):
    _check_tensor(latent, "latent", f"[B, {cfg.latent_channels}, T, h, w]")
    c = latent.shape[1]
    if c != cfg.latent_channels:
        raise ChannelMismatchError(
            f"latent has {c} channels but this CV-VAE ({cfg.variant}) uses {cfg.latent_channels}. "
            f"A {c}-channel latent belongs to {cvvae_owner(c)}; load that model, or check that the latent "
            "is [B, C, T, h, w] and not frames-as-batch [T, C, h, w].")


def conform(video: torch.Tensor, cfg: CVVAEConfig, policy: str) -> tuple[torch.Tensor, FrameAdjustment]:
    """Apply the frame/size policy; returns the video to encode and what was changed."""
    if policy not in POLICIES:
        raise ValueError(f"frame_policy must be one of {POLICIES}, got {policy!r}")
    check_video(video, cfg, policy)
    if policy == "error":
        return video, FrameAdjustment()
    _, _, t, h, w = video.shape
    tc, sc = cfg.time_compression, cfg.spatial_compression
    if policy == "pad":
        dt, dh, dw = (-(t - 1)) % tc, (-h) % sc, (-w) % sc
        if dt or dh or dw:
            video = F.pad(video, (0, dw, 0, dh, 0, dt), mode="replicate")
        return video, FrameAdjustment(padded_frames=dt, padded_height=dh, padded_width=dw)
    dt, dh, dw = (t - 1) % tc, h % sc, w % sc
    if h - dh <= 0 or w - dw <= 0:
        raise FrameCountError(f"frame size {h}x{w} is smaller than {sc} pixels; nothing is left after trimming.")
    return video[:, :, : t - dt, : h - dh, : w - dw], FrameAdjustment(
        trimmed_frames=dt, trimmed_height=dh, trimmed_width=dw)


def unwrap(latent) -> tuple[torch.Tensor, FrameAdjustment]:
    if isinstance(latent, FramedLatent):
        return latent.latent, latent.adjustment
    return latent, FrameAdjustment()


def restore(video: torch.Tensor, adjust: FrameAdjustment) -> torch.Tensor:
    """Drop the frames and pixels that ``pad`` added before encoding."""
    t, h, w = video.shape[-3:]
    return video[..., : t - adjust.padded_frames, : h - adjust.padded_height, : w - adjust.padded_width]
