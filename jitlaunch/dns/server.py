"""The DNS servers: thin trio UDP and TCP loops around :func:`jitlaunch.dns.answer.respond`.

UDP answers each datagram in the receive loop; a query held for a ``wait`` service is moved to
its own task so the loop never blocks. TCP follows RFC 7766: two-byte length framing, several
queries per connection, held answers sent as they complete (out of order, which section 6.2.1
allows), idle connections closed after ``tcp_idle_timeout``, and at most
``max_tcp_connections`` open at once.

The answers themselves (the cache, held ``wait`` answers) come from
:class:`~jitlaunch.dns.authority.Authority`.
"""

from __future__ import annotations

import logging
import socket
import struct

import trio

from ..config import Config, Endpoint
from ..errors import ListenError, listen_error
from ..lifecycle.supervisor import Supervisor
from .authority import Authority

log = logging.getLogger("jitlaunch.dns")

#: Datagrams answered per wake-up before other tasks get a turn.
UDP_BATCH = 64
#: Queries held at once for booting ``wait`` services; past it new ones are dropped.
MAX_HELD = 1024


def _bind_pair(ep: Endpoint) -> tuple[socket.socket, trio.socket.SocketType]:
    """A non-blocking UDP socket and a TCP listening socket on the same address and port.

    With port 0, the port the UDP socket got may already be taken for TCP: then the pair is
    tried again on another port (a bounded number of times)."""
    family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    attempts = 50 if ep.port == 0 else 1
    for attempt in range(1, attempts + 1):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.setblocking(False)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                for s in (udp, tcp):
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            _bind(udp, ep.host, ep.port, "UDP")
            try:
                _bind(tcp, ep.host, udp.getsockname()[1], "TCP")
            except ListenError:
                if attempt < attempts:
                    udp.close()
                    tcp.close()
                    continue
                raise
            tcp.listen(128)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        return udp, trio.socket.from_stdlib_socket(tcp)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _bind(sock: socket.socket, host: str, port: int, proto: str) -> None:
    try:
        sock.bind((host, port))  # a numeric address: never blocks
    except OSError as exc:
        raise listen_error(f"DNS over {proto}", host, port, exc) from exc


async def serve_dns(
    config: Config,
    supervisor: Supervisor,
    *,
    task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve DNS on every ``dns.listen`` endpoint, over UDP and TCP, until cancelled.

    Binds first, then reports the bound endpoints (with real ports when 0 was configured)
    through ``task_status``. Raises ListenError if an endpoint cannot be bound.
    """
    authority = Authority(config, supervisor)
    pairs: list[tuple[socket.socket, trio.socket.SocketType]] = []
    try:
        for ep in config.dns.listen:
            pairs.append(_bind_pair(ep))
        bound = [Endpoint(ep.host, udp.getsockname()[1]) for ep, (udp, _) in zip(
            config.dns.listen, pairs, strict=True)]
        async with trio.open_nursery() as nursery:
            tcp_slots = trio.CapacityLimiter(config.dns.max_tcp_connections)
            for udp, tcp in pairs:
                nursery.start_soon(_serve_udp, udp, authority)
                listener = trio.SocketListener(tcp)
                nursery.start_soon(_serve_tcp, listener, authority, tcp_slots)
            log.info("DNS on %s (UDP and TCP)", ", ".join(str(b) for b in bound))
            task_status.started(bound)
    finally:
        for udp, tcp in pairs:
            udp.close()
            tcp.close()


async def _serve_udp(sock: socket.socket, authority: Authority) -> None:
    # Datagrams are taken in batches with plain non-blocking calls and one wait per batch:
    # trio's checkpoint in every socket call would cost more than a cached answer does.
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(UDP_BATCH):
                try:
                    wire, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. ECONNREFUSED from an earlier ICMP error
                    log.debug("UDP receive error: %s", exc)
                    continue
                resp = authority.answer_now(wire, udp=True)
                if resp.pending and resp.service is not None:
                    if authority.held < MAX_HELD:
                        nursery.start_soon(_udp_held, sock, authority, wire, addr, resp.service)
                elif resp.reply is not None:
                    await _udp_send(sock, resp.reply, addr)


async def _udp_send(sock: socket.socket, reply: bytes, addr: tuple[object, ...]) -> None:
    try:
        try:
            sock.sendto(reply, addr)
        except BlockingIOError:  # send buffer full: wait once, then give up on this reply
            await trio.lowlevel.wait_writable(sock)
            sock.sendto(reply, addr)
    except OSError as exc:
        log.debug("UDP send to %s failed: %s", addr, exc)


async def _udp_held(
    sock: socket.socket, authority: Authority, wire: bytes, addr: tuple[object, ...], service: str
) -> None:
    reply = await authority.answer_held(wire, True, service)
    if reply is not None:
        await _udp_send(sock, reply, addr)


async def _serve_tcp(
    listener: trio.SocketListener, authority: Authority, slots: trio.CapacityLimiter
) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off briefly, keep serving
                log.warning("DNS TCP accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            try:
                slots.acquire_on_behalf_of_nowait(stream)
            except trio.WouldBlock:
                log.warning("DNS TCP: too many connections; closing a new one")
                await trio.aclose_forcefully(stream)
                continue
            nursery.start_soon(_tcp_connection, stream, authority, slots)


async def _tcp_connection(
    stream: trio.SocketStream, authority: Authority, slots: trio.CapacityLimiter
) -> None:
    send_lock = trio.Lock()
    idle = authority.config.dns.tcp_idle_timeout

    async def send(reply: bytes) -> None:
        async with send_lock:
            await stream.send_all(struct.pack("!H", len(reply)) + reply)

    async def held(wire: bytes, service: str) -> None:
        reply = await authority.answer_held(wire, False, service)
        if reply is not None:
            await send(reply)

    try:
        async with trio.open_nursery() as nursery:
            buf = bytearray()
            while True:
                with trio.move_on_after(idle):
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    buf += data
                    while len(buf) >= 2:
                        (length,) = struct.unpack_from("!H", buf)
                        if len(buf) < 2 + length:
                            break
                        wire = bytes(buf[2 : 2 + length])
                        del buf[: 2 + length]
                        resp = authority.answer_now(wire, udp=False)
                        if resp.pending and resp.service is not None:
                            nursery.start_soon(held, wire, resp.service)
                        elif resp.reply is not None:
                            await send(resp.reply)
                    continue
                break  # idle timeout
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        slots.release_on_behalf_of(stream)
        await trio.aclose_forcefully(stream)
