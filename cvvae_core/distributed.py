"""torch.distributed in one place: joining a torchrun group with one device per rank, the
collectives the library uses, leaving the group; and running one clip's tiles across ranks.

Multi-rank code (training, dataset encoding, ``reconstruct --distributed``) joins with
:func:`join_ranks` (or :func:`ranks_of`) and talks to the other ranks through :class:`Ranks` only.

The seamless engine (:mod:`cvvae_core.tiling`) uses :class:`TileGroup` when
``TilingOptions.distributed`` is set and a process group of more than one rank is initialised:
each rank runs the pieces ``k % world == rank`` of every layer step, the GroupNorm statistics of each
step's output are merged across ranks (exactly: per-rank count, mean and M2 combined with Chan's
formula in float64), and each step's output, zero where a rank wrote nothing, is summed across ranks
before the next step reads it. Every collective is
preceded by a status exchange, so a rank that fails makes every rank raise
:class:`~cvvae_core.errors.DistributedRunError` instead of leaving the others waiting.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import DistributedRunError, InjectedFaultError

#: Fault injection for tests: ``CVVAE_FAULT_RANK=R`` makes rank R fail in its first tile.
FAULT_RANK_ENV = "CVVAE_FAULT_RANK"


@dataclass
class Ranks:
    """This process's place in a torchrun group (rank 0 of 1 without one), its compute device, and
    the collectives the library's multi-rank code uses: every one is a no-op for a single process."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False           # this process joined the group, so it leaves it

    @property
    def collective_device(self) -> torch.device:
        """Where collective tensors live: nccl needs CUDA tensors, gloo takes CPU ones."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        parts = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def from_rank0(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks (the same keys on every rank)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world).tolist()))

    def average_gradients(self, params):
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def close(self):
        """Leave the group if this process joined it."""
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False


def join_ranks(device: torch.device) -> Ranks:
    """Join the torchrun group when there is one (``WORLD_SIZE`` > 1; env:// rendezvous, nccl on
    CUDA, gloo on CPU), or use the group already joined. A CUDA device given without an index
    becomes this rank's own GPU, ``cuda:LOCAL_RANK``, made current with ``torch.cuda.set_device``."""
    if dist.is_available() and dist.is_initialized():
        rank, world, owns = dist.get_rank(), dist.get_world_size(), False
    elif int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        rank, world, owns = 0, 1, False
    else:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
        rank, world, owns = dist.get_rank(), dist.get_world_size(), True
    if device.type == "cuda" and world > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return Ranks(rank, world, device, owns)


@contextmanager
def ranks_of(device: torch.device) -> Iterator[Ranks]:
    """:func:`join_ranks` for the length of a ``with`` block; a group joined here is left at its end."""
    ranks = join_ranks(device)
    try:
        yield ranks
    finally:
        ranks.close()


class TileGroup:
    """The ranks sharing one clip's tiles (see the module docstring)."""

    def __init__(self, rank: int, world: int):
        self.dist, self.rank, self.world = dist, rank, world
        self.nccl = dist.get_backend() == "nccl"
        self.error: BaseException | None = None
        self.fault = os.environ.get(FAULT_RANK_ENV) == str(rank)

    @classmethod
    def of(cls, enabled: bool) -> "TileGroup | None":
        """A group when ``enabled`` and more than one rank is initialised; else None (one process)."""
        if not enabled:
            return None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    def mine(self, k: int) -> bool:
        return k % self.world == self.rank

    def run(self, fn, *args):
        """Runs this rank's local work; an exception is kept (and reported at :meth:`check`)."""
        if self.error is not None:
            return None
        try:
            if self.fault:
                self.fault = False
                raise InjectedFaultError(f"fault injected on rank {self.rank} (${FAULT_RANK_ENV})")
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - handed to every rank at the next check
            self.error = err
            return None

    def check(self):
        """Collective: every rank raises DistributedRunError if any rank's local work failed."""
        flags = torch.zeros(self.world, dtype=torch.int32, device=self._device())
        flags[self.rank] = int(self.error is not None)
        self.dist.all_reduce(flags)
        if not flags.any():
            return
        messages = [None] * self.world
        mine = None if self.error is None else f"{type(self.error).__name__}: {self.error}"
        self.dist.all_gather_object(messages, mine)
        failed = "; ".join(f"rank {r} failed: {m}" for r, m in enumerate(messages) if m is not None)
        cause, self.error = self.error, None  # the group can run again (the out-of-memory retry)
        raise DistributedRunError(f"{failed} (every rank stopped)") from cause

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.nccl else torch.device("cpu")

    def all_sum(self, t: torch.Tensor):
        """In place: the sum of every rank's ``t`` (one rank's part, zeros elsewhere), on every rank."""
        self.check()
        if not self.nccl or t.device.type == "cuda":
            self.dist.all_reduce(t)
            return
        dev = self._device()
        for i in range(t.shape[2]):  # nccl needs device tensors: one frame at a time
            part = t[:, :, i].to(dev)
            self.dist.all_reduce(part)
            t[:, :, i].copy_(part)

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def merge_moments(self, moments):
        """Replace every rank's GroupMoments (of its own pieces) by the merge of all ranks' ones."""
        self.check()
        local = (moments.n, None if moments.n == 0 else moments.mean.cpu(), None if moments.n == 0 else moments.m2.cpu())
        parts = [None] * self.world
        self.dist.all_gather_object(parts, local)
        device = None if moments.mean is None else moments.mean.device
        moments.n, moments.mean, moments.m2 = 0, None, None
        for n, mean, m2 in parts:  # rank order: the same merge on every rank
            if n:
                moments.merge(n, mean.to(device) if device else mean, m2.to(device) if device else m2)
