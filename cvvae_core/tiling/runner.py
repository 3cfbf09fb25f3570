"""Tiling/streaming engine: encode and decode clips of any length and size in bounded working memory.

Contract used by the model API, the command line and the ComfyUI nodes:

    opts = TilingOptions(mode="seamless", tile_size=None, chunk_frames=None,
                         progress=lambda done, total: ..., cancel=lambda: False)
    moments = encode_moments(model, video, opts)    # video [B,3,1+4k,H,W] in [-1,1], any device
    video = decode_latent(model, latent, opts)      # latent [B,C,1+k,h,w]

Results come back in float32 on ``opts.output_device`` (CPU by default), written piece by piece
(pinned memory and non-blocking copies when computing on CUDA). Untiled means ``tiling=None`` in
``CVVAE.encode``/``decode``: the whole clip at once, in the model's dtype on its device. Modes:

* ``seamless`` (default): exact. The model's own layer list runs step by step over pieces (time
  chunks x spatial tiles) with exact clip-wide GroupNorm statistics (see
  :mod:`cvvae_core.streaming`): equal to the untiled model to float rounding at any piece size.
  When one piece covers the whole clip it *is* the untiled pass.
* ``official``: the official code's own tiled algorithm (tile size 576 px, overlap ratio 0.2222,
  linear blend in raster order, 16-frame chunks with one shared frame and a hard cut), to match
  published outputs. ``tile_size``/``chunk_frames``/``overlap`` default to the release values.

Sizes come from :func:`plan_for` (given sizes win), which uses the one memory estimate of this
module, :func:`estimate_memory`; the ComfyUI nodes ask ComfyUI for room with the same estimate
(:func:`memory_request`). On out-of-memory the engine frees what it holds and retries with the
next smaller plan (:func:`_with_smaller_plans`), down to a floor; then raises
:class:`~cvvae_core.errors.OutOfMemoryError` saying what to lower.

Progress is reported as ``progress(done, PROGRESS_UNITS)``: the share, in thousandths, of the
run's multiply-adds done so far, so the bar moves at a steady pace across layers of different
cost. ``cancel()`` is checked before every piece.
"""
from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, replace
from typing import Callable

import torch

from . import executor as st
from ..distributed import TileGroup
from ..errors import CancelledError, InputError, OutOfMemoryError

MODES = ("seamless", "official")

#: Official release tiling parameters (``CVVAEModel`` constructor defaults).
OFFICIAL_TILE = 576
OFFICIAL_OVERLAP = 0.2222
OFFICIAL_CHUNK = 16

#: Working memory of one piece on CPU. Measured (release-size vae3d encode, 17 frames, 2-core AMD
#: EPYC): pieces of 24 MB took 2.3-2.6x the CPU time of 384 MB ones at 128x128 (convolutions on
#: small tiles and short chunks lose most of their efficiency); 96-128 MB pieces took 7-12% more
#: than 384-512 MB ones at 128x128 and 256x256.
CPU_PIECE_BYTES = 512 << 20
#: Automatic pieces keep at least this many frames while tiles can still shrink.
PREFERRED_MIN_FRAMES = 4
#: Floors of the out-of-memory fallback.
MIN_PIECE_BYTES = 4 << 20
MIN_CHUNK_FRAMES = 1
MIN_TILE = 64
#: Share of free device memory a plan may use (the rest: allocator slack, other tensors).
FREE_MEMORY_SHARE = 0.7

#: ``progress(done, total)`` always gets this total: ``done`` is thousandths of the estimated work.
PROGRESS_UNITS = 1000


@dataclass
class TilingOptions:
    mode: str = "seamless"
    tile_size: int | None = None      # pixels (seamless: piece width/height; official: its tile); None = automatic
    chunk_frames: int | None = None   # video frames per time chunk; None = automatic
    progress: Callable[[int, int], None] | None = None
    cancel: Callable[[], bool] | None = None
    output_device: torch.device | str = "cpu"
    overlap: float = OFFICIAL_OVERLAP  # official mode: tile overlap ratio
    memory_budget: int | None = None  # bytes the engine may use on the device; None = from free memory
    # seamless: share each step's pieces among the ranks of the initialised torch.distributed group
    # (see cvvae_core.distributed); every rank gets the whole result. No effect in one process.
    distributed: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"TilingOptions.mode must be one of {MODES}, got {self.mode!r} "
                             "(untiled: pass tiling=None)")
        if self.tile_size is not None and (self.tile_size < 8 or self.tile_size % 8):
            raise InputError(f"tile_size must be a positive multiple of 8 pixels, got {self.tile_size}")
        if self.chunk_frames is not None and self.chunk_frames < 1:
            raise InputError(f"chunk_frames must be >= 1, got {self.chunk_frames}")

    # ``CVVAE.encode(tiling=opts)`` / ``decode`` call these: the model layer does not import the engine.
    def encode_moments(self, model, video: torch.Tensor) -> torch.Tensor:
        return encode_moments(model, video, self)

    def decode_latent(self, model, latent: torch.Tensor) -> torch.Tensor:
        return decode_latent(model, latent, self)


