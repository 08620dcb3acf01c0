"""Configuration: TOML (tomllib) into frozen dataclasses.

Parsing is pure: :func:`parse_config` takes the text and a path (used only in messages and to
resolve relative paths) and either returns a :class:`Config` or raises
:class:`~jitlaunch.errors.ConfigError` whose message names the file, the service and the key
and says what was expected. Unknown keys are errors too: a typo must never be silently ignored.

The file has global tables ``[daemon]``, ``[dns]``, ``[proxy]`` and ``[defaults]`` and one
``[[service]]`` table per service. Every key of ``[defaults]`` may be repeated in a service;
backend settings live in a sub-table named after the backend (``[service.process]``). See the
README for the full reference.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

ANSWER_MODES = ("handoff", "proxy", "wait")
STOP_MODES = ("destroy", "shutdown", "pause", "save")

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


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

    rate: int = 200  # responses per second per source prefix; 0 turns RRL off
    slip: int = 2  # every slip-th limited response is sent truncated (TC=1); 0 never
    window: float = 15.0  # seconds over which the rate is averaged
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    exempt: tuple[str, ...] = ()  # networks never limited ("192.0.2.0/24")


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
    rrl: RrlConfig = field(default_factory=RrlConfig)


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

    @property
    def front_v4(self) -> tuple[str, ...]:
        return tuple(a for a in self.front if ":" not in a)

    @property
    def front_v6(self) -> tuple[str, ...]:
        return tuple(a for a in self.front if ":" in a)


@dataclass(frozen=True)
class Config:
    path: str
    daemon: DaemonConfig
    dns: DnsConfig
    proxy: ProxyConfig
    services: tuple[ServiceConfig, ...] = field(default=())
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    host: HostConfig = field(default_factory=HostConfig)

    def service(self, name: str) -> ServiceConfig:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)


class Table:
    """A TOML table being read: typed getters that raise ConfigError naming the key.

    Backends use it to read their own settings table; call :meth:`done` at the end so that
    unknown keys are reported.
    """

    def __init__(
        self, path: str, data: Mapping[str, Any], prefix: str = "", service: str | None = None
    ) -> None:
        self.path = path
        self.data = data
        self.prefix = prefix
        self.service = service
        self._seen: set[str] = set()

    def error(self, key: str | None, message: str) -> ConfigError:
        full = None if key is None else self.prefix + key
        return ConfigError(self.path, message, service=self.service, key=full)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        self._seen.add(key)
        return self.data.get(key, default)

    def sub(self, key: str, *, required: bool = False) -> Table:
        value = self.raw(key)
        if value is None:
            if required:
                raise self.error(key, "missing table")
            value = {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_show(value)}")
        return Table(self.path, value, f"{self.prefix}{key}.", self.service)

    def string(self, key: str, default: str | None = None, *, choices: tuple[str, ...] = ()) -> str:
        value = self.raw(key, default)
        if value is None:
            raise self.error(key, "missing (expected a string)")
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_show(value)}")
        if choices and value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def strings(self, key: str, default: list[str] | None = None, *, one_ok: bool = True) -> list[str]:
        value = self.raw(key, default)
        if value is None:
            raise self.error(key, "missing (expected a list of strings)")
        if one_ok and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected a list of strings, got {_show(value)}")
        return list(value)

    def integer(
        self, key: str, default: int | None = None, *, low: int = 0, high: int = 2**31 - 1
    ) -> int:
        value = self.raw(key, default)
        if value is None:
            raise self.error(key, "missing (expected an integer)")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_show(value)}")
        if not low <= value <= high:
            raise self.error(key, f"expected an integer from {low} to {high}, got {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_show(value)}")
        return value

    def duration(
        self, key: str, default: float | str | None = None, *, allow_zero: bool = False
    ) -> float:
        """Seconds, as a number or a string with a unit (``"250ms"``, ``"30s"``, ``"5m"``,
        ``"1h"``). ``"never"`` means no limit (``math.inf``)."""
        value = self.raw(key, default)
        expected = 'a duration such as 30, "250ms", "30s", "5m" or "never"'
        if value is None:
            raise self.error(key, f"missing (expected {expected})")
        seconds: float
        if isinstance(value, bool):
            raise self.error(key, f"expected {expected}, got {_show(value)}")
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and value.strip() == "never":
            seconds = math.inf
        elif isinstance(value, str) and (m := _DURATION.match(value)):
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
        else:
            raise self.error(key, f"expected {expected}, got {_show(value)}")
        if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
            raise self.error(key, f"expected a positive duration, got {_show(value)}")
        return seconds

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _show(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} ({text})"


def _dns_name(table: Table, key: str, value: str) -> str:
    name = value.strip().rstrip(".").lower()
    labels = name.split(".")
    if not name or not all(_LABEL.match(label) for label in labels) or len(name) > 253:
        raise table.error(key, f"expected a DNS name such as 'apps.example.org', got {value!r}")
    return name


def _endpoint(table: Table, key: str, value: str) -> Endpoint:
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:([0-9]+)$", value) or re.match(
        r"^([0-9.]+):([0-9]+)$", value
    )
    expected = f"expected ADDRESS:PORT such as '127.0.0.1:5353' or '[::1]:5353', got {value!r}"
    if not m:
        raise table.error(key, expected)
    try:
        host = str(ipaddress.ip_address(m.group(1)))
    except ValueError:
        raise table.error(key, expected) from None
    port = int(m.group(2))
    if port > 65535:
        raise table.error(key, f"port must be from 0 to 65535, got {port}")
    return Endpoint(host, port)


def _address(table: Table, key: str, value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise table.error(key, f"expected an IPv4 or IPv6 address, got {value!r}") from None


def default_state_dir() -> Path:
    """Where instance logs and state go: systemd's StateDirectory, else a per-user default."""
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/jitlaunch")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "jitlaunch"


