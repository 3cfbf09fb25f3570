"""Progress and cancellation of a pass: ``progress(done, PROGRESS_UNITS)`` in proportion to work."""
from __future__ import annotations

from typing import Callable

from ..errors import CancelledError

#: ``progress(done, total)`` always gets this total: ``done`` is thousandths of the estimated work.
PROGRESS_UNITS = 1000


class Meter:
    """Cancellation checks and progress in proportion to work: ``step(cost)`` adds that piece's cost
    (multiply-adds, or voxels in official mode) to ``done``, reported in thousandths of ``total_cost``."""

    def __init__(self, progress: Callable[[int, int], None] | None, cancel: Callable[[], bool] | None,
                 total_cost: int):
        self.progress, self.cancel = progress, cancel
        self.total, self.spent = max(1, total_cost), 0

    def check(self):
        if self.cancel is not None and self.cancel():
            raise CancelledError("cancelled by the caller (TilingOptions.cancel returned True)")

    def step(self, cost: int):
        self.spent += cost
        if self.progress is not None:
            # Integer arithmetic: the last step reports exactly PROGRESS_UNITS.
            self.progress(min(PROGRESS_UNITS, self.spent * PROGRESS_UNITS // self.total), PROGRESS_UNITS)
