"""Static records (``[[dns.record]]``): what a zone owner publishes beside the services'
addresses, such as an ACME DNS-01 challenge (``_acme-challenge`` TXT) or CAA. Pure, as
:mod:`.parse`: every error names the file, the record and the key.

One table per record::

    [[dns.record]]
    name = "_acme-challenge.jit.test"   # inside one of dns.zones; the zone itself is its apex
    type = "TXT"                         # TXT, CAA, MX, CNAME, HTTPS or SVCB
    text = ["one string", "another"]     # per type, below
    ttl = 300                            # default: the zone's [dns.soa] ttl

* TXT: ``text``, a string or a list of strings (each at most 255 bytes, as a zone file's
  strings: a longer one is an error, not split behind the owner's back).
* CAA: ``flags`` (0 to 255, default 0), ``tag`` (``issue``, ``issuewild``, ``iodef``, or
  another of letters and digits), ``value``.
* MX: ``preference`` (0 to 65535), ``exchange`` (a host name; "." for a null MX).
* CNAME: ``target``. Only for a name that has nothing else: not a zone's apex, a service's
  name, a nameserver with glue, nor a name with other static records.
* HTTPS and SVCB: ``priority`` (0: alias form), ``target`` ("." for the owner itself),
  ``params``, a table of ``alpn`` (list of strings), ``no_default_alpn`` (true),
  ``port``, ``ipv4hint`` and ``ipv6hint`` (lists of addresses); for any name, services'
  included (a browser asks HTTPS of the name it connects to).

Names take letters, digits, ``-`` and ``_`` (``_acme-challenge``, ``_443._tcp``), lower-cased.
A change takes effect at a reload, as every ``[dns]`` key but ``listen``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from ..errors import ConfigError
from .model import StaticRecord, SvcParams
from .reader import Table, show

TYPES = ("TXT", "CAA", "MX", "CNAME", "HTTPS", "SVCB")
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_TAG = re.compile(r"^[a-z0-9]{1,15}$", re.I)


def record_name(t: Table, key: str, value: str, *, root_ok: bool = False) -> str:
    """A DNS name of a record (underscores allowed), lower case, without the final dot;
    ``"."`` is the root where ``root_ok``."""
    if root_ok and value.strip() == ".":
        return "."
    name = value.strip().rstrip(".").lower()
    if not name or len(name) > 253 or not all(_LABEL.match(lab) for lab in name.split(".")):
        raise t.error(key, f"expected a DNS name such as '_acme-challenge.example.org', got "
                      f"{value!r}")
    return name


def parse_records(dns: Table, zones: tuple[str, ...], default_ttl: int) -> tuple[StaticRecord, ...]:
    """Every ``[[dns.record]]`` of ``dns``, each inside one of ``zones``."""
    raw = dns.raw("record", [])
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise dns.error("record", f"expected [[dns.record]] tables, got {show(raw)}")
    out = []
    for i, data in enumerate(raw):
        t = Table(dns.path, data, f"dns.record[{i}].")
        name = record_name(t, "name", t.string("name"))
        if not any(name == z or name.endswith("." + z) for z in zones):
            raise t.error("name", f"{name!r} is not inside any of dns.zones ({', '.join(zones)})")
        rtype = t.string("type").upper()
        if rtype not in TYPES:
            raise t.error("type", f"expected one of {', '.join(TYPES)}, got {rtype!r}")
        ttl = t.integer("ttl", default_ttl, high=2**31 - 1, unit="seconds")
        out.append(StaticRecord(name, rtype, ttl, _DATA[rtype](t)))
        t.done()
    return tuple(out)


def _txt(t: Table) -> tuple[Any, ...]:
    raw = t.raw("text")
    texts = [raw] if isinstance(raw, str) else t.strings("text", what="strings")
    if not texts:
        raise t.error("text", "expected a string or a list of strings")
    for s in texts:
        if len(s.encode()) > 255:
            raise t.error("text", f"a string of {len(s.encode())} bytes: at most 255 each (give "
                          "a longer text as a list of strings)")
    return tuple(texts)


def _caa(t: Table) -> tuple[Any, ...]:
    tag = t.string("tag")
    if not _TAG.match(tag):
        raise t.error("tag", f"expected a tag such as 'issue' (letters and digits), got {tag!r}")
    return t.integer("flags", 0, high=255), tag.lower(), t.string("value")


def _mx(t: Table) -> tuple[Any, ...]:
    return (t.integer("preference", high=65535),
            record_name(t, "exchange", t.string("exchange"), root_ok=True))


def _cname(t: Table) -> tuple[Any, ...]:
    return (record_name(t, "target", t.string("target")),)


def _svcb(t: Table) -> tuple[Any, ...]:
    priority = t.integer("priority", high=65535)
    target = record_name(t, "target", t.string("target", "."), root_ok=True)
    p = t.sub("params")
    alpn = tuple(p.strings("alpn", [], what="protocol names"))
    if any(not a or len(a.encode()) > 255 for a in alpn):
        raise p.error("alpn", "expected protocol names of 1 to 255 bytes")
    port = p.integer("port", low=0, high=65535) if p.has("port") else None
    hints = []
    for key, version in (("ipv4hint", 4), ("ipv6hint", 6)):
        found = []
        for a in p.strings(key, [], what="addresses"):
            try:
                ip = ipaddress.ip_address(a)
            except ValueError:
                raise p.error(key, f"expected IPv{version} addresses, got {a!r}") from None
            if ip.version != version:
                raise p.error(key, f"expected IPv{version} addresses, got {a!r}")
            found.append(str(ip))
        hints.append(tuple(found))
    params = SvcParams(alpn, p.boolean("no_default_alpn", False), port, hints[0], hints[1])
    p.done()
    if params.no_default_alpn and not alpn:
        raise p.error("no_default_alpn", "needs alpn (RFC 9460 7.1.1)")
    if priority == 0 and params != SvcParams():
        raise t.error("params", "priority 0 is the alias form, which has no params")
    return priority, target, params


_DATA = {"TXT": _txt, "CAA": _caa, "MX": _mx, "CNAME": _cname, "HTTPS": _svcb, "SVCB": _svcb}


def check_records(path: str, records: tuple[StaticRecord, ...], zones: tuple[str, ...],
                  taken: dict[str, str]) -> None:
    """A CNAME's name has nothing else (RFC 1034 3.6.2): no other record, no name below it,
    not a zone's apex, nor a name in ``taken`` (services' names and nameservers with glue,
    to what they are). A record may not repeat another exactly."""
    seen: set[tuple[str, str, tuple[Any, ...]]] = set()
    for i, r in enumerate(records):
        key = (r.name, r.type, r.data)
        if key in seen:
            raise ConfigError(path, f"{r.type} record of {r.name!r} given twice",
                              key=f"dns.record[{i}]")
        seen.add(key)
        if r.type != "CNAME":
            continue
        clash = ("it is a zone's apex" if r.name in zones
                 else f"it is {taken[r.name]}" if r.name in taken
                 else "it has other records" if sum(o.name == r.name for o in records) > 1
                 else None)
        if clash:
            raise ConfigError(path, f"a CNAME for {r.name!r} must be the name's only record: "
                              f"{clash}", key=f"dns.record[{i}]")
