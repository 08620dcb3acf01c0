"""DNS at the wire level: parse a query, build replies from bytes. No I/O, no dnslib.

:func:`parse_query` reads a query message the way an authoritative server needs it and
never raises for any input of at least 12 bytes: what is wrong with the message is reported
in :attr:`Query.error` (FORMERR or NOTIMP), together with whatever could still be read (the
OPT record, so that an error reply can carry one). The rules:

* opcode other than QUERY: NOTIMP (checked first, as NSD does: a new opcode may give the
  rest of the message another meaning);
* names (RFC 1035 3.1, 4.1.4; 2.3.4): labels of at most 63 octets, names of at most 255
  octets, compression pointers only backwards, to an earlier name, never into the header
  and never in a loop; label types 0x40 and 0x80 are not used: otherwise FORMERR;
* an RCODE in the query, or a first question that cannot be read: FORMERR;
* a question count other than 1: FORMERR with RD cleared too, except for an EDNS probe (no
  question, nothing but one OPT of version 0), which is answered;
* records in the answer section, or in the authority section (except for IXFR, whose query
  carries the client's SOA there), in the additional section anything but one OPT and a
  TSIG record last, an OPT whose owner is not the root written as one zero octet, or whose
  data is not whole options (version 0), or has a COOKIE option of a length other than 8 or
  16 to 40 (RFC 7873 5.2.2), a TSIG record of another class than ANY, a TTL other than 0 or
  data that is not exactly its fields (RFC 8945 4.2), sections that run past the end of the
  message: FORMERR (as NSD, without an OPT: the OPT was not read);
* otherwise, a TSIG record: NOTAUTH (we hold no keys: RFC 8945 5.2.1, BADKEY), with the
  record's fields in :attr:`Query.tsig` for the reply's own TSIG record;
* bytes after the last record are ignored (as NSD does).

A name is kept in its uncompressed wire form, as asked (``b"\\x03www\\x07example\\x00"``):
labels may hold any byte, dots included, and are compared case-insensitively for ASCII only
(RFC 4343) by lower-casing the wire form, which never changes a length byte (all < 0x40).

:func:`scan_simple` reads the common query (one question of class IN, at most a plain OPT,
nothing after it) without building anything, for the answer logic's fast path; everything
else goes through :func:`parse_query`. Building replies is :mod:`.build`'s job.

DNS cookies (RFC 7873) at the wire level: :attr:`Query.cookie` is the COOKIE option's data
(the last one, as NSD takes it); :func:`split_cookie` takes the option out of the common query
(one question, one OPT whose only option is a COOKIE) so that the query without it goes the
fast way (the reply cache, :func:`scan_simple`), and :func:`.build.add_option` puts the reply's
COOKIE option into the reply's OPT afterwards. What the option says is :mod:`.cookies`' job.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import ProtocolError

HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_U16 = struct.Struct("!H")
_TYPE_CLASS = struct.Struct("!HH")
_OPTION = struct.Struct("!HH")

# Header flag bits (RFC 1035 4.1.1, RFC 4035 3.2).
QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010
RCODE_MASK = 0x000F

OPCODE_QUERY = 0

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, NOTAUTH = 0, 1, 2, 3, 4, 5, 9
BADVERS = 16
#: TSIG's own error (RFC 8945 4.2): the key is not known.
TSIG_BADKEY = 17

TYPE_A, TYPE_NS, TYPE_SOA, TYPE_AAAA, TYPE_OPT, TYPE_TSIG = 1, 2, 6, 28, 41, 250
TYPE_IXFR, TYPE_AXFR, TYPE_ANY = 251, 252, 255
CLASS_IN, CLASS_ANY = 1, 255

MAX_NAME = 255
MAX_LABEL = 63
#: The OPT's DO bit, in the TTL field (RFC 3225).
EDNS_DO = 0x8000
#: The COOKIE option (RFC 7873 4): its code, and the lengths of a well-formed one.
OPTION_COOKIE = 10
COOKIE_LENGTHS = frozenset({8, *range(16, 41)})


class FormError(ProtocolError):
    """A DNS message does not follow RFC 1035's format (answered with FORMERR)."""


class Edns(NamedTuple):
    """The fixed fields of a query's OPT record (RFC 6891 6.1.3)."""

    payload: int
    ext_rcode: int
    version: int
    flags: int  # DO and Z
    has_options: bool

    @property
    def do(self) -> bool:
        return bool(self.flags & EDNS_DO)