def _parse_dns(root: Table) -> DnsConfig:
    t = root.sub("dns")
    listen = tuple(_endpoint(t, "listen", v) for v in t.strings("listen", ["127.0.0.1:5353"]))
    if not listen:
        raise t.error("listen", "expected at least one ADDRESS:PORT")
    zone_names = [_dns_name(t, "zones", z) for z in t.strings("zones")]
    if not zone_names:
        raise t.error("zones", "expected at least one zone name")
    if len(set(zone_names)) != len(zone_names):
        raise t.error("zones", "the same zone is listed twice")
    ns_names = [_dns_name(t, "nameservers", n) for n in t.strings("nameservers", [])]
    glue = t.strings("nameserver_addresses", [])
    glue_addrs = tuple(_address(t, "nameserver_addresses", a) for a in glue)
    if not glue:
        glue_addrs = tuple(e.host for e in listen if e.host not in ("0.0.0.0", "::"))
    soa = t.sub("soa")
    zones = []
    for z in zone_names:
        nameservers = tuple(ns_names) or (f"ns.{z}",)
        zones.append(
            Zone(
                name=z,
                nameservers=nameservers,
                mname=_dns_name(soa, "mname", soa.string("mname", nameservers[0])),
                rname=_dns_name(soa, "rname", soa.string("rname", f"hostmaster.{z}")),
                serial=soa.integer("serial", 1, high=2**32 - 1),
                refresh=soa.integer("refresh", 3600),
                retry=soa.integer("retry", 600),
                expire=soa.integer("expire", 86400),
                minimum=soa.integer("minimum", 30),
                soa_ttl=soa.integer("ttl", 300),
            )
        )
    soa.done()
    cfg = DnsConfig(
        listen=listen,
        zones=tuple(zones),
        nameserver_addresses=glue_addrs,
        ttl=t.integer("ttl", 30),
        booting_ttl=t.integer("booting_ttl", 1),
        edns_payload=t.integer("edns_payload", 1232, low=512, high=65535),
        tcp_idle_timeout=t.duration("tcp_idle_timeout", 10),
        max_tcp_connections=t.integer("max_tcp_connections", 256, low=1),
        tcp_message_timeout=t.duration("tcp_message_timeout", 3),
        max_tcp_connections_per_source=t.integer("max_tcp_connections_per_source", 32, low=1),
        max_held=t.integer("max_held", 1024, low=1),
        max_held_per_connection=t.integer("max_held_per_connection", 16, low=1),
        rrl=_parse_rrl(t.sub("rrl")),
    )
    t.done()
    return cfg


