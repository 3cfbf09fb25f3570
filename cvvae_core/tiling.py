"""Tiling/streaming engine: encode and decode clips of any length and size in bounded device memory.

Contract used by the model API, the command line and the ComfyUI nodes:

    opts = TilingOptions(mode="seamless", tile_size=None, chunk_frames=None,
                         progress=lambda done, total: ..., cancel=lambda: False)
    moments = encode_moments(model, video, opts)    # video [B,3,1+4k,H,W] in [-1,1], any device
    video = decode_latent(model, latent, opts)      # latent [B,C,1+k,h,w]

Results come back in float32 on ``opts.output_device`` (CPU by default), written chunk by chunk
(pinned memory and non-blocking copies when computing on CUDA): the whole video never sits on the
device. Modes:

* ``seamless`` (default): as close to the whole-clip model as the math allows; see
  :mod:`cvvae_core.streaming` for how. Exactly the whole-clip pass when the clip fits one tile
  and one chunk.
* ``official``: the official code's own tiled algorithm (tile size 576 px, overlap ratio 0.2222,
  linear blend in raster order, 16-frame chunks with one shared frame and a hard cut), to match
  published outputs. ``tile_size``/``chunk_frames``/``overlap`` default to the release values.
* ``none``: the whole clip at once on the device (no bound on memory).

Sizes are chosen from free device memory unless given. On CUDA out-of-memory the engine frees
what it holds and retries with shorter chunks, then smaller tiles, down to a floor; then raises
:class:`~cvvae_core.errors.OutOfMemoryError` saying what to lower.

Progress is reported as ``progress(done, PROGRESS_UNITS)``: the share, in thousandths, of the
run's estimated compute done so far (see :class:`_Progress`), so the bar moves at a steady pace
whether a step is a short last chunk, a statistics pass or the output pass. ``cancel()`` is
checked before every step.
"""
from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from . import streaming as st
from .distributed import TileGroup
from .errors import CancelledError, InputError, OutOfMemoryError

MODES = ("seamless", "official", "none")

#: Official release tiling parameters (``CVVAEModel`` constructor defaults).
OFFICIAL_TILE = 576
OFFICIAL_OVERLAP = 0.2222
OFFICIAL_CHUNK = 16

#: Smallest sizes the out-of-memory fallback goes down to.
MIN_CHUNK_FRAMES = 4
MIN_TILE = 64

#: Estimated peak device bytes per (frame x pixel) of a chunk, per channel of the first level
#: and byte of the compute dtype, plus float32 norm temporaries. Set from the decoder's widest
#: full-resolution stage (upsampler output, skip queue, norm in float32, conv output); the
#: out-of-memory fallback corrects an estimate that proves too small.
_BYTES_PER_VOXEL_CHANNEL = 24
_NORM_FP32_BYTES = 16

#: ``progress(done, total)`` always gets this total: ``done`` is thousandths of the estimated work.
PROGRESS_UNITS = 1000


