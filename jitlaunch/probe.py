"""``jitlaunch probe``: what a client does, timed, as Jitsu's own benchmark did.

Resolve NAME through the given server, connect to the answered address, send ``GET /`` and
time the DNS answer, the TCP connect and the first byte of the reply. Each phase (DNS,
connect, first byte, the rest of the reply) may take ``timeout`` seconds; a failure names its
phase and the address and port it concerns.

Exit status: 0 when the reply came, 1 when a phase failed, 2 for bad input (a NAME that is
not a domain name, a ``--server`` that is not ``ADDR:PORT``), 141 (128 + SIGPIPE, as
``yes | head -1`` gives) when the reader of the output went away
(``jitlaunch probe ... | head -0``): quietly, without a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSRecord

from .config import Endpoint

#: The port `jitlaunch probe` connects to by default: the one conf/default.toml serves.
DEFAULT_PORT = 8080
#: The exit status when stdout is a pipe whose reader has gone (128 + SIGPIPE).
EXIT_BROKEN_PIPE = 141


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
    """A phase failed (exit status 1); the message names the phase and the address."""


class ProbeInputError(ProbeError):
    """Bad input on the command line (exit status 2)."""


def where(host: str, port: int) -> str:
    return str(Endpoint(host, port))


def split_server(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[ADDR]:PORT`` for an IPv6 address) into an address and a port; a host
    name is looked up (the system's resolver, the first address). ProbeInputError for
    anything that is not of that form, ProbeError for a name that does not resolve."""
    expected = (f"--server: expected ADDR:PORT or HOST:PORT such as 127.0.0.1:5300, [::1]:5300 "
                f"or localhost:5300, got {text!r}")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) \
            or not 0 < int(port) < 65536:
        raise ProbeInputError(expected)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ProbeInputError(expected)
    elif ":" in host:
        raise ProbeInputError(f"{expected} (an IPv6 address goes in brackets)")
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        pass
    if not all(label and len(label) < 64 for label in host.rstrip(".").split(".")):
        raise ProbeInputError(expected)
    try:
        found = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        raise ProbeError(f"--server: cannot resolve {host!r}: {exc}") from None
    return str(found[0][4][0]), int(port)


def resolve(
    name: str, server: tuple[str, int], *, tcp: bool = False, ipv6: bool = False,
    timeout: float = 10.0,
) -> tuple[str, int]:
    """Ask ``server`` for the A (or AAAA) record of ``name``; return (address, ttl).
    Falls back to TCP when the UDP answer is truncated. ProbeError names the phase (DNS)."""
    qtype = "AAAA" if ipv6 else "A"
    try:
        wire = DNSRecord.question(name, qtype).pack()
    except Exception:  # dnslib: UnicodeError for an empty or long label, DNSLabelError, ...
        raise ProbeInputError(f"NAME: expected a domain name, got {name!r}") from None
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    at = where(*server)
    transport = "TCP" if tcp else "UDP"
    try:
        if tcp:
            with socket.create_connection(server, timeout=timeout) as s:
                deadline = time.monotonic() + timeout  # for the answer, not for each recv
                s.sendall(struct.pack("!H", len(wire)) + wire)
                length = struct.unpack("!H", _recv_exactly(s, 2, at, deadline))[0]
                data = _recv_exactly(s, length, at, deadline)
        else:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                deadline = time.monotonic() + timeout  # replies with another id do not extend it
                # Connected, so that a port where nothing listens is reported at once (the
                # ICMP error comes back as ECONNREFUSED) instead of waiting out the timeout.
                s.connect(server)
                s.send(wire)
                while True:
                    s.settimeout(_left(deadline))
                    data = s.recv(65535)
                    if data[:2] == wire[:2]:
                        break
    except TimeoutError:
        raise ProbeError(f"DNS: no answer from {at} over {transport} within {timeout:g} s") \
            from None
    except ConnectionRefusedError:
        raise ProbeError(f"DNS: {at} refused the query over {transport} (nothing listens "
                         "there?)") from None
    except OSError as exc:
        raise ProbeError(f"DNS: {at} over {transport}: {exc.strerror or exc}") from None
    try:
        reply = DNSRecord.parse(data)
    except Exception:  # dnslib raises several kinds for bad bytes
        raise ProbeError(f"DNS: {at} sent a reply that is not DNS") from None
    if reply.header.tc and not tcp:
        return resolve(name, server, tcp=True, ipv6=ipv6, timeout=timeout)
    if reply.header.rcode != RCODE.NOERROR:
        raise ProbeError(f"DNS: {at} answered {name} with {RCODE.get(reply.header.rcode)}")
    want = QTYPE.AAAA if ipv6 else QTYPE.A
    for rr in reply.rr:
        if rr.rtype == want:
            return str(rr.rdata), rr.ttl
    raise ProbeError(f"DNS: {at} answered no {qtype} record for {name}")


