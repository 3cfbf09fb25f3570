"""torch.distributed helpers: joining a torchrun group, and running one clip's tiles across ranks.

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

import torch

from .errors import DistributedRunError, InjectedFaultError

#: Fault injection for tests: ``CVVAE_FAULT_RANK=R`` makes rank R fail in its first tile.
FAULT_RANK_ENV = "CVVAE_FAULT_RANK"


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world_size, whether we started the process group). Under torchrun (``WORLD_SIZE`` > 1)
    joins the group via env:// (MASTER_ADDR/PORT, RANK, WORLD_SIZE): nccl on CUDA, gloo on CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size(), True


class TileGroup:
    """The ranks sharing one clip's tiles (see the module docstring)."""

    def __init__(self, rank: int, world: int):
        import torch.distributed as dist

        self.dist, self.rank, self.world = dist, rank, world
        self.nccl = dist.get_backend() == "nccl"
        self.error: BaseException | None = None
        self.fault = os.environ.get(FAULT_RANK_ENV) == str(rank)

    @classmethod
    def of(cls, enabled: bool) -> "TileGroup | None":
        """A group when ``enabled`` and more than one rank is initialised; else None (one process)."""
        if not enabled:
            return None
        import torch.distributed as dist

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
