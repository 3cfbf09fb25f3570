"""The engine's interface: options, the two passes, the plan a pass takes and the memory it asks for.

Contract used by the model API, the command line and the ComfyUI nodes:

    opts = TilingOptions(mode="seamless", tile_size=None, chunk_frames=None,
                         progress=lambda done, total: ..., cancel=lambda: False)
    moments = encode_moments(model, video, opts)    # video [B,3,1+4k,H,W] in [-1,1], any device
    video = decode_latent(model, latent, opts)      # latent [B,C,1+k,h,w]

Results come back in float32 on ``opts.output_device`` (CPU by default), written piece by piece as
they are finished. Untiled means ``tiling=None`` in ``CVVAE.encode``/``decode``: the whole clip at
once, in the model's dtype on its device. Modes:

* ``seamless`` (default): exact. The model's own layer list runs step by step over pieces (time
  chunks x spatial tiles) with exact clip-wide GroupNorm statistics (:mod:`.executor`): equal to the
  untiled model to float rounding at any piece size. When one piece covers the whole clip it *is*
  the untiled pass. Layer outputs are kept on the device while they fit its budget, the rest in
  host memory, and ResNet intermediates are recomputed when host memory is short too (:mod:`.planner`).
* ``official``: the official code's own tiled algorithm (:mod:`.official`), to match published
  outputs. ``tile_size``/``chunk_frames``/``overlap`` default to the release values.

Plans come from :func:`plan_for` (given sizes win), which uses the one memory estimate,
:func:`estimate_memory`; the ComfyUI nodes ask ComfyUI for room with the same estimate
(:func:`memory_request`). On out-of-memory the engine frees what it holds and retries with the
next smaller plan, down to a floor; then raises :class:`~cvvae_core.errors.OutOfMemoryError`
saying what to lower.

Progress is reported as ``progress(done, PROGRESS_UNITS)``: the share, in thousandths, of the
run's multiply-adds done so far, so the bar moves at a steady pace across layers of different
cost. ``cancel()`` is checked before every piece.
"""
from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..distributed import TileGroup
from ..errors import InputError, OutOfMemoryError
from . import executor as ex
from .meter import PROGRESS_UNITS, Meter
from .official import OFFICIAL_CHUNK, OFFICIAL_OVERLAP, OFFICIAL_TILE, run_official
from .planner import (DECODE, ENCODE, FREE_MEMORY_SHARE, STAGING_SLOTS, Direction, MemoryEstimate, Plan, block_bytes,
                      elem_size, estimate_memory, estimate_program, piece_sizes, same_device, schedule, smaller_plan,
                      step_work)
from .search import choose_plan, free_bytes
from .tiers import DEVICE, DISK, HOST, Arena, HostLink, Ledger, Streams, finish, output_buffer, output_store

log = logging.getLogger(__name__)

MODES = ("seamless", "official")
#: Memory format of device stores and pieces: ``channels_last_3d`` speeds up convolutions on CPU.
MEMORY_FORMATS = {"cpu": torch.channels_last_3d, "cuda": torch.contiguous_format}


@dataclass(frozen=True)
class RunReport:
    """What a seamless run chose and used: its plan, the plan's estimate, and the peaks the engine
    counted while running (bytes; None for the untiled pass, which the engine does not see inside):
    on the device the stores it held plus the running piece's working memory (as estimated) and the
    result when it is on the device; in host memory the host arena, the staging ring and the result.
    ``host_traffic`` / ``disk_traffic``: bytes it copied between the device and host memory / disk;
    ``pinned``: bytes it held page-locked."""

    direction: str
    plan: Plan
    estimate: MemoryEstimate
    device_peak: int | None
    host_peak: int | None
    host_traffic: int = 0
    disk_traffic: int = 0
    pinned: int = 0

    def describe(self) -> str:
        return f"{self.direction}: {self.plan.describe(self.estimate)}"


