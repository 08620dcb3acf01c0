"""``jitlaunch probe``: what a client does, timed, as Jitsu's own benchmark did.

Resolve NAME through the given server, connect to the answered address, send ``GET /`` and
time the DNS answer, the TCP connect and the first byte of the reply.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSRecord


@dataclass
class ProbeResult:
    address: str
    ttl: int
    dns: float
    connect: float
    first_byte: float
    total: float
    status_line: str
    body_bytes: int


class ProbeError(Exception):
    pass


def _split_server(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ProbeError(f"--server: expected ADDR:PORT such as 127.0.0.1:5353, got {text!r}")
    return host.strip("[]"), int(port)


def resolve(
    name: str, server: tuple[str, int], *, tcp: bool = False, ipv6: bool = False,
    timeout: float = 10.0,
) -> tuple[str, int]:
    """Ask ``server`` for the A (or AAAA) record of ``name``; return (address, ttl).
    Falls back to TCP when the UDP answer is truncated."""
    qtype = "AAAA" if ipv6 else "A"
    query = DNSRecord.question(name, qtype)
    wire = query.pack()
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    if tcp:
        with socket.create_connection(server, timeout=timeout) as s:
            s.sendall(struct.pack("!H", len(wire)) + wire)
            length = struct.unpack("!H", _recv_exactly(s, 2))[0]
            data = _recv_exactly(s, length)
    else:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(wire, server)
            while True:
                data, _ = s.recvfrom(65535)
                if data[:2] == wire[:2]:
                    break
    reply = DNSRecord.parse(data)
    if reply.header.tc and not tcp:
        return resolve(name, server, tcp=True, ipv6=ipv6, timeout=timeout)
    if reply.header.rcode != RCODE.NOERROR:
        raise ProbeError(f"{name}: the server answered {RCODE.get(reply.header.rcode)}")
    want = QTYPE.AAAA if ipv6 else QTYPE.A
    for rr in reply.rr:
        if rr.rtype == want:
            return str(rr.rdata), rr.ttl
    raise ProbeError(f"{name}: the server answered no {qtype} record")


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ProbeError("the DNS server closed the TCP connection early")
        buf += chunk
    return buf


def probe(
    name: str, server: tuple[str, int], port: int, path: str = "/", *, tcp: bool = False,
    ipv6: bool = False, timeout: float = 10.0,
) -> ProbeResult:
    t0 = time.perf_counter()
    address, ttl = resolve(name, server, tcp=tcp, ipv6=ipv6, timeout=timeout)
    t1 = time.perf_counter()
    with socket.create_connection((address, port), timeout=timeout) as s:
        t2 = time.perf_counter()
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
        )
        first = s.recv(65536)
        t3 = time.perf_counter()
        if not first:
            raise ProbeError(f"{address}:{port} closed the connection without a reply")
        body = bytearray(first)
        while len(body) < 1 << 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    t4 = time.perf_counter()
    status = bytes(body).split(b"\r\n", 1)[0].decode("latin-1")
    return ProbeResult(address, ttl, t1 - t0, t2 - t1, t3 - t2, t4 - t0, status, len(body))


def run_probe(args: argparse.Namespace) -> int:
    try:
        server = _split_server(args.server)
        r = probe(
            args.name, server, args.port, args.path, tcp=args.tcp, ipv6=args.ipv6,
            timeout=args.timeout,
        )
    except ProbeError as exc:
        print(f"jitlaunch: probe: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"jitlaunch: probe: {exc.strerror or exc}", file=sys.stderr)
        return 1
    ms = 1000.0
    print(f"{args.name} -> {r.address} (ttl {r.ttl})")
    print(f"  dns         {r.dns * ms:8.2f} ms")
    print(f"  connect     {r.connect * ms:8.2f} ms   {r.address}:{args.port}")
    print(f"  first byte  {r.first_byte * ms:8.2f} ms   {r.status_line}")
    print(f"  total       {r.total * ms:8.2f} ms   ({r.body_bytes} bytes)")
    return 0
