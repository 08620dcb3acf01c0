"""Configuration text into a :class:`~.model.Config`: the section parsers and cross-checks.

Parsing is pure: :func:`parse_config` takes the text, a path (used only in messages and to
resolve relative paths), the backends' settings parsers and the process environment it needs
(:class:`ParseEnv`), and either returns a :class:`Config` or raises
:class:`~jitlaunch.errors.ConfigError` whose message names the file, the service and the key
and says what was expected. It reads no file and no environment variable. Unknown keys are
errors too: a typo must never be silently ignored.

The file has global tables ``[daemon]``, ``[dns]``, ``[proxy]``, ``[metrics]``, ``[host]`` and
``[defaults]``, one ``[[service]]`` table per service and one ``[[frontend]]`` per shared front
(:mod:`.frontends`). Every key of ``[defaults]`` may be
repeated in a service; backend settings live in a sub-table named after the backend
(``[service.process]``), read by that backend's :class:`SettingsParser`. A backend may also
have a global table named after it (``[libvirt]``) whose keys are defaults for every one of
its services' sub-tables (a service's own value wins). See the README for the full reference.
"""

from __future__ import annotations

import difflib
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .frontends import join_frontends, parse_frontends
from .model import (
    Config,
    DaemonConfig,
    DnsConfig,
    HostConfig,
    MetricsConfig,
    ProxyConfig,
    RrlConfig,
    ServiceConfig,
    WakeConfig,
    Zone,
)
from .reader import Table, address, dns_name, endpoint, once, show
from .records import check_records, parse_records
from .service import SettingsParser, check_unique, parse_defaults, parse_service


@dataclass(frozen=True)
class ParseEnv:
    """The facts about the process that parsing depends on, gathered once by the caller
    (:func:`~.load.process_env` reads them from ``os.environ`` and ``os.geteuid()``)."""

    is_root: bool
    home: Path
    #: The current directory: relative config paths given to parse_config resolve against it.
    cwd: Path
    #: ``$STATE_DIRECTORY`` (set by systemd's StateDirectory=; several are ':'-separated).
    state_directory: str | None = None
    #: ``$XDG_STATE_HOME``.
    xdg_state_home: str | None = None


_ENDPOINTS = "ADDRESS:PORT strings"


def default_state_dir(env: ParseEnv) -> Path:
    """Where instance logs and state go: systemd's StateDirectory, else a per-user default."""
    if env.state_directory:
        return Path(env.state_directory.split(":")[0])
    if env.is_root:
        return Path("/var/lib/jitlaunch")
    base = env.xdg_state_home or str(env.home / ".local" / "state")
    return Path(base) / "jitlaunch"


