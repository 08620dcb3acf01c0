"""The authoritative answer logic: query bytes in, reply bytes out. No I/O.

:func:`respond` implements these rules (RFC 1035, 2308, 4343, 6891, 6895, 7766, 8482),
checked against NSD by tests/test_dns_nsd.py:

* fewer than 12 bytes, or a message with QR set: no reply at all (never answer a response);
* malformed (see :mod:`jitlaunch.dns.wire`: bad names, sections, records where a query has
  none, a second OPT or one not owned by the root): FORMERR; an opcode other than QUERY:
  NOTIMP. Both are the header only (opcode and RD kept) plus an OPT when the query's OPT
  could be read (RFC 6891 7);
* a TSIG record (we hold no keys): NOTAUTH, the header (opcode and RD kept), the OPT if any
  and an unsigned TSIG record with error BADKEY (RFC 8945 5.2.1, 5.3.2), as NSD answers it;
* no question but an OPT (an EDNS probe): NOERROR with an OPT;
* an OPT with a version other than 0: BADVERS (with the question); otherwise the OPT is
  answered with our payload size and the DO bit copied, and a UDP reply is bounded by the
  smaller of the client's payload size (at least 512) and ours; without an OPT, by 512 bytes;
* classes other than IN, CH and ANY: REFUSED, header only; CH: REFUSED; zone transfers (we
  serve no secondaries): AXFR over UDP NOTIMP; otherwise REFUSED for a zone's apex and
  NOTAUTH for other names, as NSD answers when no transfer is allowed;
* a name outside every zone: REFUSED (we are never an open resolver);
* SOA and NS at the apex, with glue for nameservers inside the zone;
* A and AAAA for service names, as the answer-mode policy
  (:func:`jitlaunch.lifecycle.answers.answer_for`) says for the service's snapshot and the
  time; a ``wait`` service that is booting gives ``pending`` (hold the reply and call
  again), a failed one SERVFAIL;
* ANY gets one RRset (RFC 8482 4.1: a minimal answer, never an amplifier): the SOA at the
  apex, else the A records, or the AAAA records when there are none; what NSD answers from a
  zone file that lists the SOA first and A before AAAA;
* NODATA (NOERROR, SOA in the authority section) for other types of a known name and for
  empty non-terminals; NXDOMAIN with the SOA for unknown names inside a zone; the negative
  TTL is the smaller of the SOA's TTL and its minimum (RFC 2308, section 5);
* class ANY: the same answer, but not authoritative (AA=0) and without the SOA of negative
  answers (RFC 6895 3.2, as NSD does);
* names compared label by label in wire form, case-insensitively for ASCII only (RFC 4343);
  a label may hold any byte (a dot, or bytes that are not UTF-8); the question is echoed
  exactly as asked and answers point to it;
* flags in replies: QR, AA for authoritative answers, the opcode and RD copied, nothing else;
* a UDP reply too large for the bound: header and question (and OPT) only, with TC set;
* a well-formed DNS cookie (RFC 7873) is handed on in :attr:`Response.cookie`: the reply is
  the one without it, and the caller adds the server's COOKIE option to its OPT
  (:func:`wire.add_option`), since that needs the client's address and the secret.

Each response carries its identity for response rate limiting (:mod:`.rrl`): the name, type
and class of an answer, the name of a NODATA, the zone of an NXDOMAIN, one for all errors.

The common replies (NXDOMAIN, NODATA, REFUSED, service answers) are the question copied from
the query plus precomputed bytes: the SOA record of a zone's negative answers is built once
per question length, since only the offset of the zone's apex in the question varies.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import NamedTuple

from ..config import DnsConfig, ServiceConfig, Zone
from ..lifecycle.answers import ServiceSnapshot, answer_for
from ..logutil import LimitedLog
from . import build as b
from . import rrl
from . import wire as w
from .records import TYPE_CNAME, StaticRecords

log = logging.getLogger("jitlaunch.dns")
_limited = LimitedLog(log)

#: Query types that make a service start: the ones a client asks before it connects.
STARTING_TYPES = frozenset({w.TYPE_A, w.TYPE_AAAA, w.TYPE_ANY})
CLASS_CH = 3
_KNOWN_CLASSES = frozenset({w.CLASS_IN, CLASS_CH, w.CLASS_ANY})
_OWNER_Q = b.pointer(12)  # the question's name, where every answer's owner points
_A_HEAD = _OWNER_Q + struct.pack("!HH", w.TYPE_A, w.CLASS_IN)
_AAAA_HEAD = _OWNER_Q + struct.pack("!HH", w.TYPE_AAAA, w.CLASS_IN)
_TTL_LEN = struct.Struct("!IH")
#: The longest CNAME chain followed within a zone.
MAX_CHAIN = 8


class Response(NamedTuple):
    """The outcome of one query.

    ``reply`` is None when nothing must be sent. ``service`` names the service the query
    asks for (to note activity and start it). ``pending`` means the reply is held: the
    service answers in ``wait`` mode and is booting; call :func:`respond` again once it is
    ready or has failed. ``cacheable`` says the reply depends only on the query bytes (less
    the ID) and the supervisor's state, and is worth keeping: the query was one canonical
    message (no trailing bytes, no EDNS options) about a name that exists. ``internal_error``
    means answering failed on a bug: the reply is a header-only SERVFAIL, and tests assert
    that this never happens. ``cookie`` is the query's DNS cookie when it had one (the
    reply's OPT then still needs the server's COOKIE option: :mod:`.cookies`, added by the
    caller, which knows the client's address). ``identity`` is the reply's identity for
    response rate limiting (see :mod:`.rrl`): an error's unless set.
    """

    reply: bytes | None
    service: str | None = None
    pending: bool = False
    cacheable: bool = False
    internal_error: bool = False
    cookie: QueryCookie | None = None
    identity: int = rrl.ERROR_IDENTITY


class QueryCookie(NamedTuple):
    """A query's COOKIE option: its data, and the query's EDNS payload size (the bound of a
    UDP reply, with the option added)."""

    option: bytes
    payload: int


NO_REPLY = Response(None)


class ZoneData:
    """A zone with the bytes of its answers, prepared once."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.apex = b.name_to_wire(zone.name)
        self.nameservers = tuple(b.name_to_wire(ns) for ns in zone.nameservers)
        self.soa = b.SoaTemplate(
            self.apex, b.name_to_wire(zone.mname), b.name_to_wire(zone.rname),
            (zone.serial, zone.refresh, zone.retry, zone.expire, zone.minimum),
            negative_ttl=min(zone.soa_ttl, zone.minimum),
        )
        self.negative_soa = self.soa.negative
        self.nxdomain_identity = rrl.nxdomain_identity(self.apex)


