"""Warnings that can repeat thousands of times a minute (bad payloads, a stalled database).

One line per kind per period keeps an admin's journal readable and still says how many there were.
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """At most one warning per ``every`` seconds per kind, saying how many were not logged."""

    def __init__(self, every: float, logger: logging.Logger):
        self.every = every
        self.log = logger
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.every) < self.every:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        skipped = self._skipped.pop(kind, 0)
        self._last[kind] = now
        suffix = f" ({skipped} more like it not logged)" if skipped else ""
        self.log.warning(message + suffix, *args, exc_info=exc_info)
