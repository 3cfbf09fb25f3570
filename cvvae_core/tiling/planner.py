"""Plans of the seamless engine and the one memory estimate behind them.

A :class:`Plan` fixes, before anything runs, the piece size of every step (time chunks x spatial
tiles, scaled to each layer's resolution, then capped in bytes) and where every layer output lives
while later steps read it:

* the **device tier** (the compute device): read in place, no copies;
* the **host tier** (host memory): pieces are copied in and out, on CUDA on a copy stream of their
  own through a pinned staging ring (:mod:`.tiers`);
* **recomputed**: a ResNet block's first convolution is not stored at all; the step that reads it
  (the second convolution) recomputes the region it needs from the block's input, which is kept for
  the residual anyway. Exact, at the cost of running that convolution twice.

:func:`estimate_memory` simulates the schedule the executor runs (each store taken from its tier's
pool when its step starts, freed after its last reader) and returns the peak on the device and in
host memory; :func:`choose_plan` places stores with it: the smallest (low-resolution) stores on the
device first while the device peak stays within the device budget, the rest in host memory, and
recomputes the largest ResNet intermediates when the host peak would exceed the host budget.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

from . import executor as ex

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
#: Floors of the out-of-memory fallback.
MIN_PIECE_BYTES = 4 << 20
MIN_CHUNK_FRAMES = 1
MIN_TILE = 64
#: Share of free device memory a plan may use (the rest: allocator slack, other tensors).
FREE_MEMORY_SHARE = 0.7
#: Share of available host memory the host tier may use by default.
HOST_MEMORY_SHARE = 0.8
#: Pinned staging buffers of the CUDA host tier: enough for a piece's reads to be in flight while
#: earlier pieces' results are still on their way out.
STAGING_SLOTS = 4


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
    layer (the untiled pass). ``host`` names the steps whose outputs live in host memory (the others
    on the device); ``recompute`` the ResNet first convolutions whose outputs are not stored."""

    tile: int | None = None
    chunk: int | None = None
    piece_bytes: int | None = None
    host: frozenset[str] = frozenset()
    recompute: frozenset[str] = frozenset()

    @property
    def whole(self) -> bool:
        return self.tile is None and self.chunk is None and self.piece_bytes is None

    def describe(self, estimate: "MemoryEstimate | None" = None) -> str:
        """One readable line: pieces, where the stores are, and the estimated peaks."""
        if self.whole:
            text = "untiled (whole clip at once)"
        else:
            sizes = [f"tile {self.tile} px" if self.tile else "", f"chunk {self.chunk} frames" if self.chunk else "",
                     f"pieces <= {self.piece_bytes / 2**20:.0f} MiB" if self.piece_bytes else ""]
            text = "seamless, " + ", ".join(s for s in sizes if s)
            text += f"; {len(self.host)} layer outputs in host memory"
            if self.recompute:
                text += f", {len(self.recompute)} recomputed ({', '.join(sorted(self.recompute))})"
        if estimate is not None:
            text += (f"; estimated peak {estimate.total / 2**30:.2f} GiB on the device "
                     f"({estimate.stores / 2**30:.2f} stores + {estimate.work / 2**30:.2f} piece"
                     f"{f' + {estimate.io / 2**30:.2f} result' if estimate.io else ''}), "
                     f"{estimate.host / 2**30:.2f} GiB in host memory")
        return text


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of a plan. On the device: the layer outputs held there at the peak (``stores``),
    the working memory of that step's largest piece (``work``), and the float32 result when it is
    written on the device (``io``); ``total`` is their sum. In host memory (``host``): the host-tier
    layer outputs held at their peak (``host_stores``) and the pinned staging ring (``staging``)."""

    stores: int
    work: int
    io: int
    host_stores: int = 0
    staging: int = 0

    @property
    def total(self) -> int:
        return self.stores + self.work + self.io

    @property
    def host(self) -> int:
        return self.host_stores + self.staging


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device (the current one is 0 unless set otherwise)."""
    index = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
    return a.type == b.type and (a.index if a.index is not None else index) == (b.index if b.index is not None else index)


def elem_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


# ------------------------------------------------------------------------------------------
# Piece sizes
# ------------------------------------------------------------------------------------------
def piece_work(prog: ex.Program, step: ex.Step, piece, recompute: frozenset[str], elem: int) -> int:
    """Working memory of one piece of ``step``; a reader of a recomputed store also holds the
    recomputing convolution's piece (the region it reads, with its halo)."""
    work = ex.work_bytes(step, prog.shapes[step.src], prog.shapes[step.out], piece, elem)
    producer = prog.producer(step.src)
    if producer is not None and producer.name in recompute:
        kernel, size = step.conv.kernel3, prog.shapes[step.src][2:]
        region = tuple(min(n, p + k - 1) for p, k, n in zip(piece, kernel, size))
        work += ex.work_bytes(producer, prog.shapes[producer.src], prog.shapes[producer.out], region, elem)
    return work


