"""The DNS query log: one debug line per query, rate-limited so that it cannot fill a disk.

On only when the ``jitlaunch.dns.queries`` logger logs at debug level (``log_level = "debug"``)
and ``[daemon] query_log_rate`` is above 0. At most that many lines are written per second
(a token bucket with a burst of one second's worth); queries past it are counted, and the next
line written says how many were left out. A line reads::

    query udp 192.0.2.7 hello.jit.test. A NOERROR 0.041 ms

transport, source address, name (as asked, bytes outside printable ASCII as ``\\DDD``), type,
rcode (``none``: no reply) and the time taken to answer (for a held ``wait`` answer, until it
was ready).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from . import stats

log = logging.getLogger("jitlaunch.dns.queries")


def qname_of(wire: bytes) -> str:
    """The question's name in presentation form, ``?`` if it cannot be read."""
    labels: list[str] = []
    pos = 12
    end = len(wire)
    while pos < end:
        length = wire[pos]
        if length == 0:
            return ".".join(labels) + "." if labels else "."
        if length & 0xC0 or pos + 1 + length > end:
            break
        labels.append("".join(
            chr(b) if 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C) else f"\\{b:03d}"
            for b in wire[pos + 1 : pos + 1 + length]
        ))
        pos += 1 + length
    return "?"


def qtype_text(wire: bytes) -> str:
    name = stats.qtype_of(wire)
    if name != "other":
        return name
    pos = 12
    while pos < len(wire) and wire[pos] and not wire[pos] & 0xC0:
        pos += wire[pos] + 1
    if pos + 3 > len(wire) or wire[pos] != 0:
        return "?"
    return f"TYPE{(wire[pos + 1] << 8) | wire[pos + 2]}"


class QueryLog:
    """Rate-limited debug lines, one per query. Check :attr:`enabled` before timing a query
    (the servers do), so that with the log off a query costs one attribute test."""

    def __init__(
        self, rate: int, logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.logger = logger
        self.clock = clock
        self.enabled = False
        #: Lines left out since the last one written, and in all.
        self.skipped = 0
        self.skipped_total = 0
        self._tokens = float(rate)
        self._last = clock()

    def refresh(self) -> None:
        """Turn the log on or off from the logger's level (called when serving starts)."""
        self.enabled = self.rate > 0 and self.logger.isEnabledFor(logging.DEBUG)

    def query(
        self, wire: bytes, reply: bytes | None, transport: str, source: object, seconds: float
    ) -> bool:
        """Log one query unless over the rate; returns whether a line was written."""
        now = self.clock()
        self._tokens = min(float(self.rate), self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1:
            self.skipped += 1
            self.skipped_total += 1
            return False
        self._tokens -= 1
        more = f" ({self.skipped} more queries not logged)" if self.skipped else ""
        self.skipped = 0
        self.logger.debug(
            "query %s %s %s %s %s %.3f ms%s", transport, source, qname_of(wire), qtype_text(wire),
            stats.rcode_of(reply), seconds * 1000, more,
        )
        return True
