"""Where the seamless engine keeps layer outputs, and how pieces move between the tiers.

* **device**: :class:`StorePool`, stores on the compute device from PyTorch's allocator, reused by
  shape (a long clip allocates each store size once).
* **host** and **disk**: one :class:`Arena` each, laid out before the run by the plan (every store
  at a fixed offset: :func:`cvvae_core.tiling.planner.arena_layout`), so what the plan counts is
  what is allocated. Stores are kept frame-row-major, ``[B, T, H, C, W]`` in memory: a piece of
  whole rows is one contiguous block per frame, a piece of whole frames one block, and both move by
  the copy engine with no gather on the CPU. The host arena is page-locked on CUDA once
  (``cudaHostRegister``: exactly its size) and kept for later runs of the process up to
  :data:`KEEP_PINNED_SHARE` of RAM; the disk arena is a memory-mapped file in the plan's folder,
  removed when the pass ends, reached through a small page-locked staging ring.
* :class:`Streams`: the copy streams. On an accelerator, pieces leave on an *outbound* stream and
  arrive on an *inbound* one (``torch.Stream`` / ``torch.Event``), each ordered against the compute
  stream by events; the host thread waits only to reuse a staging buffer of the disk ring. On CPU,
  whose ``torch.Event`` cannot be recorded, the same calls copy at once and an event is ``None``
  (complete). :class:`HostLink` is one code path for both.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections import deque
from dataclasses import dataclass, field
from itertools import product

import torch

log = logging.getLogger(__name__)

DEVICE, HOST, DISK = "device", "host", "disk"

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

#: Memory order of host and disk stores: [B, C, T, H, W] kept as [B, T, H, C, W].
STORE_ORDER = (0, 2, 3, 1, 4)
#: A page-locked host arena no larger than this share of physical RAM is kept for the next pass of
#: the process (page-locking costs about a second per few GiB); a larger one is given back.
KEEP_PINNED_SHARE = 0.25
#: Arena offsets are aligned to this many bytes (any dtype, any vector load).
ALIGN = 512


def pinned_size(nbytes: int) -> int:
    """Bytes PyTorch's pinned-memory allocator really locks for a request: the next power of two."""
    return 1 << max(0, nbytes - 1).bit_length() if nbytes > 0 else 0


class Ledger:
    """What a pass holds and moves. Bytes per tier and their peaks (on the device the stores held
    while a piece runs plus that piece's working memory, as the estimate counts it), page-locked
    bytes, and the bytes copied between the device and host memory / disk."""

    def __init__(self):
        self.held = {DEVICE: 0, HOST: 0, DISK: 0}
        self.peak = {DEVICE: 0, HOST: 0, DISK: 0}
        self.pinned = 0
        self.traffic = {HOST: 0, DISK: 0}

    def add(self, tier: str, nbytes: int):
        self.held[tier] += nbytes
        self.peak[tier] = max(self.peak[tier], self.held[tier])

    def remove(self, tier: str, nbytes: int):
        self.held[tier] -= nbytes

    def piece(self, work: int):
        """A piece with ``work`` bytes of working memory runs on the device now."""
        self.peak[DEVICE] = max(self.peak[DEVICE], self.held[DEVICE] + work)


class StorePool:
    """Freed device stores, kept for the next store of the same shape."""

    def __init__(self, device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format, ledger: Ledger):
        self.device, self.dtype, self.memory_format, self.ledger = device, dtype, memory_format, ledger
        self.free: list[torch.Tensor] = []

    def take(self, shape) -> torch.Tensor:
        for i, t in enumerate(self.free):
            if tuple(t.shape) == tuple(shape):
                return self.free.pop(i)
        self.release()  # a new size: the network has moved on to another resolution
        t = torch.empty(shape, device=self.device, dtype=self.dtype, memory_format=self.memory_format)
        self.ledger.add(DEVICE, t.nbytes)
        return t

    def give(self, t: torch.Tensor):
        self.free.append(t)

    def release(self):
        for t in self.free:
            self.ledger.remove(DEVICE, t.nbytes)
        self.free.clear()


