"""The server name of a TLS connection, read from its ClientHello without terminating TLS.

Sans-IO, h11-style: :class:`SniReader` is fed the connection's first bytes as they arrive,
in any split, and says after each feed what it knows: nothing yet (:data:`MORE`), the name
the client asked for, that the ClientHello names none, or that the bytes are not a
ClientHello it will route (with a short reason). It keeps every byte it was fed
(:attr:`SniReader.buffered`), so that the connection can be passed on untouched.

Rules (RFC 8446 5.1 and 4.1.2, RFC 6066 3):

* TLS records of content type 22 (handshake), legacy version 3.x, 1 to 2^14 bytes each; the
  ClientHello may span several of them. Anything else first is ``not TLS``.
* The handshake message must be a ClientHello (type 1) whose fields exactly fill it: the
  session id at most 32 bytes, a non-empty even cipher suite list, a non-empty compression
  list, then extensions (or none) that exactly fill their block, none of a type twice.
* ``server_name`` (type 0) holds exactly one entry, of type host_name (0); its name is a DNS
  name (letters, digits and hyphens in labels of 1 to 63 bytes, at most 253 bytes, a final
  dot allowed and dropped); it is returned in lower case. A ClientHello without the
  extension is :data:`NO_SNI`.
* At most :data:`MAX_BYTES` are read (a ClientHello with a post-quantum key share is some
  1.8 kB; 16 kB is one full record and its header, with room for a second record's).

``feed`` never raises for any input; once it has a verdict other than MORE, it keeps it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: The most bytes read before a verdict: past it, ``too big``.
MAX_BYTES = 16384 + 2 * 5 + 4096
_RECORD_MAX = 1 << 14
_HANDSHAKE, _CLIENT_HELLO, _SERVER_NAME, _HOST_NAME = 22, 1, 0, 0
_LABEL = re.compile(rb"(?!-)[a-z0-9-]{1,63}(?<!-)")


class Verdict(NamedTuple):
    """``kind``: ``more``, ``routed`` (``name`` set), ``no_sni`` or ``rejected`` (``reason``)."""

    kind: str
    name: str | None = None
    reason: str = ""


MORE = Verdict("more")
NO_SNI = Verdict("no_sni")


def _rejected(reason: str) -> Verdict:
    return Verdict("rejected", reason=reason)


class _Malformed(Exception):
    pass


class SniReader:
    """Feed it a connection's first bytes; see the module docstring."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._pos = 0  # the first record not yet taken into _hello
        self._hello = bytearray()  # the handshake bytes of the records taken so far
        self._verdict = MORE

    @property
    def buffered(self) -> bytes:
        """Every byte fed so far, to pass on as it came."""
        return bytes(self._buf)

    def feed(self, data: bytes) -> Verdict:
        if self._verdict.kind != "more":
            self._buf += data
            return self._verdict
        self._buf += data
        try:
            verdict = self._read()
        except _Malformed as exc:
            verdict = _rejected(str(exc) or "malformed")
        except (IndexError, ValueError):  # a bound check missed: still only a rejection
            verdict = _rejected("malformed")
        if verdict.kind == "more" and len(self._buf) >= self.max_bytes:
            verdict = _rejected("too big")
        self._verdict = verdict
        return verdict

    def _read(self) -> Verdict:
        buf = self._buf
        while True:
            if len(buf) - self._pos < 5:
                if len(buf) > self._pos and buf[self._pos] != _HANDSHAKE:
                    raise _Malformed("not TLS")
                if len(buf) > self._pos + 1 and buf[self._pos + 1] != 3:
                    raise _Malformed("not TLS")
                return MORE
            ctype, major, length = buf[self._pos], buf[self._pos + 1], _u16(buf, self._pos + 3)
            if ctype != _HANDSHAKE or major != 3:
                raise _Malformed("not TLS")
            if not 0 < length <= _RECORD_MAX:
                raise _Malformed("malformed record")
            if len(buf) - self._pos - 5 < length:
                return MORE
            self._hello += buf[self._pos + 5 : self._pos + 5 + length]
            self._pos += 5 + length
            verdict = _client_hello(bytes(self._hello))
            if verdict is not MORE:
                return verdict


def _u16(b: bytes | bytearray, at: int) -> int:
    if at + 2 > len(b):
        raise _Malformed("malformed")
    return (b[at] << 8) | b[at + 1]


def _client_hello(hs: bytes) -> Verdict:
    """The verdict on the handshake bytes so far (MORE while the message is incomplete)."""
    if len(hs) < 4:
        return MORE
    if hs[0] != _CLIENT_HELLO:
        raise _Malformed("not a ClientHello")
    size = int.from_bytes(hs[1:4], "big")
    if size > MAX_BYTES:
        raise _Malformed("too big")
    if len(hs) < 4 + size:
        return MORE
    if len(hs) != 4 + size:
        raise _Malformed("bytes after the ClientHello")
    return _hello_body(hs[4:])


def _hello_body(body: bytes) -> Verdict:
    pos = 2 + 32  # legacy_version, random
    if pos + 1 > len(body):
        raise _Malformed("malformed ClientHello")
    sid = body[pos]
    if sid > 32:
        raise _Malformed("malformed session id")
    pos += 1 + sid
    suites = _u16(body, pos)
    if suites == 0 or suites % 2:
        raise _Malformed("malformed cipher suites")
    pos += 2 + suites
    if pos + 1 > len(body):
        raise _Malformed("malformed ClientHello")
    compression = body[pos]
    if compression == 0:
        raise _Malformed("malformed compression methods")
    pos += 1 + compression
    if pos == len(body):
        return NO_SNI  # no extensions at all
    end = pos + 2 + _u16(body, pos)
    if end != len(body):
        raise _Malformed("malformed extensions")
    return _extensions(body, pos + 2, end)


def _extensions(body: bytes, pos: int, end: int) -> Verdict:
    seen: set[int] = set()
    found: Verdict = NO_SNI
    while pos < end:
        kind, length = _u16(body, pos), _u16(body, pos + 2)
        data_end = pos + 4 + length
        if data_end > end:
            raise _Malformed("malformed extension")
        if kind in seen:
            raise _Malformed("an extension repeated")
        seen.add(kind)
        if kind == _SERVER_NAME:
            found = _server_name(body[pos + 4 : data_end])
        pos = data_end
    return found


def _server_name(ext: bytes) -> Verdict:
    if _u16(ext, 0) != len(ext) - 2 or len(ext) < 5:
        raise _Malformed("malformed server_name")
    if ext[2] != _HOST_NAME:
        raise _Malformed("a server_name that is not a host name")
    length = _u16(ext, 3)
    if 5 + length != len(ext):
        raise _Malformed("several names in server_name" if 5 + length < len(ext)
                         else "malformed server_name")
    name = dns_name(ext[5:])
    if name is None:
        return _rejected("bad name")
    return Verdict("routed", name=name)


def dns_name(raw: bytes) -> str | None:
    """``raw`` as a lower-case DNS name without its final dot, or None if it is not one."""
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if not name or len(name) > 253:
        return None
    if not all(_LABEL.fullmatch(label) for label in name.split(b".")):
        return None
    return name.decode("ascii")


__all__ = ["MAX_BYTES", "MORE", "NO_SNI", "SniReader", "Verdict", "dns_name"]