@dataclass
class TilingOptions:
    mode: str = "seamless"
    tile_size: int | None = None      # pixels (core of a seamless tile; the official tile); None = automatic
    chunk_frames: int | None = None   # video frames per time chunk; None = automatic
    progress: Callable[[int, int], None] | None = None
    cancel: Callable[[], bool] | None = None
    output_device: torch.device | str = "cpu"
    overlap: float = OFFICIAL_OVERLAP  # official mode: tile overlap ratio
    # seamless: passes that gather clip-wide GroupNorm statistics (0 = tile-local); None = 1 when
    # frames are whole, 2 when they are split into spatial tiles (each pass normalises with the
    # previous pass's statistics, so the gathered ones converge; measured on a real clip at 144x256,
    # 64 px tiles: decode 32.1 -> 43.2 dB against untiled)
    stats_passes: int | None = None
    memory_budget: int | None = None  # bytes the engine may use on the device; None = from free memory
    # seamless: share the clip's tiles among the ranks of the initialised torch.distributed group
    # (see cvvae_core.distributed); every rank gets the whole result. No effect in one process.
    distributed: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"TilingOptions.mode must be one of {MODES}, got {self.mode!r}")
        if self.stats_passes is not None and self.stats_passes < 0:
            raise InputError(f"stats_passes must be >= 0, got {self.stats_passes}")
        if self.tile_size is not None and (self.tile_size < 8 or self.tile_size % 8):
            raise InputError(f"tile_size must be a positive multiple of 8 pixels, got {self.tile_size}")
        if self.chunk_frames is not None and self.chunk_frames < 1:
            raise InputError(f"chunk_frames must be >= 1, got {self.chunk_frames}")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: ``tile`` = core size in pixels (>= the frame: no spatial tiling),
    ``chunk`` = video frames per chunk."""

    tile: int
    chunk: int


class _Progress:
    """Cancellation checks and progress in proportion to work.

    ``total_cost`` is the run's estimated cost and each ``step(cost)`` adds that step's share, in
    the same (integer) unit, so ``done`` grows with the work done, not with the number of steps.
    """

    def __init__(self, opts: TilingOptions, total_cost: int):
        self.opts, self.total, self.spent = opts, max(1, total_cost), 0

    def check(self):
        if self.opts.cancel is not None and self.opts.cancel():
            raise CancelledError("cancelled by the caller (TilingOptions.cancel returned True)")

    def step(self, cost: int):
        self.spent += cost
        if self.opts.progress is not None:
            # Integer arithmetic: the last step reports exactly PROGRESS_UNITS.
            self.opts.progress(min(PROGRESS_UNITS, self.spent * PROGRESS_UNITS // self.total), PROGRESS_UNITS)


# ------------------------------------------------------------------------------------------
# Cost estimates for the progress bar
# ------------------------------------------------------------------------------------------
# Counted, not timed: a weightless copy of the model (meta device) runs the same code on shapes
# only, and torch's FlopCounterMode adds up the multiply-adds of its convolutions, matrix
# products and attention. Norms and element-wise ops are not counted; they scale with the same
# voxels as the convolutions around them. Counting takes time (about 0.8 s for a 17-frame
# 576x1024 encode), so without a progress callback every step simply costs 1.
def _flops(counting: bool, fn, *args) -> int:
    if not counting:
        return 1
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    return counter.get_total_flops()


def _meta(shape) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def _weightless_twin(model):
    """The model's architecture on the meta device: shapes, no storage, no compute."""
    with torch.device("meta"):
        return type(model)(model.config)


def _stream_costs(counting: bool, make_stream, tiles: list, chunks: list, channels: int,
                  batch: int) -> list[list[int]]:
    """``costs[k][ci]``: flops of tile ``k``'s stream when fed time chunk ``ci`` (a stream answers
    some frames one chunk late, which this counts exactly). Tiles of the same size cost the same."""
    if not counting:
        return [[1] * len(chunks) for _ in tiles]
    by_size: dict[tuple[int, int], list[int]] = {}
    costs = []
    for tile in tiles:
        size = (tile.hr1 - tile.hr0, tile.hc1 - tile.hc0)
        if size not in by_size:
            stream = make_stream(tile)
            by_size[size] = [_flops(True, st.run_stream, stream, _meta((batch, channels, z - a, *size)),
                                    ci == len(chunks) - 1) for ci, (a, z) in enumerate(chunks)]
        costs.append(by_size[size])
    return costs


# ------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_moments(model, video: torch.Tensor, opts: TilingOptions | None = None) -> torch.Tensor:
    """Encoder output [B, 2C, 1+k, H/8, W/8] (mean, logvar) of a validated video, float32 on
    ``opts.output_device``."""
    opts = opts or TilingOptions()
    return _with_fallback(model, opts, video, "encode")


@torch.no_grad()
def decode_latent(model, latent: torch.Tensor, opts: TilingOptions | None = None) -> torch.Tensor:
    """Decoder output [B, 3, 1+4k, 8h, 8w] (unclamped) of a latent, float32 on ``opts.output_device``."""
    opts = opts or TilingOptions()
    return _with_fallback(model, opts, latent, "decode")


# ------------------------------------------------------------------------------------------
# Sizing and the out-of-memory fallback
# ------------------------------------------------------------------------------------------
def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def voxel_bytes(model) -> int:
    """Estimated peak device bytes per frame x pixel of a chunk (see ``_BYTES_PER_VOXEL_CHANNEL``)."""
    cfg = model.config
    elem = torch.finfo(model.dtype).bits // 8
    return cfg.base_channels * (_BYTES_PER_VOXEL_CHANNEL * elem + _NORM_FP32_BYTES)


