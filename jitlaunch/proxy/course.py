"""The course of one admitted connection, from the front to its instance.

A connection asks the supervisor for its service's instance (a proven request: the TCP
handshake proved the source). While the instance boots it is held: its first bytes are
buffered (at most ``proxy.max_buffer``, and ``proxy.max_buffer_total`` for all held
connections together), bounded by the boot timeout. Then it connects, replays the buffered
bytes and relays both ways (:mod:`.relay`). A connect that fails, or a reset or FIN before
the instance's first byte, is reported to the supervisor (which checks the instance at once)
and retried on the next instance within the boot timeout, so a connection that met a dying
instance is served by its replacement. Every connection that is not served is closed with a
reason, counted by :meth:`Proxy._close`.

A connect takes one of the service's ``max_connecting`` slots and keeps it until the
instance sends its first byte (at most :data:`CONNECT_HOLD`): an instance whose listen
backlog is full drops connections it has not accepted yet, so a burst of held connections is
let through only as fast as the instance answers.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import errno
import math
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import trio

from ..aio import first_of
from ..backoff import backoff_delay
from ..config import Config, ServiceConfig
from ..errors import BootFailed
from ..lifecycle.runtime import Instance
from ..lifecycle.state import State
from ..logutil import LimitedLog
from .pipes import PipePool
from .proxyproto import proxy_v2_header
from .relay import Relay, Timeouts

#: Between connects to an instance that refused (its listen backlog is full): doubling.
RETRY_FIRST = 0.005
RETRY_MAX = 0.25
#: The longest a connect keeps its max_connecting slot while waiting for the first byte.
CONNECT_HOLD = 0.25
#: Relay outcomes that are the proxy closing a connection on a timer.
TIMERS = ("first_data", "no_answer", "first_answer", "idle", "half_close")
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with a RST
# struct tcp_info up to tcpi_unacked: u8 state, ca_state, retransmits, ...; u32 unacked at 24.
_TCP_INFO_LEN = 28


class Instances(Protocol):
    """What the proxy needs of the supervisor (jitlaunch.lifecycle.supervisor.Supervisor)."""

    def request(self, name: str, source: str | None = None, *,
                proven: bool = True) -> Instance | None: ...

    async def acquire(self, name: str, *, proven: bool = True) -> Instance: ...

    async def report_unreachable(self, inst: Instance, reason: str) -> None: ...

    def connection_opened(self, name: str) -> None: ...

    def connection_closed(self, name: str) -> None: ...

    def service_config(self, name: str) -> ServiceConfig: ...

    def is_removed(self, name: str) -> bool: ...


class Course:
    """The per-connection path of :class:`~jitlaunch.proxy.front.Proxy` (a base class of
    it): what it reads and counts is the proxy's."""

    config: Config
    supervisor: Instances
    timeouts: Timeouts
    pipes: PipePool
    buffered: int
    pending: collections.Counter[str]
    ended: collections.Counter[tuple[str, str]]
    retries: collections.Counter[str]
    bytes: collections.Counter[tuple[str, str]]
    on_held: Callable[[str, float], None] | None
    _connecting: dict[str, trio.CapacityLimiter]
    _log: LimitedLog

    def _close(self, service: str, reason: str, detail: str = "") -> None:
        raise NotImplementedError

    async def _handle(
        self, client: trio.SocketStream, service: str, port: int, source: str,
        initial: builtins.bytes = b"",
    ) -> None:
        """Serve ``client`` by ``service``'s instance ``port``; ``initial``: the bytes a
        shared frontend read from it already, replayed first."""
        sup = self.supervisor
        sup.connection_opened(service)
        try:
            # Proven (the handshake): a boot it causes counts on its prefix's wake limit.
            inst = sup.request(service, source, proven=True)
            buffered = initial
            eof = False
            if inst is None:
                # (removed: accepted just before a reload closed the front)
                self._close(service, "removed" if sup.is_removed(service) else "backoff")
                return
            if inst.state is not State.READY:
                if self.pending[service] >= self.config.proxy.max_pending:
                    self._close(service, "pending")
                    return
                self.pending[service] += 1
                held_at = trio.current_time()
                try:
                    got = await self._buffer_until_ready(client, service, initial)
                finally:
                    self.pending[service] -= 1
                if got is None:
                    return
                if self.on_held is not None:
                    self.on_held(service, trio.current_time() - held_at)
                inst, buffered, eof = got
            await self._serve(client, service, port, inst, buffered, eof)
        finally:
            sup.connection_closed(service)

    async def _buffer_until_ready(
        self, client: trio.SocketStream, service: str, initial: builtins.bytes = b""
    ) -> tuple[Instance, builtins.bytes, bool] | None:
        limit = self.config.proxy.max_buffer
        svc = self.supervisor.service_config(service)  # (a removed one's, while it goes)
        buf = bytearray(initial)
        eof = False
        if self.buffered + len(buf) > self.config.proxy.max_buffer_total:
            self._close(service, "buffer_total")
            return None

        async def read() -> str:
            nonlocal eof
            while True:
                if len(buf) > limit:
                    return "buffer"
                data = await client.receive_some(limit - len(buf) + 1)
                if not data:
                    eof = True
                    await trio.sleep_forever()  # keep waiting: the request may be complete
                if self.buffered + len(data) > self.config.proxy.max_buffer_total:
                    return "buffer_total"
                buf.extend(data)
                self.buffered += len(data)

        async def ready() -> Instance:
            return await self.supervisor.acquire(service)

        # The supervisor bounds the admission queue's wait and the boot; this is a safety net.
        with trio.move_on_after(svc.boot_timeout + self.config.host.queue_timeout + 1):
            self.buffered += len(buf)
            try:
                try:
                    which, value = await first_of(read, ready)
                finally:
                    self.buffered -= len(buf)
            except BootFailed as exc:
                self._close(service, "boot_failed", str(exc))
                return None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._close(service, "client")
                return None
            if which == 0:
                self._close(service, value)
                return None
            assert isinstance(value, Instance)
            return value, bytes(buf), eof
        self._close(service, "timeout")
        return None

    async def _serve(
        self,
        client: trio.SocketStream,
        service: str,
        port: int,
        inst: Instance,
        buffered: builtins.bytes,
        eof: bool,
    ) -> None:
        """Connect to ``inst`` and relay; on a failed connect or an unanswered reset, report
        the instance and go on with the next one, within the boot timeout."""
        svc = self.supervisor.service_config(service)
        deadline = math.inf  # set at the first failure
        refusals = 0  # in a row, by the same live instance
        while True:
            why, relay = await self._attempt(client, service, port, inst, buffered, eof)
            if relay is not None:
                outcome = why
                self.ended[(service, outcome)] += 1
                if outcome == "first_answer":
                    await self._report(inst, "no first byte within proxy.answer_timeout")
                    if relay.replay is None or inst.state is State.READY:
                        self._close(service, outcome)
                        return
                elif outcome == "unanswered_reset":
                    if relay.replay is None:
                        self._close(service, "reset", "the instance reset it before answering")
                        return
                    if inst.state is State.READY:
                        await self._report(inst, "reset a connection before answering")
                elif outcome == "unaccepted":
                    if relay.replay is None:
                        self._close(service, "reset", "the instance did not accept it")
                        return
                else:
                    if outcome in TIMERS:
                        self._close(service, outcome)
                    elif outcome == "instance_reset" and not relay.activity.instance_bytes:
                        self._close(service, "reset", "the instance reset it before answering")
                    return
                assert relay.replay is not None
                buffered, eof = bytes(relay.replay), relay.client_eof
                why = outcome
            elif why == "fds":
                self._close(service, "fds", "no file descriptor left to connect")
                return
            else:
                await self._report(inst, why)
            now = trio.current_time()
            if deadline == math.inf:
                deadline = now + svc.boot_timeout
            if now >= deadline:
                self._close(service, "connect", f"{why}, still after the boot timeout")
                return
            self.retries[service] += 1
            with trio.move_on_at(deadline):
                try:
                    nxt = await self.supervisor.acquire(service)
                except BootFailed as exc:
                    self._close(service, "boot_failed", str(exc))
                    return
                if nxt is inst:  # alive, but not accepting (a full backlog): wait a little
                    refusals += 1
                    await trio.sleep(backoff_delay(refusals, RETRY_FIRST, RETRY_MAX))
                else:
                    refusals = 0
                inst = nxt
                continue
            self._close(service, "connect", f"{why}, still after the boot timeout")
            return

    async def _attempt(
        self,
        client: trio.SocketStream,
        service: str,
        port: int,
        inst: Instance,
        buffered: builtins.bytes,
        eof: bool,
    ) -> tuple[str, Relay | None]:
        """Connect to ``inst`` and relay: the outcome and the relay, or why the connect
        failed and None.

        A connect takes one of the service's ``max_connecting`` slots and keeps it until the
        instance sends its first byte (at most ``CONNECT_HOLD``): an instance whose listen
        backlog is full drops connections it has not accepted yet, so a burst of held
        connections is let through only as fast as the instance answers.
        """
        async with self._connect_slot(service) as release:
            upstream, why = await self._connect(inst, service, port)
            if upstream is not None and inst.service.proxy_protocol is not None:
                upstream, why = await _send_proxy_header(client, upstream)
            if upstream is None:
                return why, None

            async def closed_unanswered() -> bool:
                # A FIN before any byte: from a dying instance (replay elsewhere), or the
                # service's own way of saying no (pass it on).
                await self._report(inst, "closed a connection before answering")
                return inst.state is not State.READY

            def watch() -> bool:
                release()
                return _unaccepted(upstream.socket, relay)

            relay = Relay(
                client, upstream, self.timeouts, self.pipes,
                buffered=buffered, client_eof=eof, keep=self.config.proxy.max_buffer,
                closed_unanswered=closed_unanswered, on_answer=release, watch=watch,
                watch_after=CONNECT_HOLD,
            )
            try:
                outcome = await relay.run()
            finally:
                if not relay.activity.instance_bytes:
                    # Unanswered: a reset, not a FIN after our unacknowledged bytes, so that
                    # an instance that accepts it late never sees a request we replay.
                    with contextlib.suppress(OSError):
                        upstream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                upstream.socket.close()
                self.bytes[(service, "to_instance")] += relay.activity.client_bytes
                self.bytes[(service, "to_client")] += relay.activity.instance_bytes
            return outcome, relay

    @contextlib.asynccontextmanager
    async def _connect_slot(self, service: str) -> AsyncIterator[Callable[[], None]]:
        """One of ``service``'s ``max_connecting`` slots, for a connect; yields a function
        that gives it back early (idempotent), and gives it back at the latest on exit."""
        limiter = self._connecting.get(service)
        if limiter is None:
            limiter = self._connecting[service] = trio.CapacityLimiter(
                self.config.proxy.max_connecting
            )
        token = object()
        try:
            limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            await limiter.acquire_on_behalf_of(token)
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                limiter.release_on_behalf_of(token)

        try:
            yield release
        finally:
            release()

    async def _connect(
        self, inst: Instance, service: str, port: int
    ) -> tuple[trio.SocketStream | None, str]:
        """A stream to the instance's ``port``, or None and why not: ``gone`` (no handle),
        ``fds``, ``refused``, ``connect_timeout`` or ``unreachable``."""
        handle = inst.handle
        if handle is None:
            return None, "gone"
        host, target = handle.endpoint(port)
        # A non-blocking connect of our own: trio's resolves the address and checkpoints
        # twice, a cost per connection on the proxy's hot path.
        try:
            sock = socket.socket(
                socket.AF_INET6 if ":" in host else socket.AF_INET,
                socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            )
        except OSError:
            return None, "fds"
        try:
            try:
                err = sock.connect_ex((host, target))
            except OSError as exc:  # (not a connect's errno: a bad address)
                err = exc.errno or errno.EHOSTUNREACH
            if err == errno.EINPROGRESS:
                # On loopback and our bridge the handshake is usually over by now: a
                # getpeername() is cheaper than a trip through the event loop.
                with contextlib.suppress(OSError):
                    sock.getpeername()
                    err = 0
            if err == errno.EINPROGRESS:
                with trio.move_on_after(self.config.proxy.connect_timeout):
                    await trio.lowlevel.wait_writable(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == errno.EINPROGRESS:
                    sock.close()
                    return None, "connect_timeout"
        except BaseException:
            sock.close()
            raise
        if err == errno.ECONNREFUSED:
            sock.close()
            return None, "refused"
        if err:
            sock.close()
            self._log.warning(
                f"connect:{service}", "proxy: cannot connect to %s at %s:%d: %s",
                inst.label, host, target, os.strerror(err),
            )
            return None, "unreachable"
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock)), ""

    async def _report(self, inst: Instance, reason: str) -> None:
        """Tell the supervisor that ``inst`` let a connection down; it checks the instance at
        once and releases it if it is dead or hung."""
        await self.supervisor.report_unreachable(inst, reason)


