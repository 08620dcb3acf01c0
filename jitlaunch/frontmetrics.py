"""The shared frontends' figures: connections routed by frontend and service, and closed
unrouted by frontend and reason (:data:`jitlaunch.proxy.shared.REASONS`, a fixed set).

Label values are bounded: configured frontend and service names and fixed reasons, never a
name a client asked for. The counters are read when Prometheus scrapes, possibly in the
rendering's worker thread: each is copied with ``dict()``, one C-level copy under the GIL
(``Counter`` keeps ``dict``'s iteration), so a connection counted meanwhile cannot break it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .proxy.shared import SharedFronts


class FrontendCollector(Collector):
    """Register it on the daemon's registry with the daemon's :class:`SharedFronts`."""

    def __init__(self, shared: SharedFronts) -> None:
        self.shared = shared

    def collect(self) -> Iterable[Metric]:
        routed = CounterMetricFamily(
            "jitlaunch_frontend_connections_routed", "Connections a shared frontend routed to "
            "a service", labels=["frontend", "service"])
        for (frontend, service), n in sorted(dict(self.shared.routed).items()):
            routed.add_metric([frontend, service], n)
        yield routed
        closed = CounterMetricFamily(
            "jitlaunch_frontend_connections_closed", "Connections a shared frontend closed "
            "unrouted, by reason (unknown_name, no_sni, no_host, bad_name, not_http, not_tls, "
            "too_big, timeout, client, caps, error)", labels=["frontend", "reason"])
        for (frontend, reason), n in sorted(dict(self.shared.closed).items()):
            closed.add_metric([frontend, reason], n)
        yield closed


__all__ = ["FrontendCollector"]
