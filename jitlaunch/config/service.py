"""A ``[[service]]`` table into a :class:`~.model.ServiceConfig`, and the checks across
services (a name, a front or a service defined twice). Pure, as parse.py: every error is a
ConfigError naming the file, the service and the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError
from .frontends import service_frontends
from .model import ANSWER_MODES, STOP_MODES, DnsConfig, ServiceConfig
from .reader import LABEL, Table, address, dns_name, once, show

#: The PROXY protocol versions a service may ask for (HAProxy's binary version 2).
PROXY_PROTOCOLS = ("v2",)


class SettingsParser(Protocol):
    """What parsing needs from a backend (``jitlaunch.backends.SETTINGS`` holds the real ones,
    by backend name). Config never imports the backends; they are passed in."""

    @property
    def stop_modes(self) -> tuple[str, ...]:
        """The ``stop`` modes the backend supports."""
        ...

    def parse_settings(self, table: Table, base_dir: Path, ports: tuple[int, ...]) -> Any:
        """Read a service's backend table (call ``table.done()``); ``ports`` are the
        service's front ports. The result must compare by value (a frozen dataclass)."""
        ...

    # Optional: ``parse_top(table: Table) -> Mapping[str, Any] | None`` reads the global
    # ``[<backend>]`` table (call ``table.done()``) and returns the defaults it gives the
    # services' sub-tables, or None if the backend has no global table.


def parse_service(
    path: str, data: Any, index: int, defaults: Table, dns: DnsConfig, base_dir: Path,
    backends: Mapping[str, SettingsParser], tops: Mapping[str, Mapping[str, Any]],
) -> ServiceConfig:
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a table, got {show(data)}", key=f"service[{index}]")
    raw_name = data.get("name")
    if not isinstance(raw_name, str):
        raise ConfigError(
            path, "missing or not a string (expected a DNS label such as 'hello')",
            key=f"service[{index}].name",
        )
    t = Table(path, data, "", service=raw_name)
    name = t.string("name").lower()
    if not LABEL.match(name):
        raise t.error("name", f"expected a DNS label (letters, digits, '-'), got {raw_name!r}")

    def pick(key: str) -> Table:
        # A service's own value wins over [defaults].
        return t if t.has(key) else defaults

    def inherited(key: str) -> Any:
        return _INHERITED[key](pick(key), dns)

    names = _names(t, name, dns)
    backend = inherited("backend")
    ports = t.ports("ports")
    if not ports:
        raise t.error("ports", "expected a list of port numbers (1 to 65535), got a list ([])")
    once(t, "ports", ports)
    frontends = service_frontends(t, ports)
    front = tuple(address(t, "front", a)
                  for a in t.strings("front", [], what="addresses"))
    if not front and not frontends:
        raise t.error("front", "expected at least one address (or frontends = { NAME = PORT })")
    once(t, "front", front)
    answer = inherited("answer")
    stop = inherited("stop")
    settings = _settings(t, pick, backend, stop, base_dir, backends, tops, tuple(ports))
    svc = ServiceConfig(
        name=name,
        names=tuple(names),
        backend=backend,
        settings=settings,
        front=front,
        ports=tuple(ports),
        answer=answer,
        idle_timeout=inherited("idle_timeout"),
        boot_timeout=inherited("boot_timeout"),
        stop=stop,
        max_instances=inherited("max_instances"),
        ttl=inherited("ttl"),
        booting_ttl=inherited("booting_ttl"),
        retry_backoff=inherited("retry_backoff"),
        retry_backoff_max=inherited("retry_backoff_max"),
        extra_names=len(names) - len(dns.zones),
        health_interval=inherited("health_interval"),
        health_timeout=inherited("health_timeout"),
        health_failures=inherited("health_failures"),
        pinned=t.boolean("pinned", False),
        proxy_protocol=(t.string("proxy_protocol", choices=PROXY_PROTOCOLS)
                        if t.has("proxy_protocol") else None),
        priority=inherited("priority"),
        frontends=frontends,
    )
    t.done(also=_DEFAULT_KEYS)
    _check_service(t, svc)
    return svc


def _check_service(t: Table, svc: ServiceConfig) -> None:
    pool = getattr(svc.settings, "pool", 0)
    if pool >= svc.max_instances:
        raise t.error(
            "max_instances", f"must be more than the warm pool ({pool}): pooled instances count "
            f"against it, and one must be left to run; set it to at least {pool + 1}"
        )
    if svc.retry_backoff_max < svc.retry_backoff:
        raise t.error("retry_backoff_max", "must not be smaller than retry_backoff")