# ----------------------------------------------------------------------------------------------
# Copy streams and events
# ----------------------------------------------------------------------------------------------
class Streams:
    """The compute stream and two copy streams of ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.asynchronous = device.type != "cpu"
        self._kept: deque[tuple[object, torch.Tensor]] = deque()
        if self.asynchronous:
            self.compute = torch.accelerator.current_stream(device)
            self.outbound = torch.Stream(device=device)
            self.inbound = torch.Stream(device=device)
        else:
            self.compute = self.outbound = self.inbound = None

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A buffer on the device for an inbound copy. Allocated on the inbound stream (memory the
        compute stream freed may still be in use by its queued work) and marked as used by the
        compute stream, so the allocator does not hand it out again before compute is done with it."""
        if not self.asynchronous:
            return torch.empty(shape, dtype=dtype, device=self.device)
        with self.inbound:
            t = torch.empty(shape, dtype=dtype, device=self.device)
        t.record_stream(self.compute)
        return t

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream):
        if stream is None:
            dst.copy_(src)
            return
        with stream:
            dst.copy_(src, non_blocking=True)

    def record(self, stream):
        """An event marking everything issued so far on ``stream`` (None on CPU: already done)."""
        if stream is None:
            return None
        event = torch.Event(device=self.device)
        event.record(stream)
        return event

    def wait(self, stream, event):
        """``stream`` waits (on the device) for ``event``."""
        if stream is not None and event is not None:
            stream.wait_event(event)

    def synchronize(self, event):
        """The host waits for ``event``."""
        if event is not None:
            event.synchronize()

    def keep(self, tensor: torch.Tensor, event):
        """Hold ``tensor`` until ``event`` completes: a copy stream still reads it, and PyTorch's
        allocator would otherwise hand its memory to the compute stream."""
        if event is None:
            return
        self._kept.append((event, tensor))
        while self._kept and self._kept[0][0].query():
            self._kept.popleft()

    def finish(self):
        """Every copy landed; nothing held any more."""
        if self.asynchronous:
            for stream in (self.outbound, self.inbound, self.compute):
                stream.synchronize()
        self._kept.clear()


def contiguous_blocks(view: torch.Tensor):
    """Index tuples over the leading dimensions of a strided ``view`` whose sub-tensors are
    contiguous: the fewest blocks it copies in."""
    expected, lead = 1, view.dim()
    for d in range(view.dim() - 1, -1, -1):
        if view.shape[d] != 1 and view.stride(d) != expected:
            break
        expected *= view.shape[d]
        lead = d
    return product(*(range(n) for n in view.shape[:lead]))


# ----------------------------------------------------------------------------------------------
# Host and disk memory laid out by the plan
# ----------------------------------------------------------------------------------------------
_pinned_arenas: dict[int, torch.Tensor] = {}


def _register(t: torch.Tensor) -> bool:
    """Page-lock ``t`` in place (exactly its bytes, unlike the power-of-two pinned allocator)."""
    try:
        return int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.nbytes, 0)) == 0
    except (RuntimeError, AttributeError) as err:
        log.warning("could not page-lock %d bytes of host memory (%s): host copies will be synchronous", t.nbytes, err)
        return False


def _unregister(t: torch.Tensor):
    try:
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
    except (RuntimeError, AttributeError):
        pass


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def release_pinned_memory():
    """Give back the page-locked host arenas kept for later passes."""
    for t in _pinned_arenas.values():
        _unregister(t)
    _pinned_arenas.clear()


class Arena:
    """One block of host memory (``tier`` host) or of a memory-mapped file (``tier`` disk) holding the
    stores of one pass at the offsets the plan gave them."""

    def __init__(self, tier: str, nbytes: int, compute: torch.device, ledger: Ledger, folder=None):
        self.tier, self.nbytes, self.ledger = tier, nbytes, ledger
        self.folder, self.pinned, self._cached_key = None, False, None
        if tier == DISK:
            self.folder = tempfile.mkdtemp(prefix="cvvae-stores-", dir=folder)
            path = os.path.join(self.folder, "stores.bin")
            self.memory = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8) if nbytes else \
                torch.empty(0, dtype=torch.uint8)
        elif compute.type == "cuda" and nbytes:
            key = compute.index if compute.index is not None else torch.cuda.current_device()
            cached = _pinned_arenas.pop(key, None)
            if cached is not None and nbytes <= cached.nbytes <= 2 * nbytes:
                self.memory, self.pinned = cached, True
            else:
                if cached is not None:
                    _unregister(cached)
                self.memory = torch.empty(nbytes, dtype=torch.uint8)
                self.pinned = _register(self.memory)  # else pageable: correct, copies synchronous
            self._cached_key = key if self.pinned else None
        else:
            self.memory = torch.empty(nbytes, dtype=torch.uint8)
        ledger.add(tier, self.memory.nbytes)
        if self.pinned:
            ledger.pinned += self.memory.nbytes

    def store(self, offset: int, shape, dtype: torch.dtype) -> "HostStore":
        b, c, t, h, w = shape
        n = b * c * t * h * w * dtype.itemsize
        mem = self.memory[offset:offset + n].view(dtype).view(b, t, h, c, w)
        return HostStore(mem, STORE_ORDER, self.tier)

    def close(self):
        self.ledger.remove(self.tier, self.memory.nbytes)
        if self.tier == DISK:
            self.memory = None
            shutil.rmtree(self.folder, ignore_errors=True)
        elif self._cached_key is not None and self.memory.nbytes <= KEEP_PINNED_SHARE * physical_memory():
            _pinned_arenas[self._cached_key] = self.memory
        elif self.pinned:
            _unregister(self.memory)
        self.memory = None


