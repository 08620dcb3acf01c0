"""DNS cookies (RFC 7873) with interoperable server cookies (RFC 9018), as pure functions.

A client that sends a COOKIE option gets a server cookie back; a later query that carries
that server cookie proves that the client receives what is sent to its address: its source
is not forged. jitlaunch uses that to decide who may take room from others (README,
"Capacity"): a UDP query proves its source only with a valid server cookie.

The server cookie (RFC 9018 4) is 16 bytes: version 1, three reserved zero bytes, a 32-bit
timestamp (seconds since the epoch) and SipHash-2-4 over client cookie | version | reserved |
timestamp | client address (4 or 16 bytes) under a 16-byte secret. The secret is made at
start and kept in memory only: a restart makes every cookie out there invalid, and the
clients simply learn a new one.

What a query's COOKIE option gets (RFC 7873 5.2, as NSD 4.6 answers with
``answer-cookie: yes``):

* a malformed option (length other than 8 or 16 to 40): FORMERR (found by the parser,
  :mod:`.wire`);
* a client cookie only: the answer, with a fresh server cookie; unproven;
* a server cookie that is not valid (not ours, another version or length, a wrong hash, a
  timestamp more than an hour old or more than five minutes ahead): the same, as if there
  were none (no BADCOOKIE);
* a valid server cookie: the answer, proven; the same server cookie comes back while it is
  less than half an hour old, a fresh one after that (RFC 9018 4.3).

Timestamps compare in serial number arithmetic (RFC 1982), as RFC 9018 asks.

Cost: SipHash in Python takes about 9 µs, more than a cached answer (about 6 µs of CPU). A
resolver sends the same cookie back for up to half an hour, so the cookies made or found
valid lately are remembered (with the client's address; at most :data:`KNOWN` of them, all
forgotten at once when full): finding one there costs a dictionary look-up. Only a valid
cookie gets in, so forged ones cannot push the real ones out faster than real clients do.
"""

from __future__ import annotations

import hmac
import os
import socket
import struct

from .siphash import SipHash24

#: The EDNS option code of COOKIE (RFC 7873 8).
OPTION_COOKIE = 10
CLIENT_LEN = 8
SERVER_LEN = 16  # RFC 9018's server cookie
VERSION = 1
#: A valid server cookie may be this old (s) ...
MAX_AGE = 3600
#: ... or this far in the future.
MAX_AHEAD = 300
#: One older than this is answered with a fresh one.
REFRESH_AGE = 1800
#: Cookies remembered as valid (with the client's address) before all are forgotten.
KNOWN = 4096

_U32 = struct.Struct("!I")
_HEAD = struct.Struct("!HH")


def option_length_ok(length: int) -> bool:
    """Whether a COOKIE option of ``length`` bytes is well-formed (RFC 7873 5.2.2): a client
    cookie alone, or one with a server cookie of 8 to 32 bytes."""
    return length == CLIENT_LEN or 16 <= length <= 40


def address_bytes(source: str | None) -> bytes | None:
    """The client's address as the hash takes it (4 or 16 bytes), or None for a source that
    is not an IP address."""
    if source is None:
        return None
    try:
        if ":" in source:
            return socket.inet_pton(socket.AF_INET6, source.partition("%")[0])
        return socket.inet_aton(source) if source.count(".") == 3 else None
    except OSError:
        return None


class ServerCookies:
    """Makes and checks RFC 9018 server cookies under one secret (random unless given:
    tests pass a fixed one). Pure: the time and the client's address are passed in."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._hash = SipHash24(secret if secret is not None else os.urandom(16))
        #: Client and server cookie and the client's address, of cookies known to be valid
        #: (made here, or checked); their age is still checked each time.
        self._known: set[bytes] = set()

    def __repr__(self) -> str:
        return "<ServerCookies>"  # never the secret

    def make(self, client: bytes, address: bytes, now: int) -> bytes:
        """A fresh 16-byte server cookie for ``client`` (8 bytes) at ``address`` at ``now``
        (seconds since the epoch)."""
        head = b"\x01\0\0\0" + _U32.pack(now & 0xFFFFFFFF)
        made = head + self._hash.digest(client + head + address)
        self._remember(client + made + address)
        return made

    def _remember(self, key: bytes) -> None:
        if len(self._known) >= KNOWN:
            self._known.clear()
        self._known.add(key)

    def check(self, option: bytes, address: bytes, now: int) -> int:
        """The age in seconds (negative: ahead of us) of the server cookie in the COOKIE option
        data ``option`` when it is valid for ``address`` at ``now``; -1 << 32 when it is not."""
        if len(option) != CLIENT_LEN + SERVER_LEN or option[8] != VERSION:
            return _INVALID
        stamp: int = _U32.unpack_from(option, 12)[0]
        age = (now - stamp) & 0xFFFFFFFF
        if age >= 0x80000000:  # serial arithmetic: the stamp is ahead of now
            age -= 0x100000000
        if not -MAX_AHEAD <= age <= MAX_AGE:
            return _INVALID
        key = option + address
        if key not in self._known:
            if not hmac.compare_digest(self._hash.digest(option[:16] + address), option[16:]):
                return _INVALID
            self._remember(key)
        return age

    def answer(self, option: bytes, address: bytes, now: int) -> tuple[bytes, str]:
        """The reply's COOKIE option (code, length and data) for a query's well-formed COOKIE
        option data ``option`` from ``address``, and what the query's server cookie was:
        ``valid`` (the source is proven), ``invalid`` or ``none`` (a client cookie alone)."""
        client = option[:CLIENT_LEN]
        if len(option) == CLIENT_LEN:
            status = NONE
        else:
            age = self.check(option, address, now)
            if age == _INVALID:
                status = INVALID
            elif age < REFRESH_AGE:
                return _COOKIE_24 + option, VALID
            else:
                status = VALID
        return _COOKIE_24 + client + self.make(client, address, now), status


#: What a query's server cookie was (metrics label values).
VALID, INVALID, NONE = "valid", "invalid", "none"
_INVALID = -1 << 32
_COOKIE_24 = _HEAD.pack(OPTION_COOKIE, CLIENT_LEN + SERVER_LEN)
