"""Where the seamless engine keeps layer outputs, and how pieces move between the tiers.

* :class:`StorePool`: the stores of one tier (device or host), reused by shape, every byte counted
  in the :class:`Ledger`;
* :class:`HostLink`: moves pieces between the compute device and host memory. On CUDA, writes
  leave the device on a copy stream of their own and reads arrive on another, both through a ring
  of pinned staging buffers allocated once per run, ordered by events: the host thread never waits
  for the device except to reuse a staging buffer or to read back a region still on its way out.
  On CPU the tiers share one memory and a move is a plain copy (write) or a view (read); the
  placement and the accounting are the same.
* :func:`output_buffer` / :func:`finish`: the float32 result, pinned when it is written from CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICE, HOST = "device", "host"

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


class Ledger:
    """Bytes each tier holds, and the peaks of a run: on the device the stores held while a piece
    runs plus that piece's working memory (as the estimate counts it); in host memory the stores and
    the staging ring."""

    def __init__(self):
        self.held = {DEVICE: 0, HOST: 0}
        self.peak = {DEVICE: 0, HOST: 0}

    def add(self, tier: str, nbytes: int):
        self.held[tier] += nbytes
        self.peak[tier] = max(self.peak[tier], self.held[tier])

    def remove(self, tier: str, nbytes: int):
        self.held[tier] -= nbytes

    def piece(self, work: int):
        """A piece with ``work`` bytes of working memory runs on the device now."""
        self.peak[DEVICE] = max(self.peak[DEVICE], self.held[DEVICE] + work)


class StorePool:
    """Freed stores of one tier, kept for the next store of the same shape: a long clip allocates (and
    page-faults in) each store size once instead of once per layer."""

    def __init__(self, tier: str, device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format,
                 ledger: Ledger):
        self.tier, self.device, self.dtype, self.memory_format, self.ledger = tier, device, dtype, memory_format, ledger
        self.free: list[torch.Tensor] = []

    def take(self, shape) -> torch.Tensor:
        for i, t in enumerate(self.free):
            if tuple(t.shape) == tuple(shape):
                return self.free.pop(i)
        self.release()  # a new size: the network has moved on to another resolution
        t = torch.empty(shape, device=self.device, dtype=self.dtype, memory_format=self.memory_format)
        self.ledger.add(self.tier, t.nbytes)
        return t

    def give(self, t: torch.Tensor):
        self.free.append(t)

    def release(self):
        for t in self.free:
            self.ledger.remove(self.tier, t.nbytes)
        self.free.clear()


def _overlap(a: Box, b: Box) -> bool:
    return all(x0 < y1 and y0 < x1 for (x0, x1), (y0, y1) in zip(a, b))


@dataclass
class _Write:
    key: int
    box: Box
    dest: torch.Tensor
    staged: torch.Tensor


class _Staging:
    """One pinned staging buffer of the ring and what it is busy with."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.event: torch.cuda.Event | None = None
        self.write: _Write | None = None

    def view(self, dtype: torch.dtype, shape) -> torch.Tensor:
        n = torch.Size(shape).numel() * dtype.itemsize
        return self.buf[:n].view(dtype).view(shape)


class HostLink:
    """Pieces between the compute ``device`` and host-tier tensors (see the module docstring).
    ``slot_bytes``: the largest single transfer (each staging buffer's size); ``slots`` of them."""

    def __init__(self, device: torch.device, slot_bytes: int, slots: int, ledger: Ledger):
        self.device, self.cuda = device, device.type == "cuda"
        self.ring: list[_Staging] = []
        self.next, self.slot_bytes = 0, 0
        self.ledger = ledger
        if self.cuda:
            self.outbound = torch.cuda.Stream(device)
            self.inbound = torch.cuda.Stream(device)
        if self.cuda and slot_bytes > 0:
            self.slot_bytes = -(-slot_bytes // 512) * 512  # every buffer aligned for any dtype
            pinned = torch.empty(slots * self.slot_bytes, dtype=torch.uint8, pin_memory=True)
            self.ring = [_Staging(pinned[i * self.slot_bytes:(i + 1) * self.slot_bytes]) for i in range(slots)]
            ledger.add(HOST, pinned.nbytes)

    # -- CPU: one memory ------------------------------------------------------------------------
    def read(self, key: int, box: Box, region: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``region`` (box ``box`` of host-tier tensor ``key``) on the device in ``dtype``."""
        if not self.cuda:
            return region.to(dtype)
        self.wait(key, box)
        staging = self._staging(region.nbytes)
        staged = staging.view(region.dtype, region.shape)
        staged.copy_(region)  # the strided gather, on the host
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.inbound):
            x = torch.empty(region.shape, dtype=region.dtype, device=self.device)
            x.copy_(staged, non_blocking=True)
            staging.event = self.inbound.record_event()
        compute.wait_event(staging.event)
        x.record_stream(compute)  # allocated on the inbound stream, used on the compute stream
        return x.to(dtype)

    def write(self, key: int, box: Box, dest: torch.Tensor, y: torch.Tensor):
        """Write device piece ``y`` into ``dest`` (box ``box`` of host-tier tensor ``key``)."""
        if not self.cuda:
            dest.copy_(y)
            return
        staging = self._staging(y.nbytes)
        staged = staging.view(y.dtype, y.shape)
        self.outbound.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.outbound):
            staged.copy_(y, non_blocking=True)
            staging.event = self.outbound.record_event()
        y.record_stream(self.outbound)  # computed on the compute stream, read on the outbound one
        staging.write = _Write(key, box, dest, staged)
        if staging not in self.ring:
            self._land(staging)

    def wait(self, key: int, box: Box | None = None):
        """Land the writes into tensor ``key`` still on their way (those overlapping ``box``)."""
        for staging in self.ring:
            w = staging.write
            if w is not None and w.key == key and (box is None or _overlap(w.box, box)):
                self._land(staging)

    def land_all(self):
        """Land every write still on its way."""
        for staging in self.ring:
            if staging.write is not None:
                self._land(staging)

    def close(self):
        """Drop what is still under way (a failed run) and give the ring's pinned memory back to
        PyTorch's pinned cache."""
        for staging in self.ring:
            staging.write = None
        if self.ring:
            self.ledger.remove(HOST, sum(s.buf.nbytes for s in self.ring))
        self.ring = []

    def _land(self, staging: _Staging):
        staging.event.synchronize()
        staging.write.dest.copy_(staging.write.staged)  # the strided scatter, on the host
        staging.write = None

    def _staging(self, nbytes: int) -> _Staging:
        """The next staging buffer of the ring, once its previous transfer is done."""
        if nbytes > self.slot_bytes:
            # Larger than the plan's estimate of the largest transfer: a buffer of its own, its write
            # landed at once (PyTorch caches pinned blocks, and holds this one until the copies
            # recorded on it are done).
            return _Staging(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
        staging = self.ring[self.next]
        self.next = (self.next + 1) % len(self.ring)
        if staging.write is not None:
            self._land(staging)
        elif staging.event is not None:
            staging.event.synchronize()
        return staging


def output_buffer(shape, output_device, compute: torch.device) -> torch.Tensor:
    """The float32 result on ``output_device``; pinned when written from CUDA into host memory."""
    out_dev = torch.device(output_device)
    pin = out_dev.type == "cpu" and compute.type == "cuda"
    return torch.empty(shape, dtype=torch.float32, device=out_dev, pin_memory=pin)


def finish(out: torch.Tensor, compute: torch.device) -> torch.Tensor:
    if compute.type == "cuda":
        torch.cuda.synchronize(compute)  # the non-blocking copies into ``out`` must land first
    return out
