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
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from . import __version__
from .config import Config, Endpoint
from .errors import ListenError
from .lifecycle.state import State
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
_RRL = {"rrl_slipped": "slipped", "rrl_dropped": "dropped"}

_STATUS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
}


class Metrics:
    """The daemon's metrics on ``registry``: its collectors, hooks and HTTP endpoint.

    Construct it after the supervisor, DNS server and proxy exist; it hooks itself into the
    supervisor (``on_ready``) and the proxy (``on_held``). Start the endpoint with
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
        #: The control socket, once the daemon has started it (its counts are exported).
        self.control: ControlServer | None = None
        #: Expositions rendered (see the module docstring: scrapes share them).
        self.renderings = 0
        registry.register(DaemonCollector(self))
        ProcessCollector(registry=registry)
        supervisor.on_ready = self._ready
        proxy.on_held = self._held
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

    def _ready(self, inst: Instance) -> None:
        try:
            path = inst.handle.wake if inst.handle is not None else "cold"
            if path not in WAKE_PATHS:
                path = "cold"
            seconds = max(0.0, inst.ready_at - inst.started_at)
            self.wake.labels(inst.service.name, path).observe(seconds)
        except Exception:
            self._log.error("hook", "metrics: observing a wake-up failed", exc_info=True)

    def _held(self, service: str, seconds: float) -> None:
        try:
            self.hold.labels(service).observe(max(0.0, seconds))
        except Exception:
            self._log.error("hook", "metrics: observing a held connection failed", exc_info=True)

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


class ServiceFigures(NamedTuple):
    """One service's figures in a :class:`Snapshot`."""

    name: str
    backend: str
    readies: int
    boot_failures: int
    boot_timeouts: int
    boots: int
    stops: tuple[tuple[tuple[str, str], int], ...]  # ((reason, mode), n)
    state: State | None  # of its instance; None: none
    unreachable_reports: int
    failures: int
    pool: int
    pool_target: int
    max_instances: int
    connections: int
    accepted: int
    pending: int
    retries: int
    to_instance: int
    to_client: int
    traffic: tuple[int, int, int]  # handed-over traffic samples: moved, still, unknown


@dataclass(frozen=True)
class Snapshot:
    """Every figure :class:`DaemonCollector` exports, copied into plain values on the event
    loop (:func:`take_snapshot`: a few milliseconds for 500 services), so that the exposition
    text can be built from it in a worker thread while the loop serves on."""

    services_configured: int
    reloads: dict[str, int]
    last_reload: float
    last_reload_ok: bool
    dns_queries: list[tuple[tuple[str, str, str], int]]
    dns_counts: dict[str, int]
    dns_cookies: dict[str, int]
    dns_tcp_connections: int
    dns_held: int
    services: list[ServiceFigures]
    retired_stops: dict[tuple[str, str, str], int]
    admission: dict[str, int]
    queued: int
    budget: dict[str, int]
    proxy_closed: dict[tuple[str, str], int]
    proxy_ended: dict[tuple[str, str], int]
    proxy_accept_errors: int
    proxy_max_connections: int
    http: dict[str, int]
    renderings: int
    control: dict[str, int]


