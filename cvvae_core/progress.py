"""A dependency-free text progress bar usable as a ``progress(done, total)`` callback."""
from __future__ import annotations

import sys
import time


class TextProgress:
    def __init__(self, label: str, stream=None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.start = time.monotonic()

    def __call__(self, done: int, total: int, suffix: str = ""):
        total = max(total, 1)
        filled = round(self.width * done / total)
        elapsed = time.monotonic() - self.start
        bar = "#" * filled + "-" * (self.width - filled)
        end = "\n" if done >= total else ""
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {elapsed:5.1f}s {suffix}{end}")
        self.stream.flush()