def _glue_table(t: Table, ns_names: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``nameserver_addresses`` written as a table: each nameserver's own glue addresses
    (two hosts, each one nameserver). Empty when it is a list (every nameserver inside a
    zone gets all of them) or absent."""
    value = t.raw("nameserver_addresses")
    if not isinstance(value, dict):
        return ()
    sub = t.sub("nameserver_addresses")
    out = []
    for name in value:
        ns = dns_name(t, "nameserver_addresses", name)
        if ns not in ns_names:
            raise sub.error(name, "not one of dns.nameservers "
                            f"({', '.join(ns_names) or 'none set'})")
        addrs = tuple(address(sub, name, a) for a in sub.strings(name, what="addresses"))
        if not addrs:
            raise sub.error(name, "expected at least one address")
        once(sub, name, addrs)
        out.append((ns, addrs))
    sub.done()
    return tuple(out)


def _parse_dns(root: Table) -> DnsConfig:
    t = root.sub("dns")
    listen = tuple(endpoint(t, "listen", v) for v in t.strings("listen", ["127.0.0.1:5300"], what=_ENDPOINTS))
    if not listen:
        raise t.error("listen", "expected at least one ADDRESS:PORT")
    zone_names = [dns_name(t, "zones", z) for z in t.strings("zones", what="zone names")]
    if not zone_names:
        raise t.error("zones", "expected at least one zone name")
    once(t, "zones", zone_names)
    ns_names = [dns_name(t, "nameservers", n) for n in t.strings("nameservers", [], what="DNS names")]
    once(t, "nameservers", ns_names)
    glue_by_name = _glue_table(t, ns_names)
    if glue_by_name:
        glue = [a for _, addrs in glue_by_name for a in addrs]
        glue_addrs = tuple(dict.fromkeys(glue))
    else:
        glue = t.strings("nameserver_addresses", [], what="addresses")
        glue_addrs = tuple(address(t, "nameserver_addresses", a) for a in glue)
        once(t, "nameserver_addresses", glue_addrs)
    once(t, "listen", [e for e in listen if e.port != 0])  # port 0: a new free port each
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
                mname=dns_name(soa, "mname", soa.string("mname", nameservers[0])),
                rname=dns_name(soa, "rname", soa.string("rname", f"hostmaster.{z}")),
                serial=soa.integer("serial", 1, high=2**32 - 1),
                refresh=soa.integer("refresh", 3600),
                retry=soa.integer("retry", 600),
                expire=soa.integer("expire", 86400),
                minimum=soa.integer("minimum", 30),
                soa_ttl=soa.integer("ttl", 300),
            )
        )
    soa.done()
    records = parse_records(t, tuple(zone_names), zones[0].soa_ttl)
    cfg = DnsConfig(
        listen=listen,
        zones=tuple(zones),
        nameserver_addresses=glue_addrs,
        nameserver_glue=glue_by_name,
        ttl=t.integer("ttl", 30, unit="seconds"),
        booting_ttl=t.integer("booting_ttl", 1, unit="seconds"),
        edns_payload=t.integer("edns_payload", 1232, low=512, high=65535, unit="bytes"),
        tcp_idle_timeout=t.duration("tcp_idle_timeout", 10),
        max_tcp_connections=t.integer("max_tcp_connections", 256, low=1),
        tcp_message_timeout=t.duration("tcp_message_timeout", 3),
        max_tcp_connections_per_source=t.integer("max_tcp_connections_per_source", 32, low=1),
        max_held=t.integer("max_held", 1024, low=1),
        max_held_per_connection=t.integer("max_held_per_connection", 16, low=1),
        max_held_per_source=t.integer("max_held_per_source", 128, low=1),
        max_held_per_service=t.integer("max_held_per_service", 256, low=1),
        rrl=_parse_rrl(t.sub("rrl")),
        records=records,
    )
    t.done()
    return cfg


def _parse_rrl(t: Table) -> RrlConfig:
    exempt = []
    for net in t.strings("exempt", [], what="networks"):
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
        # Unset: as ``rate`` (None, so that a reload changing ``rate`` changes that alone).
        nxdomain_rate=t.integer("nxdomain_rate") if t.has("nxdomain_rate") else None,
        error_rate=t.integer("error_rate") if t.has("error_rate") else None,
    )
    t.done()
    return cfg


def parse_config(
    text: str,
    path: str = "<config>",
    base_dir: Path | None = None,
    *,
    backends: Mapping[str, SettingsParser],
    env: ParseEnv,
) -> Config:
    """Parse configuration text. ``path`` is used in messages; relative paths in the text are
    relative to ``base_dir``, by default the directory of ``path`` (taken relative to
    ``env.cwd``, symlinks not followed: the caller that reads the file passes the resolved
    directory). ``backends`` maps each backend name to its settings parser.

    Reads no file and no environment. Raises ConfigError (never anything else) for any
    problem in the text.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"not valid TOML: {exc}") from None
    if base_dir is None:
        base_dir = (env.cwd / path).parent if not path.startswith("<") else env.cwd
    root = Table(path, data)
    _check_tables(path, data, backends)

    daemon = _parse_daemon(root.sub("daemon"), base_dir, env)
    dns = _parse_dns(root)
    proxy = _parse_proxy(root.sub("proxy"))
    metrics = _parse_metrics(root.sub("metrics"))
    host = _parse_host(root.sub("host"))
    frontends = parse_frontends(root)

    defaults = parse_defaults(root, dns, backends)

    tops = _parse_backend_tables(root, backends)
    raw_services = root.raw("service", [])
    if not isinstance(raw_services, list):
        raise root.error("service", "expected [[service]] tables")
    services = tuple(
        parse_service(path, s, i, defaults, dns, base_dir, backends, tops)
        for i, s in enumerate(raw_services)
    )
    root.done()
    check_unique(path, text, services)
    services = join_frontends(path, frontends, services)
    taken = {n: f"the name of service {s.name!r}" for s in services for n in s.names}
    taken |= {n: "a nameserver with glue" for z in dns.zones for n in z.nameservers
              if dns.nameserver_addresses or dns.nameserver_glue}
    check_records(path, dns.records, tuple(z.name for z in dns.zones), taken)
    _check_host(path, host, services)
    return Config(
        path=path, daemon=daemon, dns=dns, proxy=proxy, services=services, metrics=metrics,
        host=host, frontends=frontends,
    )


