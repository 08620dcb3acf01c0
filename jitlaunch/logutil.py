"""Rate-limited logging: one line per kind of event per interval, never one per packet.

Anything a client can cause (a bad packet, a reset, a refused connection) is logged through
a :class:`LimitedLog`, so that a flood costs one line every ``interval`` seconds per kind, and
that line says how many were left out since the last one. Keys must come from a bounded set
(fixed strings, service names), never from client input such as an address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class LimitedLog:
    """Logs at most one line per key per ``interval`` seconds; counts every call per key."""

    def __init__(
        self, logger: logging.Logger, interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        #: Every call, logged or not, by key: what tests and metrics read.
        self.counts: dict[str, int] = {}
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(
        self, level: int, key: str, msg: str, *args: object,
        exc_info: bool | BaseException = False,
    ) -> bool:
        """Count ``key`` and log ``msg % args`` unless ``key`` was logged within the interval.
        Returns whether a line was written."""
        self.counts[key] = self.counts.get(key, 0) + 1
        now = self.clock()
        if now < self._next.get(key, -1.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._next[key] = now + self.interval
        left_out = self._suppressed.pop(key, 0)
        if left_out:
            msg += f" ({left_out} more like it in the last {self.interval:g} s)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: object, exc_info: bool | BaseException = False) -> bool:
        return self.log(logging.ERROR, key, msg, *args, exc_info=exc_info)