class Tsig(NamedTuple):
    """What a reply's TSIG record takes from the query's (RFC 8945 4.2): names in wire form,
    lower case; the time signed and fudge as sent (8 octets); the original ID."""

    key: bytes
    algorithm: bytes
    time_fudge: bytes
    original_id: int


class Query:
    """A parsed query: what the answer logic needs, and nothing else.

    ``error`` is 0, FORMERR, NOTIMP or NOTAUTH (a TSIG record, then in ``tsig``); with an
    error, only ``ident``, ``flags``, ``edns`` (when the OPT could still be read) and
    ``tsig`` are meaningful. ``question`` is the question section exactly as sent, ``qname``
    the question's name in wire form as asked. ``cookie`` is the data of the OPT's COOKIE
    option (well-formed: 8 or 16 to 40 bytes), or None.
    ``canonical`` is True when the message is one well-formed query with no bytes after it and
    no EDNS options: then the message less its ID says all that the reply depends on.
    """

    __slots__ = ("canonical", "cookie", "edns", "error", "flags", "ident", "qclass", "qname",
                 "qtype", "question", "tsig")

    def __init__(self, ident: int, flags: int) -> None:
        self.ident = ident
        self.flags = flags
        self.error = 0
        self.question = b""
        self.qname = b""
        self.qtype = 0
        self.qclass = 0
        self.edns: Edns | None = None
        self.cookie: bytes | None = None
        self.tsig: Tsig | None = None
        self.canonical = False

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    def __repr__(self) -> str:
        return (f"<Query id={self.ident} flags={self.flags:#06x} error={self.error} "
                f"{self.qname!r} {self.qtype}/{self.qclass} edns={self.edns}>")


def read_name(wire: bytes, pos: int) -> tuple[bytes, int]:
    """Read the name at ``pos``; return it uncompressed in wire form and the offset after it.

    Raises FormError for a label longer than 63 octets, a name longer than 255, a reserved
    label type, a compression pointer that points into the header, forwards or in a loop,
    or a name that runs past the end of the message.
    """
    out = bytearray()
    end = -1  # where the name ends in the message: after the first pointer, if any
    limit = len(wire)
    # Each pointer must point before the start of the bytes read so far (RFC 1035 4.1.4:
    # "a prior occurrence"); so the targets strictly decrease and a loop cannot happen.
    floor = pos
    while True:
        if pos >= limit:
            raise FormError("name runs past the end of the message")
        length = wire[pos]
        if length == 0:
            out.append(0)
            if len(out) > MAX_NAME:
                raise FormError("name longer than 255 octets")
            return bytes(out), (pos + 1 if end < 0 else end)
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= limit:
                raise FormError("compression pointer runs past the end of the message")
            target = ((length & 0x3F) << 8) | wire[pos + 1]
            if target < 12:
                raise FormError("compression pointer into the header")
            if target >= floor:
                raise FormError("compression pointer forwards or in a loop")
            if end < 0:
                end = pos + 2
            pos = floor = target
            continue
        if kind:
            raise FormError(f"label type {kind:#04x} is not used (RFC 6891 5)")
        if pos + 1 + length > limit:
            raise FormError("label runs past the end of the message")
        out += wire[pos : pos + 1 + length]
        if len(out) >= MAX_NAME:  # with the final zero octet, over 255
            raise FormError("name longer than 255 octets")
        pos += 1 + length


def _skip_record(wire: bytes, pos: int) -> tuple[bytes, int, int, int, int, int]:
    """Read one resource record: (owner, type, class, ttl, rdata offset, offset after it)."""
    owner, pos = read_name(wire, pos)
    if pos + 10 > len(wire):
        raise FormError("record runs past the end of the message")
    rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, pos)
    pos += 10
    if pos + rdlength > len(wire):
        raise FormError("record data runs past the end of the message")
    return owner, rtype, rclass, ttl, pos, pos + rdlength