def take_snapshot(m: Metrics) -> Snapshot:
    """Copy every figure the daemon's parts keep (on the event loop: they change there)."""
    sup, dns, proxy = m.supervisor, m.dns, m.proxy
    accepted, pending, retries, moved = proxy.accepted, proxy.pending, proxy.retries, proxy.bytes
    services = []
    for name, rt in sup.services.items():
        svc = rt.config
        inst = rt.instance
        services.append(ServiceFigures(
            name, svc.backend, rt.readies, rt.boot_failures, rt.boot_timeouts, rt.boots,
            tuple(rt.stops.items()), inst.state if inst is not None else None,
            rt.unreachable_reports, rt.failures,
            len(getattr(m.backends.get(svc.backend), "pools", {}).get(name, ())),
            getattr(svc.settings, "pool", 0), svc.max_instances, rt.connections,
            accepted.get(name, 0), pending.get(name, 0), retries.get(name, 0),
            moved.get((name, "to_instance"), 0), moved.get((name, "to_client"), 0),
            (rt.traffic_samples["moved"], rt.traffic_samples["still"],
             rt.traffic_samples["unknown"]),
        ))
    control = m.control.counts if m.control is not None else {}
    return Snapshot(
        services_configured=len(m.config.services),
        reloads=dict(m.reloads), last_reload=m.last_reload, last_reload_ok=m.last_reload_ok,
        dns_queries=sorted((key, n) for key, (n,) in dns.authority.queries.items()),
        dns_counts=dict(dns.counts), dns_cookies=dict(dns.authority.cookies_seen),
        dns_tcp_connections=dns.tcp_connections, dns_held=dns.held,
        services=services, retired_stops=dict(sup.retired_stops),
        admission=dict(sup.admission), queued=len(sup.queue),
        budget={k: getattr(sup.budget, k) for k in ("max_instances", "memory", "max_booting")},
        proxy_closed=dict(proxy.closed), proxy_ended=dict(proxy.ended),
        proxy_accept_errors=proxy.accept_errors, proxy_max_connections=proxy.max_connections,
        http=dict(m.http), renderings=m.renderings, control=dict(control),
    )


#: The snapshot a rendering in a worker thread exports (see :func:`render`).
_rendering = threading.local()


def render(registry: CollectorRegistry, snapshot: Snapshot) -> bytes:
    """The exposition text of ``registry``, with :class:`DaemonCollector` reading
    ``snapshot``. Runs in a worker thread: it touches nothing the event loop changes but the
    prometheus-client metrics, which lock."""
    _rendering.snapshot = snapshot
    try:
        return generate_latest(registry)
    finally:
        _rendering.snapshot = None