def _names(t: Table, name: str, dns: DnsConfig) -> list[str]:
    """The service's DNS names: ``<name>.<zone>`` in every zone, then its ``names``."""
    names = [f"{name}.{z.name}" for z in dns.zones]
    for extra in t.strings("names", [], what="DNS names"):
        n = dns_name(t, "names", extra)
        if n in names[: len(dns.zones)]:
            raise t.error("names", f"{extra!r} is already the service's own name")
        if n in names:
            raise t.error("names", f"{extra!r} is listed twice")
        if not any(n == z.name or n.endswith("." + z.name) for z in dns.zones):
            raise t.error("names", f"{extra!r} is not inside any configured zone")
        if any(n == z.name for z in dns.zones):
            raise t.error("names", f"{extra!r} is a zone apex; it holds SOA and NS records")
        names.append(n)
    return names


def _settings(
    t: Table, pick: Callable[[str], Table], backend: str, stop: str, base_dir: Path,
    backends: Mapping[str, SettingsParser], tops: Mapping[str, Mapping[str, Any]],
    ports: tuple[int, ...],
) -> Any:
    """The service's backend settings, read by its backend's parser (the global table's
    values under the service's own), after checking the backend and its stop mode."""
    parser = backends.get(backend)
    if parser is None:
        raise pick("backend").error("backend", f"unknown backend {backend!r}")
    for other in backends:
        if other != backend and other in t.data:
            raise t.error(other, f"settings for the {other} backend, but backend is {backend!r}")
    name = t.service
    table = t.sub(backend) if backend in t.data else Table(t.path, {}, f"{backend}.", name)
    if tops.get(backend):
        table = Table(t.path, {**tops[backend], **table.data}, table.prefix, name)
    settings = parser.parse_settings(table, base_dir, ports)
    supported = parser.stop_modes
    if stop not in supported:
        raise pick("stop").error(
            "stop", f"the {backend} backend supports {', '.join(supported)}, not {stop!r}"
        )
    return settings


#: The service keys that [defaults] may set, each with its reader (a service's table, or
#: [defaults] when the service leaves the key out; ``dns`` gives the TTL defaults).
_INHERITED: dict[str, Callable[[Table, DnsConfig], Any]] = {
    "backend": lambda t, dns: t.string("backend", "process"),
    "answer": lambda t, dns: t.string("answer", "handoff", choices=ANSWER_MODES),
    "idle_timeout": lambda t, dns: t.duration("idle_timeout", 300),
    "boot_timeout": lambda t, dns: t.duration("boot_timeout", 10),
    "stop": lambda t, dns: t.string("stop", "destroy", choices=STOP_MODES),
    "max_instances": lambda t, dns: t.integer("max_instances", 1, low=1, high=10000),
    "ttl": lambda t, dns: t.integer("ttl", dns.ttl, unit="seconds"),
    "booting_ttl": lambda t, dns: t.integer("booting_ttl", dns.booting_ttl, unit="seconds"),
    "retry_backoff": lambda t, dns: t.duration("retry_backoff", 1),
    "retry_backoff_max": lambda t, dns: t.duration("retry_backoff_max", 60),
    "health_interval": lambda t, dns: t.duration("health_interval", 10),
    "health_timeout": lambda t, dns: t.duration("health_timeout", 2),
    "health_failures": lambda t, dns: t.integer("health_failures", 3, low=1, high=1000),
    "priority": lambda t, dns: t.integer("priority", 0, low=-1000, high=1000),
}
_DEFAULT_KEYS = tuple(_INHERITED)


def parse_defaults(
    root: Table, dns: DnsConfig, backends: Mapping[str, SettingsParser]
) -> Table:
    """[defaults], every value checked now: a service that sets the key itself never reads
    it, and a bad value must not wait for a service that does."""
    defaults = root.sub("defaults")
    for key in defaults.data:
        if key not in _INHERITED:
            raise defaults.error(key, f"unknown key (allowed: {', '.join(_DEFAULT_KEYS)})")
        value = _INHERITED[key](defaults, dns)
        if key == "backend" and value not in backends:
            raise defaults.error(key, f"unknown backend {value!r}")
    return defaults



_SERVICE_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*service[ \t]*\]\][ \t]*(#.*)?$", re.MULTILINE)


def _service_places(text: str, count: int) -> list[str]:
    """Where each [[service]] table is, for messages: its header's line when every service
    has a ``[[service]]`` header line, else its position among them."""
    lines = [text.count("\n", 0, m.start()) + 1 for m in _SERVICE_HEADER.finditer(text)]
    if len(lines) == count:
        return [f"line {n}" for n in lines]
    return [f"[[service]] number {i + 1}" for i in range(count)]


def check_unique(path: str, text: str, services: tuple[ServiceConfig, ...]) -> None:
    first: dict[str, int] = {}
    for i, s in enumerate(services):
        if s.name in first:
            places = _service_places(text, len(services))
            raise ConfigError(
                path, f"defined twice, at {places[first[s.name]]} and at {places[i]}",
                service=s.name,
            )
        first[s.name] = i
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