class Catalog:
    """The names we answer for, built once from the configuration. Names are kept in wire
    form, lower case."""

    def __init__(self, dns: DnsConfig, services: Iterable[ServiceConfig]) -> None:
        self.zones = {b.name_to_wire(z.name): ZoneData(z) for z in dns.zones}
        self.services: dict[bytes, ServiceConfig] = {}
        self.glue: dict[bytes, tuple[str, ...]] = {}
        self.nodes: set[bytes] = set()
        self.edns_payload = dns.edns_payload
        self.opt_plain = b.opt_record(dns.edns_payload)
        self.opt_do = b.opt_record(dns.edns_payload, 0, w.EDNS_DO)
        for svc in services:
            for name in svc.names:
                key = b.name_to_wire(name)
                self.services[key] = svc
                self._add_node(key)
        self.static = StaticRecords(dns.records)
        for key in self.static.by_name:
            self._add_node(key)
        own = dict(dns.nameserver_glue)
        for zone in dns.zones:
            for ns in zone.nameservers:
                key = b.name_to_wire(ns)
                addresses = own.get(ns, () if own else dns.nameserver_addresses)
                if self.zone_for(key) is not None and addresses:
                    self.glue[key] = addresses
                    self._add_node(key)

    def _add_node(self, name: bytes) -> None:
        # Every ancestor of a name exists too (empty non-terminals answer NODATA).
        for _, suffix in b.suffixes(name):
            self.nodes.add(suffix)

    def zone_for(self, name: bytes) -> ZoneData | None:
        """The closest enclosing zone of a lower-case wire-form name, or None."""
        zones = self.zones
        pos = 0
        while True:
            zone = zones.get(name[pos:])
            if zone is not None:
                return zone
            length = name[pos]
            if not length:
                return None
            pos += 1 + length


