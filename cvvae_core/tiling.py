"""Tiling/streaming engine (placeholder: runs the whole clip at once).

Contract used by the model API, the command line and the ComfyUI nodes:

    opts = TilingOptions(mode="seamless", tile_size=None, chunk_frames=None,
                         progress=lambda done, total: ..., cancel=lambda: False)
    latent = encode_video(model, video, opts)       # video [B,3,1+4k,H,W] in [-1,1], any device
    video = decode_latent(model, latent, opts)      # latent [B,C,1+k,h,w]

Results come back on ``opts.output_device`` (CPU by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import CancelledError

MODES = ("seamless", "official", "none")


@dataclass
class TilingOptions:
    mode: str = "seamless"
    tile_size: int | None = None      # pixels; None = chosen from free device memory
    chunk_frames: int | None = None   # video frames per time chunk; None = automatic
    progress: Callable[[int, int], None] | None = None
    cancel: Callable[[], bool] | None = None
    output_device: torch.device | str = "cpu"


def _check_cancel(opts: TilingOptions):
    if opts.cancel is not None and opts.cancel():
        raise CancelledError("cancelled by the caller")


@torch.no_grad()
def encode_moments(model, video: torch.Tensor, opts: TilingOptions | None = None) -> torch.Tensor:
    opts = opts or TilingOptions()
    _check_cancel(opts)
    out = model.encode_moments(video).to(opts.output_device, torch.float32)
    if opts.progress:
        opts.progress(1, 1)
    return out


@torch.no_grad()
def decode_latent(model, latent: torch.Tensor, opts: TilingOptions | None = None) -> torch.Tensor:
    opts = opts or TilingOptions()
    _check_cancel(opts)
    out = model.decode_latent(latent).to(opts.output_device, torch.float32)
    if opts.progress:
        opts.progress(1, 1)
    return out
