"""Shared frontends: one listener for many services, each connection routed by name.

A ``[[frontend]]`` listens on its addresses; each connection it accepts is admitted under the
proxy's own caps (``max_connections``, per source), then read until its router decides
(:class:`~.hostroute.HostReader` for ``route = "host"``, :class:`~.sni.SniReader` for
``"sni"``), at most their byte bounds and ``proxy.first_data_timeout`` in all. A name that is
one of the DNS names of a service joining this frontend is routed: the connection goes on
exactly as one to that service's own front does (:meth:`~.course.Course._handle`: the wake,
the hold while booting, the buffer caps, the retries, activity), to the instance port the
service named for this frontend, with every byte read so far replayed first (and a PROXY v2
header before them when the service asks for one). A ClientHello without a server name goes
to the frontend's ``default`` service, if it has one.

Anything else is closed and counted in :attr:`SharedFronts.closed` by ``(frontend, reason)``
(:data:`REASONS`), never a boot: on a ``host`` frontend after a ``421`` (a name not routed
here) or a ``400`` (not an HTTP request with one valid ``Host``) response, as an HTTP server
would answer; on an ``sni`` frontend at once. Routed connections are counted in
:attr:`SharedFronts.routed` by ``(frontend, service)``.

Reload: :meth:`SharedFronts.reconfigure` swaps the routing tables at once (a service that
joins or leaves a frontend, a ``default``); the listeners are those of the config the daemon
started with (a frontend added, dropped or moved takes a restart, logged as such).
"""

from __future__ import annotations

import collections
import logging
import os

import trio

from ..config import Config, Endpoint
from ..config.frontends import routes
from ..config.model import FrontendConfig
from ..logutil import LimitedLog
from ..net import bound_endpoint, fd_shortage, listen_tcp, serve
from ..slots import Slot
from .front import Proxy, _source
from .hostroute import HostReader
from .sni import SniReader, Verdict

log = logging.getLogger("jitlaunch.proxy")

#: Why a frontend closed a connection unrouted.
REASONS = ("unknown_name", "no_sni", "no_host", "bad_name", "not_http", "not_tls", "too_big",
           "timeout", "client", "max_connections", "max_per_source", "fds", "error")
#: The most a refusal's response may take to send.
ANSWER_TIMEOUT = 1.0
_RESPONSES = {
    421: b"HTTP/1.1 421 Misdirected Request\r\n",
    400: b"HTTP/1.1 400 Bad Request\r\n",
}
_READ = 4096
#: The most of a refused client's bytes read (and dropped) before the close.
_DRAIN = 65536


def _reason(verdict: Verdict, route: str) -> str:
    """A rejection's metric label (the readers' own reasons are finer, and for logs)."""
    if verdict.kind == "no_sni":
        return "no_sni"
    text = verdict.reason
    if text == "too big":
        return "too_big"
    if text in ("bad name", "a server_name that is not a host name"):
        return "bad_name"
    if text == "no Host":
        return "no_host"
    return "not_http" if route == "host" else "not_tls"


class _Ticket:
    __slots__ = ("slot",)

    def __init__(self, slot: Slot) -> None:
        self.slot = slot

    def release(self) -> None:
        self.slot.release()


class Frontend:
    """One ``[[frontend]]``: its settings and routing table (a reload replaces both), and its
    listeners."""

    def __init__(self, config: FrontendConfig, table: dict[str, tuple[str, int]]) -> None:
        self.config = config
        self.table = table
        self.listeners: list[trio.SocketListener] = []

    def __repr__(self) -> str:
        where = ", ".join(str(bound_endpoint(lst)) for lst in self.listeners)
        return f"<Frontend {self.config.name} {self.config.route} {where} {len(self.table)} names>"