def piece_shape(prog: ex.Program, step: ex.Step, plan: Plan, video: tuple[int, int, int],
                elem: int) -> tuple[int, int, int]:
    """Piece size (T, H, W) of ``step`` under ``plan``."""
    size = list(prog.shapes[step.out][2:])
    piece = [n if v is None else min(n, max(1, math.ceil(v * n / ref)))
             for n, v, ref in zip(size, (plan.chunk, plan.tile, plan.tile), video)]
    piece = [p if can else n for p, n, can in zip(piece, size, step.split)]
    if plan.piece_bytes is not None:
        def fits():
            return piece_work(prog, step, piece, plan.recompute, elem) <= plan.piece_bytes

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


def piece_sizes(prog: ex.Program, plan: Plan, video, elem: int) -> list[tuple[int, int, int]]:
    """The piece size of every step of ``prog``, in step order."""
    return [piece_shape(prog, s, plan, video, elem) for s in prog.steps]


def step_work(prog: ex.Program, sizes, recompute: frozenset[str], elem: int) -> list[int]:
    """Working memory of each step's largest piece."""
    return [piece_work(prog, s, piece, recompute, elem) for s, piece in zip(prog.steps, sizes)]


# ------------------------------------------------------------------------------------------
# The schedule's memory, simulated
# ------------------------------------------------------------------------------------------
def store_timeline(prog: ex.Program, plan: Plan, elem: int) -> tuple[list[int], list[int]]:
    """Bytes each tier holds while each step runs (device, host), stores only.

    Mirrors the executor's store pools: a step's output is taken from its tier's pool when the step
    starts (a freed store of the same shape is reused, else the pool's freed stores are released and
    a new one allocated), and a store returns to its pool after its last reader."""
    live = {"device": {}, "host": {}}
    freed = {"device": [], "host": []}
    device, host = [], []
    last = len(prog.steps) - 1
    for i, step in enumerate(prog.steps):
        if i < last and step.name not in plan.recompute:
            tier = "host" if step.name in plan.host else "device"
            shape = prog.shapes[step.out]
            same = [k for k, s in enumerate(freed[tier]) if s == shape]
            if same:
                freed[tier].pop(same[0])
            else:
                freed[tier].clear()
            live[tier][step.out] = shape
        held = {t: elem * (sum(math.prod(s) for s in live[t].values()) + sum(math.prod(s) for s in freed[t]))
                for t in live}
        device.append(held["device"])
        host.append(held["host"])
        for slot in prog.frees[i]:
            for tier in live:
                if slot in live[tier]:
                    freed[tier].append(live[tier].pop(slot))
    return device, host


def staging_slot_bytes(prog: ex.Program, sizes, plan: Plan, elem: int, input_elem: int = 4) -> int:
    """Largest single host-tier transfer of the plan: a piece's input region read from a host store
    (the clip itself included: it comes from host memory) or a piece written to one (the result
    included)."""
    host_slots = {0} | {s.out for s in prog.steps if s.name in plan.host}
    biggest = 0
    for i, (s, piece) in enumerate(zip(prog.steps, sizes)):
        src = prog.shapes[s.src]
        if s.src in host_slots:
            biggest = max(biggest, (input_elem if s.src == 0 else elem) * src[0] * src[1] * s.region_voxels(piece))
        if s.residual in host_slots:
            biggest = max(biggest, elem * src[0] * prog.shapes[s.residual][1] * math.prod(piece))
        if s.out in host_slots or i == len(prog.steps) - 1:
            biggest = max(biggest, elem * src[0] * prog.shapes[s.out][1] * math.prod(piece))
    return biggest


def estimate_memory(model, direction: Direction, shape, plan: Plan, output_device="cpu",
                    device: torch.device | None = None, dtype: torch.dtype | None = None) -> MemoryEstimate:
    """Peak memory of running ``plan`` on ``device`` (default: the model's) in ``dtype`` (default: the
    model's), on the device and in host memory (see :class:`MemoryEstimate`): the one estimate behind
    the planner and the ComfyUI nodes' requests. The untiled pass is ``Plan()``."""
    device, dtype = torch.device(device or model.device), dtype or model.dtype
    prog = ex.Program(direction.network(model).layers(), shape)
    return estimate_program(prog, plan, direction.video_size(model, shape), elem_size(dtype), device, output_device)


