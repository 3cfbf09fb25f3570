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

:func:`choose_plan` searches greedily, the way checkpointing planners trade memory for time
(sqrt(n) checkpointing, Checkmate): pieces from a share of the device budget; the smallest stores
on the device while the device peak fits; while host memory is over its budget, of the stores held
at the host peak the one whose move (to disk when a folder is named, or recomputation) frees most
bytes per added second; then smaller pieces if the device still does not fit. A plan that fits no
budget is refused before any work with :class:`~cvvae_core.errors.MemoryBudgetError`, saying what
the clip needs.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

from ..errors import MemoryBudgetError
from . import executor as ex
from .tiers import ALIGN, DEVICE, DISK, HOST, output_bytes, pinned_size

RECOMPUTE = "recompute"

#: Working memory of one piece on CPU: convolutions on small tiles and short chunks lose most of
#: their efficiency there (measurements: docs/engine.md, "Piece size on CPU").
CPU_PIECE_BYTES = 512 << 20
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
    bytes copied; ``relative_cost``: estimated time over the untiled pass's (cost model above)."""

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
    return a.type == b.type and (a.index if a.index is not None else index) == (b.index if b.index is not None else index)


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
    recomputing step's pieces (the regions it reads, with their halos, down the chain)."""
    reads, write = _moves(prog, step, plan)
    work = ex.work_bytes(step, prog.shapes[step.src], prog.shapes[step.out], piece, elem, reads, write * elem
                         if write == 1 else write) + conv_workspace(step, prog.shapes[step.src], piece, elem, device)
    producer, region = prog.producer(step.src), piece
    while producer is not None and producer.name in plan.recompute:
        kernel = getattr(getattr(step, "conv", None), "kernel3", (3, 3, 3))
        region = tuple(min(n, p + k - 1) for p, k, n in zip(region, kernel, prog.shapes[step.src][2:]))
        work += ex.work_bytes(producer, prog.shapes[producer.src], prog.shapes[producer.out], region, elem)
        work += conv_workspace(producer, prog.shapes[producer.src], region, elem, device)
        step, producer = producer, prog.producer(producer.src)
    return work


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


def piece_sizes(prog: ex.Program, plan: Plan, video, elem: int, device: torch.device) -> list[tuple[int, int, int]]:
    """The piece size of every step of ``prog``, in step order."""
    return [piece_shape(prog, s, plan, video, elem, device) for s in prog.steps]


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
    """A plan laid onto a program: each step's tier, when each store is last read, the device tier's
    bytes while each step runs, and the host and disk arenas' offsets and sizes."""

    tiers: dict[str, str]
    frees: list[list[int]]
    device_held: list[int]
    host_held: list[int]
    offsets: dict[int, int]
    arena_bytes: dict[str, int]

    def placement(self) -> ex.Placement:
        return ex.Placement(self.tiers, self.offsets, self.frees)


def schedule(prog: ex.Program, plan: Plan, elem: int) -> Schedule:
    """Mirrors the executor: a device store is taken from the pool when its step starts (a freed
    store of the same shape is reused, else the pool's freed stores are released and a new one
    allocated) and returns to it after its last reader; host and disk stores sit at fixed offsets."""
    frees = prog.frees(plan.recompute)
    last_read = {slot: i for i, slots in enumerate(frees) for slot in slots}
    tiers = {s.name: plan.tier(s.name) for s in prog.steps[:-1]}
    live, freed, device_held, host_held, in_host = {}, [], [], [], {}
    intervals = {HOST: [], DISK: []}
    last = len(prog.steps) - 1
    for i, step in enumerate(prog.steps):
        tier = tiers.get(step.name)
        shape = prog.shapes[step.out]
        if i < last and tier == DEVICE:
            same = [k for k, s in enumerate(freed) if s == shape]
            if same:
                freed.pop(same[0])
            else:
                freed.clear()
            live[step.out] = shape
        elif i < last and tier in (HOST, DISK):
            intervals[tier].append((step.out, i, last_read.get(step.out, i), elem * math.prod(shape)))
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
        tier_offsets, arena_bytes[tier] = arena_layout(spans)
        offsets.update(tier_offsets)
    return Schedule(tiers, frees, device_held, host_held, offsets, arena_bytes)


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
              output_on_host: bool) -> tuple[float, int, int]:
    """(time relative to the untiled pass, host traffic, disk traffic) of ``plan`` (module docstring)."""
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
    return seconds / max(untiled / rates.macs_per_s, 1e-9), traffic[HOST], traffic[DISK]


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
                     sizes=None, work=None, sched: Schedule | None = None, input_device="cpu") -> MemoryEstimate:
    """:func:`estimate_memory` of a built program (``sizes``/``work``/``sched``: its pieces and
    schedule, when known)."""
    sizes = sizes or piece_sizes(prog, plan, video, elem, device)
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
    cost, host_traffic, disk_traffic = plan_cost(prog, plan, sizes, elem, device,
                                                 torch.device(input_device).type == "cpu" and accelerated,
                                                 out_dev.type == "cpu" and accelerated)
    return MemoryEstimate(stores=sched.device_held[peak], work=work[peak], io=io, host_stores=host_arena,
                          staging=staging, workspace=CUDA_WORKSPACE_BYTES if device.type == "cuda" else 0,
                          host_io=host_io, disk=sched.arena_bytes.get(DISK, 0), pinned=pinned,
                          host_traffic=host_traffic, disk_traffic=disk_traffic, relative_cost=cost,
                          shared_memory=not accelerated)