def _parse_rrl(t: Table) -> RrlConfig:
    exempt = []
    for net in t.strings("exempt", []):
        try:
            exempt.append(str(ipaddress.ip_network(net, strict=False)))
        except ValueError:
            raise t.error(
                "exempt", f"expected a network such as '192.0.2.0/24' or '2001:db8::/32', got {net!r}"
            ) from None
    cfg = RrlConfig(
        rate=t.integer("rate", 200),
        slip=t.integer("slip", 2, high=100),
        window=t.duration("window", 15),
        ipv4_prefix=t.integer("ipv4_prefix", 24, high=32),
        ipv6_prefix=t.integer("ipv6_prefix", 56, high=128),
        exempt=tuple(exempt),
    )
    t.done()
    return cfg


def _parse_service(
    path: str, data: Any, index: int, defaults: Table, dns: DnsConfig, base_dir: Path
) -> ServiceConfig:
    from .backends import parse_backend_settings, stop_modes

    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a table, got {_show(data)}", key=f"service[{index}]")
    raw_name = data.get("name")
    if not isinstance(raw_name, str):
        raise ConfigError(
            path, "missing or not a string (expected a DNS label such as 'hello')",
            key=f"service[{index}].name",
        )
    t = Table(path, data, "", service=raw_name)
    name = t.string("name").lower()
    if not _LABEL.match(name):
        raise t.error("name", f"expected a DNS label (letters, digits, '-'), got {raw_name!r}")

    def pick(key: str) -> Table:
        # A service's own value wins over [defaults].
        return t if t.has(key) else defaults

    names = [f"{name}.{z.name}" for z in dns.zones]
    for extra in t.strings("names", []):
        n = _dns_name(t, "names", extra)
        if not any(n == z.name or n.endswith("." + z.name) for z in dns.zones):
            raise t.error("names", f"{extra!r} is not inside any configured zone")
        if any(n == z.name for z in dns.zones):
            raise t.error("names", f"{extra!r} is a zone apex; it holds SOA and NS records")
        names.append(n)
    backend = pick("backend").string("backend", "process")
    front = tuple(_address(t, "front", a) for a in t.strings("front"))
    if not front:
        raise t.error("front", "expected at least one address")
    ports = t.raw("ports")
    if isinstance(ports, int) and not isinstance(ports, bool):
        ports = [ports]
    if (
        not isinstance(ports, list)
        or not ports
        or not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports)
    ):
        raise t.error("ports", f"expected a list of port numbers (1 to 65535), got {_show(ports)}")
    answer = pick("answer").string("answer", "handoff", choices=ANSWER_MODES)
    stop = pick("stop").string("stop", "destroy", choices=STOP_MODES)
    try:
        supported = stop_modes(backend)
    except KeyError:
        raise pick("backend").error("backend", f"unknown backend {backend!r}") from None
    for other in ("process", "qemu", "libvirt"):
        if other != backend and other in data:
            raise t.error(other, f"settings for the {other} backend, but backend is {backend!r}")
    table = t.sub(backend) if backend in data else Table(path, {}, f"{backend}.", name)
    settings = parse_backend_settings(backend, table, base_dir, tuple(ports))
    if stop not in supported:
        raise pick("stop").error(
            "stop", f"the {backend} backend supports {', '.join(supported)}, not {stop!r}"
        )
    svc = ServiceConfig(
        name=name,
        names=tuple(names),
        backend=backend,
        settings=settings,
        front=front,
        ports=tuple(ports),
        answer=answer,
        idle_timeout=pick("idle_timeout").duration("idle_timeout", 300),
        boot_timeout=pick("boot_timeout").duration("boot_timeout", 10),
        stop=stop,
        max_instances=pick("max_instances").integer("max_instances", 1, low=1, high=10000),
        ttl=pick("ttl").integer("ttl", dns.ttl),
        booting_ttl=pick("booting_ttl").integer("booting_ttl", dns.booting_ttl),
        retry_backoff=pick("retry_backoff").duration("retry_backoff", 1),
        retry_backoff_max=pick("retry_backoff_max").duration("retry_backoff_max", 60),
        extra_names=len(names) - len(dns.zones),
        health_interval=pick("health_interval").duration("health_interval", 10),
        health_timeout=pick("health_timeout").duration("health_timeout", 2),
        health_failures=pick("health_failures").integer("health_failures", 3, low=1, high=1000),
        pinned=t.boolean("pinned", False),
        priority=pick("priority").integer("priority", 0, low=-1000, high=1000),
    )
    t.done()
    pool = getattr(settings, "pool", 0)
    if pool >= svc.max_instances:
        raise t.error(
            "max_instances", f"must be more than the warm pool ({pool}): pooled instances count "
            f"against it, and one must be left to run; set it to at least {pool + 1}"
        )
    if svc.retry_backoff_max < svc.retry_backoff:
        raise t.error("retry_backoff_max", "must not be smaller than retry_backoff")
    return svc


