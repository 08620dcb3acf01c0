"""One DNS-over-TCP connection (RFC 7766): two-byte length framing, several queries per
connection, held ``wait`` answers sent as they complete (out of order, which section 6.2.1
allows).

The bounds, all from ``[dns]``: a message must arrive whole within ``tcp_message_timeout`` of
its first byte (else :class:`SlowQuery`); each reply must be taken by the client within the
same time (else :class:`SlowReader`); an idle connection is closed after ``tcp_idle_timeout``,
shortened to :data:`BUSY_IDLE_TIMEOUT` while the listener is busy (:meth:`Slots.idle`); at most
``max_held_per_connection`` answers are held for one connection, and past the server's held
bounds the connection stops reading until one completes. The session buffers at most one
whole message (65,537 bytes) plus :data:`TCP_READ_AHEAD`.

What it raises is the connection's end, classified by :meth:`DnsServer._connection_failed`.
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from typing import Protocol

import trio

from ..config import Config
from ..slots import Slot, Slots
from .authority import Authority
from .querylog import QueryLog

#: Bytes asked of a TCP stream per receive beyond the rest of the message being read.
TCP_READ_AHEAD = 4096
#: The idle timeout of a DNS-over-TCP connection while more than half of
#: ``max_tcp_connections`` are open (NSD's, under the same condition).
BUSY_IDLE_TIMEOUT = 0.2


class SlowQuery(Exception):
    """A TCP query did not arrive whole within ``tcp_message_timeout`` of its first byte."""


class SlowReader(Exception):
    """The client did not take a reply within ``tcp_message_timeout``."""


class TcpServer(Protocol):
    """What a session needs of its server (jitlaunch.dns.server.DnsServer)."""

    config: Config
    authority: Authority
    query_log: QueryLog
    tcp_slots: Slots
    counts: Counter[str]

    def prefix_of(self, host: str) -> str: ...

    def unhold(self, source: str, service: str) -> None: ...

    async def wait_held_slot(self, source: str, service: str) -> None: ...

    def client_fault(self, key: str, msg: str, *args: object) -> None: ...


class TcpClient:
    """An admitted connection: where it comes from and its slot."""

    __slots__ = ("slot", "source")

    def __init__(self, source: str, slot: Slot) -> None:
        self.source, self.slot = source, slot

    def release(self) -> None:
        self.slot.release()


class TcpSession:
    """The queries and replies of one connection; :meth:`run` until it ends."""

    def __init__(self, server: TcpServer, stream: trio.SocketStream, client: TcpClient) -> None:
        self.server = server
        self.stream = stream
        self.source = client.source
        self.slot = client.slot
        self.prefix = server.prefix_of(client.source)
        self.dns = server.config.dns
        self._send_lock = trio.Lock()
        self._held_here = trio.Semaphore(self.dns.max_held_per_connection)

    async def send(self, reply: bytes) -> None:
        async with self._send_lock:
            with trio.move_on_after(self.dns.tcp_message_timeout) as scope:
                await self.stream.send_all(struct.pack("!H", len(reply)) + reply)
            if scope.cancelled_caught:
                raise SlowReader

    async def _held(self, wire: bytes, service: str) -> None:
        server, qlog = self.server, self.server.query_log
        start = time.perf_counter()
        try:
            reply = (await server.authority.answer_held(wire, False, service, self.source)).reply
        finally:
            server.unhold(self.prefix, service)
            self._held_here.release()
        if qlog.enabled:
            qlog.query(wire, reply, "tcp", self.source, time.perf_counter() - start)
        if reply is not None:
            await self.send(reply)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            buf = bytearray()
            # When the first byte of the partial message in ``buf`` arrived (or, if replies
            # were sent since, when we were ready to read again).
            started = 0.0
            while True:
                data = await self._receive(buf, started)
                if not data:
                    break
                if not buf:
                    started = trio.current_time()
                buf += data
                if await self._answer_whole(buf, nursery):
                    # The rest of ``buf`` came in the data just read; time spent answering
                    # (a slow reader, a full held bound) is not the client's to pay for.
                    started = trio.current_time()
            # Idle or at EOF: the nursery still sends the held answers as they complete.

    async def _receive(self, buf: bytearray, started: float) -> bytes | None:
        """The next bytes; empty or None when the connection ends quietly (EOF, idle)."""
        want = TCP_READ_AHEAD
        if len(buf) >= 2:
            want = max(want, 2 + struct.unpack_from("!H", buf)[0] - len(buf))
        data: bytes | None = None
        if buf:
            with trio.move_on_at(started + self.dns.tcp_message_timeout):
                data = await self.stream.receive_some(want)
            if data is None:
                raise SlowQuery
            return data
        # Idle: shortened while the server is busy (see Slots.idle), so that connections
        # asking for a query now and then cannot keep every slot.
        with self.server.tcp_slots.idle(self.slot, self.dns.tcp_idle_timeout):
            data = await self.stream.receive_some(want)
        if data is None:
            if self.slot.idle_shortened:
                self.server.client_fault("tcp_idle_busy", "DNS over TCP is busy: closing "
                                          "connections idle for %g s", BUSY_IDLE_TIMEOUT)
            else:
                self.server.counts["tcp_idle"] += 1
        return data

    async def _answer_whole(self, buf: bytearray, nursery: trio.Nursery) -> bool:
        """Answer every whole message at the front of ``buf`` (removing it); whether any."""
        server, qlog = self.server, self.server.query_log
        answered = False
        while len(buf) >= 2:
            (length,) = struct.unpack_from("!H", buf)
            if len(buf) < 2 + length:
                break
            wire = bytes(buf[2 : 2 + length])
            del buf[: 2 + length]
            answered = True
            start = time.perf_counter() if qlog.enabled else 0.0
            resp = server.authority.answer_now(wire, udp=False, source=self.source)
            if qlog.enabled and not resp.pending:
                qlog.query(wire, resp.reply, "tcp", self.source, time.perf_counter() - start)
            if resp.internal_error:  # logged where it happened
                server.counts["internal_error"] += 1
            if resp.pending and resp.service is not None:
                # Past a bound, stop reading until a held answer completes.
                await self._held_here.acquire()
                await server.wait_held_slot(self.prefix, resp.service)
                nursery.start_soon(self._held, wire, resp.service)
            elif resp.reply is not None:
                await self.send(resp.reply)
        return answered
