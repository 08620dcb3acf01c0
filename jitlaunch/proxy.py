"""The trio TCP proxy in front of every service.

Each service listens on its front address and ports. A connection to a service with no ready
instance starts one, exactly as a lookup does. While it boots, the client's first bytes are
buffered, bounded three ways: ``proxy.max_buffer`` bytes per connection, ``proxy.max_pending``
waiting connections per service, and the service's boot timeout. Past a bound, or when the
boot fails, the connection is closed and counted in :attr:`Proxy.closed`. Once the instance
is ready the proxy connects, replays the buffer (and the client's EOF if it came already),
and copies both ways: a FIN is passed on as a half-close, and a slow reader slows the writer
down because each chunk is fully sent before the next one is read (no unbounded buffering).
Every chunk counts as activity for the service; an open connection keeps it from idling.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import socket

import trio

from .config import Config, Endpoint
from .errors import BootFailed, listen_error
from .lifecycle.state import State
from .lifecycle.supervisor import Instance, Supervisor

log = logging.getLogger("jitlaunch.proxy")

#: Bytes moved per splice(2) call: the pipe between the two sockets is made this large.
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class Proxy:
    """Start with ``await nursery.start(proxy.serve)``; it reports the bound front endpoints."""

    def __init__(self, config: Config, supervisor: Supervisor) -> None:
        self.config = config
        self.supervisor = supervisor
        self.pending: collections.Counter[str] = collections.Counter()
        #: Connections closed without being served, by ``(service, reason)``.
        self.closed: collections.Counter[tuple[str, str]] = collections.Counter()
        self._accepting = trio.CancelScope()

    def stop_accepting(self) -> None:
        """Close the front listeners; connections already open carry on."""
        self._accepting.cancel()

    async def serve(
        self, *, task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners: list[tuple[str, int, trio.SocketListener]] = []
        try:
            for svc in self.config.services:
                for addr in svc.front:
                    for port in svc.ports:
                        listeners.append((svc.name, port, await _listen(addr, port)))
            bound = [_endpoint(lst) for _, _, lst in listeners]
            async with trio.open_nursery() as connections:
                with self._accepting:
                    async with trio.open_nursery() as accepting:
                        for name, port, lst in listeners:
                            accepting.start_soon(self._accept_loop, lst, name, port, connections)
                        if bound:
                            log.info("proxy on %s", ", ".join(str(b) for b in bound))
                        task_status.started(bound)
                for _, _, lst in listeners:
                    await lst.aclose()
        finally:
            for _, _, lst in listeners:
                with trio.CancelScope(shield=True):
                    await lst.aclose()

    async def _accept_loop(
        self, listener: trio.SocketListener, service: str, port: int, nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off briefly, keep serving
                log.warning("proxy accept for %s failed: %s", service, exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._connection, stream, service, port)

    def _close(self, service: str, reason: str) -> None:
        self.closed[(service, reason)] += 1

    async def _connection(self, client: trio.SocketStream, service: str, port: int) -> None:
        sup = self.supervisor
        sup.connection_opened(service)
        try:
            inst = sup.request(service)
            buffered = b""
            eof = False
            if inst is None:
                self._close(service, "backoff")
                return
            if inst.state is not State.READY:
                if self.pending[service] >= self.config.proxy.max_pending:
                    self._close(service, "pending")
                    return
                self.pending[service] += 1
                try:
                    got = await self._buffer_until_ready(client, service)
                finally:
                    self.pending[service] -= 1
                if got is None:
                    return
                inst, buffered, eof = got
            await self._relay(client, service, port, inst, buffered, eof)
        finally:
            sup.connection_closed(service)
            await trio.aclose_forcefully(client)

    async def _buffer_until_ready(
        self, client: trio.SocketStream, service: str
    ) -> tuple[Instance, bytes, bool] | None:
        limit = self.config.proxy.max_buffer
        svc = self.config.service(service)
        buf = bytearray()
        eof = False
        ready: Instance | None = None
        reason: str | None = None
        # The supervisor bounds the boot itself; this is only a safety net.
        with trio.move_on_after(svc.boot_timeout + 1) as timer:
            async with trio.open_nursery() as race:

                async def read() -> None:
                    nonlocal eof, reason
                    try:
                        while True:
                            data = await client.receive_some(limit - len(buf) + 1)
                            if not data:
                                eof = True
                                return  # keep waiting: the request may be complete
                            buf.extend(data)
                            if len(buf) > limit:
                                reason = "buffer"
                                break
                    except trio.BrokenResourceError:
                        reason = "client"
                    race.cancel_scope.cancel()

                async def wait() -> None:
                    nonlocal ready, reason
                    try:
                        ready = await self.supervisor.acquire(service)
                    except BootFailed:
                        reason = "boot_failed"
                    race.cancel_scope.cancel()

                race.start_soon(read)
                race.start_soon(wait)
        if timer.cancelled_caught:
            reason = "timeout"
        if ready is None or reason is not None:
            self._close(service, reason or "boot_failed")
            return None
        return ready, bytes(buf), eof

    async def _relay(
        self,
        client: trio.SocketStream,
        service: str,
        port: int,
        inst: Instance,
        buffered: bytes,
        eof: bool,
    ) -> None:
        handle = inst.handle
        if handle is None:
            self._close(service, "gone")
            return
        host, target_port = handle.endpoint(port)
        upstream: trio.SocketStream | None = None
        with trio.move_on_after(self.config.proxy.connect_timeout):
            try:
                upstream = await trio.open_tcp_stream(host, target_port)
            except OSError as exc:
                log.warning("%s: cannot connect to %s:%d: %s", inst.label, host, target_port, exc)
        if upstream is None:
            self._close(service, "connect")
            return
        # Activity: an open connection keeps the service from idling, and its close counts
        # as its last activity (Supervisor.connection_closed), so chunks need no bookkeeping.
        try:
            if buffered:
                await upstream.send_all(buffered)
            if eof:
                await upstream.send_eof()
            async with trio.open_nursery() as both:
                if not eof:
                    both.start_soon(_pump, client, upstream, both.cancel_scope)
                both.start_soon(_pump, upstream, client, both.cancel_scope)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(upstream)


async def _pump(
    src: trio.SocketStream,
    dst: trio.SocketStream,
    abort: trio.CancelScope,
) -> None:
    """Copy src to dst until EOF, then half-close dst. A broken side ends both directions.

    The bytes go socket -> pipe -> socket with splice(2), never through Python: a chunk is
    fully written before the next is read, so a slow reader slows the writer (backpressure)
    and at most one pipe's worth is in flight.
    """
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # a larger pipe moves more per call, if allowed
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        src_sock, dst_sock = src.socket, dst.socket
        sfd, dfd = src_sock.fileno(), dst_sock.fileno()
        busy = 0  # chunks moved in a row without waiting
        while True:
            try:
                n = os.splice(sfd, w, PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                busy = 0
                await trio.lowlevel.wait_readable(src_sock)
                continue
            if n == 0:
                break
            while n:
                try:
                    n -= os.splice(r, dfd, n, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    busy = 0
                    await trio.lowlevel.wait_writable(dst_sock)
            busy += 1
            if busy >= 16:  # never waited for a while: let other tasks run
                busy = 0
                await trio.lowlevel.checkpoint()
        dst_sock.shutdown(socket.SHUT_WR)
    except OSError:
        abort.cancel()
    finally:
        os.close(r)
        os.close(w)


async def _listen(host: str, port: int) -> trio.SocketListener:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise listen_error("the proxy", host, port, exc) from exc
    return trio.SocketListener(sock)


def _endpoint(listener: trio.SocketListener) -> Endpoint:
    host, port = listener.socket.getsockname()[:2]
    return Endpoint(host, port)
