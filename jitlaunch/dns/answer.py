"""The authoritative answer logic: query bytes in, reply bytes out. No I/O.

:func:`respond` implements these rules (RFC 1035, 2308, 6891, 7766, 8482):

* fewer than 12 bytes, or a message with QR set: no reply at all (never answer a response);
* unparseable: FORMERR, header fields copied, no sections;
* opcode other than QUERY: NOTIMP; QDCOUNT other than 1 or more than one OPT: FORMERR;
* an OPT record with a version other than 0: BADVERS; otherwise the OPT is echoed with our
  payload size and the DO bit copied, and a UDP reply is bounded by the smaller of the
  client's payload size (at least 512) and ours; without an OPT, by 512 bytes;
* a name outside every zone: REFUSED (we are never an open resolver); a class other than
  IN (or ANY): REFUSED; zone transfers: REFUSED;
* SOA and NS at the apex, with glue for nameservers inside the zone;
* A and AAAA for service names, from the supervisor's :class:`ServiceAnswer`; a ``wait``
  service that is booting gives ``pending`` (hold the reply and call again), a failed one
  SERVFAIL;
* NODATA (NOERROR, SOA in the authority section) for other types of a known name and for
  empty non-terminals; NXDOMAIN with the SOA for unknown names inside a zone; the negative
  TTL is the smaller of the SOA's TTL and its minimum (RFC 2308, section 5);
* names compared case-insensitively (ASCII), the question echoed exactly as asked;
* a UDP reply too large for the bound: header and question only, with TC set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dnslib import AAAA, CLASS, EDNS0, NS, QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSRecord

from ..config import DnsConfig, ServiceConfig, Zone
from ..lifecycle.supervisor import ServiceAnswer
from ..logutil import LimitedLog
from . import wire as w

log = logging.getLogger("jitlaunch.dns")
_limited = LimitedLog(log)

OPCODE_QUERY = 0
CLASS_ANY = 255
RCODE_BADVERS = 16
#: Query types that make a service start: the ones a client asks before it connects.
STARTING_TYPES = frozenset({QTYPE.A, QTYPE.AAAA, QTYPE.ANY})
_TRANSFERS = frozenset({QTYPE.AXFR, QTYPE.IXFR})


@dataclass(frozen=True)
class Response:
    """The outcome of one query.

    ``reply`` is None when nothing must be sent. ``service`` names the service the query
    asks for (to note activity and start it). ``pending`` means the reply is held: the
    service answers in ``wait`` mode and is booting; call :func:`respond` again once it is
    ready or has failed. ``cacheable`` says the reply depends only on the query bytes (less
    the ID) and the supervisor's state. ``internal_error`` means answering failed on a bug:
    the reply is a header-only SERVFAIL, and tests assert that this never happens.
    """

    reply: bytes | None
    service: str | None = None
    pending: bool = False
    cacheable: bool = False
    internal_error: bool = False


class Catalog:
    """The names we answer for, built once from the configuration."""

    def __init__(self, dns: DnsConfig, services: Iterable[ServiceConfig]) -> None:
        # Longest zone first, so that a child zone wins over its parent.
        self.zones = sorted(dns.zones, key=lambda z: -len(z.name))
        self.services: dict[bytes, str] = {}
        self.glue: dict[bytes, tuple[str, ...]] = {}
        self.nodes: set[bytes] = set()
        self.edns_payload = dns.edns_payload
        for svc in services:
            for name in svc.names:
                self.services[name.encode()] = svc.name
                self._add_node(name)
        for zone in dns.zones:
            for ns in zone.nameservers:
                if self.zone_for(ns.encode()) is not None and dns.nameserver_addresses:
                    self.glue[ns.encode()] = dns.nameserver_addresses
                    self._add_node(ns)

    def _add_node(self, name: str) -> None:
        # Every ancestor of a name exists too (empty non-terminals answer NODATA).
        labels = name.split(".")
        for i in range(len(labels)):
            self.nodes.add(".".join(labels[i:]).encode())

    def zone_for(self, name: bytes) -> Zone | None:
        for zone in self.zones:
            z = zone.name.encode()
            if name == z or name.endswith(b"." + z):
                return zone
        return None


def _error_reply(q: w.Query, edns_payload: int) -> bytes:
    """FORMERR or NOTIMP: header only (as NSD), opcode and RD kept, and an OPT when the query
    had one (RFC 6891 7)."""
    flags = w.QR | (q.flags & (w.OPCODE_MASK | w.RD)) | q.error
    if q.edns is None:
        return w.header(q.ident, flags)
    return w.header(q.ident, flags, ar=1) + w.opt_record(edns_payload, 0, q.edns.flags & w.EDNS_DO)


def _soa_rr(zone: Zone, ttl: int) -> RR:
    times = (zone.serial, zone.refresh, zone.retry, zone.expire, zone.minimum)
    return RR(zone.name + ".", QTYPE.SOA, ttl=ttl, rdata=SOA(zone.mname + ".", zone.rname + ".", times))


def respond(
    wire: bytes,
    catalog: Catalog,
    lookup: Callable[[str], ServiceAnswer],
    *,
    udp: bool,
) -> Response:
    """Answer one DNS query (see the module docstring for the rules). Never raises."""
    if len(wire) < 12 or wire[2] & 0x80:
        return Response(None)
    try:
        parsed = w.parse_query(wire)
        if parsed.error:
            return Response(_error_reply(parsed, catalog.edns_payload))
        try:
            query = DNSRecord.parse(wire)
        except Exception:  # dnslib raises many kinds of errors on garbage
            parsed.error = w.FORMERR
            return Response(_error_reply(parsed, catalog.edns_payload))
        return _respond(query, catalog, lookup, udp)
    except Exception:
        # A bug must cost one answer, not the server. The fallback cannot fail, and the
        # flag lets tests (and the counters) see that this path was taken.
        _limited.error("internal", "internal error answering a query of %d bytes", len(wire),
                       exc_info=True)
        return Response(w.servfail_for(wire), internal_error=True)


def _respond(
    query: DNSRecord, catalog: Catalog, lookup: Callable[[str], ServiceAnswer], udp: bool
) -> Response:
    qh = query.header
    header = DNSHeader(id=qh.id, qr=1, opcode=qh.opcode, rd=qh.rd)
    reply = DNSRecord(header)
    opts = [rr for rr in query.ar if rr.rtype == QTYPE.OPT]
    if len(opts) > 1 or len(query.questions) != 1 or qh.opcode != OPCODE_QUERY:
        header.rcode = RCODE.NOTIMP if qh.opcode != OPCODE_QUERY else RCODE.FORMERR
        reply.questions = list(query.questions[:1]) if header.rcode == RCODE.NOTIMP else []
        return Response(reply.pack())
    limit = 512
    if opts:
        opt = opts[0]
        version = (opt.ttl >> 16) & 0xFF
        do_bit = opt.ttl & 0x8000
        limit = min(max(512, opt.rclass), catalog.edns_payload)
        reply.add_ar(
            EDNS0(udp_len=catalog.edns_payload, flags="do" if do_bit else "",
                  ext_rcode=RCODE_BADVERS >> 4 if version else 0)
        )
        if version != 0:
            return Response(reply.pack())
    q = query.q
    reply.add_question(q)
    name = b".".join(label.lower() for label in q.qname.label)
    zone = catalog.zone_for(name)
    if zone is None or q.qclass not in (CLASS.IN, CLASS_ANY) or q.qtype in _TRANSFERS:
        header.rcode = RCODE.REFUSED
        return Response(reply.pack(), cacheable=True)
    header.aa = 1
    negative_ttl = min(zone.soa_ttl, zone.minimum)
    qtype = q.qtype
    service = catalog.services.get(name)
    response_service: str | None = None
    if name == zone.name.encode():
        if qtype in (QTYPE.SOA, QTYPE.ANY):
            reply.add_answer(_soa_rr(zone, zone.soa_ttl))
        if qtype in (QTYPE.NS, QTYPE.ANY):
            for ns in zone.nameservers:
                reply.add_answer(RR(q.qname, QTYPE.NS, ttl=zone.soa_ttl, rdata=NS(ns + ".")))
            for ns in zone.nameservers:
                for addr in catalog.glue.get(ns.encode(), ()):
                    rtype, rdata = (QTYPE.AAAA, AAAA(addr)) if ":" in addr else (QTYPE.A, A(addr))
                    reply.add_ar(RR(ns + ".", rtype, ttl=zone.soa_ttl, rdata=rdata))
    elif service is not None:
        response_service = service if qtype in STARTING_TYPES else None
        if response_service is not None:
            ans = lookup(service)
            if ans.pending:
                return Response(None, service, pending=True)
            if ans.servfail:
                header.aa = 0
                header.rcode = RCODE.SERVFAIL
                return Response(reply.pack(), service)
            if qtype in (QTYPE.A, QTYPE.ANY):
                for addr in ans.v4:
                    reply.add_answer(RR(q.qname, QTYPE.A, ttl=ans.ttl, rdata=A(addr)))
            if qtype in (QTYPE.AAAA, QTYPE.ANY):
                for addr in ans.v6:
                    reply.add_answer(RR(q.qname, QTYPE.AAAA, ttl=ans.ttl, rdata=AAAA(addr)))
    elif name in catalog.glue:
        for addr in catalog.glue[name]:
            if ":" in addr and qtype in (QTYPE.AAAA, QTYPE.ANY):
                reply.add_answer(RR(q.qname, QTYPE.AAAA, ttl=zone.soa_ttl, rdata=AAAA(addr)))
            elif ":" not in addr and qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(q.qname, QTYPE.A, ttl=zone.soa_ttl, rdata=A(addr)))
    elif name not in catalog.nodes:
        header.rcode = RCODE.NXDOMAIN
    if not reply.rr:
        reply.add_auth(_soa_rr(zone, negative_ttl))
    packed = reply.pack()
    if udp and len(packed) > limit:
        header.tc = 1
        reply.rr, reply.auth = [], []
        reply.ar = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
        packed = reply.pack()
    return Response(packed, response_service, cacheable=True)