#: How :func:`respond` learns a service's state: a snapshot by service name.
Snapshots = Callable[[str], ServiceSnapshot]


def respond(wire: bytes, catalog: Catalog, state: Snapshots, now: float, *, udp: bool) -> Response:
    """Answer one DNS query (see the module docstring for the rules). Never raises.

    ``state`` gives the snapshot of a service the query names, ``now`` the time the
    answer-mode policy compares with a service's backoff. A pure function of its arguments.
    """
    if len(wire) < 12 or wire[2] & 0x80:
        return NO_REPLY
    try:
        wire = bytes(wire)  # a bytearray would not hash; bytes are returned as they are
        simple = w.scan_simple(wire)
        if simple is not None:
            resp = _respond_simple(wire, simple, catalog)
            if resp is not None:
                return resp
        q = w.parse_query(wire)
        resp = _respond(q, catalog, state, now, udp)
        if q.cookie is not None and q.edns is not None:
            resp = resp._replace(cookie=QueryCookie(q.cookie, q.edns.payload))
        return resp
    except Exception:
        # A bug must cost one answer, not the server. The fallback cannot fail, and the
        # flag lets tests (and the counters) see that this path was taken.
        _limited.error("internal", "internal error answering a query of %d bytes", len(wire),
                       exc_info=True)
        return Response(b.servfail_for(wire), internal_error=True)


def _respond_simple(wire: bytes, simple: tuple[int, int, int, bool], catalog: Catalog) -> Response | None:
    """The fast path for the common query (:func:`wire.scan_simple`) about a name that is
    not a zone's apex, a service or a nameserver: REFUSED, NXDOMAIN or NODATA, made of the
    query's own question and prepared bytes. None for anything else (then :func:`_respond`
    answers, with the same result as here for these cases: the tests compare the two)."""
    qend, qtype, payload, do = simple
    if qtype == w.TYPE_AXFR or qtype == w.TYPE_IXFR:
        return None
    name = wire[12 : qend - 4].lower()
    zone = catalog.zone_for(name)
    rd = wire[2] & 0x01
    if payload < 0:
        ar, opt = b"\0\0", b""
    else:
        ar, opt = b"\0\x01", catalog.opt_do if do else catalog.opt_plain
    if zone is None:
        return Response(wire[:2] + bytes((0x80 | rd, w.REFUSED)) + b"\0\x01\0\0\0\0" + ar
                        + wire[12:qend] + opt)
    if (name in catalog.services or name in catalog.glue or name == zone.apex
            or name in catalog.static):
        return None
    known = name in catalog.nodes  # an empty non-terminal: NODATA, else NXDOMAIN
    head = wire[:2] + bytes((0x84 | rd, w.NOERROR if known else w.NXDOMAIN))
    identity = rrl.nodata_identity(name, w.CLASS_IN) if known else zone.nxdomain_identity
    return Response(head + b"\0\x01\0\0\0\x01" + ar + wire[12:qend] + zone.negative_soa(qend - 16)
                    + opt, None, cacheable=known, identity=identity)


def _opt(catalog: Catalog, q: w.Query) -> bytes:
    edns = q.edns
    if edns is None:
        return b""
    return b.opt_record(catalog.edns_payload, 0, edns.flags & w.EDNS_DO)


def _short(q: w.Query, rcode: int, opt: bytes, question: bool) -> bytes:
    """A reply with no records: the header, the question if asked for, the OPT if any."""
    flags = w.QR | (q.flags & (w.OPCODE_MASK | w.RD)) | rcode
    if question:
        return b.header(q.ident, flags, 1, 0, 0, 1 if opt else 0) + q.question + opt
    return b.header(q.ident, flags, 0, 0, 0, 1 if opt else 0) + opt