class SharedFronts:
    """Start with ``await nursery.start(shared.serve)`` after the proxy; it reports the bound
    endpoints. Connections are the proxy's: its caps, its counters once routed."""

    def __init__(self, config: Config, proxy: Proxy) -> None:
        self.proxy = proxy
        self.frontends = {fe.name: Frontend(fe, routes(fe.name, config.services))
                          for fe in config.frontends}
        #: Connections routed, by ``(frontend, service)``.
        self.routed: collections.Counter[tuple[str, str]] = collections.Counter()
        #: Connections closed unrouted, by ``(frontend, reason)`` (see :data:`REASONS`).
        self.closed: collections.Counter[tuple[str, str]] = collections.Counter()
        self._log = LimitedLog(log)
        self._accepting = trio.CancelScope()

    def stop_accepting(self) -> None:
        """Close the listeners; connections already open carry on."""
        self._accepting.cancel()

    def reconfigure(self, config: Config) -> None:
        """Swap in ``config``'s routing tables, synchronously."""
        for fe in config.frontends:
            current = self.frontends.get(fe.name)
            if current is None or current.config.listen != fe.listen:
                log.warning("frontend %s: a new or moved frontend takes a restart", fe.name)
                continue
            current.config, current.table = fe, routes(fe.name, config.services)
        for name in set(self.frontends) - {fe.name for fe in config.frontends}:
            log.warning("frontend %s: removed from the config; it listens until a restart", name)
            self.frontends[name].table = {}

    async def serve(
        self, *, task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        bound: list[Endpoint] = []
        try:
            for fe in self.frontends.values():
                for ep in fe.config.listen:
                    lst = await listen_tcp(ep.host, ep.port, what=f"frontend {fe.config.name}")
                    fe.listeners.append(lst)
                    bound.append(bound_endpoint(lst))
            async with trio.open_nursery() as connections:
                with self._accepting:
                    async with trio.open_nursery() as accepting:
                        for fe in self.frontends.values():
                            for lst in fe.listeners:
                                accepting.start_soon(self._accept_loop, fe, lst, connections)
                        if bound:
                            log.info("frontends on %s", ", ".join(map(str, bound)))
                        task_status.started(bound)
                self._close_listeners()
        finally:
            self._close_listeners()

    def _close_listeners(self) -> None:
        for fe in self.frontends.values():
            for lst in fe.listeners:
                lst.socket.close()

    async def _accept_loop(
        self, fe: Frontend, listener: trio.SocketListener, nursery: trio.Nursery
    ) -> None:
        def admit(stream: trio.SocketStream) -> _Ticket | None:
            slot = self.proxy.slots.take(_source(stream))
            if slot is None:
                full = self.proxy.slots.in_use >= self.proxy.slots.total
                self._close(fe, "max_connections" if full else "max_per_source")
                return None
            return _Ticket(slot)

        async def handler(stream: trio.SocketStream, ticket: _Ticket) -> None:
            await self._connection(fe, stream)

        def failed(ticket: _Ticket, exc: Exception) -> None:
            self._close(fe, "fds" if fd_shortage(exc) else "error", repr(exc))

        await serve(listener, admit, handler, what=f"frontend {fe.config.name}", log=self._log,
                    on_failure=failed, handlers=nursery)

    def _close(self, fe: Frontend, reason: str, detail: str = "") -> None:
        self.closed[(fe.config.name, reason)] += 1
        level = logging.INFO if reason in ("timeout", "client") else logging.WARNING
        self._log.log(level, f"{reason}:{fe.config.name}", "frontend %s: connection closed "
                      "unrouted (%s)%s", fe.config.name, reason, f": {detail}" if detail else "")

    async def _connection(self, fe: Frontend, stream: trio.SocketStream) -> None:
        route = fe.config.route
        reader = HostReader() if route == "host" else SniReader()
        verdict = await self._read(stream, reader)
        if verdict is None:
            self._close(fe, "timeout")
            return
        if verdict.kind == "more":  # the client closed (or reset) before a verdict
            self._close(fe, "client")
            return
        target = None
        if verdict.kind == "routed" and verdict.name is not None:
            target = fe.table.get(verdict.name)
            if target is None:
                self._close(fe, "unknown_name", verdict.name)
                await _answer(stream, route, 421)
                return
        elif verdict.kind == "no_sni" and fe.config.default is not None:
            target = next((t for t in fe.table.values() if t[0] == fe.config.default), None)
        if target is None:
            self._close(fe, _reason(verdict, route), verdict.reason)
            await _answer(stream, route, 400)
            return
        service, port = target
        self.routed[(fe.config.name, service)] += 1
        self.proxy.accepted[service] += 1
        await self.proxy._handle(stream, service, port, _source(stream), reader.buffered)

    async def _read(self, stream: trio.SocketStream, reader: HostReader | SniReader
                    ) -> Verdict | None:
        """Feed the router until it decides: its verdict; ``more`` if the client closed
        first; None past ``proxy.first_data_timeout``."""
        sock = stream.socket
        with trio.move_on_after(self.proxy.config.proxy.first_data_timeout):
            while True:
                # Plain non-blocking reads, waiting only on EAGAIN (receive_some would
                # checkpoint at every call: a task switch per connection).
                try:
                    data = os.read(sock.fileno(), _READ)
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_readable(sock)
                    except (trio.ClosedResourceError, OSError):
                        data = b""
                    else:
                        continue
                except OSError:
                    data = b""
                verdict = reader.feed(data) if data else Verdict("more")
                if verdict.kind != "more" or not data:
                    return verdict
        return None


async def _answer(stream: trio.SocketStream, route: str, status: int) -> None:
    """On a host frontend, the HTTP refusal a server would send (bounded); on sni, nothing."""
    if route != "host":
        return
    with trio.move_on_after(ANSWER_TIMEOUT):
        try:
            await stream.send_all(_RESPONSES[status] + b"Content-Length: 0\r\n"
                                  b"Connection: close\r\n\r\n")
            # A lingering close (RFC 9112 9.6): closing with the client's bytes unread would
            # reset the connection, and the reset may destroy the response before it is read.
            await stream.send_eof()
            drained = 0
            while drained < _DRAIN and (data := await stream.receive_some(_READ)):
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
