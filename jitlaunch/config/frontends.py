"""Shared frontends: the ``[[frontend]]`` tables, a service's ``frontends`` key, and the checks
that join the two. Pure, as :mod:`.parse`: every error is a ConfigError naming the file, the
frontend or service, and the key.

Rules:

* A frontend has a ``name`` (a DNS label, unique), ``listen`` (``ADDRESS:PORT`` strings as
  ``dns.listen``; at least one, none twice, none another frontend's or a service front's)
  and ``route``, ``"host"`` or ``"sni"``. ``default`` (sni only) names a service that joins
  it: a ClientHello without a server name goes there.
* A service joins with ``frontends = { NAME = PORT }``: NAME a frontend, PORT one of the
  service's ``ports`` (the instance's port the frontend's connections go to). Joined, it may
  leave out ``front``: DNS then answers with the frontends' listen addresses
  (:attr:`~.model.ServiceConfig.shared_front`), so at least one must be a specific address,
  not a wildcard.
* On one frontend a name belongs to one service: a name claimed twice is an error naming
  both services (services' names are unique in all anyway; this holds per frontend even so).
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import ConfigError
from .model import ROUTES, Endpoint, FrontendConfig, ServiceConfig
from .reader import LABEL, Table, endpoint, once, show

_WILDCARDS = ("0.0.0.0", "::")


def parse_frontends(root: Table) -> tuple[FrontendConfig, ...]:
    """Every ``[[frontend]]`` table, checked on its own and against each other."""
    raw = root.raw("frontend", [])
    if not isinstance(raw, list) or not all(isinstance(f, dict) for f in raw):
        raise root.error("frontend", f"expected [[frontend]] tables, got {show(raw)}")
    out: list[FrontendConfig] = []
    taken: dict[Endpoint, str] = {}
    for i, data in enumerate(raw):
        t = Table(root.path, data, f"frontend[{i}].")
        fe = _parse_frontend(t)
        if any(fe.name == other.name for other in out):
            raise t.error("name", f"frontend {fe.name!r} is defined twice")
        for ep in fe.listen:
            if ep.port != 0 and ep in taken:
                raise t.error("listen", f"{ep} is already where frontend {taken[ep]!r} listens")
            taken[ep] = fe.name
        out.append(fe)
    return tuple(out)


def _parse_frontend(t: Table) -> FrontendConfig:
    name = t.string("name").lower()
    if not LABEL.match(name):
        raise t.error("name", f"expected a name of letters, digits and '-', got {name!r}")
    listen = tuple(endpoint(t, "listen", v)
                   for v in t.strings("listen", what="ADDRESS:PORT strings"))
    if not listen:
        raise t.error("listen", "expected at least one ADDRESS:PORT")
    once(t, "listen", [e for e in listen if e.port != 0])
    route = t.string("route", choices=ROUTES)
    default = t.string("default").lower() if t.has("default") else None
    if default is not None and route != "sni":
        raise t.error("default", 'only a route = "sni" frontend has a default (a ClientHello '
                      "without a server name); an HTTP request without Host gets a 400")
    t.done()
    return FrontendConfig(name=name, listen=listen, route=route, default=default)


def service_frontends(t: Table, ports: tuple[int, ...]) -> tuple[tuple[str, int], ...]:
    """A service's ``frontends = { NAME = PORT }`` (empty when absent); each PORT one of
    ``ports``. Whether each NAME is a frontend is :func:`join_frontends`' to say."""
    if not t.has("frontends"):
        return ()
    sub = t.sub("frontends")
    out = []
    for name in sub.data:
        port = sub.integer(name, low=1, high=65535)
        if port not in ports:
            raise sub.error(name, f"port {port} is not one of the service's ports "
                            f"({', '.join(map(str, ports))})")
        out.append((name.lower(), port))
    sub.done()
    if not out:
        raise t.error("frontends", "expected at least one NAME = PORT")
    return tuple(out)


def join_frontends(
    path: str, frontends: tuple[FrontendConfig, ...], services: tuple[ServiceConfig, ...]
) -> tuple[ServiceConfig, ...]:
    """Check the services' ``frontends`` and the frontends' ``default`` against each other;
    the services, each without a front of its own given its frontends' addresses."""
    by_name = {fe.name: fe for fe in frontends}
    own = {(a, p): s.name for s in services for a in s.front for p in s.ports}
    for fe in frontends:
        for ep in fe.listen:
            if (ep.host, ep.port) in own:
                owner = own[(ep.host, ep.port)]
                raise ConfigError(path, f"{ep} is already the front of service {owner!r}",
                                  key=f"frontend {fe.name}.listen")
    claimed: dict[tuple[str, str], str] = {}  # (frontend, DNS name) -> service
    out = []
    for svc in services:
        for fe_name, _port in svc.frontends:
            if fe_name not in by_name:
                known = ", ".join(sorted(by_name)) or "none is defined"
                raise ConfigError(path, f"unknown frontend {fe_name!r} (the frontends: {known})",
                                  service=svc.name, key=f"frontends.{fe_name}")
            for dns in svc.names:
                other = claimed.setdefault((fe_name, dns), svc.name)
                if other != svc.name:
                    raise ConfigError(path, f"name {dns!r} on frontend {fe_name!r} is claimed "
                                      f"by services {other!r} and {svc.name!r}",
                                      service=svc.name, key="frontends")
        out.append(_with_shared_front(path, svc, by_name))
    for fe in frontends:
        if fe.default is not None and (fe.name, fe.default) not in {
                (f, s.name) for s in services for f, _ in s.frontends}:
            raise ConfigError(path, f"default {fe.default!r} is not a service that joins "
                              f"frontend {fe.name!r}", key=f"frontend {fe.name}.default")
    return tuple(out)


def _with_shared_front(
    path: str, svc: ServiceConfig, by_name: dict[str, FrontendConfig]
) -> ServiceConfig:
    if svc.front or not svc.frontends:
        return svc
    addrs = [ep.host for f, _ in svc.frontends for ep in by_name[f].listen
             if ep.host not in _WILDCARDS]
    if not addrs:
        raise ConfigError(path, "no front of its own, and its frontends listen on wildcard "
                          "addresses only: DNS would have no address to answer; give a "
                          "frontend a specific address, or the service a front",
                          service=svc.name, key="frontends")
    return replace(svc, shared_front=tuple(dict.fromkeys(addrs)))


def routes(
    frontend: str, services: tuple[ServiceConfig, ...]
) -> dict[str, tuple[str, int]]:
    """The routing table of one frontend: each DNS name of each service that joins it, to
    ``(service, instance port)``."""
    return {dns: (svc.name, port) for svc in services for f, port in svc.frontends
            if f == frontend for dns in svc.names}