# ------------------------------------------------------------------------------------------
# The two directions
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Direction:
    """What differs between encoding and decoding, in one place."""

    name: str                         # "encode" / "decode"
    part: str                         # the model attribute that runs it: "encoder" / "decoder"
    units: str                        # what the input's H, W count: "pixels" / "latent pixels"

    def network(self, model):
        return getattr(model, self.part)

    def video_size(self, model, shape) -> tuple[int, int, int]:
        """(frames, height, width) of the video side of the pass: the plan's units."""
        cfg, (_, _, t, h, w) = model.config, shape
        if self.name == "encode":
            return t, h, w
        return cfg.video_frames(t), h * cfg.spatial_compression, w * cfg.spatial_compression

    def untiled(self, model, x: torch.Tensor) -> torch.Tensor:
        return model.encode_moments(x) if self.name == "encode" else model.decode_latent(x)

    def official(self, model, x: torch.Tensor, opts: "TilingOptions") -> torch.Tensor:
        return (_official_encode if self.name == "encode" else _official_decode)(model, x, opts)


ENCODE = Direction("encode", "encoder", "pixels")
DECODE = Direction("decode", "decoder", "latent pixels")


# ------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_moments(model, video: torch.Tensor, opts: TilingOptions | None = None) -> torch.Tensor:
    """Encoder output [B, 2C, 1+k, H/8, W/8] (mean, logvar) of a validated video, float32 on
    ``opts.output_device``."""
    return _run(model, video, opts or TilingOptions(), ENCODE)


@torch.no_grad()
def decode_latent(model, latent: torch.Tensor, opts: TilingOptions | None = None) -> torch.Tensor:
    """Decoder output [B, 3, 1+4k, 8h, 8w] (unclamped) of a latent, float32 on ``opts.output_device``."""
    return _run(model, latent, opts or TilingOptions(), DECODE)


# ------------------------------------------------------------------------------------------
# Plans and the memory estimate
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Piece sizes of one seamless run. ``tile`` (pixels) and ``chunk`` (video frames) are scaled to
    each layer's resolution; ``piece_bytes`` then caps each piece's working memory; all None =
    one piece per layer (the untiled pass). ``stores_on_device``: where layer outputs are kept."""

    tile: int | None = None
    chunk: int | None = None
    piece_bytes: int | None = None
    stores_on_device: bool = True


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak device bytes of a plan: the layer outputs kept whole (``stores``, when on the device),
    one piece's temporaries (``work``), and the float32 result when it is written on the device (``io``)."""

    stores: int
    work: int
    io: int

    @property
    def total(self) -> int:
        return self.stores + self.work + self.io


