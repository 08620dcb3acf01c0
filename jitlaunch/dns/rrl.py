"""Response rate limiting (RRL) for DNS over UDP, as NSD, Knot and BIND have it. No I/O.

A UDP source address can be forged, so an authoritative server can be made to send replies
to a victim (reflection, amplified when replies are larger than queries). RRL bounds how many
*identical* replies go to one source prefix (``ipv4_prefix``, ``ipv6_prefix`` bits of the
address) each second, the design of Vixie and Schryver that BIND, NSD and Knot share: a
reflection attack sends the same large reply over and over, while a real resolver behind the
prefix asks for many different names and is not held back. TCP needs none, since its
handshake proves the source.

What counts as one reply (its *identity*, from :func:`answer_identity` and the others below,
computed by the answer logic alongside the reply: :attr:`answer.Response.identity`):

* an answer: the query name (lower case), type and class, as BIND keys its
  ``responses-per-second`` (NSD keys its "positive" type by the name alone);
* NODATA: the query name and class, not the type: BIND's ``nodata-per-second`` key (NSD
  counts all NODATA of a zone as one). Only names that exist give NODATA, so a flood of
  random names cannot make new identities of this kind; and a resolver asking AAAA of many
  names that have only A records is not limited as one (it would be by NSD's key);
* NXDOMAIN: the zone, whatever the name, as both BIND (``nxdomains-per-second``, the zone
  origin) and NSD (``rrl_type_nxdomain``, the zone apex) key it: random names cannot spread a
  flood over many identities;
* every error (FORMERR, NOTIMP, REFUSED, SERVFAIL, NOTAUTH, BADVERS, an EDNS probe's reply):
  one identity per prefix, as BIND keys the errors it limits (no name: ``errors-per-second``).
  NSD keys them by zone; we answer many errors before any zone is known, and an error reply
  is never larger than its query, so one class suffices.

We have no delegations, so no referrals (BIND and NSD key those by the delegation point).

The rules (``[dns.rrl]``, see :class:`~jitlaunch.config.RrlConfig`):

* Each identity of each prefix has a balance, credited ``rate`` per second up to ``rate`` (a
  burst of at most one second's worth) and debited by one for every reply it asks for, sent
  or not; NXDOMAIN has ``nxdomain_rate`` and errors ``error_rate`` instead (both ``rate``
  unless set; 0: not limited). A reply is sent while the balance is not negative; below zero
  it is *limited*. The balance never falls below ``window`` seconds' worth of debt, so an
  identity that stops being asked is served again within ``window`` seconds, and one asked
  persistently above its rate stays limited. (Balances are kept in seconds, as the time at
  which a bucket's balance is full again: a reply costs ``1 / rate`` of its kind, the credit
  is the time passed, at most 1 s; this is the generic cell rate algorithm.)
* Of the limited replies, every ``slip``-th is sent truncated instead (TC=1, the question
  only, no records: smaller than the query, never an amplifier), so that a real client
  behind a limited prefix retries over TCP; the others are dropped. ``slip = 0`` drops them
  all, ``slip = 1`` truncates them all.
* Sources in an ``exempt`` network are never limited. All three rates 0 (``rate = 0`` with
  the other two unset) turns RRL off.

The state is a fixed table of :data:`BUCKETS` buckets (12 bytes each: 0.8 MB, allocated only
when RRL is on), indexed by a keyed hash of the prefix and the identity: a flood from spoofed
sources or of random names costs no memory. Identities that share a bucket share its balance
(each reply still debits its own kind's cost), which can only limit them sooner, never let
more through: a collision makes limiting stricter, not looser. The address-to-prefix work is
kept for the last :data:`SOURCES` addresses seen.
"""

from __future__ import annotations

import enum
import ipaddress
import random
import socket
import struct
from array import array

from ..config import RrlConfig

#: Buckets in the state table (a power of two).
BUCKETS = 65536
#: Source addresses whose prefix is remembered (the memo is emptied when full).
SOURCES = 4096

#: The kinds of reply, each with its own rate: the low two bits of an identity.
ANSWER, NXDOMAIN, ERROR = 0, 1, 2
#: The identity of every error reply (one per prefix).
ERROR_IDENTITY = ERROR
_KIND = 3
_EXEMPT = -1  # never the value of hash()
#: One second of credit, and a little float slack so that ``rate`` replies of ``1 / rate``
#: each fit in it.
_BURST = 1.0 + 1e-9


def answer_identity(name: bytes, qtype: int, qclass: int) -> int:
    """The identity of an answer to ``name`` (wire form, lower case), ``qtype``, ``qclass``."""
    return hash((name, qtype, qclass)) & ~_KIND | ANSWER