# ------------------------------------------------------------------------------------------
# Budgets
# ------------------------------------------------------------------------------------------
def free_bytes(device: torch.device) -> int:
    """Memory a pass could use on ``device``: on CUDA what the driver reports free plus what PyTorch
    holds cached but unused (its allocator hands that out first); on CPU the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_host_budget() -> int:
    return int(free_bytes(torch.device("cpu")) * HOST_MEMORY_SHARE)


def disk_free(folder) -> int:
    try:
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0


@dataclass
class _Search:
    """What the planner searches over: one program, its budgets, and the estimate of a plan."""

    prog: ex.Program
    video: tuple[int, int, int]
    elem: int
    device: torch.device
    output_device: object
    input_device: object
    device_budget: int | None
    host_budget: int
    disk_budget: int | None  # None: no disk tier
    recompute: bool | None

    def estimate(self, plan: Plan) -> MemoryEstimate:
        return estimate_program(self.prog, plan, self.video, self.elem, self.device, self.output_device,
                                input_device=self.input_device)

    def excess(self, plan: Plan) -> int:
        """Host bytes over the budget, summed over the steps (the search's progress measure: a move
        that lowers one of several equal peaks lowers it, where the peak itself does not move)."""
        sched = schedule(self.prog, plan, self.elem)
        shared = self.device.type == "cpu"
        return sum(max(0, h + (d if shared else 0) - self.host_budget)
                   for h, d in zip(sched.host_held, sched.device_held))

    def fits(self, est: MemoryEstimate) -> bool:
        return ((self.device_budget is None or est.total <= self.device_budget) and est.host <= self.host_budget
                and (est.disk == 0 or (self.disk_budget is not None and est.disk <= self.disk_budget)))

    def stores(self, plan: Plan) -> list[ex.Step]:
        return [s for s in self.prog.steps[:-1] if s.name not in plan.recompute]

    def place(self, plan: Plan) -> Plan:
        """``plan`` with its stores placed: the smallest first on the device while the device peak
        stays within its budget, the rest in host memory (those on disk stay there)."""
        if self.device_budget is None:
            return plan
        movable = [s for s in self.stores(plan) if s.name not in plan.disk]
        host = {s.name for s in movable}
        plan = replace(plan, host=frozenset(host))
        sizes = piece_sizes(self.prog, plan, self.video, self.elem, self.device)
        for step in sorted(movable, key=lambda s: math.prod(self.prog.shapes[s.out])):
            trial = replace(plan, host=frozenset(host - {step.name}))
            est = estimate_program(self.prog, trial, self.video, self.elem, self.device, self.output_device, sizes,
                                   input_device=self.input_device)
            if est.total <= self.device_budget:
                host.discard(step.name)
        return replace(plan, host=frozenset(host))

    def relieve_host(self, plan: Plan) -> Plan:
        """Host memory within its budget, as cheaply as the search finds: a beam search over moves of
        the stores held at the host peak (to disk when there is a disk tier, or to recomputation; one
        store, or every store of its shape, since blocks at one resolution peak alike) that keep the
        device within its budget. The beam keeps the :data:`BEAM` plans that free the most bytes per
        added second; the cheapest plan that fits wins."""
        est = self.estimate(plan)
        if est.host <= self.host_budget:
            return plan
        start = self.excess(plan)
        beam, done, seen, grown_before = [(plan, est, start)], None, {plan}, []
        closest = (plan, est)  # when nothing fits: the plan that needs the least host memory
        while beam:
            grown = []
            for parent, p_est, p_excess in beam:
                for trial in self.moves(parent):
                    if trial in seen:
                        continue
                    seen.add(trial)
                    t_est = self.estimate(trial)
                    if not self._fits_device_and_disk(t_est):
                        continue
                    if t_est.host <= self.host_budget:
                        if done is None or t_est.relative_cost < done[1].relative_cost:
                            done = (trial, t_est)
                        continue
                    if t_est.host < closest[1].host:
                        closest = (trial, t_est)
                    t_excess = self.excess(trial)
                    if t_excess < p_excess and (done is None or t_est.relative_cost < done[1].relative_cost):
                        rate = (start - t_excess) / max(t_est.relative_cost - est.relative_cost, 1e-6)
                        grown.append((rate, trial, t_est, t_excess))
            grown.sort(key=lambda g: -g[0])
            beam = [(p, e, x) for _, p, e, x in grown[:BEAM]]
            if not beam and done is None and grown_before:
                beam = grown_before[:1]  # nothing freed more: go on from the best plan so far
            grown_before = [(p, e, x) for _, p, e, x in grown] or grown_before[1:]
        return (done or closest)[0]

    def speed_up(self, plan: Plan) -> Plan:
        """While some move of the same kinds lowers the estimated time and still fits every budget
        (recomputing can be cheaper than a slow host link), take the best."""
        est = self.estimate(plan)
        while True:
            best = None
            for trial in self.moves(plan, everywhere=True):
                t_est = self.estimate(trial)
                if self.fits(t_est) and t_est.relative_cost < (best[1].relative_cost if best else
                                                                 est.relative_cost) - 0.01:
                    best = (trial, t_est)
            if best is None:
                return plan
            plan, est = best

    def _fits_device_and_disk(self, est: MemoryEstimate) -> bool:
        return ((self.device_budget is None or est.total <= self.device_budget)
                and (not est.disk or (self.disk_budget is not None and est.disk <= self.disk_budget)))

    def moves(self, plan: Plan, everywhere: bool = False):
        """Plans that each move some stores held at the host peak (``everywhere``: any host store) off
        the host (module docstring)."""
        if everywhere:
            held = [s for s in self.stores(plan) if plan.tier(s.name) == HOST]
            for name in plan.recompute if self.recompute is None else ():  # and back: storing can be cheaper
                yield replace(plan, recompute=plan.recompute - {name}, host=plan.host | {name})
        else:
            held = self._held_at_host_peak(plan, schedule(self.prog, plan, self.elem))
        shapes = {self.prog.shapes[s.out] for s in held}
        groups = [[s] for s in held]
        for shape in shapes:
            same = [s for s in self.stores(plan) if self.prog.shapes[s.out] == shape]
            free = [s for s in same if self.prog.free_to_recompute(s)]
            groups += [g for g in (free, same) if len(g) > 1]
        for group in groups:
            names = frozenset(s.name for s in group)
            if self.recompute is not False and all(s.recomputable for s in group):
                yield replace(plan, recompute=plan.recompute | names, host=plan.host - names, disk=plan.disk - names)
            if self.disk_budget is not None:
                movable = frozenset(s.name for s in group if plan.tier(s.name) == HOST
                                    or (self.device.type == "cpu" and plan.tier(s.name) == DEVICE))
                if movable:
                    yield replace(plan, disk=plan.disk | movable, host=plan.host - movable)

    def _held_at_host_peak(self, plan: Plan, sched: Schedule) -> list[ex.Step]:
        """The stores in host memory (on CPU also the device's: one memory) at the step where it holds most."""
        held_tiers = {HOST} | ({DEVICE} if self.device.type == "cpu" else set())
        live, best, best_bytes = {}, [], -1
        for i, step in enumerate(self.prog.steps[:-1]):
            if sched.tiers.get(step.name) in held_tiers:
                live[step.out] = step
            nbytes = sum(math.prod(self.prog.shapes[slot]) for slot in live)
            if nbytes > best_bytes:
                best, best_bytes = list(live.values()), nbytes
            for slot in sched.frees[i]:
                live.pop(slot, None)
        return best


def choose_plan(model, direction: Direction, shape, *, tile: int | None, chunk: int | None,
                device_budget: int | None, host_budget: int | None, recompute: bool | None,
                output_device, device: torch.device, dtype: torch.dtype | None = None,
                disk_dir=None, input_device="cpu") -> Plan:
    """The plan a seamless run takes (see :func:`cvvae_core.tiling.plan_for`), or
    :class:`~cvvae_core.errors.MemoryBudgetError` when none fits the budgets.

    ``device_budget`` None: no device limit (CPU without ``memory_budget``: every store in RAM, pieces
    of ``CPU_PIECE_BYTES``). Otherwise the whole clip at once when it fits and no sizes are given,
    else pieces (given sizes, or a share of the budget) and the stores placed (module docstring)."""
    elem = elem_size(dtype or model.dtype)
    prog = ex.Program(direction.network(model).layers(), shape)
    search = _Search(prog, direction.video_size(model, shape), elem, device, output_device, input_device,
                     device_budget, default_host_budget() if host_budget is None else host_budget,
                     None if disk_dir is None else disk_free(disk_dir), recompute)
    everything = frozenset(s.name for s in prog.steps if prog.free_to_recompute(s)) if recompute else frozenset()
    given = tile is not None or chunk is not None
    if device_budget is None:
        bases = [Plan(tile, chunk) if given else Plan(piece_bytes=CPU_PIECE_BYTES)]
    else:
        whole = Plan()
        if not given and not recompute and search.fits(search.estimate(whole)):
            return whole
        if given:
            bases = [Plan(tile, chunk)]
        else:
            cap = CUDA_PIECE_BYTES if device.type == "cuda" else CPU_PIECE_BYTES
            first = int(min(cap, max(device_budget * PIECE_SHARE, 1)))
            bases = [Plan(piece_bytes=first >> k) for k in range(PIECE_HALVINGS) if k == 0 or first >> k >= 1 << 16]
    best, fastest = None, None
    for base in bases:
        plan = search.place(replace(base, recompute=everything))
        plan = search.relieve_host(plan)
        plan = search.place(plan)
        est = search.estimate(plan)
        if search.fits(est):
            plan = search.speed_up(plan)
            est = search.estimate(plan)
            if fastest is None or est.relative_cost < fastest[1].relative_cost:
                fastest = (plan, est)
            elif fastest is not None:
                break  # smaller pieces only cost more from here
        elif best is None or _overflow(search, est) < _overflow(search, best[1]):
            best = (plan, est)
    if fastest is not None:
        return fastest[0]
    plan, est = best
    raise MemoryBudgetError(_refusal(direction, shape, search, est), device_needed=est.total, host_needed=est.host,
                            device_budget=device_budget, host_budget=search.host_budget)


def _overflow(search: _Search, est: MemoryEstimate) -> float:
    over = max(0, est.host - search.host_budget) / max(1, search.host_budget)
    if search.device_budget is not None:
        over += max(0, est.total - search.device_budget) / max(1, search.device_budget)
    return over


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _refusal(direction: Direction, shape, search: _Search, est: MemoryEstimate) -> str:
    device = "" if search.device_budget is None else \
        f"{_size(est.total)} on the device (budget {_size(search.device_budget)}) and "
    disk = f" and {_size(est.disk)} on disk" if est.disk else ""
    advice = ("fewer frames or a smaller size, a larger memory budget, a disk folder for layer outputs "
              "(TilingOptions.disk_dir)" if search.disk_budget is None else "fewer frames or a smaller size, a "
              "larger memory budget, more free disk space")
    return (f"no exact {direction.name} plan for {list(shape)} fits the memory budgets: the smallest found needs "
            f"{device}{_size(est.host)} of host memory (budget {_size(search.host_budget)}){disk}. "
            f"Use {advice}, or mode='official' (its own tiles: seams).")


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