def _elem(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def piece_shape(step: st.Step, shape, plan: Plan, video: tuple[int, int, int], elem: int,
                src_shape) -> tuple[int, int, int]:
    """Piece size (T, H, W) of ``step`` (output ``shape``) under ``plan``."""
    size = list(shape[2:])
    piece = [n if v is None else min(n, max(1, math.ceil(v * n / ref)))
             for n, v, ref in zip(size, (plan.chunk, plan.tile, plan.tile), video)]
    piece = [p if can else n for p, n, can in zip(piece, size, step.split)]
    if plan.piece_bytes is not None:
        def fits():
            return st.work_bytes(step, src_shape, shape, piece, elem) <= plan.piece_bytes

        # Smaller tiles first: convolutions lose efficiency on short chunks (a 1-frame output
        # runs at half the speed per voxel of 4 frames on CPU); then shorter chunks, then tiles again.
        for min_side, min_frames in ((64, PREFERRED_MIN_FRAMES), (64, 1), (8, 1)):
            while not fits():
                side = max((i for i in (1, 2) if step.split[i] and piece[i] > min_side), key=lambda i: piece[i],
                           default=None)
                if side is not None:
                    piece[side] = (piece[side] + 1) // 2
                elif step.split[0] and piece[0] > min_frames:
                    piece[0] = max(min_frames, (piece[0] + 1) // 2)
                else:
                    break
    return tuple(piece)


def _plan_pieces(prog: st.Program, plan: Plan, video, elem: int):
    return {id(s): piece_shape(s, prog.shapes[s.out], plan, video, elem, prog.shapes[s.src]) for s in prog.steps}


def estimate_memory(model, direction: Direction, shape, plan: Plan, output_device="cpu",
                    device: torch.device | None = None, dtype: torch.dtype | None = None) -> MemoryEstimate:
    """Peak memory on ``device`` (default: the model's) of running ``plan`` (see :class:`MemoryEstimate`);
    the one estimate behind the planner and the ComfyUI nodes' requests. The untiled pass is ``Plan()``."""
    device, dtype = torch.device(device or model.device), dtype or model.dtype
    elem = _elem(dtype)
    prog = st.Program(direction.network(model).layers(), shape)
    video = direction.video_size(model, shape)
    sizes = _plan_pieces(prog, plan, video, elem)
    work = max(st.work_bytes(s, prog.shapes[s.src], prog.shapes[s.out], sizes[id(s)], elem) for s in prog.steps)
    stores = st.peak_store_bytes(prog, elem) if plan.stores_on_device else 0
    io = 4 * math.prod(prog.output_shape) if torch.device(output_device) == device else 0
    return MemoryEstimate(stores, work, io)


def whole_plan(plan: Plan) -> bool:
    return plan.tile is None and plan.chunk is None and plan.piece_bytes is None


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def plan_for(model, direction: Direction, shape, opts: TilingOptions, budget: int | None = None,
             device: torch.device | None = None) -> Plan:
    """The plan a seamless run takes on ``device`` (default: the model's): given sizes win; on CPU,
    pieces of ``CPU_PIECE_BYTES`` with layer outputs in RAM; on CUDA the whole clip at once when it
    fits ``budget`` (default: 70% of free memory), else layer outputs on the device when they fit
    next to a minimal piece (else in pinned host memory) and pieces as large as the rest allows."""
    device = torch.device(device or model.device)
    budget = budget or opts.memory_budget or int(_free_bytes(device) * FREE_MEMORY_SHARE)

    def estimate(plan: Plan) -> MemoryEstimate:
        return estimate_memory(model, direction, shape, plan, opts.output_device, device)

    if opts.tile_size or opts.chunk_frames:
        plan = Plan(opts.tile_size, opts.chunk_frames)
        return plan if estimate(plan).total <= budget else replace(plan, stores_on_device=False)
    if device.type != "cuda":
        return Plan(piece_bytes=CPU_PIECE_BYTES)
    if estimate(Plan()).total <= budget:
        return Plan()
    smallest = Plan(piece_bytes=MIN_PIECE_BYTES)
    fixed = estimate(replace(smallest, stores_on_device=estimate(smallest).total <= budget))
    return Plan(piece_bytes=max(MIN_PIECE_BYTES, budget - fixed.stores - fixed.io),
                stores_on_device=fixed.stores > 0)


def memory_request(model, direction: Direction, shape, opts: TilingOptions | None,
                   device: torch.device | None = None) -> int:
    """Bytes a host application (ComfyUI) should free on ``device`` before a pass: the estimate of
    the plan the engine would take there with the whole device to itself (``opts=None``: untiled)."""
    device = torch.device(device or model.device)
    if opts is None:
        plan = Plan()
    elif opts.mode == "official":
        # the whole network on one official tile at a time
        plan, (b, c, t, h, w) = Plan(), shape
        scale = 1 if direction is ENCODE else model.config.spatial_compression
        chunk = (opts.chunk_frames or OFFICIAL_CHUNK) // (1 if direction is ENCODE else model.config.time_compression)
        tile = (opts.tile_size or OFFICIAL_TILE) // scale
        shape = (b, c, min(t, chunk + 1), min(h, tile), min(w, tile))
    else:
        whole_device = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                        else _free_bytes(device))
        plan = plan_for(model, direction, shape, opts, int(whole_device * FREE_MEMORY_SHARE), device)
    output_device = "cpu" if opts is None else opts.output_device
    return estimate_memory(model, direction, shape, plan, output_device, device).total


def smaller_plan(plan: Plan, video: tuple[int, int, int]) -> Plan | None:
    """The next plan the out-of-memory fallback tries; None at the floor."""
    if whole_plan(plan):
        return Plan(chunk=max(MIN_CHUNK_FRAMES, video[0] // 2))
    if plan.piece_bytes is not None and plan.piece_bytes > MIN_PIECE_BYTES:
        return replace(plan, piece_bytes=max(MIN_PIECE_BYTES, plan.piece_bytes // 2))
    if plan.piece_bytes is None:
        chunk = plan.chunk or video[0]
        if chunk > MIN_CHUNK_FRAMES:
            return replace(plan, chunk=max(MIN_CHUNK_FRAMES, chunk // 2))
        tile = min(plan.tile or max(video[1:]), max(video[1:]))
        if tile > MIN_TILE:
            return replace(plan, tile=max(MIN_TILE, tile // 2 // 8 * 8))
    if plan.stores_on_device:
        return replace(plan, stores_on_device=False)
    return None


# ------------------------------------------------------------------------------------------
# Running, and the out-of-memory fallback
# ------------------------------------------------------------------------------------------
def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _with_smaller_plans(model, run: Callable, plan, smaller: Callable, give_up: Callable[[object], str]):
    """``run(plan)``; on out-of-memory free what the attempt held and retry with ``smaller(plan)``
    until it returns None, then raise OutOfMemoryError with ``give_up(plan)``."""
    while True:
        try:
            return run(plan)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            _free(model.device)
            nxt = smaller(plan)
            if nxt is None:
                raise OutOfMemoryError(give_up(plan)) from err
            plan = nxt


def _run(model, x: torch.Tensor, opts: TilingOptions, direction: Direction) -> torch.Tensor:
    _check_input(x, direction)
    if opts.mode == "official":
        return _with_smaller_plans(
            model, lambda _: direction.official(model, x, opts), None, lambda _: None,
            lambda _: f"out of device memory in official mode ({direction.name}, tile {opts.tile_size or OFFICIAL_TILE}"
                      f" px, {opts.chunk_frames or OFFICIAL_CHUNK}-frame chunks). Official mode keeps the release "
                      "tile sizes so that results match published outputs: lower tile_size/chunk_frames (results "
                      "then differ from the release), use mode='seamless', or free device memory (other models, "
                      "fp16 weights).")
    video = direction.video_size(model, x.shape)
    group = TileGroup.of(opts.distributed)
    plan = plan_for(model, direction, x.shape, opts)
    if group is not None:
        plan = group.broadcast_object(plan)  # every rank must take the same plan: rank 0's
    return _with_smaller_plans(
        model, lambda p: _seamless(model, x, opts, direction, p, group), plan,
        lambda p: smaller_plan(p, video),
        lambda p: f"out of device memory ({direction.name}) even with the smallest pieces this engine tries "
                  f"({p}). Lower the resolution or the batch size, load the model in float16/bfloat16, or free "
                  "device memory used by other models.")


def _check_input(x: torch.Tensor, direction: Direction):
    if x.dim() != 5:
        raise InputError(f"the tiling engine takes 5-D [B, C, T, H, W] tensors, got shape {list(x.shape)}")
    if direction is ENCODE and (x.shape[3] % 8 or x.shape[4] % 8):
        raise InputError(f"height and width must be multiples of 8, got {x.shape[3]}x{x.shape[4]}; "
                         "use CVVAE.encode_framed with frame_policy='pad' or 'trim'")


class _Progress:
    """Cancellation checks and progress in proportion to work: ``step(cost)`` adds that piece's
    multiply-adds to ``done``, reported in thousandths of ``total_cost``."""

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


def _output_buffer(shape, opts: TilingOptions, compute: torch.device) -> torch.Tensor:
    out_dev = torch.device(opts.output_device)
    pin = out_dev.type == "cpu" and compute.type == "cuda"
    return torch.empty(shape, dtype=torch.float32, device=out_dev, pin_memory=pin)


def _finish(out: torch.Tensor, compute: torch.device) -> torch.Tensor:
    if compute.type == "cuda":
        torch.cuda.synchronize(compute)  # the non-blocking copies into ``out`` must land first
    return out


def _seamless(model, x: torch.Tensor, opts: TilingOptions, direction: Direction, plan: Plan,
              group: TileGroup | None) -> torch.Tensor:
    device, dtype = model.device, model.dtype
    prog = st.Program(direction.network(model).layers(), x.shape)
    out = _output_buffer(prog.output_shape, opts, device)
    if whole_plan(plan):
        # The untiled pass itself (every rank runs it; nothing to share).
        prog_bar = _Progress(opts, 1)
        prog_bar.check()
        if group is None:
            out.copy_(direction.untiled(model, x), non_blocking=True)
        else:
            group.run(lambda: out.copy_(direction.untiled(model, x)))
            group.check()
        prog_bar.step(1)
        return _finish(out, device)
    sizes = _plan_pieces(prog, plan, direction.video_size(model, x.shape), _elem(dtype))
    batch = x.shape[0]

    def cost(step, box):
        return batch * step.macs(prog.shapes[step.src], box)

    total = sum(cost(s, box) for s in prog.steps for box in st.pieces(prog.shapes[s.out], sizes[id(s)]))
    bar = _Progress(opts, total)
    st.run_program(prog, x, out, device=device, dtype=dtype,
                   store_device=device if plan.stores_on_device else torch.device("cpu"),
                   piece_of=lambda step, shape: sizes[id(step)], check=bar.check,
                   done=lambda step, box: bar.step(cost(step, box)), group=group,
                   memory_format=torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format)
    return _finish(out, device)


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