@dataclass
class HostStore:
    """A tensor in host memory or on disk, kept in memory order ``mem``; ``order`` maps the logical
    [B, C, T, H, W] dimensions to it (``view`` is the logical view)."""

    mem: torch.Tensor
    order: tuple[int, ...]
    tier: str
    last_write: object = None

    @property
    def view(self) -> torch.Tensor:
        inverse = [self.order.index(d) for d in range(5)]
        return self.mem.permute(*inverse)

    @property
    def shape(self):
        return self.view.shape

    def region(self, box: Box) -> tuple[torch.Tensor, tuple[slice, ...]]:
        """The memory-order view of whole rows covering ``box``, and the logical column slice of it."""
        (t0, t1), (r0, r1), (c0, c1) = box
        cut = {2: slice(t0, t1), 3: slice(r0, r1)}
        index = tuple(cut.get(d, slice(None)) for d in self.order)
        return self.mem[index], (slice(None), slice(None), slice(None), slice(None), slice(c0, c1))


# ----------------------------------------------------------------------------------------------
# Moving pieces
# ----------------------------------------------------------------------------------------------
@dataclass
class _Slot:
    """A staging buffer of the disk ring and what it is busy with."""

    buf: torch.Tensor
    event: object = None
    landing: tuple | None = None  # (event, destination block, staged view) still to copy to disk


