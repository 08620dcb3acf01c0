"""The proxy's front: listeners on every service's front addresses, admission, and each
connection from its accept to its close.

A connection to a service with no ready instance starts one, exactly as a lookup does. While
it boots, the client's first bytes are buffered, bounded three ways: ``proxy.max_buffer``
bytes per connection, ``proxy.max_pending`` waiting connections per service, and the
service's boot timeout. Once an instance is ready the proxy connects (at most
``proxy.max_connecting`` connects per service at once), replays the buffer (and the client's
EOF if it came already) and relays both ways (:mod:`.relay`).

A connect that is refused or fails, or an instance that resets the connection before sending
a byte, does not lose the client: the instance is reported to the supervisor (which checks it
at once and releases it if it is dead or hung), and the client is served by the instance
``acquire`` gives next, or by the same one once it accepts (a full listen backlog), with the
client's bytes replayed, until the service's boot timeout has passed since the first failure.
A connection the instance's kernel never accepted (a full listen backlog: our bytes stay
unacknowledged) is reset and connected again the same way, without a report.

Admission: at most ``max_connections`` connections are open at once, and at most
``max_connections_per_source`` from one source address (IPv6: one /64); past either, a new
connection is closed at once. Every connection the proxy closes without serving it, or ends
on a timer, is counted in :attr:`Proxy.closed` by ``(service, reason)`` and logged (rate
limited). No exception from one connection reaches the daemon: each connection's task ends
only itself.

Reload (:meth:`Proxy.bind_fronts`, then :meth:`Proxy.reconfigure`): the fronts a new config
adds are bound first (a failure fails the reload, nothing changed); then, synchronously, the
fronts it drops are closed (their open connections carry on), the new ones start accepting,
a front that moved to another service serves that one from its next connection, and the
``[proxy]`` settings apply to connections accepted from then on.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import logging
import socket
from collections.abc import Callable, Hashable

import trio

from ..config import Config, Endpoint
from ..fdlimit import FDS_PER_CONNECTION, default_max_connections, nofile_limit, reserve
from ..logutil import LimitedLog
from ..net import bound_endpoint, fd_shortage, listen_tcp, serve
from ..slots import Slot, Slots
from .course import TIMERS, Course, Instances
from .pipes import PipePool
from .relay import Timeouts

log = logging.getLogger("jitlaunch.proxy")



class Proxy(Course):
    """Start with ``await nursery.start(proxy.serve)``; it reports the bound front endpoints.

    ``fd_limit`` (default: the process's soft RLIMIT_NOFILE now) sets the defaults of the
    connection caps, see :mod:`jitlaunch.fdlimit`.
    """

    def __init__(
        self, config: Config, supervisor: Instances, fd_limit: int | None = None, *,
        on_held: Callable[[str, float], None] | None = None,
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.fd_limit = nofile_limit() if fd_limit is None else fd_limit
        #: Connections open now (admitted, not yet closed), in all and by source address
        #: (an IPv6 client by its /64); the caps are set by _apply_settings.
        self.slots = Slots(0, 0)
        self._apply_settings(config)
        #: Splice pipes: one per two connections at most, so each costs 3 fds at most.
        self.pipes = PipePool(max(1, self.max_connections // 2))
        self.pending: collections.Counter[str] = collections.Counter()
        #: Bytes buffered now for connections waiting for a boot, all services together
        #: (bounded by ``proxy.max_buffer_total``).
        self.buffered = 0
        #: Connections the proxy closed, unserved or on a timer, by ``(service, reason)``.
        self.closed: collections.Counter[tuple[str, str]] = collections.Counter()
        #: Relays that ended, by ``(service, outcome)`` (see relay.OUTCOMES).
        self.ended: collections.Counter[tuple[str, str]] = collections.Counter()
        #: Connects retried after a failure or a reset before the instance answered.
        self.retries: collections.Counter[str] = collections.Counter()
        #: Connections accepted (admitted or refused at a cap), by service.
        self.accepted: collections.Counter[str] = collections.Counter()
        #: Bytes relayed by ``(service, direction)`` (``to_instance``, ``to_client``), counted
        #: when each relay ends.
        self.bytes: collections.Counter[tuple[str, str]] = collections.Counter()
        #: Called with ``(service, seconds)`` when a connection held for a boot is released
        #: to its instance (the metrics' hold histogram).
        self.on_held = on_held
        self.accept_errors = 0
        self._log = LimitedLog(log)
        self._connecting: dict[str, trio.CapacityLimiter] = {}
        self._accepting = trio.CancelScope()
        #: Fronts systemd bound (socket activation), by (service, address, port).
        self.passed: dict[tuple[str, str, int], socket.socket] = {}
        #: The fronts listening now, by (address, port).
        self.fronts: dict[tuple[str, int], Front] = {}
        #: The fronts systemd passed (a reload must not drop them), by (address, port).
        self.passed_fronts: set[tuple[str, int]] = set()
        self._accept_nursery: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None

    def _apply_settings(self, config: Config) -> None:
        pc = config.proxy
        dns_tcp = config.dns.max_tcp_connections
        self.max_connections = pc.max_connections or default_max_connections(self.fd_limit, dns_tcp)
        self.max_per_source = pc.max_connections_per_source or max(1, self.max_connections // 8)
        self.slots.total, self.slots.per_key = self.max_connections, self.max_per_source
        self.timeouts = Timeouts(
            first_data=pc.first_data_timeout,
            answer=pc.answer_timeout,
            idle=pc.idle_timeout,
            half_close=pc.half_close_timeout,
        )

    def stop_accepting(self) -> None:
        """Close the front listeners; connections already open carry on."""
        self._accepting.cancel()

    async def bind_fronts(self, config: Config) -> dict[tuple[str, int], trio.SocketListener]:
        """Bind the fronts of ``config`` that are not listening now (the first step of a
        reload). Raises ListenError, with every one bound here closed again, if one fails."""
        bound: dict[tuple[str, int], trio.SocketListener] = {}
        try:
            for svc in config.services:
                for addr in svc.front:
                    for port in svc.ports:
                        if (addr, port) not in self.fronts and (addr, port) not in bound:
                            bound[(addr, port)] = await listen_tcp(addr, port, what="the proxy")
        except BaseException:
            for lst in bound.values():
                lst.socket.close()
            raise
        return bound

    def reconfigure(
        self, config: Config, bound: dict[tuple[str, int], trio.SocketListener]
    ) -> None:
        """Switch to ``config`` synchronously, with the listeners :meth:`bind_fronts` bound
        for it: close the fronts it drops, start accepting on the new ones."""
        owners = {(a, p): s.name for s in config.services for a in s.front for p in s.ports}
        self.config = config
        self._apply_settings(config)
        self.pipes.limit = max(1, self.max_connections // 2)
        for limiter in self._connecting.values():  # (made from the old max_connecting)
            limiter.total_tokens = config.proxy.max_connecting
        for key, front in list(self.fronts.items()):
            if key in owners:
                front.service = owners[key]
            else:
                del self.fronts[key]
                front.close()
        for (addr, port), listener in bound.items():
            front = self.fronts[(addr, port)] = Front(owners[(addr, port)], port, listener)
            if self._accept_nursery is not None and self._connections is not None:
                self._accept_nursery.start_soon(self._accept_loop, front, self._connections)
            else:  # not serving (yet, or any more)
                front.close()
                del self.fronts[(addr, port)]

    async def serve(
        self, *, task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            for svc in self.config.services:
                for addr in svc.front:
                    for port in svc.ports:
                        given = self.passed.pop((svc.name, addr, port), None)
                        if given is not None:
                            self.passed_fronts.add((addr, port))
                        listener = (
                            trio.SocketListener(trio.socket.from_stdlib_socket(given))
                            if given is not None else await listen_tcp(addr, port, what="the proxy")
                        )
                        self.fronts[(addr, port)] = Front(svc.name, port, listener)
            bound = [bound_endpoint(f.listener) for f in self.fronts.values()]
            self._log_limits()
            async with trio.open_nursery() as connections:
                with self._accepting:
                    async with trio.open_nursery() as accepting:
                        self._accept_nursery, self._connections = accepting, connections
                        for front in self.fronts.values():
                            accepting.start_soon(self._accept_loop, front, connections)
                        accepting.start_soon(trio.sleep_forever)  # a reload may add fronts
                        if bound:
                            log.info("proxy on %s", ", ".join(str(b) for b in bound))
                        task_status.started(bound)
                self._accept_nursery = None
                for front in self.fronts.values():
                    front.close()
        finally:
            self._accept_nursery = self._connections = None
            for front in self.fronts.values():
                front.close()
            self.fronts.clear()
            self.pipes.close()

    def _log_limits(self) -> None:
        if not self.config.services:
            return
        fits = (self.fd_limit - reserve(self.fd_limit, self.config.dns.max_tcp_connections))
        fits //= FDS_PER_CONNECTION
        log.info(
            "proxy: at most %d connections, %d per source (open file limit %d)",
            self.max_connections, self.max_per_source, self.fd_limit,
        )
        if self.max_connections > fits:
            log.warning(
                "proxy.max_connections = %d is more than the open file limit of %d allows "
                "(about %d); past that, connections fail instead of being refused cleanly",
                self.max_connections, self.fd_limit, fits,
            )

    # ---- admission -------------------------------------------------------------------

    @property
    def open(self) -> int:
        """Connections open now (admitted, not yet closed)."""
        return self.slots.in_use

    @property
    def by_source(self) -> dict[Hashable, int]:
        """Open connections by source address (an IPv6 client by its /64)."""
        return self.slots.by_key

    async def _accept_loop(self, front: Front, nursery: trio.Nursery) -> None:
        with front.scope:
            await serve(
                front.listener, functools.partial(self._admit, front), self._connection,
                what=f"proxy for {front.service}", log=self._log, on_failure=self._failed,
                on_accept_error=self._accept_failed, handlers=nursery,
            )

    def _accept_failed(self, exc: OSError) -> None:
        self.accept_errors += 1

    def _admit(self, front: Front, stream: trio.SocketStream) -> _Client | None:
        """Count the connection for its front's service (a reload may have given the front to
        another), then admit it under the caps or close it with the cap's reason."""
        service = front.service
        self.accepted[service] += 1
        source = _source(stream)
        slot = self.slots.take(source)
        if slot is None:
            full = self.slots.in_use >= self.slots.total
            self._close(service, "max_connections" if full else "max_per_source")
            return None
        return _Client(service, front.port, source, slot)

    def _failed(self, client: _Client, exc: Exception) -> None:
        service = client.service
        if fd_shortage(exc):
            self._close(service, "fds", str(exc))
        else:
            self.closed[(service, "error")] += 1
            self._log.error(
                f"error:{service}", "proxy: %s connection failed: %r", service, exc, exc_info=exc,
            )

    def _close(self, service: str, reason: str, detail: str = "") -> None:
        self.closed[(service, reason)] += 1
        level = logging.INFO if reason in TIMERS else logging.WARNING
        what = "closed on a timer" if reason in TIMERS else "closed unserved"
        self._log.log(
            level, f"{reason}:{service}", "proxy: %s connection %s (%s)%s", service, what, reason,
            f": {detail}" if detail else "",
        )

    # ---- one connection --------------------------------------------------------------

    async def _connection(self, client: trio.SocketStream, conn: _Client) -> None:
        """One connection's task (run by :func:`jitlaunch.net.serve`, which counts what it
        raises, releases its slot and closes the client)."""
        await self._handle(client, conn.service, conn.port, conn.source)