def auto_plan(model, opts: TilingOptions, frames: int, height: int, width: int) -> Plan:
    """Largest chunk (then tile) whose estimated footprint fits the budget; given sizes win."""
    budget = opts.memory_budget or int(_free_bytes(model.device) * 0.7)
    per = voxel_bytes(model)
    full = max(height, width)
    tile = opts.tile_size or full
    if opts.chunk_frames:
        return Plan(tile, opts.chunk_frames)
    fits = lambda t, c: (min(t + 2 * 80, height) * min(t + 2 * 80, width) * (c + 2) * per) <= budget  # noqa: E731
    chunk = frames
    while chunk > MIN_CHUNK_FRAMES and not fits(tile, chunk):
        chunk = max(MIN_CHUNK_FRAMES, chunk // 2)
    while opts.tile_size is None and tile > MIN_TILE * 2 and not fits(tile, chunk):
        tile = max(MIN_TILE, tile // 2 // 8 * 8)
    return Plan(tile, chunk)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _smaller(plan: Plan, frame_size: int) -> Plan | None:
    """The next plan the fallback tries: halve the chunk, then the tile; None at the floor."""
    if plan.chunk > MIN_CHUNK_FRAMES:
        return replace(plan, chunk=max(MIN_CHUNK_FRAMES, plan.chunk // 2))
    tile = min(plan.tile, frame_size)
    if tile > MIN_TILE:
        return replace(plan, tile=max(MIN_TILE, tile // 2 // 8 * 8))
    return None


def _with_fallback(model, opts: TilingOptions, x: torch.Tensor, what: str) -> torch.Tensor:
    _check_input(model, x, what)
    if opts.mode == "none":
        return _untiled(model, opts, x, what)
    if opts.mode == "official":
        try:
            return (_official_encode if what == "encode" else _official_decode)(model, x, opts)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            _free(model.device)
            raise OutOfMemoryError(
                f"out of device memory in official mode ({what}, tile {opts.tile_size or OFFICIAL_TILE} px, "
                f"{opts.chunk_frames or OFFICIAL_CHUNK}-frame chunks). Official mode keeps the release tile sizes "
                "so that results match published outputs: lower tile_size/chunk_frames (results then differ from "
                "the release), use mode='seamless', or free device memory (other models, fp16 weights).") from err
    scale = 1 if what == "encode" else model.config.spatial_compression
    t = x.shape[2] if what == "encode" else model.config.video_frames(x.shape[2])
    h, w = x.shape[3] * scale, x.shape[4] * scale
    plan = auto_plan(model, opts, t, h, w)
    group = TileGroup.of(opts.distributed)
    if group is not None:
        # Every rank must take the same plan (free memory differs between ranks): rank 0's.
        sizes = torch.tensor([plan.tile, plan.chunk], device=group._device())
        group.dist.broadcast(sizes, 0)
        plan = Plan(int(sizes[0]), int(sizes[1]))
    while True:
        try:
            return (_seamless_encode if what == "encode" else _seamless_decode)(model, x, opts, plan, group)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            _free(model.device)
            nxt = _smaller(plan, max(h, w))
            if nxt is None:
                raise OutOfMemoryError(
                    f"out of device memory ({what}) even with {plan.chunk}-frame chunks and {min(plan.tile, h, w)} px "
                    f"tiles, the smallest this engine tries. Lower the resolution or the batch size, load the model "
                    "in float16/bfloat16, or free device memory used by other models.") from err
            plan = nxt


def _free(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check_input(model, x: torch.Tensor, what: str):
    if x.dim() != 5:
        raise InputError(f"the tiling engine takes 5-D [B, C, T, H, W] tensors, got shape {list(x.shape)}")
    if what == "encode" and (x.shape[3] % 8 or x.shape[4] % 8):
        raise InputError(f"height and width must be multiples of 8, got {x.shape[3]}x{x.shape[4]}; "
                         "use frame_policy='pad' or 'trim' in CVVAE.encode")


# ------------------------------------------------------------------------------------------
# Output streaming
# ------------------------------------------------------------------------------------------
def _output_buffer(shape, opts: TilingOptions, compute: torch.device) -> torch.Tensor:
    out_dev = torch.device(opts.output_device)
    pin = out_dev.type == "cpu" and compute.type == "cuda"
    return torch.empty(shape, dtype=torch.float32, device=out_dev, pin_memory=pin)


def _finish(out: torch.Tensor, compute: torch.device) -> torch.Tensor:
    if compute.type == "cuda":
        torch.cuda.synchronize(compute)  # the non-blocking copies into ``out`` must land first
    return out


def _untiled(model, opts: TilingOptions, x: torch.Tensor, what: str) -> torch.Tensor:
    prog = _Progress(opts, 1)  # one step: all the work
    prog.check()
    y = model.encode_moments(x) if what == "encode" else model.decode_latent(x)
    out = _output_buffer(y.shape, opts, model.device)
    out.copy_(y, non_blocking=True)
    prog.step(1)
    return _finish(out, model.device)


# ------------------------------------------------------------------------------------------
# Seamless mode
# ------------------------------------------------------------------------------------------
def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def _stats_passes(opts: TilingOptions, tiles: list) -> int:
    if opts.stats_passes is not None:
        return opts.stats_passes
    return 1 if len(tiles) == 1 else 2


def _encoder_head(encoder, feats: torch.Tensor) -> torch.Tensor:
    """The low-resolution end of the encoder (mid-block, norm, conv_out), run on the whole clip."""
    return encoder.conv_out(F.silu(encoder.norm_out(encoder.mid(feats))))


def _decoder_middle(decoder, latent: torch.Tensor) -> torch.Tensor:
    """The low-resolution start of the decoder (conv_in, mid-block), run on the whole clip."""
    return decoder.mid(decoder.conv_in(latent))


def _guarded_untiled(model, opts: TilingOptions, x: torch.Tensor, what: str, group: TileGroup | None):
    """The whole-clip pass; with a group every rank runs it (nothing to share) and a failure stops all."""
    if group is None:
        return _untiled(model, opts, x, what)
    out = group.run(_untiled, model, opts, x, what)
    group.check()
    return out


def _seamless_encode(model, video: torch.Tensor, opts: TilingOptions, plan: Plan,
                     group: TileGroup | None = None) -> torch.Tensor:
    enc, cfg, dev, dtype = model.encoder, model.config, model.device, model.dtype
    b, _, t, h, w = video.shape
    s = cfg.spatial_compression
    tiles = st.make_tiles(h, w, plan.tile, st.encoder_halo(cfg), s)
    chunks = _chunks(t, plan.chunk)
    if len(tiles) == 1 and len(chunks) == 1:
        return _guarded_untiled(model, opts, video, "encode", group)
    mine = (lambda k: True) if group is None else group.mine  # noqa: E731
    passes = _stats_passes(opts, tiles)
    feats_shape = (b, cfg.level_channels[-1], cfg.latent_frames(t), h // s, w // s)
    # Every pass runs the same down path (gathering passes skip only the head), then the head once.
    counting = opts.progress is not None
    twin = _weightless_twin(model) if counting else None
    costs = _stream_costs(counting, lambda tile: st.encoder_stream(twin.encoder, tile, None, False),
                          tiles, chunks, video.shape[1], b)
    head_cost = _flops(counting, _encoder_head, twin and twin.encoder, _meta(feats_shape))
    prog = _Progress(opts, (1 + passes) * sum(map(sum, costs)) + head_cost)
    book = st.StatsBook()

    def down_path(collect: bool, feats: torch.Tensor | None):
        streams = [st.encoder_stream(enc, tile, book, collect) if mine(k) else None for k, tile in enumerate(tiles)]
        written = [0] * len(tiles)
        for ci, (a, z) in enumerate(chunks):
            last = ci == len(chunks) - 1
            for k, tile in enumerate(tiles):
                prog.check()
                if not mine(k):  # another rank's tile: progress counts the whole clip's work
                    prog.step(costs[k][ci])
                    continue
                x = video[:, :, a:z, tile.hr0:tile.hr1, tile.hc0:tile.hc1].to(dev, dtype, non_blocking=True)
                y = st.run_stream(streams[k], x, last)
                if y is not None and feats is not None:
                    r0, r1, c0, c1 = tile.owned(1, s)
                    n = y.shape[2]
                    feats[:, :, written[k]:written[k] + n, tile.r0 // s:tile.r1 // s, tile.c0 // s:tile.c1 // s] = \
                        y[:, :, :, r0:r1, c0:c1]
                    written[k] += n
                prog.step(costs[k][ci])
        return written

    def head(feats: torch.Tensor) -> torch.Tensor:
        prog.check()
        # The low-resolution head runs whole: its norms, causal convs and per-frame attention are exact.
        moments = _encoder_head(enc, feats)
        out = _output_buffer(moments.shape, opts, dev)
        out.copy_(moments, non_blocking=True)
        prog.step(head_cost)
        return _finish(out, dev)

    if group is None:
        for _ in range(passes):
            down_path(True, None)
            book.freeze()
        feats = torch.empty(feats_shape, device=dev, dtype=dtype)
        written = down_path(False, feats)
        assert all(n == feats.shape[2] for n in written), (written, feats.shape)
        return head(feats)
    # Across ranks: each runs its tiles; statistics merged after every gathering pass; the feature
    # buffers (zeros outside a rank's tiles) summed; then every rank runs the head on the whole.
    for _ in range(passes):
        group.run(down_path, True, None)
        group.merge_stats(book)
        book.freeze()
    feats = torch.zeros(feats_shape, device=dev, dtype=dtype)
    written = group.run(down_path, False, feats)
    if group.error is None and not all(n == feats.shape[2] for k, n in enumerate(written) if mine(k)):
        group.error = AssertionError(f"latent frames written per tile {written}, expected {feats.shape[2]}")
    group.all_sum(feats)
    out = group.run(head, feats)
    group.check()
    return out


def _seamless_decode(model, latent: torch.Tensor, opts: TilingOptions, plan: Plan,
                     group: TileGroup | None = None) -> torch.Tensor:
    dec, cfg, dev, dtype = model.decoder, model.config, model.device, model.dtype
    b, _, n_lat, lh, lw = latent.shape
    s, tc = cfg.spatial_compression, cfg.time_compression
    tiles = st.make_tiles(lh, lw, max(1, plan.tile // s), st.decoder_halo(cfg), 1)
    chunks = _chunks(n_lat, max(1, plan.chunk // tc))
    if len(tiles) == 1 and len(chunks) == 1:
        return _guarded_untiled(model, opts, latent, "decode", group)
    mine = (lambda k: True) if group is None else group.mine  # noqa: E731
    passes = _stats_passes(opts, tiles)
    # The middle runs once; gathering passes stop before conv_out (they only need norm_out's
    # statistics), so they cost a little less than the output pass.
    counting = opts.progress is not None
    twin = _weightless_twin(model) if counting else None
    middle_cost = _flops(counting, _decoder_middle, twin and twin.decoder, _meta(latent.shape))
    stream_costs = {output: _stream_costs(counting,
                                          lambda tile: st.decoder_stream(twin.decoder, tile, None, False, output),
                                          tiles, chunks, cfg.level_channels[-1], b)
                    for output in (False, True)}
    total = middle_cost + passes * sum(map(sum, stream_costs[False])) + sum(map(sum, stream_costs[True]))
    prog = _Progress(opts, total)

    def middle() -> torch.Tensor:
        prog.check()
        # Input conv and mid-block (temporal attention over the whole sequence) at 1/8 resolution: whole.
        mid = _decoder_middle(dec, latent.to(dev, dtype))
        prog.step(middle_cost)
        return mid

    if group is None:
        mid = middle()
    else:
        mid = group.run(middle)
        group.check()
    book = st.StatsBook()
    out = _output_buffer((b, cfg.in_channels, cfg.video_frames(n_lat), lh * s, lw * s), opts, dev)
    if group is not None:
        out.zero_()  # summed across ranks: zeros outside this rank's tiles

    def up_path(collect: bool, write: bool):
        streams = [st.decoder_stream(dec, tile, book, collect, output=write) if mine(k) else None
                   for k, tile in enumerate(tiles)]
        costs = stream_costs[write]
        written = [0] * len(tiles)
        for ci, (a, z) in enumerate(chunks):
            last = ci == len(chunks) - 1
            for k, tile in enumerate(tiles):
                prog.check()
                if not mine(k):  # another rank's tile: progress counts the whole clip's work
                    prog.step(costs[k][ci])
                    continue
                y = st.run_stream(streams[k], mid[:, :, a:z, tile.hr0:tile.hr1, tile.hc0:tile.hc1], last)
                if y is not None and write:
                    r0, r1, c0, c1 = tile.owned(s, 1)
                    n = y.shape[2]
                    out[:, :, written[k]:written[k] + n, tile.r0 * s:tile.r1 * s, tile.c0 * s:tile.c1 * s].copy_(
                        y[:, :, :, r0:r1, c0:c1], non_blocking=True)
                    written[k] += n
                prog.step(costs[k][ci])
        return written

    if group is None:
        for _ in range(passes):
            up_path(True, False)
            book.freeze()
        written = up_path(False, True)
        assert all(n == out.shape[2] for n in written), (written, out.shape)
        return _finish(out, dev)
    # Across ranks: each runs its tiles; statistics merged after every gathering pass; the output
    # buffers (zeros outside a rank's tiles) summed, so every rank ends with the whole video.
    for _ in range(passes):
        group.run(up_path, True, False)
        group.merge_stats(book)
        book.freeze()
    written = group.run(up_path, False, True)
    if group.error is None:
        _finish(out, dev)
        if not all(n == out.shape[2] for k, n in enumerate(written) if mine(k)):
            group.error = AssertionError(f"frames written per tile {written}, expected {out.shape[2]}")
    group.all_sum(out)
    return out


# ------------------------------------------------------------------------------------------
# Official mode: a re-statement of CVVAEModel.tiled_encode / tiled_decode (models/modeling_vae.py)
# ------------------------------------------------------------------------------------------
def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
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


def _official_spatial(fn, x: torch.Tensor, tile: int, stride: int, overlap: int, out_stride: int,
                      prog: _Progress, store: torch.device) -> torch.Tensor:
    rows = []
    for i in _tile_starts(x.shape[3], tile, stride):
        cols = []
        for j in _tile_starts(x.shape[4], tile, stride):
            prog.check()
            piece = x[:, :, :, i:i + tile, j:j + tile]
            cols.append(fn(piece).to(store, non_blocking=True))
            prog.step(piece.shape[2:].numel())
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


def _official_cost(frames: int, chunk: int, height: int, width: int, tile: int, stride: int) -> int:
    """Input voxels (frames x pixels) of every official tile of every chunk: the whole network
    runs on each tile, so its cost grows with them (chunks share one frame, as in the loops)."""
    rounds = max(1, math.ceil((frames - 1) / chunk))
    chunk_frames = sum(min(frames, (n + 1) * chunk + 1) - n * chunk for n in range(rounds))
    rows = sum(min(tile, height - i) for i in _tile_starts(height, tile, stride))
    cols = sum(min(tile, width - j) for j in _tile_starts(width, tile, stride))
    return chunk_frames * rows * cols


def _official_geometry(model, opts: TilingOptions) -> tuple[int, float, int]:
    p, r, f = opts.tile_size or OFFICIAL_TILE, opts.overlap, opts.chunk_frames or OFFICIAL_CHUNK
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


def _official_encode(model, video: torch.Tensor, opts: TilingOptions) -> torch.Tensor:
    cfg, dev, dtype = model.config, model.device, model.dtype
    p, r, f = _official_geometry(model, opts)
    lat = p // cfg.spatial_compression
    pixel_stride, lat_overlap = round(p * (1 - r)), round(lat * r)
    t, h, w = video.shape[2:]
    rounds = max(1, math.ceil((t - 1) / f))
    prog = _Progress(opts, _official_cost(t, f, h, w, p, pixel_stride))
    store = torch.device(opts.output_device)
    out = _output_buffer((video.shape[0], 2 * cfg.latent_channels, cfg.latent_frames(t),
                          h // cfg.spatial_compression, w // cfg.spatial_compression), opts, dev)
    pos = 0
    for n in range(rounds):
        chunk = video[:, :, n * f:(n + 1) * f + 1].to(dev, dtype)
        z = _official_spatial(model.encoder, chunk, p, pixel_stride, lat_overlap, lat - lat_overlap, prog, store)
        z = z if n == 0 else z[:, :, 1:]
        out[:, :, pos:pos + z.shape[2]].copy_(z, non_blocking=True)
        pos += z.shape[2]
    return _finish(out[:, :, :pos], dev)


def _official_decode(model, latent: torch.Tensor, opts: TilingOptions) -> torch.Tensor:
    cfg, dev, dtype = model.config, model.device, model.dtype
    p, r, f = _official_geometry(model, opts)
    lat = p // cfg.spatial_compression
    lat_stride, pix_overlap = round(lat * (1 - r)), round(p * r)
    fl = f // cfg.time_compression
    n, h, w = latent.shape[2:]
    rounds = max(1, math.ceil((n - 1) / fl))
    prog = _Progress(opts, _official_cost(n, fl, h, w, lat, lat_stride))
    store = torch.device(opts.output_device)
    s = cfg.spatial_compression
    out = _output_buffer((latent.shape[0], cfg.in_channels, cfg.video_frames(n), h * s, w * s), opts, dev)
    pos = 0
    for k in range(rounds):
        chunk = latent[:, :, k * fl:(k + 1) * fl + 1].to(dev, dtype)
        x = _official_spatial(model.decoder, chunk, lat, lat_stride, pix_overlap, p - pix_overlap, prog, store)
        x = x if k == 0 else x[:, :, 1:]
        out[:, :, pos:pos + x.shape[2]].copy_(x, non_blocking=True)
        pos += x.shape[2]
    return _finish(out[:, :, :pos], dev)