@dataclass
class HostLink:
    """Pieces between the compute device and host-memory or disk stores (module docstring)."""

    streams: Streams
    ledger: Ledger
    ring: list[_Slot] = field(default_factory=list)
    next_slot: int = 0

    @classmethod
    def for_run(cls, streams: Streams, ledger: Ledger, slot_bytes: int, slots: int) -> "HostLink":
        link = cls(streams, ledger)
        if slot_bytes > 0 and slots > 0:
            size = -(-slot_bytes // ALIGN) * ALIGN
            pin = streams.device.type == "cuda"
            memory = torch.empty(slots * size, dtype=torch.uint8, pin_memory=pin)
            link.ring = [_Slot(memory[i * size:(i + 1) * size]) for i in range(slots)]
            ledger.add(HOST, pinned_size(memory.nbytes) if pin else memory.nbytes)
            ledger.pinned += pinned_size(memory.nbytes) if pin else 0
        return link

    # -- reading -------------------------------------------------------------------------------
    def read(self, store: HostStore, box: Box, dtype: torch.dtype) -> torch.Tensor:
        """Box ``box`` of ``store`` on the compute device in ``dtype`` (a logical [B, C, T, H, W] view)."""
        s = self.streams
        src, cols = store.region(box)
        buf = s.empty(src.shape, src.dtype)
        if store.tier == DISK:
            self._land_store(store)
            for index in contiguous_blocks(src):
                self._through_ring(buf[index], src[index])
        else:
            s.wait(s.inbound, store.last_write)
            for index in contiguous_blocks(src):
                s.copy(buf[index], src[index], s.inbound)
        s.wait(s.compute, s.record(s.inbound))
        self.ledger.traffic[store.tier] += buf.nbytes
        inverse = [store.order.index(d) for d in range(5)]
        return buf.permute(*inverse)[cols].to(dtype)

    def _through_ring(self, dst: torch.Tensor, src: torch.Tensor):
        """Disk -> staging buffer (host) -> device (inbound stream)."""
        slot = self._slot(src.nbytes)
        staged = slot.buf[:src.nbytes].view(src.dtype).view(src.shape)
        staged.copy_(src)
        self.streams.copy(dst, staged, self.streams.inbound)
        slot.event = self.streams.record(self.streams.inbound)

    # -- writing -------------------------------------------------------------------------------
    def write(self, store: HostStore, box: Box, y: torch.Tensor, fresh: bool):
        """Device piece ``y`` (logical [B, C, t, h, w]) into box ``box`` of ``store``; ``fresh``: the
        first write into a store whose memory earlier stores used (their reads must be done)."""
        s = self.streams
        dst, cols = store.region(box)
        full_rows = y.shape[4] == store.shape[4]
        if not full_rows:
            # A piece narrower than the store (rare: pieces of host stores span whole rows): one
            # plain copy, done when it returns.
            s.finish()
            self._land_all()
            store.view[(slice(None), slice(None), slice(*box[0]), slice(*box[1]), slice(*box[2]))].copy_(y)
            self.ledger.traffic[store.tier] += y.numel() * store.mem.element_size()
            return
        ordered = torch.empty(dst.shape, dtype=dst.dtype, device=y.device)
        ordered.copy_(y.permute(*store.order))  # device-side reorder (and cast) into memory order
        s.wait(s.outbound, s.record(s.compute))
        if fresh:
            s.wait(s.outbound, s.record(s.inbound))
        for index in contiguous_blocks(dst):
            if store.tier == DISK:
                self._to_ring(dst[index], ordered[index])
            else:
                s.copy(dst[index], ordered[index], s.outbound)
        store.last_write = s.record(s.outbound)
        s.keep(ordered, store.last_write)
        self.ledger.traffic[store.tier] += ordered.nbytes

    def _to_ring(self, dst: torch.Tensor, src: torch.Tensor):
        """Device (outbound stream) -> staging buffer -> disk, landed when the buffer is needed again."""
        slot = self._slot(src.nbytes)
        staged = slot.buf[:src.nbytes].view(src.dtype).view(src.shape)
        self.streams.copy(staged, src, self.streams.outbound)
        slot.event = self.streams.record(self.streams.outbound)
        slot.landing = (dst, staged)
        if not self.streams.asynchronous:
            self._land(slot)

    def _slot(self, nbytes: int) -> _Slot:
        if not self.ring or nbytes > self.ring[0].buf.nbytes:
            raise RuntimeError(f"staging ring too small for a {nbytes}-byte block (a planning error)")
        slot = self.ring[self.next_slot]
        self.next_slot = (self.next_slot + 1) % len(self.ring)
        if slot.landing is not None:
            self._land(slot)
        else:
            self.streams.synchronize(slot.event)  # its last inbound copy has left the buffer
        return slot

    def _land(self, slot: _Slot):
        self.streams.synchronize(slot.event)
        dst, staged = slot.landing
        dst.copy_(staged)
        slot.landing = None

    def _land_store(self, store: HostStore):
        for slot in self.ring:
            if slot.landing is not None and slot.landing[0].untyped_storage().data_ptr() == \
                    store.mem.untyped_storage().data_ptr():
                self._land(slot)

    def _land_all(self):
        for slot in self.ring:
            if slot.landing is not None:
                self._land(slot)

    def settle(self, store: HostStore):
        """The host may read ``store`` now: every write into it has landed."""
        if store.tier == DISK:
            self._land_store(store)
        self.streams.synchronize(store.last_write)

    def finish(self):
        """Every transfer landed (the end of a pass)."""
        self._land_all()
        self.streams.finish()

    def close(self):
        """Drop what is still under way (a failed pass) and give the ring back."""
        for slot in self.ring:
            slot.landing = None
        if self.ring:
            self.ledger.remove(HOST, sum(s.buf.nbytes for s in self.ring))
        self.ring = []


def output_store(shape, output_device, compute: torch.device, ledger: Ledger):
    """The float32 result on ``output_device``: a tensor there, or, in host memory when computing on
    an accelerator, a page-locked :class:`HostStore` in standard order that pieces reach by DMA."""
    out_dev = torch.device(output_device)
    if out_dev.type != "cpu" or compute.type == "cpu":
        return torch.empty(shape, dtype=torch.float32, device=out_dev)
    pin = compute.type == "cuda"
    t = torch.empty(shape, dtype=torch.float32, pin_memory=pin)
    ledger.add(HOST, pinned_size(t.nbytes) if pin else t.nbytes)
    ledger.pinned += pinned_size(t.nbytes) if pin else 0
    return HostStore(t, (0, 1, 2, 3, 4), HOST)


def output_bytes(shape, output_device, compute: torch.device) -> int:
    """Host bytes the result takes when it is written from an accelerator into host memory (page-locked
    by PyTorch's allocator: rounded up); 0 otherwise (on CPU it is counted as the device's)."""
    if torch.device(output_device).type != "cpu" or compute.type == "cpu":
        return 0
    n = 4 * math.prod(shape)
    return pinned_size(n) if compute.type == "cuda" else n


def output_buffer(shape, output_device, compute: torch.device) -> torch.Tensor:
    """The float32 result of a pass that writes it whole (official mode, the untiled pass)."""
    out_dev = torch.device(output_device)
    pin = out_dev.type == "cpu" and compute.type == "cuda"
    return torch.empty(shape, dtype=torch.float32, device=out_dev, pin_memory=pin)


def finish(out: torch.Tensor, compute: torch.device) -> torch.Tensor:
    if compute.type != "cpu":
        torch.accelerator.synchronize(compute)  # the non-blocking copies into ``out`` must land first
    return out