async def _send_proxy_header(
    client: trio.SocketStream, upstream: trio.SocketStream
) -> tuple[trio.SocketStream | None, str]:
    """Send the PROXY v2 header (the client's address and port, and the front's) before any
    byte of the client's; a connection that cannot take it is closed and counts as refused."""
    try:
        src = client.socket.getpeername()[:2]
        dst = client.socket.getsockname()[:2]
        await upstream.send_all(proxy_v2_header((src[0], src[1]), (dst[0], dst[1])))
    except (OSError, ValueError, trio.BrokenResourceError):
        await trio.aclose_forcefully(upstream)
        return None, "refused"
    return upstream, ""


def _unaccepted(sock: trio.socket.SocketType, relay: Relay) -> bool:
    """The relay's watch until the instance answers: if its kernel leaves our bytes
    unacknowledged past a retransmission, it never accepted the connection (its listen
    backlog overflowed, and Linux drops the handshake's last ACK then), so abandon the relay
    as ``unaccepted``: the caller replays the bytes on a new connection. True while it is
    still to be seen."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return False
    retransmits, unacked = info[2], struct.unpack_from("I", info, 24)[0]
    if unacked == 0 and relay.activity.client_bytes:
        return False
    if unacked and retransmits:
        relay.abandon("unaccepted")
        return False
    return True
