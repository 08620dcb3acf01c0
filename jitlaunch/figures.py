"""The figures the metrics endpoint exports, and how they are read.

Most figures are counted by the parts themselves (DnsServer.counts, Authority.queries,
Proxy.closed/ended/accepted/bytes, the supervisor's per-service counters, the QEMU warm
pools) and read only when Prometheus scrapes: the hot paths pay nothing for them. A scrape
costs the event loop only :func:`take_snapshot` (the figures copied into plain values, the
supervisor's through its frozen status); :func:`render` turns a snapshot into the exposition
text in a worker thread, through :class:`DaemonCollector`.

Every name follows Prometheus conventions: the ``jitlaunch_`` prefix, base units
(``_seconds``, ``_bytes``), ``_total`` on counters. Label values come from bounded sets: the
configured services, fixed reasons and states; never a client's address or a queried name.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .config import Config
from .lifecycle.state import State

if TYPE_CHECKING:
    from .backends import Backend
    from .dns.server import DnsServer
    from .lifecycle.supervisor import Supervisor
    from .proxy import Proxy

_RRL = {"rrl_slipped": "slipped", "rrl_dropped": "dropped"}


class Sources(Protocol):
    """Where the figures are read from (the daemon's Metrics): read-only."""

    @property
    def config(self) -> Config: ...
    @property
    def supervisor(self) -> Supervisor: ...
    @property
    def dns(self) -> DnsServer: ...
    @property
    def proxy(self) -> Proxy: ...
    @property
    def backends(self) -> Mapping[str, Backend]: ...
    @property
    def reloads(self) -> Mapping[str, int]: ...
    @property
    def last_reload(self) -> float: ...
    @property
    def last_reload_ok(self) -> bool: ...
    @property
    def http(self) -> Mapping[str, int]: ...
    @property
    def renderings(self) -> int: ...
    @property
    def control_counts(self) -> Mapping[str, int]: ...


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


def take_snapshot(m: Sources) -> Snapshot:
    """Copy every figure the daemon's parts keep (on the event loop: they change there)."""
    sup, dns, proxy = m.supervisor.status(), m.dns, m.proxy
    accepted, pending, retries, moved = proxy.accepted, proxy.pending, proxy.retries, proxy.bytes
    services = []
    for st in sup.services:
        svc, name, inst = st.config, st.name, st.instance
        services.append(ServiceFigures(
            name, svc.backend, st.readies, st.boot_failures, st.boot_timeouts, st.boots,
            st.stops, inst.state if inst is not None else None,
            st.unreachable_reports, st.failures,
            len(getattr(m.backends.get(svc.backend), "pools", {}).get(name, ())),
            getattr(svc.settings, "pool", 0), svc.max_instances, st.connections,
            accepted.get(name, 0), pending.get(name, 0), retries.get(name, 0),
            moved.get((name, "to_instance"), 0), moved.get((name, "to_client"), 0),
            st.traffic_samples,
        ))
    control = m.control_counts
    return Snapshot(
        services_configured=len(m.config.services),
        reloads=dict(m.reloads), last_reload=m.last_reload, last_reload_ok=m.last_reload_ok,
        dns_queries=sorted((key, n) for key, (n,) in dns.authority.queries.items()),
        dns_counts=dict(dns.counts), dns_cookies=dict(dns.authority.cookies_seen),
        dns_tcp_connections=dns.tcp_connections, dns_held=dns.held,
        services=services, retired_stops=dict(sup.retired_stops),
        admission=dict(sup.admission), queued=sup.queued,
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

    def __init__(self, metrics: Sources) -> None:
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


__all__ = ["DaemonCollector", "ServiceFigures", "Snapshot", "Sources", "render", "take_snapshot"]
