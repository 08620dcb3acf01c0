"""The PROXY protocol's version 2 header (HAProxy's proxy-protocol.txt, section 2.2): what a
proxy sends an instance before the client's first byte, so that it learns the client's
address and port although the connection comes from us.

Binary: the 12-byte signature, version 2 with the PROXY command (0x21), the family and
transport (0x11 TCP over IPv4, 0x21 TCP over IPv6), the length of what follows, then the
source and destination addresses and the source and destination ports, in network order.
No TLVs. Pure.
"""

from __future__ import annotations

import socket
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_PROXY_V2 = 0x21
_TCP4, _TCP6 = 0x11, 0x21


def proxy_v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The header for a TCP connection from ``source`` to ``destination`` (the address the
    client connected to), both ``(address, port)`` of one family. ValueError for an address
    that is not an IP address, or for a mixed pair."""
    (src, sport), (dst, dport) = source, destination
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    if (":" in dst) != (family == socket.AF_INET6):
        raise ValueError(f"source {src} and destination {dst} are of different families")
    try:
        addresses = socket.inet_pton(family, src.partition("%")[0]) \
            + socket.inet_pton(family, dst.partition("%")[0])
    except OSError as exc:
        raise ValueError(f"not an IP address: {src} or {dst}") from exc
    body = addresses + struct.pack("!HH", sport, dport)
    kind = _TCP6 if family == socket.AF_INET6 else _TCP4
    return SIGNATURE + struct.pack("!BBH", _PROXY_V2, kind, len(body)) + body


__all__ = ["SIGNATURE", "proxy_v2_header"]
