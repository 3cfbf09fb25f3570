"""Plans of the seamless engine, the one memory estimate and the cost model behind them.

A :class:`Plan` fixes, before anything runs, the piece size of every step (time chunks x spatial
tiles, scaled to each layer's resolution, then capped in bytes) and where every layer output lives
while later steps read it:

* the **device tier** (the compute device): read in place, no copies;
* the **host tier** (host memory): pieces are copied in and out by the copy engine (:mod:`.tiers`);
* the **disk tier** (memory-mapped files in ``TilingOptions.disk_dir``): after host memory, only
  when a folder is named;
* **recomputed**: not stored at all; the steps that read a convolution's or upsampler's output
  compute the regions they need from its inputs (rematerialization; exact, at the cost of running
  that layer again on every reader's regions, halos included).

:func:`estimate_memory` simulates the schedule the executor runs and returns a
:class:`MemoryEstimate`: the device peak (stores from the pool, the largest piece's working memory,
the convolution workspace, the result when it is on the device), the host arenas (laid out exactly
as the executor lays them out: :func:`arena_layout`), the page-locked bytes as PyTorch really
allocates them, the traffic between the tiers and the plan's estimated time relative to the
untiled pass.

**Cost model** (:class:`Rates`): time = max(multiply-adds / device rate, host traffic / host link
bandwidth) (the copy engine overlaps compute) + disk traffic / disk bandwidth + a fixed cost per
piece; relative to the untiled pass's multiply-adds at the same rate. Recomputation adds the
recomputed layers' multiply-adds over every reader's regions; the host and disk tiers add their
bytes written once and read by every reader (halos included).

The search for the plan that fits the budgets is :mod:`.search`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from . import executor as ex
from .tiers import ALIGN, DEVICE, DISK, HOST, output_bytes, pinned_size

RECOMPUTE = "recompute"

#: Working memory of one piece on CPU: convolutions on small tiles and short chunks lose most of
#: their efficiency there (measurements: docs/engine.md, "Piece size on CPU").
CPU_PIECE_BYTES = 384 << 20
#: Largest piece working memory a budgeted CUDA plan takes: beyond it pieces gain little and take
#: room from the device tier.
CUDA_PIECE_BYTES = 4 << 30
#: Share of a device budget a tiered plan gives to one piece's working memory; the rest holds stores.
PIECE_SHARE = 0.25
#: Automatic pieces keep at least this many frames while tiles can still shrink.
PREFERRED_MIN_FRAMES = 4
#: Smaller piece sizes the planner tries, each half the last, when the first does not fit.
PIECE_HALVINGS = 6
#: Floors of the out-of-memory fallback.
MIN_PIECE_BYTES = 4 << 20
MIN_CHUNK_FRAMES = 1
MIN_TILE = 64
#: Share of free device memory a plan may use (the rest: allocator slack, other tensors).
FREE_MEMORY_SHARE = 0.7
#: Share of available host memory the engine may use by default.
HOST_MEMORY_SHARE = 0.8
#: Staging buffers between the device and the disk tier (each the size of the largest block).
STAGING_SLOTS = 4
#: Float32 3-D convolutions on CPU whose input has at most this many rows (batch x channels x frames
#: x height) run through a column buffer (see ``conv_workspace``).
CPU_COLUMN_ROWS = 20480
#: Plans the planner's search keeps at each step (see ``_Search.relieve_host``).
BEAM = 4
#: cuDNN's convolution workspace, counted on every CUDA plan.
CUDA_WORKSPACE_BYTES = 512 << 20


@dataclass(frozen=True)
class Rates:
    """The cost model's rates: multiply-adds per second of the compute device, bytes per second
    between it and host memory (one direction; the two run at once), of the disk, and seconds per
    piece (launches, bookkeeping). Defaults, not measurements of your machine:
    ``bench/cuda_engine_check.py`` measures the host link of a GPU."""

    macs_per_s: float
    host_bytes_per_s: float
    disk_bytes_per_s: float
    piece_s: float


RATES = {"cuda": Rates(macs_per_s=80e12, host_bytes_per_s=20e9, disk_bytes_per_s=1.5e9, piece_s=50e-6),
         "cpu": Rates(macs_per_s=50e9, host_bytes_per_s=8e9, disk_bytes_per_s=1e9, piece_s=1e-3)}


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

    def output_shape(self, model, shape) -> tuple[int, int, int, int, int]:
        cfg, (b, _, t, h, w), s = model.config, shape, model.config.spatial_compression
        if self.name == "encode":
            return b, 2 * cfg.latent_channels, cfg.latent_frames(t), h // s, w // s
        return b, cfg.in_channels, cfg.video_frames(t), h * s, w * s

    def untiled(self, model, x: torch.Tensor) -> torch.Tensor:
        return model.encoder_output(x) if self.name == "encode" else model.decoder_output(x)


ENCODE = Direction("encode", "encoder", "pixels")
DECODE = Direction("decode", "decoder", "latent pixels")


@dataclass(frozen=True)
class Plan:
    """One seamless run. ``tile`` (pixels) and ``chunk`` (video frames) are scaled to each layer's
    resolution; ``piece_bytes`` then caps each piece's working memory; all None = one piece per
    layer (the untiled pass). ``host`` / ``disk`` name the steps whose outputs live in host memory /
    on disk, ``recompute`` those whose outputs are recomputed by their readers; the others stay on
    the device."""

    tile: int | None = None
    chunk: int | None = None
    piece_bytes: int | None = None
    host: frozenset[str] = frozenset()
    recompute: frozenset[str] = frozenset()
    disk: frozenset[str] = frozenset()

    @property
    def whole(self) -> bool:
        return self.tile is None and self.chunk is None and self.piece_bytes is None

    def tier(self, name: str) -> str:
        if name in self.recompute:
            return RECOMPUTE
        return DISK if name in self.disk else HOST if name in self.host else DEVICE

    def describe(self, estimate: "MemoryEstimate | None" = None) -> str:
        """One readable line: pieces, which layer outputs are where, estimated peaks and cost."""
        if self.whole:
            text = "untiled (whole clip at once)"
        else:
            sizes = [f"tile {self.tile} px" if self.tile else "", f"chunk {self.chunk} frames" if self.chunk else "",
                     f"pieces <= {self.piece_bytes / 2**20:.0f} MiB" if self.piece_bytes else ""]
            text = "seamless, " + ", ".join(s for s in sizes if s)
            for label, names in (("in host memory", self.host), ("on disk", self.disk), ("recomputed", self.recompute)):
                if names:
                    text += f"; {len(names)} {label} ({', '.join(sorted(names))})"
            if not (self.host or self.disk or self.recompute):
                text += "; every layer output on the device"
        if estimate is not None:
            text += (f"; estimated peak {estimate.total / 2**30:.2f} GiB on the device "
                     f"({estimate.stores / 2**30:.2f} stores + {estimate.work / 2**30:.2f} piece"
                     f"{f' + {estimate.workspace / 2**30:.2f} workspace' if estimate.workspace else ''}"
                     f"{f' + {estimate.io / 2**30:.2f} result' if estimate.io else ''}), "
                     f"{estimate.host / 2**30:.2f} GiB of host memory"
                     f"{f' ({estimate.pinned / 2**30:.2f} page-locked)' if estimate.pinned else ''}"
                     f"{f', {estimate.disk / 2**30:.2f} GiB on disk' if estimate.disk else ''}"
                     f"; estimated time {estimate.relative_cost:.2f}x the untiled pass")
        return text


@dataclass(frozen=True)
class MemoryEstimate:
    """What a plan holds at its peaks and moves. On the device: the layer outputs held there at the
    peak (``stores``), the working memory of that step's largest piece (``work``), the convolution
    workspace (``workspace``) and the result when it is there (``io``); ``total`` is their sum. In
    host memory (``host``): the host arena (``host_stores``), the disk staging ring (``staging``) and
    the result (``host_io``), and on a CPU, whose device *is* host memory, the device peak too.
    ``pinned``: the page-locked part; ``disk``: the disk arena; ``host_traffic`` / ``disk_traffic``:
    bytes copied; ``relative_cost``: estimated time over the untiled pass's (cost model above);
    ``relative_work``: multiply-adds over the untiled pass's (recomputation and halos included)."""

    stores: int
    work: int
    io: int
    host_stores: int = 0
    staging: int = 0
    workspace: int = 0
    host_io: int = 0
    disk: int = 0
    pinned: int = 0
    host_traffic: int = 0
    disk_traffic: int = 0
    relative_cost: float = 1.0
    relative_work: float = 1.0
    shared_memory: bool = False

    @property
    def total(self) -> int:
        return self.stores + self.work + self.workspace + self.io

    @property
    def host(self) -> int:
        return self.host_stores + self.staging + self.host_io + (self.total if self.shared_memory else 0)


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device (the current one is 0 unless set otherwise)."""
    index = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
    def index_of(d: torch.device) -> int:
        return d.index if d.index is not None else index
    return a.type == b.type and index_of(a) == index_of(b)


def elem_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


# ------------------------------------------------------------------------------------------
# Piece sizes
# ------------------------------------------------------------------------------------------
def _moves(prog: ex.Program, step: ex.Step, plan: Plan) -> tuple[bool, int]:
    """(whether the step reads a host or disk store, bytes per element of a reordered copy its output
    takes on the way out of the device: a host/disk store in the compute dtype, the result in float32)."""
    def off_device(slot):
        producer = prog.producer(slot)
        return producer is not None and plan.tier(producer.name) in (HOST, DISK)
    reads = off_device(step.src) or (step.residual is not None and off_device(step.residual))
    if step is prog.steps[-1]:
        return reads, 4
    return reads, (1 if plan.tier(step.name) in (HOST, DISK) else 0)


def piece_work(prog: ex.Program, step: ex.Step, piece, plan: Plan, elem: int, device: torch.device) -> int:
    """Working memory of one piece of ``step``; a reader of a recomputed store also holds the
    recomputing steps' pieces (the regions they read, with their halos, down every chain)."""
    reads, write = _moves(prog, step, plan)
    work = ex.work_bytes(step, prog.shapes[step.src], prog.shapes[step.out], piece, elem, reads, write * elem
                         if write == 1 else write) + conv_workspace(step, prog.shapes[step.src], piece, elem, device)
    return work + _recompute_work(prog, step, piece, plan, elem, device)