@lru_cache(maxsize=4096)
def _address_records(v4: tuple[str, ...], v6: tuple[str, ...], ttl: int,
                     want_a: bool, want_aaaa: bool) -> tuple[int, bytes]:
    count = 0
    out = b""
    ttl_len4 = _TTL_LEN.pack(ttl, 4)
    ttl_len16 = _TTL_LEN.pack(ttl, 16)
    if want_a:
        for addr in v4:
            out += _A_HEAD + ttl_len4 + b.address_rdata(addr)[1]
            count += 1
    if want_aaaa:
        for addr in v6:
            out += _AAAA_HEAD + ttl_len16 + b.address_rdata(addr)[1]
            count += 1
    return count, out


def _early(q: w.Query, catalog: Catalog, udp: bool) -> Response | None:
    """The reply to a query that gets no answer from a zone's data (an error, a probe, a
    class or type we do not serve, a name outside our zones); None for the others."""
    if q.tsig is not None and q.error == w.NOTAUTH:
        # No question, as NSD answers; the TSIG record goes last (RFC 8945 5.3.2). The key
        # is looked at before the rest (5.2), so an OPT of a later version gets no BADVERS,
        # but it gets no DO bit either, as in our BADVERS replies (its meaning is unknown).
        edns = q.edns
        opt = b"" if edns is None else b.opt_record(
            catalog.edns_payload, 0, 0 if edns.version else edns.flags & w.EDNS_DO)
        flags = w.QR | (q.flags & (w.OPCODE_MASK | w.RD)) | w.NOTAUTH
        return Response(b.header(q.ident, flags, 0, 0, 0, 2 if opt else 1) + opt
                        + b.tsig_badkey(q.tsig))
    if q.error:
        return Response(_short(q, q.error, _opt(catalog, q), False))
    edns = q.edns
    opt = _opt(catalog, q)
    if not q.question:  # an EDNS probe (the parser allows no question only with an OPT)
        assert edns is not None
        return Response(_short(q, w.FORMERR if edns.version else w.NOERROR, opt, False))
    if edns is not None and edns.version:
        badvers = b.opt_record(catalog.edns_payload, w.BADVERS >> 4, 0)
        return Response(_short(q, 0, badvers, True))
    qclass, qtype = q.qclass, q.qtype
    if qclass not in _KNOWN_CLASSES:
        return Response(_short(q, w.REFUSED, opt, False))
    if qclass == CLASS_CH:
        return Response(_short(q, w.REFUSED, opt, True))
    name = q.qname.lower()
    if qtype == w.TYPE_AXFR or qtype == w.TYPE_IXFR:
        # We serve no secondaries (as NSD answers with no transfer allowed): AXFR over UDP
        # is NOTIMP; otherwise REFUSED for a zone of ours, NOTAUTH for any other name.
        if qtype == w.TYPE_AXFR and udp:
            return Response(_short(q, w.NOTIMP, opt, True))
        refused = name in catalog.zones
        return Response(_short(q, w.REFUSED if refused else w.NOTAUTH, opt, True))
    if catalog.zone_for(name) is None:
        return Response(_short(q, w.REFUSED, opt, True))
    return None


