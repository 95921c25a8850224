"""A progress bar for restore and verify: drawn on standard error when it is a terminal, silent
otherwise (the log lines say what happened, without a line per object)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class Progress:
    WIDTH = 30
    INTERVAL = 0.1  # seconds between redraws

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = ""
        self.total = self.done = 0
        self._drawn = 0.0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, max(total, 1), 0
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self.done = min(self.done + n, self.total)
        self._draw(force=self.done == self.total)

    def end(self) -> None:
        if self.enabled and self.label:
            self.done = self.total
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
        self.label = ""

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._drawn < self.INTERVAL):
            return
        self._drawn = now
        filled = self.WIDTH * self.done // self.total
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        pct = 100 * self.done // self.total
        self.stream.write(f"\r{self.label:<28} [{bar}] {pct:3d}% {human(self.done):>9}")
        self.stream.flush()