def _recompute_work(prog: ex.Program, reader: ex.Step, piece, plan: Plan, elem: int, device: torch.device) -> int:
    """What recomputing the inputs of one ``reader`` piece of size ``piece`` holds at most, beyond
    the reader's own piece. A reader recomputes its input region first, then its residual piece:
    one chain at a time, and every level of a chain at once (a level holds its own piece while the
    levels below compute its inputs)."""
    chains = [0]
    for slot, region in ((reader.src, _region(reader, piece)), (reader.residual, piece)):
        producer = prog.producer(slot) if slot is not None else None
        if producer is None or producer.name not in plan.recompute:
            continue
        region = tuple(min(n, r) for n, r in zip(prog.shapes[slot][2:], region))
        chains.append(ex.work_bytes(producer, prog.shapes[producer.src], prog.shapes[producer.out], region, elem)
                      + conv_workspace(producer, prog.shapes[producer.src], region, elem, device)
                      + _recompute_work(prog, producer, region, plan, elem, device))
    return max(chains)


def conv_workspace(step: ex.Step, src, piece, elem: int, device: torch.device) -> int:
    """Memory the CPU convolution of one piece takes beyond its input and output (on CUDA cuDNN's
    workspace is counted once per plan instead: ``CUDA_WORKSPACE_BYTES``). PyTorch runs a float32 3-D
    convolution whose input has at most :data:`CPU_COLUMN_ROWS` rows (batch x channels x frames x
    height) through a column buffer of input channels x kernel volume x output voxels, a larger one
    through oneDNN, which takes about one more output piece (measured: bench/conv_workspace.py)."""
    conv = getattr(step, "conv", None) or getattr(getattr(step, "up", None), "conv", None)
    if device.type != "cpu" or conv is None:
        return 0
    batch, voxels = src[0], math.prod(piece)
    frames, rows = _region(step, piece)[:2]
    if elem == 4 and batch * conv.in_channels * frames * rows <= CPU_COLUMN_ROWS:
        return elem * batch * conv.in_channels * math.prod(conv.kernel3) * voxels
    return elem * batch * conv.out_channels * voxels


