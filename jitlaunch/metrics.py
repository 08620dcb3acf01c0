"""Prometheus metrics: collectors on a registry passed in, and a small trio HTTP endpoint.

Most figures are counted by the parts themselves (DnsServer.counts, Authority.queries,
Proxy.closed/ended/accepted/bytes, the counters on each ServiceRuntime, the QEMU warm pools)
and read only when Prometheus scrapes, by :class:`DaemonCollector`: the hot paths pay nothing
for them. The two histograms (wake-up time, time a connection was held for a boot) are
observed once per instance that becomes ready and once per held connection, through the
supervisor's ``on_ready`` and the proxy's ``on_held`` hooks.

Every name follows Prometheus conventions: the ``jitlaunch_`` prefix, base units
(``_seconds``, ``_bytes``), ``_total`` on counters. Label values come from bounded sets: the
configured services, fixed reasons and states; never a client's address or a queried name.

The endpoint (:meth:`Metrics.serve`) answers ``GET /metrics`` (and ``HEAD``) with
``generate_latest`` on this registry; any other path is 404, any other method 405, a request
that is not HTTP 400. One request per connection. A client has ``[metrics] timeout`` from its
connection's accept to send its request and take the reply (however it paces its bytes), and
at most ``max_connections`` are open at once: past it the oldest connection still reading its
request is closed to make room (:mod:`jitlaunch.slots`), and only when every connection is
being answered is the new one closed at once. Nothing a client does reaches the daemon's
nursery.

A scrape costs the event loop only a snapshot (:func:`take_snapshot`: the figures copied into
plain values); the exposition text is rendered from it in a worker thread (:func:`render`).
Scrapes share renderings: a scrape waits for the next rendering whose snapshot is taken after
it arrived (so it never sees figures older than its request), all scrapes waiting when a
snapshot is taken get that rendering, and a rendering starts at least
:data:`MIN_RENDER_INTERVAL`, and :data:`RENDER_SPACING` times the last rendering's duration,
after the last one ended. However many clients scrape, rendering takes at most about a fifth
of the time (500 services: a rendering of some 0.2 s at most once a second).
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from typing import TYPE_CHECKING

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram
from prometheus_client.process_collector import ProcessCollector

from .config import Config, Endpoint
from .errors import ListenError
from .figures import DaemonCollector, render, take_snapshot
from .logutil import LimitedLog
from .net import bound_endpoint, listen_tcp, serve
from .slots import Slot, Slots

if TYPE_CHECKING:
    from .backends import Backend
    from .control import ControlServer
    from .dns.server import DnsServer
    from .lifecycle.supervisor import Instance, Supervisor
    from .proxy import Proxy

log = logging.getLogger("jitlaunch.metrics")

#: Buckets of the wake-up and hold histograms: 1 ms to 10 s.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: How an instance got ready (see Handle.wake).
WAKE_PATHS = ("cold", "pool", "resume", "restore")
#: The most bytes of a request head we read; a longer one is a 400.
MAX_REQUEST = 8192
#: Renderings start at least this many seconds apart ...
MIN_RENDER_INTERVAL = 0.1
#: ... and at least this many times the last rendering's duration after it ended.
RENDER_SPACING = 4.0
#: DnsServer.counts keys that are rate-limited responses (the rest are events).

_STATUS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
}


class Observations:
    """The two histograms, observed as things happen rather than read at a scrape: wake-up
    time (once per instance that becomes ready) and the time a connection was held for a boot
    (once per held connection). The daemon passes :meth:`ready` to the supervisor and
    :meth:`held` to the proxy. Neither raises: a failure is logged once."""

    def __init__(self, config: Config, registry: CollectorRegistry) -> None:
        self.wake = Histogram(
            "jitlaunch_wake_seconds",
            "Time from the request (lookup or connection) that started an instance to its READY",
            ["service", "path"], buckets=BUCKETS, registry=registry,
        )
        self.hold = Histogram(
            "jitlaunch_proxy_hold_seconds",
            "Time a proxied connection was held waiting for a boot before it went to the instance",
            ["service"], buckets=BUCKETS, registry=registry,
        )
        for svc in config.services:
            self.wake.labels(svc.name, "cold")
            self.hold.labels(svc.name)
        self._log = LimitedLog(log)

    def ready(self, inst: Instance) -> None:
        try:
            path = inst.handle.wake if inst.handle is not None else "cold"
            if path not in WAKE_PATHS:
                path = "cold"
            seconds = max(0.0, inst.ready_at - inst.started_at)
            self.wake.labels(inst.service.name, path).observe(seconds)
        except Exception:
            self._log.error("hook", "metrics: observing a wake-up failed", exc_info=True)

    def held(self, service: str, seconds: float) -> None:
        try:
            self.hold.labels(service).observe(max(0.0, seconds))
        except Exception:
            self._log.error("hook", "metrics: observing a held connection failed", exc_info=True)


class Metrics:
    """The daemon's metrics on ``registry``: the figures' collector (figures.py), the
    process collector and the HTTP endpoint. Start the endpoint with
    ``endpoints = await nursery.start(metrics.serve)``.
    """

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry,
        *,
        supervisor: Supervisor,
        dns: DnsServer,
        proxy: Proxy,
        backends: dict[str, Backend],
    ) -> None:
        self.config = config
        self.registry = registry
        self.supervisor = supervisor
        self.dns = dns
        self.proxy = proxy
        self.backends = backends
        #: The control socket, once the daemon has started it (its counts are exported).
        self.control: ControlServer | None = None
        #: Expositions rendered (see the module docstring: scrapes share them).
        self.renderings = 0
        registry.register(DaemonCollector(self))
        ProcessCollector(registry=registry)
        #: HTTP requests answered by status code, and connections refused, evicted (closed
        #: for a newer one while still reading their request) or timed out.
        self.http: collections.Counter[str] = collections.Counter()
        #: Reloads by result (``ok``, ``rejected``), and the wall-clock time the config was
        #: last loaded successfully (the start counts), both kept by the daemon.
        self.reloads: collections.Counter[str] = collections.Counter()
        self.last_reload = time.time()
        #: Whether the last reload was taken (True before any).
        self.last_reload_ok = True
        self.slots = Slots(config.metrics.max_connections, config.metrics.max_connections)
        self.endpoints: list[Endpoint] = []
        self._log = LimitedLog(log)
        self._batch = _Batch()  # the scrapes waiting for the next rendering
        self._wanted = trio.Event()  # set when a scrape waits in _batch
        self._not_before = -float("inf")  # when the next rendering may start

    @property
    def open(self) -> int:
        """Connections to the endpoint open now."""
        return self.slots.in_use

    # ---- hooks (must never raise into the supervisor or the proxy) ---------------------

    @property
    def control_counts(self) -> dict[str, int]:
        return self.control.counts if self.control is not None else {}

    def reconfigure(self, config: Config) -> None:
        """Export ``config``'s services from now on (a reload)."""
        self.config = config

    # ---- the endpoint ------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve ``GET /metrics`` on every ``[metrics] listen`` endpoint until cancelled.

        Binds first, then reports the bound endpoints (real ports when 0 was configured).
        An endpoint that cannot be bound is logged as an error and left out: metrics never
        keep DNS and the proxy from serving (Prometheus sees the target down).
        """
        listeners: list[trio.SocketListener] = []
        try:
            for ep in self.config.metrics.listen:
                try:
                    listeners.append(await listen_tcp(ep.host, ep.port, what="metrics", backlog=64))
                except ListenError as exc:
                    log.error("%s; serving no metrics there", exc)
            self.endpoints = [bound_endpoint(lst) for lst in listeners]
            if self.endpoints:
                log.info("metrics on %s", ", ".join(f"http://{e}/metrics" for e in self.endpoints))
            async with trio.open_nursery() as nursery:
                if listeners:
                    nursery.start_soon(self._serve_renderings)
                for lst in listeners:
                    nursery.start_soon(functools.partial(
                        serve, lst, self._admit, self._connection, what="metrics", log=self._log,
                        on_failure=self._failed,
                    ))
                task_status.started(self.endpoints)
        finally:
            with trio.CancelScope(shield=True):
                for lst in listeners:
                    await lst.aclose()

    def _admit(self, stream: trio.SocketStream) -> Slot | None:
        slots = self.slots
        slots.total = slots.per_key = self.config.metrics.max_connections
        evictions = slots.evictions
        slot = slots.take("", evict=True)
        if slots.evictions != evictions:
            self.http["evicted"] += 1
            self._log.warning("evicted", "metrics: too many connections; closing the oldest "
                              "one that has not sent its request yet")
        if slot is None:
            self.http["refused"] += 1
            self._log.warning("refused", "metrics: too many connections being answered; "
                              "closing a new one")
        return slot

    def _failed(self, slot: Slot, exc: Exception) -> None:
        if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)):
            self.http["reset"] += 1
        else:
            self.http["error"] += 1
            self._log.error("error", "metrics: a request failed", exc_info=exc)

    async def _connection(self, stream: trio.SocketStream, slot: Slot) -> None:
        """One request (run by :func:`jitlaunch.net.serve`, which counts what it raises)."""
        # One deadline from the accept for the whole exchange: bytes sent one at a time do
        # not extend it. slot.scope is cancelled when a newer connection needs the slot while
        # this one has not sent its request yet.
        with slot.scope, trio.move_on_after(self.config.metrics.timeout) as scope:
            head = await _read_head(stream)
            slot.reading = False
            status, body, ctype = await self.respond(head)
            self.http[str(status)] += 1
            head_only = head is not None and head.startswith(b"HEAD ")
            await stream.send_all(_response(status, body, ctype, head_only=head_only))
        if scope.cancelled_caught:
            self.http["timeout"] += 1

    async def respond(self, head: bytes | None) -> tuple[int, bytes, str]:
        """The status, body and content type for the request ``head`` (None: not HTTP, or
        too long)."""
        text = "text/plain; charset=utf-8"
        if head is None:
            return 400, b"bad request\n", text
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, b"bad request\n", text
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return 404, b"not found: try /metrics\n", text
        if method not in (b"GET", b"HEAD"):
            return 405, b"method not allowed\n", text
        return 200, await self.exposition(), CONTENT_TYPE_LATEST

    # ---- renderings ----------------------------------------------------------------------

    async def exposition(self) -> bytes:
        """The exposition text from a snapshot taken after this call (shared with every
        other scrape waiting then; see the module docstring). Raises RenderFailed if that
        rendering failed (logged once by the renderer)."""
        batch = self._batch
        self._wanted.set()
        await batch.done.wait()
        if batch.text is None:
            raise RenderFailed("rendering the metrics failed; see the log")
        return batch.text

    async def _serve_renderings(self) -> None:
        """Render for the waiting scrapes, one rendering at a time, spaced (never raises)."""
        while True:
            await self._wanted.wait()
            await trio.sleep_until(self._not_before)
            batch, self._batch = self._batch, _Batch()
            self._wanted = trio.Event()
            start = trio.current_time()
            try:
                snapshot = take_snapshot(self)
                self.renderings += 1
                batch.text = await trio.to_thread.run_sync(
                    functools.partial(render, self.registry, snapshot))
            except Exception:
                self._log.error("render", "metrics: rendering failed", exc_info=True)
            finally:
                batch.done.set()
            end = trio.current_time()
            self._not_before = end + max(MIN_RENDER_INTERVAL, RENDER_SPACING * (end - start))


class RenderFailed(Exception):
    """The rendering a scrape waited for failed."""


class _Batch:
    """The scrapes that share one rendering: its text (None if it failed) once ``done``."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.text: bytes | None = None


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers (up to the blank line), or None if the client closed
    first or sent more than MAX_REQUEST bytes without one."""
    buf = b""
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        data = await stream.receive_some(MAX_REQUEST)
        if not data:
            return None
        buf += data
        if len(buf) > MAX_REQUEST:
            return None
    return buf.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _response(status: int, body: bytes, ctype: str, *, head_only: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_STATUS[status]}",
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head if head_only else head + body


def new_registry() -> CollectorRegistry:
    """A registry of our own (never the global default: several daemons may share a process)."""
    return CollectorRegistry(auto_describe=False)


__all__ = ["BUCKETS", "WAKE_PATHS", "Metrics", "Observations", "new_registry"]