def parse_query(wire: bytes) -> Query:
    """Parse a query message of at least 12 bytes (see the module docstring). Never raises."""
    ident, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(wire)
    q = Query(ident, flags)
    try:
        end = _read_sections(wire, q, qdcount, ancount, nscount, arcount)
    except FormError:
        end = -1  # malformed; but the OPT, if it was read, still goes into the reply
    if flags & OPCODE_MASK:
        q.error = NOTIMP
        return q
    # As NSD does: one question is read whatever QDCOUNT says; if it cannot be, or the query
    # carries an RCODE, FORMERR (RD kept).
    if flags & RCODE_MASK or not (q.question if qdcount == 1 else _question_reads(wire)):
        q.error = FORMERR
        return q
    if qdcount != 1:
        if (qdcount == 0 and end >= 0 and not ancount and not nscount and arcount == 1
                and q.edns is not None and not q.edns.version):
            # No question but an OPT: an EDNS probe (or a DNS cookie request, RFC 7873
            # 5.4), answered with NOERROR and an OPT.
            return q
        q.flags &= ~RD  # FORMERR with the flags cleared, RD too (as NSD has it)
        q.error = FORMERR
        return q
    # Records in the answer section, or in the authority section except for IXFR (whose
    # query carries the client's SOA there, RFC 1995 3), make a query malformed.
    if end < 0 or ancount or (nscount and q.qtype != TYPE_IXFR):
        q.error = FORMERR
        return q
    if q.tsig is not None:
        # A signed query, and we hold no keys: NOTAUTH with TSIG error BADKEY (RFC 8945
        # 5.2.1), whatever was asked (as NSD answers one).
        q.error = NOTAUTH
        return q
    q.canonical = end == len(wire) and not nscount and (q.edns is None or not q.edns.has_options)
    return q


def scan_simple(wire: bytes) -> tuple[int, int, int, bool] | None:
    """Read the common query fast: opcode QUERY, no RCODE, one question of class IN with an
    uncompressed name, and nothing else but perhaps one OPT of version 0 without options,
    and no byte after it. Returns (offset after the question, qtype, the OPT's payload size
    or -1 without one, DO), or None for any other message (read it with :func:`parse_query`).
    """
    n = len(wire)
    if n < 17 or wire[2] & 0xF8 or wire[3] & 0x0F or wire[4:11] != b"\0\x01\0\0\0\0\0":
        return None
    arcount = wire[11]
    pos = _plain_name_end(wire, n)
    if pos is None:
        return None
    qend = pos + 5
    if pos - 11 > MAX_NAME or qend > n or wire[pos + 3] or wire[pos + 4] != CLASS_IN:
        return None
    qtype = (wire[pos + 1] << 8) | wire[pos + 2]
    if arcount == 0:
        return (qend, qtype, -1, False) if qend == n else None
    # owner (the root), type OPT, payload size, extended RCODE, version 0, flags, no data
    if (arcount != 1 or n != qend + 11 or wire[qend : qend + 3] != b"\0\0\x29" or wire[qend + 6]
            or wire[qend + 9] or wire[qend + 10]):
        return None
    return qend, qtype, (wire[qend + 3] << 8) | wire[qend + 4], bool(wire[qend + 7] & 0x80)


def _question_reads(wire: bytes) -> bool:
    try:
        _, pos = read_name(wire, 12)
    except FormError:
        return False
    return pos + 4 <= len(wire)


def _read_sections(
    wire: bytes, q: Query, qdcount: int, ancount: int, nscount: int, arcount: int
) -> int:
    pos = 12
    for i in range(qdcount):
        start = pos
        name, pos = read_name(wire, pos)
        if pos + 4 > len(wire):
            raise FormError("question runs past the end of the message")
        if i == 0:
            q.qname = name
            q.qtype, q.qclass = _TYPE_CLASS.unpack_from(wire, pos)
            q.question = wire[start : pos + 4]
        pos += 4
    for _ in range(ancount + nscount):
        # Records here make the query malformed (as NSD has it); they are still read so that
        # an OPT in the additional section can be found for the FORMERR reply.
        _, rtype, _, _, _, pos = _skip_record(wire, pos)
    edns: Edns | None = None
    bad = False
    for i in range(arcount):
        # The OPT's owner must be the root written as one zero octet: NSD, too, rejects a
        # compression pointer there, even one to a root name.
        literal_root = pos < len(wire) and wire[pos] == 0
        owner, rtype, rclass, ttl, rdata, pos = _skip_record(wire, pos)
        # Options are only read for version 0: a later version may define them otherwise
        # (and NSD answers BADVERS without reading them either).
        version = (ttl >> 16) & 0xFF
        cookie = -1
        if (rtype == TYPE_OPT and literal_root and edns is None
                and (version or (cookie := _read_options(wire, rdata, pos)) != -2)):
            edns = Edns(rclass, ttl >> 24, (ttl >> 16) & 0xFF, ttl & 0xFFFF, pos > rdata)
            if cookie >= 0:
                q.cookie = wire[cookie + 4 : cookie + 4 + _U16.unpack_from(wire, cookie + 2)[0]]
        elif (rtype == TYPE_TSIG and i == arcount - 1 and rclass == CLASS_ANY and not ttl
                and (tsig := _read_tsig(wire, owner, rdata, pos)) is not None):
            q.tsig = tsig  # the last record, class ANY, TTL 0 (RFC 8945 4.2, 5.2)
        else:
            # A second OPT, an OPT not owned by the root (RFC 6891 6.1.1), a TSIG record
            # out of place or out of shape, or any other record: the query is malformed.
            bad = True
    q.edns = edns
    if bad:
        raise FormError("unexpected record in the additional section")
    return pos