class Front:
    """A front listener: the service it serves (a reload may change it) and its port."""

    def __init__(self, service: str, port: int, listener: trio.SocketListener) -> None:
        self.service = service
        self.port = port
        self.listener = listener
        self.scope = trio.CancelScope()

    def close(self) -> None:
        """Stop accepting and close the socket now (the accept task is cancelled first, so it
        never sees the socket closed under it)."""
        self.scope.cancel()
        self.listener.socket.close()

    def __repr__(self) -> str:
        where = bound_endpoint(self.listener) if self.listener.socket.fileno() >= 0 else "closed"
        return f"<Front {where} {self.service}>"


class _Client:
    """An admitted connection: its service and front port, its source, its slot."""

    __slots__ = ("port", "service", "slot", "source")

    def __init__(self, service: str, port: int, source: str, slot: Slot) -> None:
        self.service, self.port, self.source, self.slot = service, port, source, slot

    def release(self) -> None:
        self.slot.release()


def _source(stream: trio.SocketStream) -> str:
    """The key a connection is counted under for the per-source cap."""
    try:
        addr = stream.socket.getpeername()[0]
    except OSError:
        return ""
    if ":" in addr:
        return str(ipaddress.IPv6Network(f"{addr.split('%')[0]}/64", strict=False))
    return str(addr)
