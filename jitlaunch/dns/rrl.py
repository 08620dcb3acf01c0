"""Response rate limiting (RRL) for DNS over UDP, as NSD, Knot and BIND have it. No I/O.

A UDP source address can be forged, so an authoritative server can be made to send replies
to a victim (reflection, amplified when replies are larger than queries). RRL bounds how many
replies go to one source prefix (``ipv4_prefix``, ``ipv6_prefix`` bits of the address) each
second; TCP needs none, since its handshake proves the source.

The rules (``[dns.rrl]``, see :class:`~jitlaunch.config.RrlConfig`):

* Each prefix has a balance, credited ``rate`` per second up to ``rate`` (a burst of at most
  one second's worth) and debited by one for every reply it asks for, sent or not. A reply
  is sent while the balance is not negative; below zero it is *limited*. The balance never
  falls below ``-rate * window``, so a prefix that stops asking is served again within
  ``window`` seconds, and a prefix asking persistently above ``rate`` stays limited.
* Of the limited replies, every ``slip``-th is sent truncated instead (TC=1, the question
  only, no records: smaller than the query, never an amplifier), so that a real client
  behind a limited prefix retries over TCP; the others are dropped. ``slip = 0`` drops them
  all, ``slip = 1`` truncates them all.
* Sources in an ``exempt`` network are never limited. ``rate = 0`` turns RRL off.

The state is a fixed table of :data:`BUCKETS` buckets (20 bytes each: 1.3 MB, allocated only
when RRL is on), indexed by a keyed hash of the prefix: a flood from spoofed sources costs no
memory.
Prefixes that share a bucket share its balance, which can only limit sooner, never let more
through.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import random
import socket
import struct
from array import array

from ..config import RrlConfig

#: Buckets in the state table (a power of two).
BUCKETS = 65536


class Verdict(enum.Enum):
    SEND = "send"
    SLIP = "slip"  # send truncated()
    DROP = "drop"


class RateLimiter:
    """Decides, reply by reply, whether a UDP reply to a source may go out.

    ``check(host, now)`` takes the source address as the socket API gives it (``"192.0.2.1"``,
    ``"2001:db8::1"``, optionally with ``%scope``) and the current time in seconds on any
    monotonic clock; it never raises for an address the socket API can return.
    """

    def __init__(self, config: RrlConfig, buckets: int = BUCKETS) -> None:
        if buckets & (buckets - 1):
            raise ValueError("buckets must be a power of two")
        self.config = config
        self.enabled = config.rate > 0
        self.rate = float(config.rate)
        self.floor = -config.rate * config.window
        self._mask = buckets - 1
        self._shift4 = 32 - config.ipv4_prefix
        self._shift6 = 128 - config.ipv6_prefix
        self._salt = random.getrandbits(64)
        self._exempt: list[tuple[int, int, int]] = []  # (version, network >> shift, shift)
        for text in config.exempt:
            net = ipaddress.ip_network(text, strict=False)
            shift = net.max_prefixlen - net.prefixlen
            self._exempt.append((net.version, int(net.network_address) >> shift, shift))
        size = buckets if self.enabled else 0
        self._balance = array("d", bytes(8 * size))
        self._stamp = array("d", [-math.inf]) * size
        self._limited = array("I", bytes(4 * size))
        #: Counters, read by tests and metrics (``checked`` only while enabled).
        self.checked = 0
        self.limited = 0
        self.slipped = 0
        self.dropped = 0

    def __repr__(self) -> str:
        if not self.enabled:
            return "<RateLimiter off>"
        return (
            f"<RateLimiter {self.config.rate}/s window={self.config.window:g}s "
            f"slip={self.config.slip} limited={self.limited} dropped={self.dropped}>"
        )

    def check(self, host: str, now: float) -> Verdict:
        if not self.enabled:
            return Verdict.SEND
        self.checked += 1
        if ":" in host:
            version = 6
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, host.partition("%")[0]))
        else:
            version = 4
            value = int.from_bytes(socket.inet_aton(host))
        for v, network, shift in self._exempt:
            if v == version and value >> shift == network:
                return Verdict.SEND
        prefix = value >> (self._shift6 if version == 6 else self._shift4)
        i = hash((self._salt, version, prefix)) & self._mask
        # Credit since the last reply (at most one second's worth), then debit this one.
        balance = min(self.rate, self._balance[i] + (now - self._stamp[i]) * self.rate) - 1.0
        self._balance[i] = max(balance, self.floor)
        self._stamp[i] = now
        if balance >= 0:
            return Verdict.SEND
        self.limited += 1
        slip = self.config.slip
        if slip:
            n = self._limited[i] = (self._limited[i] + 1) % slip
            if n == 0:
                self.slipped += 1
                return Verdict.SLIP
        self.dropped += 1
        return Verdict.DROP


def truncated(reply: bytes) -> bytes:
    """``reply`` cut to its header and question, with TC set and no records: what a limited
    source gets instead of the reply. Without a question that parses, the header alone."""
    if len(reply) < 12:
        return reply
    ident, flags, qdcount = struct.unpack_from("!HHH", reply)
    end = _question_end(reply) if qdcount == 1 else None
    if end is None:
        return struct.pack("!HHHHHH", ident, flags | 0x0200, 0, 0, 0, 0)
    return struct.pack("!HHHHHH", ident, flags | 0x0200, 1, 0, 0, 0) + reply[12:end]


def _question_end(msg: bytes) -> int | None:
    """Where the first question ends, or None. Our own replies write the question's name
    uncompressed, but a pointer is followed by nothing more of the name either way."""
    pos = 12
    while pos < len(msg):
        length = msg[pos]
        if length >= 0xC0:
            pos += 2
            break
        if length > 63:
            return None
        pos += 1 + length
        if length == 0:
            break
    else:
        return None
    end = pos + 4
    return end if end <= len(msg) else None