def _parse_daemon(d: Table, base_dir: Path, env: ParseEnv) -> DaemonConfig:
    state_dir = d.raw("state_dir")
    if state_dir is not None and (not isinstance(state_dir, str) or not state_dir.strip()):
        raise d.error("state_dir", f"expected a path, got {show(state_dir)}")
    daemon = DaemonConfig(
        state_dir=(base_dir / state_dir) if state_dir else default_state_dir(env),
        drain_timeout=d.duration("drain_timeout", 5, allow_zero=True),
        log_level=d.string(
            "log_level", "info", choices=("debug", "info", "warning", "error")
        ),
        query_log_rate=d.integer("query_log_rate", 100, high=100_000),
        instance_log_max=d.integer("instance_log_max", 10 << 20, high=2**62, unit="bytes"),
        control_group=d.string("control_group") if d.has("control_group") else None,
    )
    d.done()
    return daemon


def _parse_proxy(p: Table) -> ProxyConfig:
    proxy = ProxyConfig(
        max_buffer=p.integer("max_buffer", 65536, low=1, unit="bytes"),
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
        max_buffer_total=p.integer("max_buffer_total", 32 << 20, low=1, high=2**62, unit="bytes"),
    )
    p.done()
    return proxy


def _parse_metrics(m: Table) -> MetricsConfig:
    metrics = MetricsConfig(
        listen=tuple(
            endpoint(m, "listen", v)
            for v in m.strings("listen", ["127.0.0.1:9464"], what=_ENDPOINTS)
        ),
        timeout=m.duration("timeout", 10),
        max_connections=m.integer("max_connections", 16, low=1, high=4096),
    )
    m.done()
    return metrics


#: The top-level tables, as written in the file.
_TABLES = {
    "daemon": "[daemon]", "dns": "[dns]", "proxy": "[proxy]", "metrics": "[metrics]",
    "host": "[host]", "defaults": "[defaults]", "service": "[[service]]",
    "frontend": "[[frontend]]",
}


def _check_tables(path: str, data: Mapping[str, Any], backends: Mapping[str, SettingsParser]) -> None:
    """Unknown top-level names first: a typo'd ``[dnss]`` must be named as such, not show up
    later as ``dns.zones: missing``. A backend's name passes (:func:`_parse_backend_tables`
    says whether that backend has a global table)."""
    for key, value in data.items():
        if key in _TABLES or key in backends:
            continue
        table = isinstance(value, dict) or (
            isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
        )
        known = list(_TABLES.values())
        names = {**_TABLES, **{b: f"[{b}]" for b in backends}}
        if table and (close := difflib.get_close_matches(key, list(names), n=1)):
            message = f"unknown table (did you mean {names[close[0]]}?)"
        elif table:
            message = f"unknown table (the tables are {', '.join(known[:-1])} and {known[-1]})"
        else:
            message = f"unknown key (keys belong in a table: {', '.join(known)})"
        raise ConfigError(path, message, key=key)


def _parse_backend_tables(
    root: Table, backends: Mapping[str, SettingsParser]
) -> dict[str, Mapping[str, Any]]:
    """The global ``[<backend>]`` tables: each backend's defaults for its services."""
    tops: dict[str, Mapping[str, Any]] = {}
    for name, parser in backends.items():
        if name not in root.data:
            continue
        parse_top = getattr(parser, "parse_top", None)
        found = parse_top(root.sub(name)) if parse_top is not None else None
        if found is None:
            raise root.error(name, f"the {name} backend has no global table; its settings go "
                             f"in each service's [service.{name}]")
        tops[name] = found
    return tops


def _parse_host(t: Table) -> HostConfig:
    def optional(key: str, unit: str | None = None) -> int | None:
        return t.integer(key, low=1, unit=unit) if t.has(key) else None

    w = t.sub("wake")
    rate = w.raw("rate", 1.0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1e6:
        raise w.error("rate", f"expected boots per second (a number, 0 turns it off), got "
                      f"{show(rate)}")
    wake = WakeConfig(
        rate=float(rate),
        burst=w.integer("burst", 10, low=1, high=1_000_000),
        ipv4_prefix=w.integer("ipv4_prefix", 24, high=32),
        ipv6_prefix=w.integer("ipv6_prefix", 56, high=128),
    )
    w.done()
    host = HostConfig(
        max_instances=optional("max_instances"),
        memory=optional("memory", "MiB"),
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