def _read_tsig(wire: bytes, owner: bytes, pos: int, end: int) -> Tsig | None:
    """The TSIG record data from ``pos`` to ``end`` (RFC 8945 4.2): algorithm name, time
    signed (6), fudge (2), MAC size (2) and MAC, original ID (2), error (2), other length (2)
    and other data, filling the data exactly; else None."""
    algorithm, pos = read_name(wire, pos)
    if pos + 10 > end:
        return None
    time_fudge = wire[pos : pos + 8]
    pos += 10 + _U16.unpack_from(wire, pos + 8)[0]
    if pos + 6 > end:
        return None
    original_id = _U16.unpack_from(wire, pos)[0]
    if pos + 6 + _U16.unpack_from(wire, pos + 4)[0] != end:
        return None
    return Tsig(owner.lower(), algorithm.lower(), time_fudge, original_id)


def _read_options(wire: bytes, pos: int, end: int) -> int:
    """Read the OPT's data from ``pos`` to ``end``: -2 unless it is a sequence of whole
    options (RFC 6891 6.1.2) with any COOKIE option well-formed (RFC 7873 5.2.2); else the
    offset of the last COOKIE option, or -1 without one."""
    cookie = -1
    while pos < end:
        if pos + 4 > end:
            return -2
        code, length = _OPTION.unpack_from(wire, pos)
        if code == OPTION_COOKIE:
            if length not in COOKIE_LENGTHS:
                return -2
            cookie = pos
        pos += 4 + length
    return cookie if pos == end else -2


def _plain_name_end(wire: bytes, n: int) -> int | None:
    """The offset of the zero octet that ends the question's name at offset 12, when the
    name has no compression pointer and ends before byte ``n``; else None."""
    pos = 12
    while True:
        length = wire[pos]
        if not length:
            break
        if length > MAX_LABEL:
            return None
        pos += length + 1
        if pos >= n:
            return None
    return pos


def split_cookie(wire: bytes) -> tuple[bytes, bytes, int] | None:
    """For the common query with a DNS cookie (the header of one question and one additional
    record, a question whose name has no compression pointer, then an OPT of version 0
    whose data is exactly one COOKIE option of a well-formed length, and no byte after it):
    the same query without the option (its OPT then has no data), the option's data, and the
    OPT's payload size. None for any other message (:func:`parse_query` finds its cookie).

    Whatever is answered to the query without the option, with the reply's COOKIE option
    added to its OPT, is what the query itself gets (tests/test_dns_cookies.py checks it)."""
    n = len(wire)
    if n < 44 or wire[4:12] != b"\0\x01\0\0\0\0\0\x01":
        return None
    pos = _plain_name_end(wire, n)
    if pos is None:
        return None
    opt = pos + 5  # after the zero octet, the type and the class
    if (opt + 15 > n or wire[opt : opt + 3] != b"\0\0\x29" or wire[opt + 6]
            or wire[opt + 11 : opt + 13] != b"\0\x0a"):
        return None
    rdlength, length = _U16.unpack_from(wire, opt + 9)[0], _U16.unpack_from(wire, opt + 13)[0]
    if opt + 11 + rdlength != n or rdlength != length + 4 or length not in COOKIE_LENGTHS:
        return None
    return wire[: opt + 9] + b"\0\0", wire[opt + 15 :], _U16.unpack_from(wire, opt + 3)[0]