_DEFAULT_KEYS = (
    "backend", "answer", "idle_timeout", "boot_timeout", "stop", "max_instances", "ttl",
    "booting_ttl", "retry_backoff", "retry_backoff_max", "health_interval", "health_timeout",
    "health_failures", "priority",
)


def parse_config(text: str, path: str = "<config>", base_dir: Path | None = None) -> Config:
    """Parse configuration text. ``path`` is used in messages; relative paths in the text are
    relative to ``base_dir``, by default the directory of ``path``.

    Raises ConfigError (never anything else) for any problem in the text.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"not valid TOML: {exc}") from None
    if base_dir is None:
        base_dir = Path(path).resolve().parent if not path.startswith("<") else Path.cwd()
    root = Table(path, data)

    d = root.sub("daemon")
    state_dir = d.raw("state_dir")
    if state_dir is not None and not isinstance(state_dir, str):
        raise d.error("state_dir", f"expected a path, got {_show(state_dir)}")
    daemon = DaemonConfig(
        state_dir=(base_dir / state_dir) if state_dir else default_state_dir(),
        drain_timeout=d.duration("drain_timeout", 5, allow_zero=True),
        log_level=d.string(
            "log_level", "info", choices=("debug", "info", "warning", "error")
        ),
        query_log_rate=d.integer("query_log_rate", 100, high=100_000),
        instance_log_max=d.integer("instance_log_max", 10 << 20, high=2**62),
        control_group=d.string("control_group") if d.has("control_group") else None,
    )
    d.done()

    dns = _parse_dns(root)

    p = root.sub("proxy")
    proxy = ProxyConfig(
        max_buffer=p.integer("max_buffer", 65536, low=1),
        max_pending=p.integer("max_pending", 256, low=1),
        connect_timeout=p.duration("connect_timeout", 5),
        max_connections=p.integer("max_connections", low=1) if p.has("max_connections") else None,
        max_connections_per_source=(
            p.integer("max_connections_per_source", low=1)
            if p.has("max_connections_per_source") else None
        ),
        max_connecting=p.integer("max_connecting", 32, low=1),
        first_data_timeout=p.duration("first_data_timeout", 10),
        answer_timeout=p.duration("answer_timeout", 30),
        idle_timeout=p.duration("idle_timeout", "10m"),
        half_close_timeout=p.duration("half_close_timeout", 30),
        max_buffer_total=p.integer("max_buffer_total", 32 << 20, low=1, high=2**62),
    )
    p.done()

    m = root.sub("metrics")
    metrics = MetricsConfig(
        listen=tuple(_endpoint(m, "listen", v) for v in m.strings("listen", ["127.0.0.1:9464"])),
        timeout=m.duration("timeout", 10),
        max_connections=m.integer("max_connections", 16, low=1, high=4096),
    )
    m.done()

    host = _parse_host(root.sub("host"))

    defaults = root.sub("defaults")
    for key in defaults.data:
        if key not in _DEFAULT_KEYS:
            raise defaults.error(key, f"unknown key (allowed: {', '.join(_DEFAULT_KEYS)})")
        defaults.raw(key)

    raw_services = root.raw("service", [])
    if not isinstance(raw_services, list):
        raise root.error("service", "expected [[service]] tables")
    services = tuple(
        _parse_service(path, s, i, defaults, dns, base_dir) for i, s in enumerate(raw_services)
    )
    root.done()
    _check_unique(path, services)
    _check_host(path, host, services)
    return Config(
        path=path, daemon=daemon, dns=dns, proxy=proxy, services=services, metrics=metrics,
        host=host,
    )


def _parse_host(t: Table) -> HostConfig:
    def optional(key: str) -> int | None:
        return t.integer(key, low=1) if t.has(key) else None

    w = t.sub("wake")
    rate = w.raw("rate", 1.0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1e6:
        raise w.error("rate", f"expected boots per second (a number, 0 turns it off), got "
                      f"{_show(rate)}")
    wake = WakeConfig(
        rate=float(rate),
        burst=w.integer("burst", 10, low=1, high=1_000_000),
        ipv4_prefix=w.integer("ipv4_prefix", 24, high=32),
        ipv6_prefix=w.integer("ipv6_prefix", 56, high=128),
    )
    w.done()
    host = HostConfig(
        max_instances=optional("max_instances"),
        memory=optional("memory"),
        max_booting=optional("max_booting"),
        max_queued=t.integer("max_queued", 256, low=0, high=1_000_000),
        queue_timeout=t.duration("queue_timeout", 30),
        wake=wake,
    )
    t.done()
    return host


def _check_host(path: str, host: HostConfig, services: tuple[ServiceConfig, ...]) -> None:
    """Warm pools hold their members all the time: they must leave room to run something."""
    pooled = sum(getattr(s.settings, "pool", 0) for s in services)
    if host.max_instances is not None and pooled >= host.max_instances:
        raise ConfigError(
            path, f"must be more than the warm pool members of all services together "
            f"({pooled}), which count against it", key="host.max_instances",
        )


def _check_unique(path: str, services: tuple[ServiceConfig, ...]) -> None:
    seen_names: dict[str, str] = {}
    seen_fronts: dict[tuple[str, int], str] = {}
    for s in services:
        for n in s.names:
            if n in seen_names:
                # The first names are <name>.<zone>, one per zone; the rest come from `names`.
                generated = s.names.index(n) < len(s.names) - s.extra_names
                raise ConfigError(
                    path, f"name {n!r} is already used by service {seen_names[n]!r}",
                    service=s.name, key="name" if generated else "names",
                )
            seen_names[n] = s.name
        for a in s.front:
            for port in s.ports:
                if (a, port) in seen_fronts:
                    raise ConfigError(
                        path,
                        f"{a} port {port} is already the front of service "
                        f"{seen_fronts[(a, port)]!r}",
                        service=s.name, key="front",
                    )
                seen_fronts[(a, port)] = s.name


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and parse a config file; ``None`` loads the default configuration shipped in
    the package. Raises ConfigError naming the file when it cannot be read."""
    if path is None:
        # Relative paths in the default config are relative to the package directory.
        package_dir = Path(__file__).resolve().parent
        text = (package_dir / "default.toml").read_text()
        return parse_config(text, "<default config>", package_dir)
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, f"cannot read the file: {exc}") from None
    return parse_config(text, name)