def estimate_program(prog: ex.Program, plan: Plan, video, elem: int, device: torch.device, output_device,
                     sizes=None, work=None) -> MemoryEstimate:
    """:func:`estimate_memory` of a built program (``sizes``/``work``: its pieces, when known)."""
    sizes = sizes or piece_sizes(prog, plan, video, elem)
    work = work or step_work(prog, sizes, plan.recompute, elem)
    device_held, host_held = store_timeline(prog, plan, elem)
    peak = max(range(len(prog.steps)), key=lambda i: device_held[i] + work[i])
    io = 4 * math.prod(prog.output_shape) if same_device(torch.device(output_device), device) else 0
    staging = STAGING_SLOTS * staging_slot_bytes(prog, sizes, plan, elem) if device.type == "cuda" else 0
    return MemoryEstimate(device_held[peak], work[peak], io, max(host_held), staging if not plan.whole else 0)


# ------------------------------------------------------------------------------------------
# Choosing a plan
# ------------------------------------------------------------------------------------------
def free_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (CUDA: the driver's count; CPU: available RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
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


def choose_plan(model, direction: Direction, shape, *, tile: int | None, chunk: int | None,
                device_budget: int | None, host_budget: int | None, recompute: bool | None,
                output_device, device: torch.device, dtype: torch.dtype | None = None) -> Plan:
    """The plan a seamless run takes (see :func:`cvvae_core.tiling.plan_for`).

    ``device_budget`` None: no device limit (CPU without ``memory_budget``: every store in RAM, pieces
    of ``CPU_PIECE_BYTES``). Otherwise the whole clip at once when it fits and no sizes are given,
    else pieces (given sizes, or a share of the budget) and the stores placed by :func:`place`."""
    elem = elem_size(dtype or model.dtype)
    prog = ex.Program(direction.network(model).layers(), shape)
    video = direction.video_size(model, shape)
    given = tile is not None or chunk is not None
    if device_budget is None:
        base = Plan(tile, chunk) if given else Plan(piece_bytes=CPU_PIECE_BYTES)
        return _with_recompute(prog, base, recompute)
    if not given and not recompute and estimate_program(prog, Plan(), video, elem, device, output_device).total \
            <= device_budget:
        return Plan()
    if given:
        base = Plan(tile, chunk)
    else:
        cap = CUDA_PIECE_BYTES if device.type == "cuda" else CPU_PIECE_BYTES
        base = Plan(piece_bytes=int(min(cap, max(device_budget * PIECE_SHARE, 1))))
    plan = place(prog, _with_recompute(prog, base, recompute), video, elem, device, output_device, device_budget)
    host_budget = default_host_budget() if host_budget is None else host_budget
    if recompute is None:
        # Host memory short too: recompute ResNet intermediates, the largest first, one size at a
        # time (blocks at one resolution peak alike: recomputing one of them alone lowers no peak).
        by_size: dict[int, set[str]] = {}
        for s in prog.steps:
            if s.recomputable:
                by_size.setdefault(math.prod(prog.shapes[s.out]), set()).add(s.name)
        host = estimate_program(prog, plan, video, elem, device, output_device).host
        for size in sorted(by_size, reverse=True):
            if host <= host_budget:
                break
            trial = place(prog, replace(plan, recompute=plan.recompute | by_size[size]), video, elem, device,
                          output_device, device_budget)
            trial_host = estimate_program(prog, trial, video, elem, device, output_device).host
            if trial_host < host:
                plan, host = trial, trial_host
    return plan


def _with_recompute(prog: ex.Program, plan: Plan, recompute: bool | None) -> Plan:
    if recompute:
        return replace(plan, recompute=frozenset(s.name for s in prog.steps if s.recomputable))
    return plan


def place(prog: ex.Program, plan: Plan, video, elem: int, device: torch.device, output_device,
          budget: int) -> Plan:
    """``plan`` with its stores placed: the smallest first on the device while the device peak stays
    within ``budget``, the rest in host memory."""
    sizes = piece_sizes(prog, plan, video, elem)
    work = step_work(prog, sizes, plan.recompute, elem)
    stores = [s for s in prog.steps[:-1] if s.name not in plan.recompute]
    host = {s.name for s in stores}
    for step in sorted(stores, key=lambda s: math.prod(prog.shapes[s.out])):
        trial = replace(plan, host=frozenset(host - {step.name}))
        if estimate_program(prog, trial, video, elem, device, output_device, sizes, work).total <= budget:
            host.discard(step.name)
    return replace(plan, host=frozenset(host))


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
    if plan.host != stores - plan.recompute:
        return replace(plan, host=stores - plan.recompute)
    return None
