"""Deployment warnings for ``jitlaunch check``: a valid config that would not work for
clients elsewhere. Pure: a Config in, sentences out.

When DNS listens on an address that is not loopback (a wildcard counts: it takes public
addresses too), the config is meant for remote resolvers, and then:

* a nameserver inside one of our zones with no glue address (``dns.nameserver_addresses``
  unset and every listen address a wildcard) makes the delegation lame;
* a loopback glue address, front, or address handed over (``answer = "handoff"`` with
  instances in a loopback subnet) sends remote clients to an address they cannot reach.
"""

from __future__ import annotations

import ipaddress

from .config import Config

WILDCARDS = ("0.0.0.0", "::")


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def deployment_warnings(config: Config) -> list[str]:
    """One sentence per problem; empty when there is none (or DNS is on loopback only)."""
    dns = config.dns
    public = [e for e in dns.listen if not _loopback(e.host)]
    if not public:
        return []
    where = ", ".join(str(e) for e in public)
    out: list[str] = []
    inside = sorted({
        ns for z in dns.zones for ns in z.nameservers
        if any(ns == y.name or ns.endswith("." + y.name) for y in dns.zones)
    })
    if inside and not dns.nameserver_addresses:
        out.append(
            f"lame delegation: DNS listens on {where} but dns.nameserver_addresses is not set, "
            f"so the nameserver {inside[0]} (inside the zone) has no address to answer or to "
            "give the parent zone as glue; set it to this host's public address(es)"
        )
    for address in dns.nameserver_addresses:
        if _loopback(address):
            out.append(
                f"dns.nameserver_addresses: {address} is a loopback address, but DNS listens "
                f"on {where}: resolvers elsewhere cannot reach the nameserver there"
            )
    for svc in config.services:
        for front in svc.front:
            if _loopback(front):
                out.append(
                    f"service {svc.name!r}: front {front} is a loopback address, but DNS "
                    f"listens on {where}: remote clients are sent where they cannot connect"
                )
        subnet = getattr(svc.settings, "subnet", None)
        if svc.answer != "proxy" and subnet is not None and subnet.is_loopback:
            out.append(
                f"service {svc.name!r}: answer {svc.answer!r} hands over its instances' "
                f"addresses in {subnet} (loopback) once they are ready, but DNS listens on "
                f"{where}: remote clients cannot reach them; set answer = \"proxy\""
            )
    return out
