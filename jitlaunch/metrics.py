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
that is not HTTP 400. One request per connection. A client has ``[metrics] timeout`` to send
its request and take the reply, at most ``max_connections`` are open at once (more are closed
at once), and nothing a client does reaches the daemon's nursery.
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from . import __version__
from .config import Config, Endpoint
from .lifecycle.state import State
from .logutil import LimitedLog

if TYPE_CHECKING:
    from .backends import Backend
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
        registry.register(DaemonCollector(self))
        ProcessCollector(registry=registry)
        supervisor.on_ready = self._ready
        proxy.on_held = self._held
        #: HTTP requests answered by status code, and connections refused or timed out.
        self.http: collections.Counter[str] = collections.Counter()
        #: Reloads by result (``ok``, ``rejected``), and the wall-clock time the config was
        #: last loaded successfully (the start counts), both kept by the daemon.
        self.reloads: collections.Counter[str] = collections.Counter()
        self.last_reload = time.time()
        #: Whether the last reload was taken (True before any).
        self.last_reload_ok = True
        self.open = 0
        self.endpoints: list[Endpoint] = []
        self._log = LimitedLog(log)

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
                    listeners.append(await _listen(ep))
                except OSError as exc:
                    log.error("metrics: cannot listen on %s: %s; serving no metrics there",
                              ep, exc.strerror or exc)
            self.endpoints = [_endpoint(lst) for lst in listeners]
            if self.endpoints:
                log.info("metrics on %s", ", ".join(f"http://{e}/metrics" for e in self.endpoints))
            async with trio.open_nursery() as nursery:
                for lst in listeners:
                    nursery.start_soon(self._accept_loop, lst, nursery)
                task_status.started(self.endpoints)
        finally:
            with trio.CancelScope(shield=True):
                for lst in listeners:
                    await lst.aclose()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: pause, keep serving
                self._log.warning("accept", "metrics: accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            if self.open >= self.config.metrics.max_connections:
                self.http["refused"] += 1
                self._log.warning("refused", "metrics: too many connections; closing a new one")
                stream.socket.close()
                continue
            self.open += 1
            nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        """One request: never raises (but Cancelled), always closes the stream."""
        try:
            with trio.move_on_after(self.config.metrics.timeout) as scope:
                head = await _read_head(stream)
                status, body, ctype = self.respond(head)
                self.http[str(status)] += 1
                head_only = head is not None and head.startswith(b"HEAD ")
                await stream.send_all(_response(status, body, ctype, head_only=head_only))
            if scope.cancelled_caught:
                self.http["timeout"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            self.http["reset"] += 1
        except Exception:
            self.http["error"] += 1
            self._log.error("error", "metrics: a request failed", exc_info=True)
        finally:
            self.open -= 1
            await trio.aclose_forcefully(stream)

    def respond(self, head: bytes | None) -> tuple[int, bytes, str]:
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
        return 200, generate_latest(self.registry), CONTENT_TYPE_LATEST


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


async def _listen(ep: Endpoint) -> trio.SocketListener:
    family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((ep.host, ep.port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(sock)


def _endpoint(listener: trio.SocketListener) -> Endpoint:
    host, port = listener.socket.getsockname()[:2]
    return Endpoint(host, port)


class DaemonCollector(Collector):
    """Every counter and gauge the daemon's parts keep, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Metric]:
        yield from self._build()
        yield from self._dns()
        yield from self._instances()
        yield from self._proxy()
        yield from self._endpoint()

    def _build(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("jitlaunch_build_info", "jitlaunch's version; always 1",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        services = GaugeMetricFamily("jitlaunch_services", "Services configured")
        services.add_metric([], len(self.m.config.services))
        yield services
        reloads = CounterMetricFamily(
            "jitlaunch_reloads", "Config reloads (SIGHUP, jitlaunch reload) by result (ok, "
            "rejected: the running config stayed)", labels=["result"],
        )
        for result in ("ok", "rejected"):
            reloads.add_metric([result], self.m.reloads[result])
        yield reloads
        yield _gauge(
            "jitlaunch_config_last_reload_success_timestamp_seconds",
            "When the running config was loaded (at start or by the last successful reload), "
            "in seconds since the epoch", self.m.last_reload,
        )
        yield _gauge(
            "jitlaunch_config_last_reload_successful",
            "1 if the last config reload was taken (or none was tried), 0 if it was rejected",
            1 if self.m.last_reload_ok else 0,
        )

    def _dns(self) -> Iterator[Metric]:
        dns = self.m.dns
        queries = CounterMetricFamily(
            "jitlaunch_dns_queries", "DNS queries by transport, query type and response code "
            "(rcode none: no reply)", labels=["transport", "qtype", "rcode"],
        )
        for (transport, qtype, rcode), (n,) in sorted(dns.authority.queries.items()):
            queries.add_metric([transport, qtype, rcode], n)
        yield queries
        limited = CounterMetricFamily(
            "jitlaunch_dns_responses_limited", "UDP responses limited by RRL, by action",
            labels=["action"],
        )
        for key, action in _RRL.items():
            limited.add_metric([action], dns.counts.get(key, 0))
        yield limited
        cookies = CounterMetricFamily(
            "jitlaunch_dns_cookies", "DNS queries with a COOKIE option, by their server cookie "
            "(valid: the client proved its address; invalid; none: a client cookie alone)",
            labels=["server_cookie"],
        )
        for result in ("valid", "invalid", "none"):
            cookies.add_metric([result], dns.authority.cookies_seen[result])
        yield cookies
        events = CounterMetricFamily(
            "jitlaunch_dns_events", "What DNS clients made the server do besides answering "
            "(resets, slow clients, refused connections, dropped held queries, internal errors)",
            labels=["event"],
        )
        for key in sorted(set(dns.counts) | {"internal_error", "held_dropped"}):
            if key not in _RRL:
                events.add_metric([key], dns.counts.get(key, 0))
        yield events
        yield _gauge("jitlaunch_dns_tcp_connections", "Open DNS-over-TCP connections",
                     dns.tcp_connections)
        yield _gauge("jitlaunch_dns_held", "DNS replies held for booting wait services", dns.held)

    def _instances(self) -> Iterator[Metric]:
        sup = self.m.supervisor
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
        stopped = collections.Counter(sup.retired_stops)
        for name, rt in sup.services.items():
            svc = rt.config
            timeouts = rt.boot_timeouts
            boots.add_metric([name, svc.backend, "ready"], rt.readies)
            boots.add_metric([name, svc.backend, "failed"], rt.boot_failures - timeouts)
            boots.add_metric([name, svc.backend, "timeout"], timeouts)
            started.add_metric([name, svc.backend], rt.boots)
            for (reason, mode), n in rt.stops.items():
                stopped[(name, reason, mode)] += n
            inst = rt.instance
            for state in State:
                states.add_metric([name, state.value], 1 if inst is not None and inst.state is state else 0)
            unreachable.add_metric([name], rt.unreachable_reports)
            backoff.add_metric([name], rt.failures)
            members = getattr(self.m.backends.get(svc.backend), "pools", {}).get(name, ())
            pool.add_metric([name], len(members))
            pool_target.add_metric([name], getattr(svc.settings, "pool", 0))
            max_instances.add_metric([name], svc.max_instances)
        for labels, n in sorted(stopped.items()):
            stops.add_metric(list(labels), n)
        yield from (boots, started, stops, states, unreachable, backoff, pool, pool_target,
                    max_instances)
        yield from self._admission()

    def _admission(self) -> Iterator[Metric]:
        sup = self.m.supervisor
        outcomes = CounterMetricFamily(
            "jitlaunch_admission", "Starts by what admission did (admitted, queued, evicted, "
            "refused_full, refused_timeout, refused_never, refused_closing, refused_unproven, "
            "wake_limited)",
            labels=["outcome"],
        )
        for outcome in ("admitted", "queued", "evicted", "refused_full", "refused_timeout",
                        "refused_never", "refused_closing", "refused_unproven", "wake_limited"):
            outcomes.add_metric([outcome], sup.admission[outcome])
        yield outcomes
        yield _gauge("jitlaunch_admission_queue", "Starts waiting in the admission queue",
                     len(sup.queue))
        budget = GaugeMetricFamily(
            "jitlaunch_host_budget", "The host budget ([host]): max_instances, memory (MiB), "
            "max_booting", labels=["limit"],
        )
        for limit in ("max_instances", "memory", "max_booting"):
            budget.add_metric([limit], getattr(sup.budget, limit))
        yield budget

    def _proxy(self) -> Iterator[Metric]:
        proxy = self.m.proxy
        sup = self.m.supervisor
        names = list(sup.services)
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
        for name in names:
            accepted.add_metric([name], proxy.accepted.get(name, 0))
            active.add_metric([name], sup.services[name].connections)
            held.add_metric([name], proxy.pending.get(name, 0))
            retries.add_metric([name], proxy.retries.get(name, 0))
        yield from (accepted, active, held, retries)
        closed = CounterMetricFamily(
            "jitlaunch_proxy_connections_closed", "Connections the proxy closed unserved or on "
            "a timer, by service and reason", labels=["service", "reason"],
        )
        for (name, reason), n in sorted(proxy.closed.items()):
            closed.add_metric([name, reason], n)
        yield closed
        ended = CounterMetricFamily(
            "jitlaunch_proxy_relays_ended", "Relays that ended, by service and outcome",
            labels=["service", "outcome"],
        )
        for (name, outcome), n in sorted(proxy.ended.items()):
            ended.add_metric([name, outcome], n)
        yield ended
        moved = CounterMetricFamily(
            "jitlaunch_proxy_bytes", "Bytes relayed, by service and direction (to_instance, "
            "to_client), counted when each connection ends", labels=["service", "direction"],
        )
        for name in names:
            for direction in ("to_instance", "to_client"):
                moved.add_metric([name, direction], proxy.bytes.get((name, direction), 0))
        yield moved
        yield _counter("jitlaunch_proxy_accept_errors", "Failed accepts (e.g. no descriptor left)",
                       proxy.accept_errors)
        yield _gauge("jitlaunch_proxy_max_connections", "The proxy's cap on open connections",
                     proxy.max_connections)

    def _endpoint(self) -> Iterator[Metric]:
        http = CounterMetricFamily(
            "jitlaunch_metrics_requests", "Requests to this endpoint by outcome (an HTTP status, "
            "refused, timeout, reset, error)", labels=["outcome"],
        )
        for outcome, n in sorted(self.m.http.items()):
            http.add_metric([outcome], n)
        yield http


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def new_registry() -> CollectorRegistry:
    """A registry of our own (never the global default: several daemons may share a process)."""
    return CollectorRegistry(auto_describe=False)


__all__ = ["BUCKETS", "WAKE_PATHS", "DaemonCollector", "Metrics", "new_registry"]
