"""The name an HTTP/1.x connection asks for, read from the ``Host`` header of its first request.

Sans-IO, the shape of :mod:`jitlaunch.proxy.sni`: :class:`HostReader` is fed the connection's
first bytes as they arrive, in any split, and says after each feed what it knows: nothing yet
(:data:`MORE`), the name the request is for, or that the bytes are not a request it will route
(with a short reason). It keeps every byte it was fed (:attr:`HostReader.buffered`), so that
the request can be replayed to the instance exactly as it came.

Rules (RFC 9112 2.2, 3 and 3.2; RFC 9110 7.2):

* The request head is parsed by h11 (as a server): the request line and header fields must be
  what h11 accepts, or ``not HTTP``; so must the version, HTTP/1.0 or HTTP/1.1. The verdict
  comes when the first request's head is complete (its empty line): a ``Host`` field is only
  trusted once the head is known to hold exactly one (RFC 9112 3.2: more than one is a 400).
  Bytes after the head (a body, a pipelined second request) are kept but not read.
* No ``Host`` field (HTTP/1.0 may omit it; h11 rejects an HTTP/1.1 request without one) or an
  empty one: ``no Host``. Several: ``not HTTP``.
* The host is the field's value without its port (``:`` and digits), lower-cased, a final dot
  dropped, and it must be a DNS name as :func:`jitlaunch.proxy.sni.dns_name` reads one, or
  ``bad name``. An IP literal (``[::1]:80``, ``192.0.2.1``) is ``bad name`` too: it is not a
  service's name, and a service is only reached by name on a shared front.
* The target is not read: an absolute-form target (``GET http://other.example/``) is routed by
  its ``Host`` field, and the instance sees the same bytes.
* At most :data:`MAX_HEAD` bytes are read: a head not complete within them is ``too big``,
  however the bytes were split.

``feed`` never raises for any input; once it has a verdict other than MORE, it keeps it.
"""

from __future__ import annotations

import ipaddress
import re

import h11

from .sni import MORE, Verdict, dns_name

#: The most bytes of a request head read before a verdict: past it, ``too big``.
MAX_HEAD = 8192
_HOST_PORT = re.compile(rb"(?P<host>[^:]*)(?::[0-9]*)?")
#: h11's words for a request that breaks RFC 9112 3.2's Host rules (0.14 to 0.16 alike).
_NO_HOST = "Missing mandatory Host: header"


def _rejected(reason: str) -> Verdict:
    return Verdict("rejected", reason=reason)


class HostReader:
    """Feed it a connection's first bytes; see the module docstring."""

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self.max_head = max_head
        self._buf = bytearray()
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head + 1)
        self._verdict = MORE

    @property
    def buffered(self) -> bytes:
        """Every byte fed so far, to replay as it came."""
        return bytes(self._buf)

    def __repr__(self) -> str:
        return f"<HostReader {self._verdict.kind} {len(self._buf)} bytes>"

    def feed(self, data: bytes) -> Verdict:
        if self._verdict.kind != "more":
            self._buf += data
            return self._verdict
        # Only the first max_head bytes go to h11, so that the verdict does not depend on
        # how the bytes were split; and never an empty chunk, which h11 takes for EOF.
        room = self.max_head - len(self._buf)
        self._buf += data
        if room > 0 and data[:room]:
            self._h11.receive_data(bytes(data[:room]))
        try:
            verdict = self._read()
        except h11.RemoteProtocolError as exc:
            verdict = _rejected("no Host" if str(exc) == _NO_HOST else "not HTTP")
        except (h11.ProtocolError, ValueError, IndexError):  # still only a rejection
            verdict = _rejected("not HTTP")
        if verdict.kind == "more" and len(self._buf) > self.max_head:
            verdict = _rejected("too big")
        self._verdict = verdict
        return verdict

    def _read(self) -> Verdict:
        event = self._h11.next_event()
        if event is h11.NEED_DATA:
            return MORE
        if not isinstance(event, h11.Request) or event.http_version not in (b"1.0", b"1.1"):
            return _rejected("not HTTP")
        # h11 has already refused a request with several Host fields (RFC 9112 3.2).
        hosts = [value for name, value in event.headers if name == b"host"]
        if not hosts or not hosts[0]:
            return _rejected("no Host")
        name = host_name(hosts[0])
        if name is None:
            return _rejected("bad name")
        return Verdict("routed", name=name)


def host_name(value: bytes) -> str | None:
    """A ``Host`` field's value as a lower-case DNS name without port or final dot, or None
    if it is not one (an IP literal included)."""
    match = _HOST_PORT.fullmatch(value)
    if match is None:
        return None
    # An IPv6 literal (``[::1]:80``, RFC 3986 3.2.2) has colons before its port: no match.
    host = match["host"]
    try:
        ipaddress.IPv4Address(host.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return dns_name(host)
    return None


__all__ = ["MAX_HEAD", "MORE", "HostReader", "Verdict", "host_name"]