class DaemonCollector(Collector):
    """Every counter and gauge the daemon's parts keep. It exports the snapshot being
    rendered in this thread (:func:`render`), else one taken now (on the event loop only)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Metric]:
        snap = getattr(_rendering, "snapshot", None) or take_snapshot(self.m)
        yield from _build(snap)
        yield from _dns(snap)
        yield from _instances(snap)
        yield from _proxy(snap)
        yield from _endpoint_figures(snap)


def _build(s: Snapshot) -> Iterator[Metric]:
    info = GaugeMetricFamily("jitlaunch_build_info", "jitlaunch's version; always 1",
                             labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    services = GaugeMetricFamily("jitlaunch_services", "Services configured")
    services.add_metric([], s.services_configured)
    yield services
    reloads = CounterMetricFamily(
        "jitlaunch_reloads", "Config reloads (SIGHUP, jitlaunch reload) by result (ok, "
        "rejected: the running config stayed)", labels=["result"],
    )
    for result in ("ok", "rejected"):
        reloads.add_metric([result], s.reloads.get(result, 0))
    yield reloads
    yield _gauge(
        "jitlaunch_config_last_reload_success_timestamp_seconds",
        "When the running config was loaded (at start or by the last successful reload), "
        "in seconds since the epoch", s.last_reload,
    )
    yield _gauge(
        "jitlaunch_config_last_reload_successful",
        "1 if the last config reload was taken (or none was tried), 0 if it was rejected",
        1 if s.last_reload_ok else 0,
    )


def _dns(s: Snapshot) -> Iterator[Metric]:
    queries = CounterMetricFamily(
        "jitlaunch_dns_queries", "DNS queries by transport, query type and response code "
        "(rcode none: no reply)", labels=["transport", "qtype", "rcode"],
    )
    for (transport, qtype, rcode), n in s.dns_queries:
        queries.add_metric([transport, qtype, rcode], n)
    yield queries
    limited = CounterMetricFamily(
        "jitlaunch_dns_responses_limited", "UDP responses limited by RRL, by action",
        labels=["action"],
    )
    for key, action in _RRL.items():
        limited.add_metric([action], s.dns_counts.get(key, 0))
    yield limited
    cookies = CounterMetricFamily(
        "jitlaunch_dns_cookies", "DNS queries with a COOKIE option, by their server cookie "
        "(valid: the client proved its address; invalid; none: a client cookie alone)",
        labels=["server_cookie"],
    )
    for result in ("valid", "invalid", "none"):
        cookies.add_metric([result], s.dns_cookies.get(result, 0))
    yield cookies
    events = CounterMetricFamily(
        "jitlaunch_dns_events", "What DNS clients made the server do besides answering "
        "(resets, slow clients, refused connections, dropped held queries, internal errors)",
        labels=["event"],
    )
    for key in sorted(set(s.dns_counts) | {"internal_error", "held_dropped"}):
        if key not in _RRL:
            events.add_metric([key], s.dns_counts.get(key, 0))
    yield events
    yield _gauge("jitlaunch_dns_tcp_connections", "Open DNS-over-TCP connections",
                 s.dns_tcp_connections)
    yield _gauge("jitlaunch_dns_held", "DNS replies held for booting wait services", s.dns_held)


def _instances(s: Snapshot) -> Iterator[Metric]:
    boots = CounterMetricFamily(
        "jitlaunch_boots", "Boots that ended, by service, backend and result "
        "(ready, failed, timeout)", labels=["service", "backend", "result"],
    )
    started = CounterMetricFamily(
        "jitlaunch_boots_started", "Boots started (cold, pool, resume or restore)",
        labels=["service", "backend"],
    )
    stops = CounterMetricFamily(
        "jitlaunch_stops", "Instances stopped, by service, reason (idle, requested, died, "
        "hung, evicted, reload, shutdown) and mode (destroy, shutdown, pause, save)",
        labels=["service", "reason", "mode"],
    )
    states = GaugeMetricFamily(
        "jitlaunch_instances", "Instances by service and state", labels=["service", "state"],
    )
    unreachable = CounterMetricFamily(
        "jitlaunch_unreachable_reports", "Ready instances the proxy could not reach and "
        "had checked", labels=["service"],
    )
    traffic = CounterMetricFamily(
        "jitlaunch_traffic_samples", "Samples of handed-over instances' traffic, by service "
        "and result (moved: activity, still, unknown: it could not be read)",
        labels=["service", "result"],
    )
    backoff = GaugeMetricFamily(
        "jitlaunch_backoff_failures", "Failed boots in a row (0 once a boot succeeds)",
        labels=["service"],
    )
    pool = GaugeMetricFamily(
        "jitlaunch_pool_size", "Warm pool members ready to be taken", labels=["service"],
    )
    pool_target = GaugeMetricFamily(
        "jitlaunch_pool_target", "Configured warm pool size", labels=["service"],
    )
    max_instances = GaugeMetricFamily(
        "jitlaunch_max_instances", "Configured max_instances", labels=["service"],
    )
    # Services a reload removed keep their stop counts (a counter never goes back).
    stopped = collections.Counter(s.retired_stops)
    for f in s.services:
        name = f.name
        boots.add_metric([name, f.backend, "ready"], f.readies)
        boots.add_metric([name, f.backend, "failed"], f.boot_failures - f.boot_timeouts)
        boots.add_metric([name, f.backend, "timeout"], f.boot_timeouts)
        started.add_metric([name, f.backend], f.boots)
        for (reason, mode), n in f.stops:
            stopped[(name, reason, mode)] += n
        for state in State:
            states.add_metric([name, state.value], 1 if f.state is state else 0)
        unreachable.add_metric([name], f.unreachable_reports)
        for result, n in zip(("moved", "still", "unknown"), f.traffic, strict=True):
            traffic.add_metric([name, result], n)
        backoff.add_metric([name], f.failures)
        pool.add_metric([name], f.pool)
        pool_target.add_metric([name], f.pool_target)
        max_instances.add_metric([name], f.max_instances)
    for labels, n in sorted(stopped.items()):
        stops.add_metric(list(labels), n)
    yield from (boots, started, stops, states, unreachable, traffic, backoff, pool,
                pool_target, max_instances)
    yield from _admission(s)


def _admission(s: Snapshot) -> Iterator[Metric]:
    outcomes = CounterMetricFamily(
        "jitlaunch_admission", "Starts by what admission did (admitted, queued, evicted, "
        "refused_full, refused_timeout, refused_never, refused_closing, refused_unproven, "
        "wake_limited)",
        labels=["outcome"],
    )
    for outcome in ("admitted", "queued", "evicted", "refused_full", "refused_timeout",
                    "refused_never", "refused_closing", "refused_unproven", "wake_limited"):
        outcomes.add_metric([outcome], s.admission.get(outcome, 0))
    yield outcomes
    yield _gauge("jitlaunch_admission_queue", "Starts waiting in the admission queue", s.queued)
    budget = GaugeMetricFamily(
        "jitlaunch_host_budget", "The host budget ([host]): max_instances, memory (MiB), "
        "max_booting", labels=["limit"],
    )
    for limit in ("max_instances", "memory", "max_booting"):
        budget.add_metric([limit], s.budget[limit])
    yield budget


def _proxy(s: Snapshot) -> Iterator[Metric]:
    accepted = CounterMetricFamily(
        "jitlaunch_proxy_connections_accepted", "Connections accepted at a front",
        labels=["service"],
    )
    active = GaugeMetricFamily(
        "jitlaunch_proxy_connections_active", "Proxied connections open", labels=["service"],
    )
    held = GaugeMetricFamily(
        "jitlaunch_proxy_connections_held", "Connections waiting for a boot",
        labels=["service"],
    )
    retries = CounterMetricFamily(
        "jitlaunch_proxy_retries", "Connects retried after a failure or an unanswered reset",
        labels=["service"],
    )
    for f in s.services:
        accepted.add_metric([f.name], f.accepted)
        active.add_metric([f.name], f.connections)
        held.add_metric([f.name], f.pending)
        retries.add_metric([f.name], f.retries)
    yield from (accepted, active, held, retries)
    closed = CounterMetricFamily(
        "jitlaunch_proxy_connections_closed", "Connections the proxy closed unserved or on "
        "a timer, by service and reason", labels=["service", "reason"],
    )
    for (name, reason), n in sorted(s.proxy_closed.items()):
        closed.add_metric([name, reason], n)
    yield closed
    ended = CounterMetricFamily(
        "jitlaunch_proxy_relays_ended", "Relays that ended, by service and outcome",
        labels=["service", "outcome"],
    )
    for (name, outcome), n in sorted(s.proxy_ended.items()):
        ended.add_metric([name, outcome], n)
    yield ended
    moved = CounterMetricFamily(
        "jitlaunch_proxy_bytes", "Bytes relayed, by service and direction (to_instance, "
        "to_client), counted when each connection ends", labels=["service", "direction"],
    )
    for f in s.services:
        moved.add_metric([f.name, "to_instance"], f.to_instance)
        moved.add_metric([f.name, "to_client"], f.to_client)
    yield moved
    yield _counter("jitlaunch_proxy_accept_errors", "Failed accepts (e.g. no descriptor left)",
                   s.proxy_accept_errors)
    yield _gauge("jitlaunch_proxy_max_connections", "The proxy's cap on open connections",
                 s.proxy_max_connections)


def _endpoint_figures(s: Snapshot) -> Iterator[Metric]:
    http = CounterMetricFamily(
        "jitlaunch_metrics_requests", "Requests to this endpoint by outcome (an HTTP status, "
        "refused, evicted, timeout, reset, error)", labels=["outcome"],
    )
    for outcome, n in sorted(s.http.items()):
        http.add_metric([outcome], n)
    yield http
    yield _counter(
        "jitlaunch_metrics_renderings", "Expositions rendered (scrapes that arrive together "
        "share one)", s.renderings,
    )
    control = CounterMetricFamily(
        "jitlaunch_control_events", "The control socket: replies by kind (ok, bad-request, "
        "refused, failed, rejected) and connections closed or refused (evicted, timeout, "
        "refused_busy, internal_error)", labels=["event"],
    )
    for event, n in sorted(s.control.items()):
        control.add_metric([event], n)
    yield control


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def new_registry() -> CollectorRegistry:
    """A registry of our own (never the global default: several daemons may share a process)."""
    return CollectorRegistry(auto_describe=False)


__all__ = ["BUCKETS", "WAKE_PATHS", "DaemonCollector", "Metrics", "Snapshot", "new_registry",
           "render", "take_snapshot"]
