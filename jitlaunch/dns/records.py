"""Static records (``[[dns.record]]``, :mod:`jitlaunch.config.records`) in wire form: each
name's RRsets built once, as answer bytes whose owner points at the question, so that an
answer is the question plus prepared bytes, as for the services' addresses.

RDATA formats: TXT (RFC 1035 3.3.14), MX (3.3.9), CNAME (3.3.1), CAA (RFC 8659 4.1), SVCB
and HTTPS (RFC 9460 2.2: the SvcParams in increasing key order, 7.1 alpn and
no-default-alpn, 7.2 port, 7.3 ipv4hint and ipv6hint). Names inside RDATA are written in
full, never compressed (RFC 3597 4: only the well-known types' names may be; and the
answers stay position-independent).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

from ..config.model import StaticRecord, SvcParams
from . import build as b

TYPE_CNAME, TYPE_MX, TYPE_TXT, TYPE_SVCB, TYPE_HTTPS, TYPE_CAA = 5, 15, 16, 64, 65, 257
TYPES = {"CNAME": TYPE_CNAME, "MX": TYPE_MX, "TXT": TYPE_TXT, "SVCB": TYPE_SVCB,
         "HTTPS": TYPE_HTTPS, "CAA": TYPE_CAA}
_OWNER_Q = b.pointer(12)


def name_wire(name: str) -> bytes:
    return b"\0" if name == "." else b.name_to_wire(name)


def _strings(values: Iterable[str]) -> bytes:
    out = b""
    for v in values:
        raw = v.encode()
        out += bytes((len(raw),)) + raw
    return out


def _svc_params(p: SvcParams) -> bytes:
    params: list[tuple[int, bytes]] = []
    if p.alpn:
        params.append((1, _strings(p.alpn)))
    if p.no_default_alpn:
        params.append((2, b""))
    if p.port is not None:
        params.append((3, struct.pack("!H", p.port)))
    if p.ipv4hint:
        params.append((4, b"".join(ipaddress.IPv4Address(a).packed for a in p.ipv4hint)))
    if p.ipv6hint:
        params.append((6, b"".join(ipaddress.IPv6Address(a).packed for a in p.ipv6hint)))
    return b"".join(struct.pack("!HH", key, len(value)) + value for key, value in params)


def rdata(record: StaticRecord) -> bytes:
    """The record's RDATA."""
    d = record.data
    if record.type == "TXT":
        return _strings(d)
    if record.type == "CAA":
        flags, tag, value = int(d[0]), str(d[1]).encode(), str(d[2]).encode()
        return bytes((flags, len(tag))) + tag + value
    if record.type == "MX":
        return struct.pack("!H", d[0]) + name_wire(str(d[1]))
    if record.type == "CNAME":
        return name_wire(str(d[0]))
    priority, target, params = d  # SVCB, HTTPS
    return struct.pack("!H", priority) + name_wire(target) + _svc_params(params)


class StaticRecords:
    """Every static record by owner (wire form, lower case) and type: ``(count, bytes)``,
    the answer section of that RRset for a question whose name is the owner. An RRset's TTL
    is its records' smallest (RFC 2181 5.2: one TTL per RRset)."""

    def __init__(self, records: Iterable[StaticRecord]) -> None:
        grouped: dict[bytes, dict[int, list[StaticRecord]]] = {}
        for r in records:
            grouped.setdefault(b.name_to_wire(r.name), {}).setdefault(TYPES[r.type], []).append(r)
        self.by_name: dict[bytes, dict[int, tuple[int, bytes]]] = {}
        #: Each RRset's TTL and RDATAs, to write it under another owner (a CNAME's target).
        self.rdatas: dict[tuple[bytes, int], tuple[int, tuple[bytes, ...]]] = {}
        #: A CNAME's target by owner, in wire form, lower case.
        self.cnames: dict[bytes, bytes] = {}
        for owner, types in grouped.items():
            sets = self.by_name[owner] = {}
            for rtype, rs in types.items():
                ttl = min(r.ttl for r in rs)
                datas = tuple(rdata(r) for r in rs)
                self.rdatas[owner, rtype] = (ttl, datas)
                sets[rtype] = (len(rs), b"".join(b.rr(_OWNER_Q, rtype, ttl, d) for d in datas))
                if rtype == TYPE_CNAME:
                    self.cnames[owner] = datas[0].lower()

    def written(self, owner: bytes, rtype: int) -> tuple[int, bytes]:
        """``owner``'s RRset of ``rtype`` with its owner written out (no pointer): for
        records after the first owner in an answer (a CNAME's target)."""
        found = self.rdatas.get((owner, rtype))
        if found is None:
            return 0, b""
        ttl, datas = found
        return len(datas), b"".join(b.rr(owner, rtype, ttl, d) for d in datas)

    def __contains__(self, name: bytes) -> bool:
        return name in self.by_name

    def get(self, name: bytes) -> dict[int, tuple[int, bytes]] | None:
        return self.by_name.get(name)