def nodata_identity(name: bytes, qclass: int) -> int:
    """The identity of a NODATA reply about ``name`` (wire form, lower case): any type."""
    return hash((name, -1, qclass)) & ~_KIND | ANSWER


def nxdomain_identity(apex: bytes) -> int:
    """The identity of every NXDOMAIN in the zone whose apex is ``apex`` (wire form)."""
    return hash((apex, -3)) & ~_KIND | NXDOMAIN


class Verdict(enum.Enum):
    SEND = "send"
    SLIP = "slip"  # send truncated()
    DROP = "drop"


_SEND = Verdict.SEND


class RateLimiter:
    """Decides, reply by reply, whether a UDP reply to a source may go out.

    ``check(host, now, identity)`` takes the source address as the socket API gives it
    (``"192.0.2.1"``, ``"2001:db8::1"``, optionally with ``%scope``), the current time in
    seconds on any monotonic clock and the reply's identity (see the module docstring); it
    never raises for an address the socket API can return.
    """

    def __init__(self, config: RrlConfig, buckets: int = BUCKETS) -> None:
        if buckets & (buckets - 1):
            raise ValueError("buckets must be a power of two")
        self.config = config
        rates = (config.rate,
                 config.rate if config.nxdomain_rate is None else config.nxdomain_rate,
                 config.rate if config.error_rate is None else config.error_rate)
        #: The rates of answers (and NODATA), NXDOMAIN and errors.
        self.rates = rates
        self.rate = config.rate
        self.enabled = any(rates)
        #: Seconds of balance one reply costs, by kind (0.0: that kind is not limited).
        self._cost = (*(1.0 / r if r else 0.0 for r in rates), 0.0)
        #: A bucket's balance never falls below ``-window`` seconds' worth (see check()).
        self._most_debt = 1.0 + float(config.window)
        self._mask = buckets - 1
        self._shift4 = 32 - config.ipv4_prefix
        self._shift6 = 128 - config.ipv6_prefix
        self._salt = random.getrandbits(64)
        self._exempt: list[tuple[int, int, int]] = []  # (version, network >> shift, shift)
        for text in config.exempt:
            net = ipaddress.ip_network(text, strict=False)
            shift = net.max_prefixlen - net.prefixlen
            self._exempt.append((net.version, int(net.network_address) >> shift, shift))
        self._sources: dict[str, int] = {}
        size = buckets if self.enabled else 0
        self._full = array("d", [float("-inf")]) * size
        self._limited = array("I", bytes(4 * size))
        #: Counters, read by tests and metrics (``checked`` only while enabled).
        self.checked = 0
        self.limited = 0
        self.slipped = 0
        self.dropped = 0

    def __repr__(self) -> str:
        if not self.enabled:
            return "<RateLimiter off>"
        rate, nx, err = self.rates
        return (
            f"<RateLimiter {rate}/s nxdomain={nx}/s error={err}/s "
            f"window={self.config.window:g}s slip={self.config.slip} "
            f"limited={self.limited} dropped={self.dropped}>"
        )

    def check(self, host: str, now: float, identity: int) -> Verdict:
        if not self.enabled:
            return _SEND
        self.checked += 1
        source = self._sources.get(host)
        if source is None:
            source = self._source(host)
        cost = self._cost[identity & _KIND]
        if source == _EXEMPT or not cost:
            return _SEND
        # The bucket of this prefix and identity: the prefix's hash is keyed (a salt drawn at
        # start), so which identities share a bucket cannot be foreseen from outside.
        i = (source ^ identity) & self._mask
        # A bucket keeps the time its balance will be full again (1 s of credit): the
        # balance now is ``now + 1 - full``. Credit (at most full) and debit this reply.
        full = self._full[i]
        if full < now:
            full = now
        full += cost
        limit = now + self._most_debt
        self._full[i] = full if full < limit else limit
        if full - now < _BURST:
            return _SEND
        self.limited += 1
        slip = self.config.slip
        if slip:
            n = self._limited[i] = (self._limited[i] + 1) % slip
            if n == 0:
                self.slipped += 1
                return Verdict.SLIP
        self.dropped += 1
        return Verdict.DROP

    def _source(self, host: str) -> int:
        """The keyed hash of ``host``'s prefix, or _EXEMPT; remembered for the next reply."""
        if ":" in host:
            version = 6
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, host.partition("%")[0]))
            prefix = value >> self._shift6
        else:
            version = 4
            value = int.from_bytes(socket.inet_aton(host))
            prefix = value >> self._shift4
        source = hash((self._salt, version, prefix))
        for v, network, shift in self._exempt:
            if v == version and value >> shift == network:
                source = _EXEMPT
        if len(self._sources) >= SOURCES:
            self._sources.clear()
        self._sources[host] = source
        return source


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