def _respond(q: w.Query, catalog: Catalog, state: Snapshots, now: float, udp: bool) -> Response:
    early = _early(q, catalog, udp)
    if early is not None:
        return early
    edns, opt = q.edns, _opt(catalog, q)
    qclass, qtype = q.qclass, q.qtype
    name = q.qname.lower()
    zone = catalog.zone_for(name)
    assert zone is not None  # (else an early reply)
    limit = min(max(512, edns.payload), catalog.edns_payload) if edns is not None else 512
    authoritative = qclass != w.CLASS_ANY  # RFC 6895 3.2
    flags = w.QR | (q.flags & w.RD) | (w.AA if authoritative else 0)
    qname_len = len(q.qname)
    service = catalog.services.get(name)
    asked: str | None = None
    cacheable = q.canonical
    an = ar = 0
    answers = additional = b""
    if service is not None:
        if qtype in STARTING_TYPES:
            asked = service.name
            ans = answer_for(service, state(asked), now)
            if ans.pending:
                return Response(None, asked, pending=True)
            if ans.servfail:
                return Response(_short(q, w.SERVFAIL, opt, True), asked)
            # ANY: the A records, or the AAAA records if there are none (RFC 8482 4.1).
            an, answers = _address_records(
                ans.v4, ans.v6, ans.ttl, qtype != w.TYPE_AAAA,
                qtype == w.TYPE_AAAA or (qtype == w.TYPE_ANY and not ans.v4))
    elif name == zone.apex:
        if qtype in (w.TYPE_SOA, w.TYPE_NS, w.TYPE_ANY):
            return _apex(q, catalog, zone, flags, opt, limit if udp else 65535)
    elif name in catalog.glue:
        v4 = tuple(a for a in catalog.glue[name] if ":" not in a)
        v6 = tuple(a for a in catalog.glue[name] if ":" in a)
        an, answers = _address_records(
            v4, v6, zone.zone.soa_ttl, qtype in (w.TYPE_A, w.TYPE_ANY),
            qtype == w.TYPE_AAAA or (qtype == w.TYPE_ANY and not v4))
    elif name not in catalog.nodes:
        flags |= w.NXDOMAIN
        cacheable = False  # unknown names are many: cached they would push the rest out
    negative = False
    if not an and name in catalog.static:
        got = _static(catalog, zone, name, qtype, state, now)
        if got.pending or got.servfail:
            return Response(_short(q, w.SERVFAIL, opt, True) if got.servfail else None,
                            got.asked, pending=got.pending)
        an, answers, negative, asked = got.an, got.answers, got.negative, got.asked or asked
        flags |= w.NXDOMAIN if got.nxdomain else 0
    ns = 0
    authority = b""
    if (not an or negative) and authoritative:
        ns, authority = 1, zone.negative_soa(qname_len)
    if opt:
        ar += 1
        additional += opt
    reply = b.header(q.ident, flags, 1, an, ns, ar) + q.question + answers + authority + additional
    if udp and len(reply) > limit:
        reply = b.header(q.ident, flags | w.TC, 1, 0, 0, 1 if opt else 0) + q.question + opt
    if flags & w.RCODE_MASK:
        identity = zone.nxdomain_identity
    elif an:
        identity = rrl.answer_identity(name, qtype, qclass)
    else:
        identity = rrl.nodata_identity(name, qclass)
    return Response(reply, asked, cacheable=cacheable, identity=identity)


def _static(catalog: Catalog, zone: ZoneData, name: bytes, qtype: int, state: Snapshots,
            now: float) -> Chase:
    """A name's static records for ``qtype``: its CNAME for any other type (RFC 1034 3.6.2),
    followed within the zone (:func:`_chase`) unless ANY was asked; one RRset for ANY (RFC
    8482 4.1: the first configured); else the RRset of that type, or nothing (NODATA)."""
    rrsets = catalog.static.by_name[name]
    if qtype != TYPE_CNAME and TYPE_CNAME in rrsets:
        an, answers = rrsets[TYPE_CNAME]
        if qtype == w.TYPE_ANY:
            return Chase(an, answers)
        chase = _chase(catalog, zone, name, qtype, state, now)
        return chase._replace(an=an + chase.an, answers=answers + chase.answers)
    if qtype == w.TYPE_ANY:
        return Chase(*next(iter(rrsets.values())))
    return Chase(*rrsets.get(qtype, (0, b"")))


class Chase(NamedTuple):
    """What follows a CNAME in an answer (RFC 1034 4.3.2 step 3a)."""

    an: int = 0
    answers: bytes = b""
    negative: bool = False  # NODATA or NXDOMAIN at the chain's end: the SOA goes along
    nxdomain: bool = False
    asked: str | None = None
    pending: bool = False
    servfail: bool = False