def _touches_arena(prog: ex.Program, step: ex.Step, plan: Plan) -> bool:
    reads, write = _moves(prog, step, plan)
    return reads or write == 1


def piece_shape(prog: ex.Program, step: ex.Step, plan: Plan, video: tuple[int, int, int],
                elem: int, device: torch.device) -> tuple[int, int, int]:
    """Piece size (T, H, W) of ``step`` under ``plan``."""
    size = list(prog.shapes[step.out][2:])
    piece = [n if v is None else min(n, max(1, math.ceil(v * n / ref)))
             for n, v, ref in zip(size, (plan.chunk, plan.tile, plan.tile), video)]
    piece = [p if can else n for p, n, can in zip(piece, size, step.split)]
    if plan.piece_bytes is not None:
        # Pieces of host and disk stores keep whole rows (one contiguous block per frame).
        rows_first = _touches_arena(prog, step, plan)

        def fits():
            return piece_work(prog, step, piece, plan, elem, device) <= plan.piece_bytes

        def side(min_side):
            sides = [i for i in (1, 2) if step.split[i] and piece[i] > min_side]
            if rows_first and 1 in sides:
                return 1
            return max(sides, key=lambda i: piece[i], default=None) if not rows_first or min_side == 8 else None

        # Smaller tiles first: convolutions lose efficiency on short chunks (a 1-frame output
        # runs at half the speed per voxel of 4 frames on CPU); then shorter chunks, then tiles again.
        for min_side, min_frames in ((64, PREFERRED_MIN_FRAMES), (64, 1), (8, 1)):
            while not fits():
                i = side(min_side)
                if i is not None:
                    piece[i] = (piece[i] + 1) // 2
                elif step.split[0] and piece[0] > min_frames:
                    piece[0] = max(min_frames, (piece[0] + 1) // 2)
                else:
                    break
    return tuple(piece)


def piece_sizes(prog: ex.Program, plan: Plan, video, elem: int, device: torch.device,
                memo: dict | None = None) -> list[tuple[int, int, int]]:
    """The piece size of every step of ``prog``, in step order. ``memo``: a dict kept across calls
    for one program, video, dtype and device (the planner's search), keyed by what a step's piece
    size depends on."""
    if memo is None:
        return [piece_shape(prog, s, plan, video, elem, device) for s in prog.steps]
    sizes = []
    for s in prog.steps:
        key = _piece_key(prog, s, plan)
        if key not in memo:
            memo[key] = piece_shape(prog, s, plan, video, elem, device)
        sizes.append(memo[key])
    return sizes


def _piece_key(prog: ex.Program, step: ex.Step, plan: Plan) -> tuple:
    """What the piece size of ``step`` depends on: the plan's sizes, the step's tier and, for each
    input, its tier or, when recomputed, the same of its producer (down the chain)."""
    def source(slot):
        producer = prog.producer(slot) if slot is not None else None
        if producer is None or producer.name not in plan.recompute:
            return None if producer is None else plan.tier(producer.name)
        return producer.name, source(producer.src), source(producer.residual)

    return (step.name, plan.tile, plan.chunk, plan.piece_bytes, plan.tier(step.name), source(step.src),
            source(step.residual))


def step_work(prog: ex.Program, sizes, plan: Plan, elem: int, device: torch.device) -> list[int]:
    """Working memory of each step's largest piece."""
    return [piece_work(prog, s, piece, plan, elem, device) for s, piece in zip(prog.steps, sizes)]


# ------------------------------------------------------------------------------------------
# The schedule's memory, simulated
# ------------------------------------------------------------------------------------------
def arena_layout(intervals: list[tuple[int, int, int, int]]) -> tuple[dict[int, int], int]:
    """Offsets of stores that live from step ``start`` to step ``end`` (inclusive) in one arena:
    ``intervals`` = [(slot, start, end, nbytes)]; first fit in order of allocation. Returns the
    offsets and the arena's size."""
    offsets, live, size = {}, [], 0
    for slot, start, end, nbytes in sorted(intervals, key=lambda v: (v[1], v[0])):
        live = sorted((o, n, e) for o, n, e in live if e >= start)
        nbytes = -(-nbytes // ALIGN) * ALIGN
        offset = 0
        for o, n, _ in live:
            if o - offset >= nbytes:
                break
            offset = max(offset, o + n)
        offsets[slot] = offset
        live.append((offset, nbytes, end))
        size = max(size, offset + nbytes)
    return offsets, size


@dataclass(frozen=True)
class Schedule:
    """A plan laid onto a program: each step's tier, when each store is last read, which outputs are
    written over their residual, the device tier's bytes while each step runs, and the host and disk
    arenas' offsets and sizes."""

    tiers: dict[str, str]
    frees: list[list[int]]
    overwrites: dict[int, int]
    device_held: list[int]
    host_held: list[int]
    offsets: dict[int, int]
    arena_bytes: dict[str, int]

    def placement(self) -> ex.Placement:
        return ex.Placement(self.tiers, self.offsets, self.frees, self.overwrites)


def schedule(prog: ex.Program, plan: Plan, elem: int) -> Schedule:
    """Mirrors the executor: a device store is taken from the pool when its step starts (a freed
    store of the same shape is reused, else the pool's freed stores are released and a new one
    allocated) and returns to it after its last reader; host and disk stores sit at fixed offsets. An
    output written over its residual (same tier) takes that store's memory: its place in the pool,
    or its offset, the arena interval running on to the output's last reader."""
    frees = prog.frees(plan.recompute)
    last_read = {slot: i for i, slots in enumerate(frees) for slot in slots}
    tiers = {s.name: plan.tier(s.name) for s in prog.steps[:-1]}
    tier_of = {s.out: tiers[s.name] for s in prog.steps[:-1]}
    overwrites = {out: r for out, r in prog.overwrites(plan.recompute).items()
                  if tier_of[out] == tier_of[r] and tier_of[out] in (DEVICE, HOST, DISK)}
    owner = {}  # slot -> the store whose memory it lives in
    live, freed, device_held, host_held, in_host = {}, [], [], [], {}
    intervals = {HOST: {}, DISK: {}}
    last = len(prog.steps) - 1
    for i, step in enumerate(prog.steps):
        tier = tiers.get(step.name)
        shape = prog.shapes[step.out]
        if step.out in overwrites:
            r = overwrites[step.out]
            owner[step.out] = owner.get(r, r)
            if tier == DEVICE:
                live[step.out] = live.pop(r)
            else:
                root = intervals[tier][owner[step.out]]
                root[2] = last_read.get(step.out, i)
                if tier == HOST:
                    in_host[step.out] = in_host.pop(r)
        elif i < last and tier == DEVICE:
            same = [k for k, s in enumerate(freed) if s == shape]
            if same:
                freed.pop(same[0])
            else:
                freed.clear()
            live[step.out] = shape
        elif i < last and tier in (HOST, DISK):
            intervals[tier][step.out] = [step.out, i, last_read.get(step.out, i), elem * math.prod(shape)]
            if tier == HOST:
                in_host[step.out] = elem * math.prod(shape)
        device_held.append(elem * (sum(math.prod(s) for s in live.values()) + sum(math.prod(s) for s in freed)))
        host_held.append(sum(in_host.values()))
        for slot in frees[i]:
            if slot in live:
                freed.append(live.pop(slot))
            in_host.pop(slot, None)
    offsets, arena_bytes = {}, {}
    for tier, spans in intervals.items():
        tier_offsets, arena_bytes[tier] = arena_layout([tuple(v) for v in spans.values()])
        offsets.update(tier_offsets)
    offsets.update({slot: offsets[root] for slot, root in owner.items() if root in offsets})
    return Schedule(tiers, frees, overwrites, device_held, host_held, offsets, arena_bytes)


def block_bytes(prog: ex.Program, sizes, plan: Plan, elem: int) -> int:
    """Largest contiguous block moved to or from the disk tier (a staging buffer's size): a frame's
    rows of a piece's region or output."""
    biggest = 0
    for s, piece in zip(prog.steps, sizes):
        for slot, region in ((s.src, _region(s, piece)), (s.residual, piece), (s.out, piece)):
            producer = prog.producer(slot) if slot is not None else None
            if producer is not None and plan.tier(producer.name) == DISK:
                _, c, _, h, w = prog.shapes[slot]
                biggest = max(biggest, elem * c * w * min(h, region[1]) * (region[0] if region[1] >= h else 1))
    return biggest


def _region(step: ex.Step, piece) -> tuple[int, int, int]:
    """Size of the input region a piece's convolution reads (halo included), per axis."""
    conv = getattr(step, "conv", None)
    if conv is None:
        up = getattr(step, "up", None)
        return piece if up is None else (piece[0] // up.time_factor + 3, piece[1] + 2, piece[2] + 2)
    return tuple((p - 1) * s + k for p, k, s in zip(piece, conv.kernel3, conv.stride3))


# ------------------------------------------------------------------------------------------
# Traffic and time
# ------------------------------------------------------------------------------------------
def _halo(step: ex.Step, piece, src_shape) -> float:
    """Input voxels read per output voxel's worth of input, for one piece size (>= 1)."""
    region = [min(n, r) for n, r in zip(src_shape[2:], _region(step, piece))]
    covered = [min(n, p * getattr(getattr(step, "conv", None), "stride3", (1, 1, 1))[i])
               for i, (n, p) in enumerate(zip(src_shape[2:], piece))]
    return max(1.0, math.prod(region) / max(1, math.prod(covered)))


def plan_cost(prog: ex.Program, plan: Plan, sizes, elem: int, device: torch.device, input_on_host: bool,
              output_on_host: bool) -> tuple[float, float, int, int]:
    """(time relative to the untiled pass, multiply-adds relative to it, host traffic, disk traffic) of
    ``plan`` (module docstring)."""
    rates = RATES.get(device.type, RATES["cuda"])
    size_of = {s.name: p for s, p in zip(prog.steps, sizes)}
    whole = [tuple((0, n) for n in prog.shapes[s.out][2:]) for s in prog.steps]
    macs = {s.out: prog.shapes[s.out][0] * s.macs(prog.shapes[s.src], box) for s, box in zip(prog.steps, whole)}
    untiled = sum(macs.values())
    traffic = {HOST: 0, DISK: 0}

    def read(slot: int, factor: float):
        """``factor`` times the bytes of ``slot`` are read: by a store's tier, or recomputed from its inputs."""
        nonlocal extra
        producer = prog.producer(slot)
        if producer is None:
            if input_on_host:
                traffic[HOST] += int(factor * 4 * math.prod(prog.shapes[0]))
            return
        tier = plan.tier(producer.name)
        if tier in (HOST, DISK):
            traffic[tier] += int(factor * elem * math.prod(prog.shapes[slot]))
        elif tier == RECOMPUTE:
            extra += factor * macs[slot]
            inner = _halo(producer, size_of[producer.name], prog.shapes[producer.src])
            read(producer.src, factor * inner)
            if producer.residual is not None:
                read(producer.residual, factor)

    extra = 0.0
    pieces = 0
    for s in prog.steps:
        if not prog.runs(s, plan.recompute):
            continue
        pieces += math.prod(math.ceil(n / p) for n, p in zip(prog.shapes[s.out][2:], size_of[s.name]))
        read(s.src, _halo(s, size_of[s.name], prog.shapes[s.src]))
        if s.residual is not None:
            read(s.residual, 1.0)
        if plan.tier(s.name) in (HOST, DISK):
            traffic[plan.tier(s.name)] += elem * math.prod(prog.shapes[s.out])
    skipped = sum(macs[s.out] for s in prog.steps if not prog.runs(s, plan.recompute))
    if output_on_host:
        traffic[HOST] += 4 * math.prod(prog.output_shape)
    compute = (untiled - skipped + extra) / rates.macs_per_s
    seconds = (max(compute, traffic[HOST] / rates.host_bytes_per_s) + traffic[DISK] / rates.disk_bytes_per_s
               + (pieces * rates.piece_s if not plan.whole else 0))
    return (seconds / max(untiled / rates.macs_per_s, 1e-9), (untiled - skipped + extra) / max(untiled, 1),
            traffic[HOST], traffic[DISK])


# ------------------------------------------------------------------------------------------
# The estimate
# ------------------------------------------------------------------------------------------
def estimate_memory(model, direction: Direction, shape, plan: Plan, output_device="cpu",
                    device: torch.device | None = None, dtype: torch.dtype | None = None,
                    input_device: torch.device | str = "cpu") -> MemoryEstimate:
    """Peak memory, traffic and estimated time of running ``plan`` on ``device`` (default: the
    model's) in ``dtype`` (default: the model's), the input on ``input_device`` (see
    :class:`MemoryEstimate`): the one estimate behind the planner and the ComfyUI nodes' requests.
    The untiled pass is ``Plan()``."""
    device, dtype = torch.device(device or model.device), dtype or model.dtype
    prog = ex.Program(direction.network(model).layers(), shape)
    return estimate_program(prog, plan, direction.video_size(model, shape), elem_size(dtype), device, output_device,
                            input_device=input_device)


def estimate_program(prog: ex.Program, plan: Plan, video, elem: int, device: torch.device, output_device,
                     sizes=None, work=None, sched: Schedule | None = None, input_device="cpu",
                     memo: dict | None = None) -> MemoryEstimate:
    """:func:`estimate_memory` of a built program (``sizes``/``work``/``sched``: its pieces and
    schedule, when known; ``memo``: see :func:`piece_sizes`)."""
    sizes = sizes or piece_sizes(prog, plan, video, elem, device, memo)
    work = work or step_work(prog, sizes, plan, elem, device)
    sched = sched or schedule(prog, plan, elem)
    peak = max(range(len(prog.steps)), key=lambda i: sched.device_held[i] + work[i])
    out_dev = torch.device(output_device)
    out_here = same_device(out_dev, device)
    out_numel = math.prod(prog.output_shape)
    io = 4 * out_numel if out_here else 0
    if plan.whole and device.type != "cpu" and not out_here:
        io += 4 * out_numel  # the untiled result is converted to float32 on the device before it leaves
    host_io = output_bytes(prog.output_shape, out_dev, device)
    accelerated = device.type != "cpu"
    staging = STAGING_SLOTS * block_bytes(prog, sizes, plan, elem) if plan.disk else 0
    if accelerated and staging:
        staging = pinned_size(staging)
    host_arena = sched.arena_bytes.get(HOST, 0)
    pinned = (host_arena + staging + host_io) if accelerated else 0
    cost, work_ratio, host_traffic, disk_traffic = plan_cost(prog, plan, sizes, elem, device,
                                                 torch.device(input_device).type == "cpu" and accelerated,
                                                 out_dev.type == "cpu" and accelerated)
    return MemoryEstimate(stores=sched.device_held[peak], work=work[peak], io=io, host_stores=host_arena,
                          staging=staging, workspace=CUDA_WORKSPACE_BYTES if device.type == "cuda" else 0,
                          host_io=host_io, disk=sched.arena_bytes.get(DISK, 0), pinned=pinned,
                          host_traffic=host_traffic, disk_traffic=disk_traffic, relative_cost=cost,
                          relative_work=work_ratio, shared_memory=not accelerated)


def smaller_plan(plan: Plan, video: tuple[int, int, int], stores: frozenset[str]) -> Plan | None:
    """The next plan the out-of-memory fallback tries (``stores``: every storable step's name); None
    at the floor."""
    if plan.whole:
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
    rest = stores - plan.recompute - plan.disk
    if plan.host != rest:
        return replace(plan, host=rest)
    return None
