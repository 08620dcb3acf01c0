"""The configuration as values: frozen dataclasses with value equality, no parsing.

A reload compares old and new values with ``==``, so every field compares by value (backend
settings are frozen dataclasses too). :mod:`.parse` builds them from TOML text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ANSWER_MODES = ("handoff", "proxy", "wait")
STOP_MODES = ("destroy", "shutdown", "pause", "save")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Zone:
    """One zone we are authoritative for. Names are lower case, without the final dot."""

    name: str
    nameservers: tuple[str, ...]
    mname: str
    rname: str
    serial: int
    refresh: int
    retry: int
    expire: int
    minimum: int
    soa_ttl: int


@dataclass(frozen=True)
class RrlConfig:
    """Response rate limiting for DNS over UDP (``[dns.rrl]``); see :mod:`jitlaunch.dns.rrl`."""

    rate: int = 200  # identical answers per second per source prefix; 0: not limited
    slip: int = 2  # every slip-th limited response is sent truncated (TC=1); 0 never
    window: float = 15.0  # seconds over which the rate is averaged
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    exempt: tuple[str, ...] = ()  # networks never limited ("192.0.2.0/24")
    # NXDOMAIN replies per second per prefix and zone, and errors per second per prefix
    # (BIND's nxdomains-per-second, errors-per-second); None: as ``rate``; 0: not limited.
    nxdomain_rate: int | None = None
    error_rate: int | None = None


@dataclass(frozen=True)
class StaticRecord:
    """One static record (``[[dns.record]]``, :mod:`.records`): ``data`` holds the type's
    fields in wire order."""

    name: str
    type: str
    ttl: int
    data: tuple[Any, ...]


@dataclass(frozen=True)
class SvcParams:
    alpn: tuple[str, ...] = ()
    no_default_alpn: bool = False
    port: int | None = None
    ipv4hint: tuple[str, ...] = ()
    ipv6hint: tuple[str, ...] = ()


@dataclass(frozen=True)
class DnsConfig:
    listen: tuple[Endpoint, ...]
    zones: tuple[Zone, ...]
    # Addresses answered for nameserver names that lie inside one of our zones (glue).
    nameserver_addresses: tuple[str, ...]
    ttl: int
    booting_ttl: int
    edns_payload: int
    tcp_idle_timeout: float
    max_tcp_connections: int
    tcp_message_timeout: float = 3.0
    max_tcp_connections_per_source: int = 32
    max_held: int = 1024
    max_held_per_connection: int = 16
    max_held_per_source: int = 128  # held answers for one source prefix ([dns.rrl]'s prefixes)
    max_held_per_service: int = 256
    rrl: RrlConfig = field(default_factory=RrlConfig)
    # Glue per nameserver name, where ``nameserver_addresses`` is a table (else empty: every
    # nameserver inside a zone gets all of ``nameserver_addresses``).
    nameserver_glue: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Static records ([[dns.record]]), in the order given.
    records: tuple[StaticRecord, ...] = ()


@dataclass(frozen=True)
class ProxyConfig:
    max_buffer: int
    max_pending: int
    connect_timeout: float
    # None: derived from the open file limit at start (jitlaunch.fdlimit).
    max_connections: int | None = None
    max_connections_per_source: int | None = None
    max_connecting: int = 32
    first_data_timeout: float = 10.0
    answer_timeout: float = 30.0
    idle_timeout: float = 600.0
    half_close_timeout: float = 30.0
    # Bytes buffered for booting services across the whole daemon.
    max_buffer_total: int = 32 << 20


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (``[metrics]``); see :mod:`jitlaunch.metrics`."""

    listen: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", 9464),)  # empty: no endpoint
    timeout: float = 10.0  # a scrape's request must arrive, and its reply be taken, within this
    max_connections: int = 16  # open at once; more are closed at once


@dataclass(frozen=True)
class WakeConfig:
    """Wake limits per source prefix (``[host.wake]``): boots caused by one prefix's lookups
    and connections, as a token bucket; see :mod:`jitlaunch.lifecycle.admission`."""

    rate: float = 1.0  # boots per second per prefix; 0 turns the limit off
    burst: int = 10  # boots a quiet prefix may cause at once
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56


@dataclass(frozen=True)
class HostConfig:
    """The host budget (``[host]``). None: derived from the machine when the daemon starts
    (:func:`jitlaunch.lifecycle.admission.derive_budget`)."""

    max_instances: int | None = None  # all services together, warm pool members included
    memory: int | None = None  # MiB: guest memory plus the backend's overhead, per instance
    max_booting: int | None = None  # boots under way at once
    max_queued: int = 256  # starts waiting for room (FIFO); more are refused
    queue_timeout: float = 30.0  # a start waiting longer is refused
    wake: WakeConfig = field(default_factory=WakeConfig)


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path
    drain_timeout: float
    log_level: str
    query_log_rate: int = 100  # DNS query log lines per second at debug level; 0: none
    instance_log_max: int = 10 << 20  # bytes per instance log before it is rotated; 0: no cap
    # The group (besides root) allowed on the control socket; None: root only.
    control_group: str | None = None


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    # Every DNS name this service answers to, lower case, without the final dot.
    names: tuple[str, ...]
    backend: str
    settings: Any
    front: tuple[str, ...]
    ports: tuple[int, ...]
    answer: str
    idle_timeout: float
    boot_timeout: float
    stop: str
    max_instances: int
    ttl: int
    booting_ttl: int
    retry_backoff: float
    retry_backoff_max: float
    extra_names: int = 0
    # Health of a ready instance: a probe every interval (math.inf: never), each bounded by
    # the timeout; this many failures in a row and it is hung.
    health_interval: float = 10.0
    health_timeout: float = 2.0
    health_failures: int = 3
    #: Never evicted to make room for another service's start.
    pinned: bool = False
    #: Eviction order: lower priorities are evicted first (then the least recently active).
    priority: int = 0
    #: ``"v2"``: the proxy sends the PROXY protocol's v2 header (the client's address and
    #: port) on each connection to an instance, before the client's first byte.
    proxy_protocol: str | None = None
    #: The shared frontends it joins: ``(frontend name, port of the instance)``.
    frontends: tuple[tuple[str, int], ...] = ()
    #: With no ``front`` of its own: the addresses its frontends listen on, which DNS
    #: answers instead (set by :func:`~.frontends.join_frontends`).
    shared_front: tuple[str, ...] = ()

    @property
    def front_v4(self) -> tuple[str, ...]:
        return tuple(a for a in self.front or self.shared_front if ":" not in a)

    @property
    def front_v6(self) -> tuple[str, ...]:
        return tuple(a for a in self.front or self.shared_front if ":" in a)


ROUTES = ("host", "sni")


@dataclass(frozen=True)
class FrontendConfig:
    """A shared front (``[[frontend]]``): connections routed to services by name, by the
    HTTP ``Host`` header (``route = "host"``) or the TLS server name (``"sni"``)."""

    name: str
    listen: tuple[Endpoint, ...]
    route: str
    #: (sni) The service a ClientHello without a server name goes to; None: closed.
    default: str | None = None


@dataclass(frozen=True)
class Config:
    path: str
    daemon: DaemonConfig
    dns: DnsConfig
    proxy: ProxyConfig
    services: tuple[ServiceConfig, ...] = field(default=())
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    host: HostConfig = field(default_factory=HostConfig)
    frontends: tuple[FrontendConfig, ...] = ()

    def service(self, name: str) -> ServiceConfig:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)


