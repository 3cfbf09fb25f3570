"""Official mode: a re-statement of the official code's ``CVVAEModel.tiled_encode`` /
``tiled_decode`` (models/modeling_vae.py), one algorithm for both directions.

The clip is cut into chunks of ``chunk_frames`` video frames that share one frame (the shared frame
is dropped from every chunk's result but the first: a hard cut), each chunk into square tiles of
``tile_size`` pixels overlapping by ``overlap`` of a tile; the whole network runs on every tile, and
neighbouring results are blended linearly in raster order. The release values
(``OFFICIAL_TILE``/``OFFICIAL_OVERLAP``/``OFFICIAL_CHUNK``) reproduce published outputs.
"""
from __future__ import annotations

import math

import torch

from ..errors import InputError
from .meter import Meter
from .planner import ENCODE, Direction
from .tiers import finish, output_buffer

#: Official release tiling parameters (``CVVAEModel`` constructor defaults).
OFFICIAL_TILE = 576
OFFICIAL_OVERLAP = 0.2222
OFFICIAL_CHUNK = 16


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets ``0, stride, ...``, stopping after the first tile that reaches the end."""
    starts = []
    for i in range(0, size, stride):
        starts.append(i)
        if i + tile >= size:
            break
    return starts


def _blend(a: torch.Tensor, b: torch.Tensor, overlap: int, dim: int):
    """In place, as the official ``blend_v``/``blend_h``: the first ``overlap`` rows/columns of b
    fade in from a's last ones with weights k/overlap (float32 weights, result in b's dtype)."""
    shape = [1] * b.dim()
    shape[dim] = overlap
    wb = (torch.arange(overlap, device=b.device) / overlap).view(shape)
    head = b.narrow(dim, 0, overlap)
    head.copy_((1 - wb) * a.narrow(dim, a.shape[dim] - overlap, overlap) + wb * head)


def _spatial(fn, x: torch.Tensor, tile: int, stride: int, overlap: int, out_stride: int, meter: Meter,
             store: torch.device) -> torch.Tensor:
    """One chunk: ``fn`` on every tile, results kept on ``store``, blended and cropped as the official code."""
    rows = []
    for i in tile_starts(x.shape[3], tile, stride):
        cols = []
        for j in tile_starts(x.shape[4], tile, stride):
            meter.check()
            piece = x[:, :, :, i:i + tile, j:j + tile]
            cols.append(fn(piece).to(store, non_blocking=True))
            meter.step(piece.shape[2:].numel())
        rows.append(cols)
    if store.type == "cpu" and x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    for i, cols in enumerate(rows):
        for j, t in enumerate(cols):
            if i > 0:
                _blend(rows[i - 1][j], t, overlap, 3)
            if j > 0:
                _blend(cols[j - 1], t, overlap, 4)
    out_rows = []
    for i, cols in enumerate(rows):
        kept = [t[:, :, :, :out_stride if i < len(rows) - 1 else None, :out_stride if j < len(cols) - 1 else None]
                for j, t in enumerate(cols)]
        out_rows.append(torch.cat(kept, dim=4))
    return torch.cat(out_rows, dim=3)


def official_cost(frames: int, chunk: int, height: int, width: int, tile: int, stride: int) -> int:
    """Input voxels (frames x pixels) of every official tile of every chunk: the whole network
    runs on each tile, so its cost grows with them (chunks share one frame, as in the loops)."""
    rounds = max(1, math.ceil((frames - 1) / chunk))
    chunk_frames = sum(min(frames, (n + 1) * chunk + 1) - n * chunk for n in range(rounds))
    rows = sum(min(tile, height - i) for i in tile_starts(height, tile, stride))
    cols = sum(min(tile, width - j) for j in tile_starts(width, tile, stride))
    return chunk_frames * rows * cols


def geometry(model, tile_size: int | None, overlap: float, chunk_frames: int | None) -> tuple[int, float, int]:
    """(tile px, overlap ratio, chunk frames), checked the way the official code needs them."""
    p, r, f = tile_size or OFFICIAL_TILE, overlap, chunk_frames or OFFICIAL_CHUNK
    s, lat = model.config.spatial_compression, p // model.config.spatial_compression
    # The official code rounds pixel and latent strides separately; they agree only for some
    # sizes (all multiples of 72 at the release ratio). Elsewhere its tiles would not line up.
    if round(p * (1 - r)) != s * (lat - round(lat * r)) or round(lat * (1 - r)) * s != p - round(p * r):
        raise InputError(f"official mode: tile_size {p} with overlap {r} gives pixel and latent strides that do "
                         "not line up (the official code would misalign tiles); use a multiple of 72 px, e.g. "
                         "576 (the release value), 144 or 72")
    if f % model.config.time_compression:
        raise InputError(f"official mode needs chunk_frames divisible by {model.config.time_compression}, got {f}")
    return p, r, f


def run_official(model, x: torch.Tensor, direction: Direction, opts) -> torch.Tensor:
    """The official tiled pass of ``direction`` over ``x`` with ``opts`` (a TilingOptions): float32 on
    ``opts.output_device``. Tiles and chunks are counted on the input side: pixels and frames when
    encoding, latent pixels and latent frames when decoding."""
    cfg, dev, dtype = model.config, model.device, model.dtype
    p, r, f = geometry(model, opts.tile_size, opts.overlap, opts.chunk_frames)
    lat = p // cfg.spatial_compression
    in_tile, out_tile = (p, lat) if direction is ENCODE else (lat, p)
    chunk = f if direction is ENCODE else f // cfg.time_compression
    stride, out_overlap = round(in_tile * (1 - r)), round(out_tile * r)
    frames, h, w = x.shape[2:]
    meter = Meter(opts.progress, opts.cancel, official_cost(frames, chunk, h, w, in_tile, stride))
    store = torch.device(opts.output_device)
    out = output_buffer(direction.output_shape(model, x.shape), store, dev)
    pos = 0
    for n in range(max(1, math.ceil((frames - 1) / chunk))):
        part = x[:, :, n * chunk:(n + 1) * chunk + 1].to(dev, dtype)
        y = _spatial(direction.network(model), part, in_tile, stride, out_overlap, out_tile - out_overlap, meter,
                     store)
        y = y if n == 0 else y[:, :, 1:]
        out[:, :, pos:pos + y.shape[2]].copy_(y, non_blocking=True)
        pos += y.shape[2]
    return finish(out[:, :, :pos], dev)