@dataclass
class TilingOptions:
    mode: str = "seamless"
    tile_size: int | None = None      # pixels (seamless: piece width/height; official: its tile); None = automatic
    chunk_frames: int | None = None   # video frames per time chunk; None = automatic
    progress: Callable[[int, int], None] | None = None
    cancel: Callable[[], bool] | None = None
    output_device: torch.device | str = "cpu"
    overlap: float = OFFICIAL_OVERLAP  # official mode: tile overlap ratio
    # Bytes the engine may use on the compute device. None: on CUDA 70% of free memory, on CPU no limit.
    # Layer outputs that do not fit go to host memory.
    memory_budget: int | None = None
    # seamless: share each step's pieces among the ranks of the initialised torch.distributed group
    # (see cvvae_core.distributed); every rank gets the whole result. No effect in one process.
    distributed: bool = False
    # Bytes of host memory the pass may use (layer outputs that do not fit the device, buffers, the
    # result; on CPU everything). None: 80% of available RAM. A plan that fits no budget is refused
    # before any work (MemoryBudgetError).
    host_memory_budget: int | None = None
    # Recompute layer outputs instead of storing them (exact, slower): None = where the planner finds
    # it cheapest when memory is short (any convolution or upsampler), True = at least every ResNet
    # block's first convolution, False = never.
    recompute: bool | None = None
    # Called after each seamless pass with a RunReport (plan, estimate, measured peaks).
    report: Callable[[RunReport], None] | None = None
    # A folder for layer outputs that fit neither the device nor host memory (memory-mapped files,
    # removed when the pass ends). None: no disk tier; a plan that does not fit is refused.
    disk_dir: str | os.PathLike | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"TilingOptions.mode must be one of {MODES}, got {self.mode!r} "
                             "(untiled: pass tiling=None)")
        if self.tile_size is not None and (self.tile_size < 8 or self.tile_size % 8):
            raise InputError(f"tile_size must be a positive multiple of 8 pixels, got {self.tile_size}")
        if self.chunk_frames is not None and self.chunk_frames < 1:
            raise InputError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        for name in ("memory_budget", "host_memory_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"{name} must be a positive number of bytes (or None: automatic), got {value}")
        if self.disk_dir is not None and not os.path.isdir(self.disk_dir):
            raise InputError(f"disk_dir {os.fspath(self.disk_dir)!r} is not a folder: create it, or pass None "
                             "(no disk tier)")

    # ``CVVAE.encode(tiling=opts)`` / ``decode`` call these: the model layer does not import the engine.
    def encode_moments(self, model, video: torch.Tensor) -> torch.Tensor:
        return encode_moments(model, video, self)

    def decode_latent(self, model, latent: torch.Tensor) -> torch.Tensor:
        return decode_latent(model, latent, self)


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


def plan_for(model, direction: Direction, shape, opts: TilingOptions, budget: int | None = None,
             device: torch.device | None = None, input_device="cpu") -> Plan:
    """The plan a seamless run takes on ``device`` (default: the model's) within ``budget`` device
    bytes (default: ``opts.memory_budget``, else on CUDA 70% of free memory, on CPU no limit) and
    ``opts.host_memory_budget``; raises :class:`~cvvae_core.errors.MemoryBudgetError` before any
    work when none fits. Given sizes win. Without a device limit (CPU): pieces of
    ``CPU_PIECE_BYTES``, every layer output in RAM unless RAM is short. With one: the whole clip at
    once when it fits, else pieces of a share of the budget, layer outputs on the device while they
    fit (smallest first), the rest in host memory, on disk (``opts.disk_dir``) or recomputed where
    that costs least (``opts.recompute``)."""
    device = torch.device(device or model.device)
    budget = budget or opts.memory_budget
    if budget is None and device.type == "cuda":
        budget = int(free_bytes(device) * FREE_MEMORY_SHARE)
    return choose_plan(model, direction, shape, tile=opts.tile_size, chunk=opts.chunk_frames, device_budget=budget,
                       host_budget=opts.host_memory_budget, recompute=opts.recompute,
                       output_device=resolve_output_device(opts.output_device, device), device=device,
                       disk_dir=opts.disk_dir, input_device=input_device)


def resolve_output_device(output_device, compute: torch.device) -> torch.device:
    """``opts.output_device``; a GPU named without an index (``"cuda"``) is the compute GPU."""
    out = torch.device(output_device)
    if out.type == compute.type and out.index is None and compute.index is not None:
        return compute
    return out


def memory_request(model, direction: Direction, shape, opts: TilingOptions | None,
                   device: torch.device | None = None) -> int:
    """Device bytes a host application (ComfyUI) should free on ``device`` before a pass: the estimate
    of the plan the engine would take there with the whole device to itself (``opts=None``: untiled)."""
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
        whole_device = (int(torch.cuda.get_device_properties(device).total_memory * FREE_MEMORY_SHARE)
                        if device.type == "cuda" else None)
        plan = plan_for(model, direction, shape, opts, opts.memory_budget or whole_device, device)
    output_device = "cpu" if opts is None else resolve_output_device(opts.output_device, device)
    return estimate_memory(model, direction, shape, plan, output_device, device).total


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
            if not _is_oom(err) or isinstance(err, OutOfMemoryError):
                raise
            failed = err
        # Outside the except block, with the traceback dropped: its frames (and the closures they
        # run) hold the failed attempt's stores, which could not be freed otherwise.
        failed.__traceback__ = failed.__context__ = None
        _free(model.device)
        nxt = smaller(plan)
        if nxt is None:
            raise OutOfMemoryError(give_up(plan)) from failed
        failed = None
        plan = nxt


def _run(model, x: torch.Tensor, opts: TilingOptions, direction: Direction) -> torch.Tensor:
    _check_input(x, direction)
    if opts.mode == "official":
        return _with_smaller_plans(
            model, lambda _: run_official(model, x, direction, opts), None, lambda _: None,
            lambda _: f"out of device memory in official mode ({direction.name}, tile {opts.tile_size or OFFICIAL_TILE}"
                      f" px, {opts.chunk_frames or OFFICIAL_CHUNK}-frame chunks). Official mode keeps the release "
                      "tile sizes so that results match published outputs: lower tile_size/chunk_frames (results "
                      "then differ from the release), use mode='seamless', or free device memory (other models, "
                      "fp16 weights).")
    video = direction.video_size(model, x.shape)
    group = TileGroup.of(opts.distributed)
    plan = plan_for(model, direction, x.shape, opts, input_device=x.device)
    if group is not None:
        plan = group.broadcast_object(plan)  # every rank must take the same plan: rank 0's
    stores = frozenset(name for name, _ in _step_names(model, direction, x.shape)[:-1])
    return _with_smaller_plans(
        model, lambda p: _seamless(model, x, opts, direction, p, group), plan,
        lambda p: smaller_plan(p, video, stores),
        lambda p: f"out of device memory ({direction.name}) even with the smallest pieces this engine tries "
                  f"({p.describe()}). Lower the resolution or the batch size, load the model in float16/bfloat16, "
                  "or free device memory used by other models.")


def _step_names(model, direction: Direction, shape) -> list[tuple[str, ex.Step]]:
    return [(s.name, s) for s in ex.Program(direction.network(model).layers(), shape).steps]


def _check_input(x: torch.Tensor, direction: Direction):
    if x.dim() != 5:
        raise InputError(f"the tiling engine takes 5-D [B, C, T, H, W] tensors, got shape {list(x.shape)}")
    if direction is ENCODE and (x.shape[3] % 8 or x.shape[4] % 8):
        raise InputError(f"height and width must be multiples of 8, got {x.shape[3]}x{x.shape[4]}; "
                         "use CVVAE.encode_framed with frame_policy='pad' or 'trim'")


def _seamless(model, x: torch.Tensor, opts: TilingOptions, direction: Direction, plan: Plan,
              group: TileGroup | None) -> torch.Tensor:
    device, dtype = model.device, model.dtype
    output_device = resolve_output_device(opts.output_device, device)
    prog = ex.Program(direction.network(model).layers(), x.shape)
    elem, video = elem_size(dtype), direction.video_size(model, x.shape)
    sizes = piece_sizes(prog, plan, video, elem, device)
    work = step_work(prog, sizes, plan, elem, device)
    sched = schedule(prog, plan, elem)
    estimate = estimate_program(prog, plan, video, elem, device, output_device, sizes, work, sched, x.device)
    log.info("%s %s: %s", direction.name, list(x.shape), plan.describe(estimate))
    if plan.whole:
        # The untiled pass itself (every rank runs it; nothing to share).
        out = output_buffer(prog.output_shape, output_device, device)
        meter = Meter(opts.progress, opts.cancel, 1)
        meter.check()
        if group is None:
            out.copy_(direction.untiled(model, x), non_blocking=True)
        else:
            group.run(lambda: out.copy_(direction.untiled(model, x)))
            group.check()
        meter.step(1)
        _report(opts, direction, plan, estimate, None)
        return finish(out, device)

    recomputed = {s.out: s for s in prog.steps if s.name in plan.recompute}

    def cost(step, box):
        # a reader of a recomputed store runs the recomputing step on (about) its piece too
        macs, extra = step.macs(prog.shapes[step.src], box), recomputed.get(step.src)
        while extra is not None:
            macs += extra.macs(prog.shapes[extra.src], box)
            extra = recomputed.get(extra.src)
        return x.shape[0] * macs

    piece_of = {id(s): size for s, size in zip(prog.steps, sizes)}
    total = sum(cost(s, box) for s in prog.steps if prog.runs(s, plan.recompute)
                for box in ex.pieces(prog.shapes[s.out], piece_of[id(s)]))
    meter = Meter(opts.progress, opts.cancel, total)
    ledger = Ledger()
    out = output_store(prog.output_shape, output_device, device, ledger)
    if isinstance(out, torch.Tensor) and same_device(out.device, device):
        ledger.add(DEVICE, out.nbytes)
    streams = Streams(device)
    arenas = {}
    link = HostLink.for_run(streams, ledger, block_bytes(prog, sizes, plan, elem), STAGING_SLOTS if plan.disk else 0)
    try:
        for tier in (HOST, DISK):
            if sched.arena_bytes.get(tier):
                arenas[tier] = Arena(tier, sched.arena_bytes[tier], device, ledger, opts.disk_dir)
        ex.run_program(prog, x, out, device=device, dtype=dtype, placement=sched.placement(), link=link,
                       ledger=ledger, arenas=arenas, work=work, piece_of=lambda step, shape: piece_of[id(step)],
                       check=meter.check, done=lambda step, box: meter.step(cost(step, box)), group=group,
                       memory_format=MEMORY_FORMATS.get(device.type, torch.contiguous_format))
    finally:
        link.close()  # after a failure: drops the transfers still under way
        for arena in arenas.values():
            arena.close()  # the disk tier's files are removed, also after a failure or Ctrl-C
    _report(opts, direction, plan, estimate, ledger)
    return finish(out if isinstance(out, torch.Tensor) else out.mem, device)


def _report(opts: TilingOptions, direction: Direction, plan: Plan, estimate: MemoryEstimate, ledger: Ledger | None):
    if opts.report is None:
        return
    if ledger is None:
        opts.report(RunReport(direction.name, plan, estimate, None, None))
        return
    host = ledger.peak[HOST] + (ledger.peak[DEVICE] if estimate.shared_memory else 0)
    opts.report(RunReport(direction.name, plan, estimate, ledger.peak[DEVICE], host, ledger.traffic[HOST],
                          ledger.traffic[DISK], ledger.pinned))


__all__ = ["TilingOptions", "RunReport", "encode_moments", "decode_latent", "estimate_memory", "memory_request",
           "plan_for", "Plan", "MemoryEstimate", "ENCODE", "DECODE", "MODES", "PROGRESS_UNITS"]