def _chase(catalog: Catalog, zone: ZoneData, name: bytes, qtype: int, state: Snapshots,
           now: float) -> Chase:
    """Follow ``name``'s CNAME within ``zone``, as NSD does: the target's records of
    ``qtype`` (a service's addresses, which starts it, as a lookup of its own name does;
    static records; another CNAME, up to :data:`MAX_CHAIN`), NODATA or NXDOMAIN there. A
    target outside the zone is not followed (the resolver asks), nor is one at the zone's
    apex for its SOA or NS."""
    an, out = 0, b""
    target = catalog.static.cnames[name]
    for _ in range(MAX_CHAIN):
        if catalog.zone_for(target) is not zone:
            return Chase(an, out)
        if target == zone.apex and qtype in (w.TYPE_SOA, w.TYPE_NS):
            return Chase(an, out)  # (not followed: see tests/test_dns_nsd.py's reconcile)
        service = catalog.services.get(target)
        if service is not None and qtype in (w.TYPE_A, w.TYPE_AAAA):
            ans = answer_for(service, state(service.name), now)
            if ans.pending or ans.servfail:
                return Chase(asked=service.name, pending=ans.pending, servfail=ans.servfail)
            rtype = w.TYPE_A if qtype == w.TYPE_A else w.TYPE_AAAA
            addrs = ans.v4 if qtype == w.TYPE_A else ans.v6
            for addr in addrs:
                out += b.rr(target, rtype, ans.ttl, b.address_rdata(addr)[1])
            return Chase(an + len(addrs), out, not addrs, asked=service.name)
        glue = catalog.glue.get(target, ())
        if glue and qtype in (w.TYPE_A, w.TYPE_AAAA):
            addrs = tuple(a for a in glue if (":" in a) == (qtype == w.TYPE_AAAA))
            for addr in addrs:
                rtype, data = b.address_rdata(addr)
                out += b.rr(target, rtype, zone.zone.soa_ttl, data)
            return Chase(an + len(addrs), out, not addrs)
        found = catalog.static.get(target)
        if found is not None and qtype in found:
            n, records = catalog.static.written(target, qtype)
            return Chase(an + n, out + records)
        if found is not None and TYPE_CNAME in found:
            n, records = catalog.static.written(target, TYPE_CNAME)
            an, out = an + n, out + records
            target = catalog.static.cnames[target]
            continue
        return Chase(an, out, True, nxdomain=target not in catalog.nodes)
    return Chase(an, out)


def _apex(q: w.Query, catalog: Catalog, zone: ZoneData, flags: int, opt: bytes,
          limit: int) -> Response:
    """SOA and NS at a zone's apex (with glue): rare enough to build record by record."""
    comp = b.Compressor()
    comp.note(q.qname, 12)
    offset = 12 + len(q.question)
    answers: list[bytes] = []
    glue: list[bytes] = []
    qtype = q.qtype
    soa_ttl = zone.zone.soa_ttl
    if qtype in (w.TYPE_SOA, w.TYPE_ANY):  # ANY: the SOA alone (RFC 8482 4.1)
        answers.append(zone.soa.record(comp, offset, soa_ttl))
        offset += len(answers[-1])
    if qtype == w.TYPE_NS:
        for ns in zone.nameservers:
            rdata = comp.write(ns, offset + 12)
            answers.append(b.rr(_OWNER_Q, w.TYPE_NS, soa_ttl, rdata))
            offset += len(answers[-1])
        for ns in zone.nameservers:
            for addr in catalog.glue.get(ns, ()):
                owner = comp.write(ns, offset)
                rtype, rdata = b.address_rdata(addr)
                glue.append(b.rr(owner, rtype, soa_ttl, rdata))
                offset += len(glue[-1])
    ar = len(glue) + (1 if opt else 0)
    reply = (b.header(q.ident, flags, 1, len(answers), 0, ar) + q.question + b"".join(answers)
             + b"".join(glue) + opt)
    if len(reply) > limit:
        reply = b.header(q.ident, flags | w.TC, 1, 0, 0, 1 if opt else 0) + q.question + opt
    return Response(reply, None, cacheable=q.canonical,
                    identity=rrl.answer_identity(q.qname.lower(), qtype, q.qclass))
