"""The search for the plan a seamless pass takes: the fastest that fits both memory budgets.

:func:`choose_plan` searches the way checkpointing planners trade memory for time (sqrt(n)
checkpointing, Checkmate), greedily and in a narrow beam, with the one estimate and cost model of
:mod:`.planner`: pieces from a share of the device budget (then halves of it); the smallest stores on
the device while the device peak fits; while host memory is over its budget, moves of the stores held
at the host peak to disk (when a folder is named) or to recomputation; then moves that make the plan
faster and still fit. When that finds nothing, it starts again from a smaller device budget. When no
plan fits the budgets, or only plans of hopeless work (:data:`MAX_RELATIVE_WORK`), the call is
refused before any work with :class:`~cvvae_core.errors.MemoryBudgetError`, saying what the clip needs.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import torch

from ..errors import MemoryBudgetError
from . import executor as ex
from . import planner as pl
from .planner import (BEAM, CUDA_PIECE_BYTES, DEVICE, HOST, HOST_MEMORY_SHARE, PIECE_HALVINGS, PIECE_SHARE, Direction,
                      MemoryEstimate, Plan, Schedule, elem_size, estimate_program, piece_sizes, schedule)


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
    estimates: dict = field(default_factory=dict, repr=False)
    pieces: dict = field(default_factory=dict, repr=False)  # piece sizes by what they depend on

    def estimate(self, plan: Plan) -> MemoryEstimate:
        if plan not in self.estimates:  # the search meets the same plans again from other sides
            self.estimates[plan] = estimate_program(self.prog, plan, self.video, self.elem, self.device,
                                                    self.output_device, input_device=self.input_device,
                                                    memo=self.pieces)
        return self.estimates[plan]

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
        sizes = piece_sizes(self.prog, plan, self.video, self.elem, self.device, self.pieces)
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
        """While some change lowers the estimated time and still fits every budget, take the best: a
        move of the same kinds (recomputing can be cheaper than a slow host link, storing cheaper than
        recomputing) or of a store between the device and host memory; when no single change helps,
        a faster change that breaks a budget (the :data:`BEAM` fastest) followed by one that mends it
        (a store to the device in exchange for another to host memory)."""
        est = self.estimate(plan)
        while True:
            best, over = None, []
            for trial in self.changes(plan):
                t_est = self.estimate(trial)
                if t_est.relative_cost >= est.relative_cost - 0.01:
                    continue
                if not self.fits(t_est):
                    over.append((t_est.relative_cost, len(over), trial))
                elif best is None or t_est.relative_cost < best[1].relative_cost:
                    best = (trial, t_est)
            for _, _, first in sorted(over)[:BEAM] if best is None else ():
                for trial in self.changes(first):
                    t_est = self.estimate(trial)
                    if self.fits(t_est) and t_est.relative_cost < (best[1] if best else est).relative_cost - 0.01:
                        best = (trial, t_est)
            if best is None:
                return plan
            plan, est = best

    def changes(self, plan: Plan):
        """The plans :meth:`speed_up` considers: :meth:`moves` of any host store, and (with a device
        budget) any store between the device and host memory."""
        yield from self.moves(plan, everywhere=True)
        if self.device_budget is None:
            return
        for step in self.stores(plan):
            tier = plan.tier(step.name)
            if tier == HOST:
                yield replace(plan, host=plan.host - {step.name})
            elif tier == DEVICE:
                yield replace(plan, host=plan.host | {step.name})

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
                live.pop(sched.overwrites.get(step.out), None)  # its memory is the output's now
            nbytes = sum(math.prod(self.prog.shapes[slot]) for slot in live)
            if nbytes > best_bytes:
                best, best_bytes = list(live.values()), nbytes
            for slot in sched.frees[i]:
                live.pop(slot, None)
        return best


#: Shares of the device budget the search starts from again when it finds no plan at the full budget.
NARROWER_DEVICE_BUDGETS = (1.0, 0.75, 0.5)
#: Automatic plans with more than this many times the untiled pass's multiply-adds are not taken: deep
#: recomputation under tiny budgets can fit memory at thousands of times the work, which would never
#: finish. (Piece sizes the caller gives are taken at any cost.)
MAX_RELATIVE_WORK = 100.0


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
    if device_budget is not None and not given and not recompute and search.fits(search.estimate(Plan())):
        return Plan()

    def bases(budget: int | None) -> list[Plan]:
        if given:
            return [Plan(tile, chunk)]
        if budget is None:
            return [Plan(piece_bytes=pl.CPU_PIECE_BYTES)]
        cap = CUDA_PIECE_BYTES if device.type == "cuda" else pl.CPU_PIECE_BYTES
        first = int(min(cap, max(budget * PIECE_SHARE, 1)))
        return [Plan(piece_bytes=first >> k) for k in range(PIECE_HALVINGS) if k == 0 or first >> k >= 1 << 16]

    best, fastest = None, None
    # The search is greedy, and less room on the device changes its path: when it finds nothing, it
    # starts again as if the device budget were smaller (what fits that fits this one).
    for share in (1.0,) if device_budget is None or given else NARROWER_DEVICE_BUDGETS:
        narrow = search if share == 1.0 else replace(search, device_budget=int(device_budget * share))
        for base in bases(narrow.device_budget):
            plan = narrow.place(replace(base, recompute=everything))
            plan = narrow.relieve_host(plan)
            plan = narrow.place(plan)
            est = search.estimate(plan)
            if search.fits(est):
                plan = search.speed_up(plan)
                est = search.estimate(plan)
            if search.fits(est) and (given or est.relative_work <= MAX_RELATIVE_WORK):
                if fastest is None or est.relative_cost < fastest[1].relative_cost:
                    fastest = (plan, est)
                elif fastest is not None:
                    break  # smaller pieces only cost more from here
            elif best is None or _shortfall(search, est) < _shortfall(search, best[1]):
                best = (plan, est)
        if fastest is not None:
            break
    if fastest is not None:
        return fastest[0]
    plan, est = best
    raise MemoryBudgetError(_refusal(direction, shape, search, est), device_needed=est.total, host_needed=est.host,
                            device_budget=device_budget, host_budget=search.host_budget)


def _shortfall(search: _Search, est: MemoryEstimate) -> tuple[float, float]:
    """How far a plan is from being taken: its memory over the budgets (as shares of them), then its work."""
    over = max(0, est.host - search.host_budget) / max(1, search.host_budget)
    if search.device_budget is not None:
        over += max(0, est.total - search.device_budget) / max(1, search.device_budget)
    return over, est.relative_work


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _refusal(direction: Direction, shape, search: _Search, est: MemoryEstimate) -> str:
    device = "" if search.device_budget is None else \
        f"{_size(est.total)} on the device (budget {_size(search.device_budget)}) and "
    disk = f" and {_size(est.disk)} on disk" if est.disk else ""
    advice = ("fewer frames or a smaller size, a larger memory budget, a disk folder for layer outputs "
              "(TilingOptions.disk_dir)" if search.disk_budget is None else "fewer frames or a smaller size, a "
              "larger memory budget, more free disk space")
    if search.fits(est):
        return (f"no exact {direction.name} plan for {list(shape)} finishes in useful time within the memory "
                f"budgets: the least work found is {est.relative_work:.0f}x the untiled pass's (plans over "
                f"{MAX_RELATIVE_WORK:g}x are not taken). Use {advice}, or mode='official' (its own tiles: seams).")
    return (f"no exact {direction.name} plan for {list(shape)} fits the memory budgets: the smallest found needs "
            f"{device}{_size(est.host)} of host memory (budget {_size(search.host_budget)}){disk}. "
            f"Use {advice}, or mode='official' (its own tiles: seams).")