def _left(deadline: float) -> float:
    """The seconds left until ``deadline`` (time.monotonic); TimeoutError once none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _recv_exactly(s: socket.socket, n: int, at: str, deadline: float) -> bytes:
    buf = b""
    while len(buf) < n:
        s.settimeout(_left(deadline))
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ProbeError(f"DNS: {at} closed the TCP connection early")
        buf += chunk
    return buf


def fetch(
    name: str, address: str, port: int, path: str = "/", *, timeout: float = 10.0,
) -> tuple[float, float, float, str, int]:
    """Connect to ``address:port``, send ``GET path`` and read the reply until the server
    closes (at most 1 MiB). Returns (connected at, first byte at, done at, status line,
    bytes); ProbeError names the phase (connect, first byte, reply)."""
    at = where(address, port)
    phase = "connect"
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            connected = time.perf_counter()
            phase = "first byte"
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
            )
            first = s.recv(65536)
            first_at = time.perf_counter()
            if not first:
                raise ProbeError(f"first byte: {at} closed the connection without a reply")
            phase = "reply"
            deadline = time.monotonic() + timeout  # for the phase, not for each recv
            body = bytearray(first)
            while len(body) < 1 << 20:
                s.settimeout(_left(deadline))
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
    except TimeoutError:
        what = {"connect": f"no connection to {at}", "first byte": f"{at} sent nothing",
                "reply": f"{at} did not finish its reply"}[phase]
        raise ProbeError(f"{phase}: {what} within {timeout:g} s") from None
    except ConnectionRefusedError:
        raise ProbeError(f"{phase}: {at} refused the connection") from None
    except ConnectionResetError:
        raise ProbeError(f"{phase}: {at} reset the connection") from None
    except OSError as exc:
        raise ProbeError(f"{phase}: {at}: {exc.strerror or exc}") from None
    status = bytes(body).split(b"\r\n", 1)[0].decode("latin-1")
    return connected, first_at, time.perf_counter(), status, len(body)


def probe(
    name: str, server: tuple[str, int], port: int = DEFAULT_PORT, path: str = "/", *,
    tcp: bool = False, ipv6: bool = False, timeout: float = 10.0,
) -> ProbeResult:
    t0 = time.perf_counter()
    address, ttl = resolve(name, server, tcp=tcp, ipv6=ipv6, timeout=timeout)
    t1 = time.perf_counter()
    t2, t3, t4, status, size = fetch(name, address, port, path, timeout=timeout)
    return ProbeResult(address, ttl, t1 - t0, t2 - t1, t3 - t2, t4 - t0, status, size)


def run_probe(args: argparse.Namespace) -> int:
    try:
        server = split_server(args.server)
        if not 0 < args.port < 65536:
            raise ProbeInputError(f"--port: expected a port from 1 to 65535, got {args.port}")
        if not 0 < args.timeout < math.inf:  # NaN fails this too
            raise ProbeInputError(f"--timeout: expected a number of seconds above 0, got "
                                  f"{args.timeout:g}")
        r = probe(
            args.name, server, args.port, args.path, tcp=args.tcp, ipv6=args.ipv6,
            timeout=args.timeout,
        )
    except ProbeInputError as exc:
        print(f"jitlaunch: probe: {exc}", file=sys.stderr)
        return 2
    except ProbeError as exc:
        print(f"jitlaunch: probe: {exc}", file=sys.stderr)
        return 1
    ms = 1000.0
    try:
        print(f"{args.name} -> {r.address} (ttl {r.ttl})")
        print(f"  dns         {r.dns * ms:8.2f} ms")
        print(f"  connect     {r.connect * ms:8.2f} ms   {where(r.address, args.port)}")
        print(f"  first byte  {r.first_byte * ms:8.2f} ms   {r.status_line}")
        print(f"  total       {r.total * ms:8.2f} ms   ({r.body_bytes} bytes)")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head -1`). Point stdout at /dev/null so that the flush at
        # exit does not fail again, and end quietly as a process killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return 0
