"""The DNS servers: thin trio UDP and TCP loops around the :class:`Authority`.

UDP answers each datagram in the receive loop; a query held for a ``wait`` service is moved to
its own task so the loop never blocks. TCP follows RFC 7766: two-byte length framing, several
queries per connection, held answers sent as they complete (out of order, which section 6.2.1
allows).

Everything here faces the internet, so every bound is explicit (all in ``[dns]``):

* TCP: at most ``max_tcp_connections`` open, ``max_tcp_connections_per_source`` from one
  source prefix (RFC 7766 section 10; the prefixes of ``[dns.rrl]``, /24 and /56 by default,
  so that one host cannot hold every slot through many of its addresses); more are closed at
  once (:mod:`jitlaunch.slots`). A connection is closed after ``tcp_idle_timeout`` without a
  query, or :data:`BUSY_IDLE_TIMEOUT` once more than half the connections are in use (as NSD
  does), when a query has not arrived whole within
  ``tcp_message_timeout`` of its first byte (a byte every few seconds must not hold a slot
  for ever), or when a reply is not taken by the client within ``tcp_message_timeout``.
  A connection buffers at most one whole message plus :data:`TCP_READ_AHEAD` bytes.
* UDP replies: response rate limiting per source prefix and response identity
  (``[dns.rrl]``, :mod:`.rrl`).
* Held ``wait`` answers: at most ``max_held`` at once over UDP and TCP together,
  ``max_held_per_source`` for one source prefix and ``max_held_per_service`` for one service
  (past any of these a UDP query is dropped, a TCP connection stops reading until there is
  room), and ``max_held_per_connection`` on one TCP connection (past it the connection stops
  reading).

No exception from one datagram or one connection reaches the serving nursery: each task
catches at its top, counts the event in :attr:`DnsServer.counts`, logs it through a
:class:`LimitedLog` (a flood costs one line per kind per interval) and drops that datagram or
connection alone. A client going away (reset, close without reading) is counted, not logged
as an error; anything else is an internal error, logged with its traceback (rate-limited).
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Iterator

import trio

from ..config import Config, Endpoint
from ..errors import ListenError
from ..logutil import LimitedLog
from ..net import listen_error, peer_host, serve
from ..slots import Slots, source_prefix
from .authority import Authority, Services
from .querylog import QueryLog
from .rrl import RateLimiter, Verdict, truncated
from .tcp import BUSY_IDLE_TIMEOUT, SlowQuery, SlowReader, TcpClient, TcpSession

log = logging.getLogger("jitlaunch.dns")

#: Datagrams answered per wake-up before other tasks get a turn.
UDP_BATCH = 64
#: What a client going away looks like from our side of a stream.
_CLIENT_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


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


def _adopt(udp: socket.socket, tcp: socket.socket) -> tuple[socket.socket, trio.socket.SocketType]:
    """A (udp, tcp) pair systemd bound, as :func:`_bind_pair` returns one."""
    udp.setblocking(False)
    return udp, trio.socket.from_stdlib_socket(tcp)


def _bind(sock: socket.socket, host: str, port: int, proto: str) -> None:
    try:
        sock.bind((host, port))  # a numeric address: never blocks
    except OSError as exc:
        raise listen_error(f"DNS over {proto}", host, port, exc) from exc




class DnsServer:
    """DNS over UDP and TCP on every ``dns.listen`` endpoint.

    Start it with ``endpoints = await nursery.start(server.serve)``. :attr:`counts` counts
    what clients made us do besides answering (``tcp_reset``, ``tcp_slow_query``,
    ``tcp_slow_reader``, ``tcp_refused``, ``tcp_refused_source``, ``tcp_idle``,
    ``tcp_idle_busy``, ``held_dropped``, ``held_dropped_source``, ``held_dropped_service``,
    ``held_waited`` (a TCP query past a held-answer bound, not read on until there is room),
    ``udp_receive_error``, ``udp_send_error``, ``rrl_slipped``, ``rrl_dropped``) and
    ``internal_error``, which must stay 0.
    """

    def __init__(self, config: Config, supervisor: Services, *, counting: bool = True) -> None:
        """``counting``: count queries by type and rcode (off when nobody reads them)."""
        self.config = config
        self.authority = Authority(config, supervisor, counting=counting)
        self.counts: Counter[str] = Counter()
        self.rrl = RateLimiter(config.dns.rrl)
        #: Open DNS-over-TCP connections, in total and by source prefix.
        self.tcp_slots = Slots(
            config.dns.max_tcp_connections, config.dns.max_tcp_connections_per_source,
            BUSY_IDLE_TIMEOUT,
        )
        #: Held ``wait`` answers, UDP and TCP together, bounded by ``dns.max_held``, and by
        #: source prefix and service (``max_held_per_source``, ``max_held_per_service``).
        self.held = 0
        self.held_by_source: dict[str, int] = {}
        self.held_by_service: dict[str, int] = {}
        self._held_free = trio.Event()
        self._log = LimitedLog(log)
        #: The debug log of queries (rate-limited; see :mod:`.querylog`).
        self.query_log = QueryLog(config.daemon.query_log_rate)
        self.endpoints: list[Endpoint] = []
        #: Socket activation: one (udp, tcp) pair per ``dns.listen`` endpoint, bound by systemd.
        self.passed: list[tuple[socket.socket, socket.socket]] | None = None

    def reconfigure(self, config: Config) -> None:
        """Serve ``config`` from now on (a reload), synchronously: the authority's catalog,
        every ``[dns]`` bound (read per query or connection), RRL (its counts start again
        when ``[dns.rrl]`` changed) and the query log's rate. ``dns.listen`` is not
        rebound: a reload that changes it is refused before this."""
        old = self.config
        self.config = config
        self.authority.reconfigure(config)
        if config.dns.rrl != old.dns.rrl:
            self.rrl = RateLimiter(config.dns.rrl)
        if config.daemon.query_log_rate != old.daemon.query_log_rate:
            self.query_log = QueryLog(config.daemon.query_log_rate)
            self.query_log.refresh()

    @property
    def tcp_connections(self) -> int:
        """Open DNS-over-TCP connections."""
        return self.tcp_slots.in_use

    def prefix_of(self, host: str) -> str:
        rrl = self.config.dns.rrl
        return source_prefix(host, rrl.ipv4_prefix, rrl.ipv6_prefix)

    def __repr__(self) -> str:
        where = ", ".join(str(e) for e in self.endpoints) or "unbound"
        return f"<DnsServer {where} tcp={self.tcp_connections} held={self.held}>"

    async def serve(
        self, *, task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled.

        Binds first, then reports the bound endpoints (with real ports when 0 was configured)
        through ``task_status``. Raises ListenError if an endpoint cannot be bound.
        """
        dns = self.config.dns
        pairs: list[tuple[socket.socket, trio.socket.SocketType]] = []
        self.query_log.refresh()
        try:
            for ep in dns.listen:
                pairs.append(_bind_pair(ep) if self.passed is None else _adopt(*self.passed[len(pairs)]))
            self.endpoints = [
                Endpoint(ep.host, udp.getsockname()[1])
                for ep, (udp, _) in zip(dns.listen, pairs, strict=True)
            ]
            async with trio.open_nursery() as nursery:
                for udp, tcp in pairs:
                    nursery.start_soon(self._serve_udp, udp)
                    nursery.start_soon(self._serve_tcp, trio.SocketListener(tcp))
                log.info("DNS on %s (UDP and TCP)", ", ".join(str(b) for b in self.endpoints))
                task_status.started(self.endpoints)
        finally:
            for udp, tcp in pairs:
                udp.close()
                tcp.close()

    # ---- faults -------------------------------------------------------------------------

    def _internal_error(self, where: str, exc: BaseException) -> None:
        self.counts["internal_error"] += 1
        self._log.log(
            logging.ERROR, "internal_error", "DNS: internal error in %s: %r", where, exc,
            exc_info=True,
        )

    def _connection_failed(self, client: TcpClient, exc: Exception) -> None:
        """Count and log why a TCP connection ended with ``exc``: the client's doing, or ours."""
        leaves = list(_leaves(exc))
        if all(isinstance(e, SlowReader) for e in leaves):
            self.client_fault("tcp_slow_reader", "a DNS-over-TCP client did not read its replies")
        elif all(isinstance(e, SlowQuery) for e in leaves):
            self.client_fault("tcp_slow_query", "a DNS-over-TCP query did not arrive in time")
        elif all(isinstance(e, (_CLIENT_GONE, SlowReader, SlowQuery)) for e in leaves):
            self.client_fault("tcp_reset", "a DNS-over-TCP client went away: %s", leaves[0])
        else:
            self._internal_error("a DNS-over-TCP connection", exc)

    def client_fault(self, key: str, msg: str, *args: object) -> None:
        self.counts[key] += 1
        self._log.log(logging.INFO, key, "DNS: " + msg, *args)

    # ---- UDP ----------------------------------------------------------------------------

    async def _serve_udp(self, sock: socket.socket) -> None:
        # Datagrams are taken in batches with plain non-blocking calls and one wait per batch:
        # trio's checkpoint in every socket call would cost more than a cached answer does.
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(sock)
                # The time for RRL (off, it costs nothing): one reading per batch is enough.
                now = trio.current_time() if self.rrl.enabled else 0.0
                for _ in range(UDP_BATCH):
                    try:
                        wire, addr = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    except OSError as exc:  # e.g. ECONNREFUSED from an earlier ICMP error
                        self.client_fault("udp_receive_error", "UDP receive error: %s", exc)
                        continue
                    try:
                        blocked = self._udp_datagram(sock, wire, addr, nursery, now)
                        if blocked is not None:  # send buffer full: wait once, then give up
                            await trio.lowlevel.wait_writable(sock)
                            self._sendto(sock, blocked, addr)
                    except Exception as exc:
                        self._internal_error("a UDP query", exc)

    def _udp_datagram(
        self, sock: socket.socket, wire: bytes, addr: tuple[object, ...], nursery: trio.Nursery,
        now: float,
    ) -> bytes | None:
        """Answer one datagram, synchronously: a coroutine per packet would cost more than a
        cached answer does. Returns the reply if the send buffer was full (the caller waits
        for room once), else None. ``now``: the time for RRL."""
        qlog = self.query_log
        start = time.perf_counter() if qlog.enabled else 0.0
        resp = self.authority.answer_now(wire, udp=True, source=str(addr[0]))
        if qlog.enabled and not resp.pending:
            qlog.query(wire, resp.reply, "udp", addr[0], time.perf_counter() - start)
        if resp.internal_error:  # logged where it happened
            self.counts["internal_error"] += 1
        if resp.pending and resp.service is not None:
            source = self.prefix_of(str(addr[0]))
            full = self._held_full(source, resp.service)
            if full is not None:
                self.client_fault(full, "too many held answers (%s); dropping a UDP query",
                                   _HELD_BOUND[full])
                return None
            self._hold(source, resp.service)
            nursery.start_soon(self._udp_held, sock, wire, addr, source, resp.service)
        elif resp.reply is not None:
            return self._udp_send_now(sock, resp.reply, addr, resp.identity, now)
        return None

    async def _udp_held(
        self, sock: socket.socket, wire: bytes, addr: tuple[object, ...], source: str,
        service: str,
    ) -> None:
        try:
            start = time.perf_counter()
            try:
                resp = await self.authority.answer_held(wire, True, service, str(addr[0]))
            finally:
                self.unhold(source, service)
            reply = resp.reply
            if self.query_log.enabled:
                self.query_log.query(wire, reply, "udp", addr[0], time.perf_counter() - start)
            if reply is not None:
                blocked = self._udp_send_now(
                    sock, reply, addr, resp.identity, trio.current_time())
                if blocked is not None:
                    await trio.lowlevel.wait_writable(sock)
                    self._sendto(sock, blocked, addr)
        except Exception as exc:
            self._internal_error("a held UDP answer", exc)

    def _udp_send_now(
        self, sock: socket.socket, reply: bytes, addr: tuple[object, ...], identity: int,
        now: float,
    ) -> bytes | None:
        """Send ``reply`` (of RRL ``identity``, at time ``now``) unless response rate
        limiting says otherwise; returns what is left to send when the socket's send buffer
        is full (the caller waits for room once)."""
        rrl = self.rrl
        if rrl.enabled:  # off (rate = 0) costs not even the address string
            verdict = rrl.check(str(addr[0]), now, identity)
            if verdict is Verdict.DROP:
                self.counts["rrl_dropped"] += 1
                return None
            if verdict is Verdict.SLIP:
                self.counts["rrl_slipped"] += 1
                reply = truncated(reply)
        try:
            sock.sendto(reply, addr)
        except BlockingIOError:
            return reply
        except OSError as exc:
            self.client_fault("udp_send_error", "UDP send failed: %s", exc)
        return None

    def _sendto(self, sock: socket.socket, reply: bytes, addr: tuple[object, ...]) -> None:
        """The second and last try at a reply the send buffer had no room for."""
        try:
            sock.sendto(reply, addr)
        except OSError as exc:
            self.client_fault("udp_send_error", "UDP send failed: %s", exc)

    # ---- held answers -------------------------------------------------------------------

    def _held_full(self, source: str, service: str) -> str | None:
        """None if one more answer may be held for ``source`` (a prefix) and ``service``,
        else the counter of the bound it would pass."""
        dns = self.config.dns
        if self.held >= dns.max_held:
            return "held_dropped"
        if self.held_by_source.get(source, 0) >= dns.max_held_per_source:
            return "held_dropped_source"
        if self.held_by_service.get(service, 0) >= dns.max_held_per_service:
            return "held_dropped_service"
        return None

    def _hold(self, source: str, service: str) -> None:
        self.held += 1
        self.held_by_source[source] = self.held_by_source.get(source, 0) + 1
        self.held_by_service[service] = self.held_by_service.get(service, 0) + 1

    def unhold(self, source: str, service: str) -> None:
        self.held -= 1
        for counts, key in ((self.held_by_source, source), (self.held_by_service, service)):
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]
        self._held_free.set()
        self._held_free = trio.Event()

    async def wait_held_slot(self, source: str, service: str) -> None:
        full = self._held_full(source, service)
        if full is not None:  # counted once per query that has to wait, logged once
            self.client_fault("held_waited", "too many held answers (%s); a TCP connection "
                               "waits", _HELD_BOUND[full])
        while self._held_full(source, service) is not None:
            await self._held_free.wait()
        self._hold(source, service)

    # ---- TCP ----------------------------------------------------------------------------

    async def _serve_tcp(self, listener: trio.SocketListener) -> None:
        await serve(listener, self._admit_tcp, self._tcp_session, what="DNS over TCP",
                    log=self._log, on_failure=self._connection_failed,
                    on_accept_error=self._accept_failed)

    def _accept_failed(self, exc: OSError) -> None:
        self.counts["tcp_accept_error"] += 1

    def _admit_tcp(self, stream: trio.SocketStream) -> TcpClient | None:
        dns = self.config.dns
        source = peer_host(stream)
        if source is None:  # reset before we looked
            self.counts["tcp_reset"] += 1
            return None
        slots = self.tcp_slots
        slots.total, slots.per_key = dns.max_tcp_connections, dns.max_tcp_connections_per_source
        prefix = self.prefix_of(source)
        slot = slots.take(prefix)
        if slot is None:
            if slots.refusal == "total":
                self.client_fault("tcp_refused", "too many TCP connections; closing a new one")
            else:
                self.client_fault(
                    "tcp_refused_source", "too many TCP connections from one source "
                    "prefix; closing a new one from %s", prefix,
                )
            return None
        return TcpClient(source, slot)

    async def _tcp_session(self, stream: trio.SocketStream, client: TcpClient) -> None:
        await TcpSession(self, stream, client).run()


#: The ``[dns]`` key behind each held-answer counter, for the log.
_HELD_BOUND = {
    "held_dropped": "max_held", "held_dropped_source": "max_held_per_source",
    "held_dropped_service": "max_held_per_service",
}


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc
