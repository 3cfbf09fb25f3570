"""A dependency-free text progress bar usable as a ``progress(done, total)`` callback.

On a terminal it redraws one line (at most 10 times a second); into a log file it writes a line
when another 5% is done or 10 s have passed, and at the end, so a long run does not flood a log."""
from __future__ import annotations

import sys
import time


class TextProgress:
    """``percent=True`` shows ``done/total`` as a percentage: for callers whose units mean nothing
    to a reader (the tiling engine reports thousandths of its estimated work)."""

    def __init__(self, label: str, stream=None, width: int = 30, percent: bool = False):
        self.label, self.stream, self.width, self.percent = label, stream or sys.stderr, width, percent
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.open_line = False
        self.shown_at, self.shown_share = float("-inf"), float("-inf")

    def __call__(self, done: int, total: int, suffix: str = ""):
        total = max(total, 1)
        now = time.monotonic()
        if done < total and (now - self.shown_at < 0.1 if self.tty else
                             now - self.shown_at < 10 and done / total - self.shown_share < 0.05):
            return
        self.shown_at, self.shown_share = now, done / total
        filled = round(self.width * done / total)
        elapsed = now - self.start
        count = f"{100 * done / total:5.1f}%" if self.percent else f"{done}/{total}"
        line = f"{self.label} [{'#' * filled}{'-' * (self.width - filled)}] {count} {elapsed:5.1f}s {suffix}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
            self.open_line = done < total
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        """End a line left open (a loop that stopped before ``total``)."""
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False
